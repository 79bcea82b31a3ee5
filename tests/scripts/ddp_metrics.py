"""Evaluate ZeroShotAccuracy and RetrievalRecallAtK over a fixed random dataset of NUM_SAMPLES (odd) items with
N CPU processes (gloo) and write rank 0's numbers as JSON.

Lightning replaces the validation sampler with a padding ``DistributedSampler(shuffle=False)``, so with 2 ranks
one sample is seen twice; the metrics get sample ids and must drop the duplicate after the sync.
:func:`single_process_metrics` computes the reference numbers over the same data without Lightning.

Usage: python ddp_metrics.py OUT.json DEVICES
"""

from __future__ import annotations

import json
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_chips.metrics import RetrievalRecallAtK, ZeroShotAccuracy

NUM_SAMPLES = 101
NUM_CLASSES = 10
CAPTIONS = 5
DIM = 16
BATCH_SIZE = 8


def make_data() -> dict[str, torch.Tensor]:
    """Precomputed embeddings: images near their class column, captions near their image; ids non-contiguous."""
    g = torch.Generator().manual_seed(1234)
    classifier = torch.randn(DIM, NUM_CLASSES, generator=g)
    target = torch.multinomial(torch.linspace(1.0, 4.0, NUM_CLASSES), NUM_SAMPLES, replacement=True, generator=g)
    images = 0.5 * F.normalize(classifier, dim=0)[:, target].T + 0.3 * torch.randn(NUM_SAMPLES, DIM, generator=g)
    captions = images[:, None, :] + 0.6 * torch.randn(NUM_SAMPLES, CAPTIONS, DIM, generator=g)
    ids = torch.arange(NUM_SAMPLES) * 3 + 1000
    text_ids = torch.arange(NUM_SAMPLES * CAPTIONS).view(NUM_SAMPLES, CAPTIONS) * 2 + 7
    return {
        "classifier": classifier,
        "image": images,
        "target": target,
        "id": ids,
        "captions": captions,
        "text_ids": text_ids,
    }


class EmbeddingDataset(Dataset):
    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {key: self.data[key][i] for key in ("image", "target", "id", "captions", "text_ids")}


def _metrics(classifier: torch.Tensor) -> dict:
    return {
        "accuracy": ZeroShotAccuracy(classifier, top_k=(1, 5)),
        "plain": ZeroShotAccuracy(classifier, top_k=(1, 5)),  # no ids: counts padded duplicates
        "retrieval": RetrievalRecallAtK(k=(1, 5, 10), chunk_size=16),
        "retrieval_rows": RetrievalRecallAtK(k=(1, 5, 10)),  # no text ids: identical rows de-duplicated
    }


def _update(metrics: dict, batch: dict[str, torch.Tensor]) -> None:
    image, target, ids = batch["image"], batch["target"], batch["id"]
    texts = batch["captions"].reshape(-1, DIM)
    text_image_ids = ids.repeat_interleave(CAPTIONS)
    metrics["accuracy"].update(image, target, ids)
    metrics["plain"].update(image, target)
    metrics["retrieval"].update(image, ids, texts, text_image_ids, batch["text_ids"].reshape(-1))
    metrics["retrieval_rows"].update(image, ids, texts, text_image_ids)


def _floats(result: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: float(value) for key, value in result.items()}


def single_process_metrics() -> dict:
    data = make_data()
    metrics = _metrics(data["classifier"])
    for batch in DataLoader(EmbeddingDataset(data), batch_size=BATCH_SIZE, shuffle=False):
        _update(metrics, batch)
    return {
        "accuracy": _floats(metrics["accuracy"].compute()),
        "retrieval": _floats(metrics["retrieval"].compute()),
        "retrieval_rows": _floats(metrics["retrieval_rows"].compute()),
        "unique_total": float(metrics["plain"].total),
    }


class MetricsModule(pl.LightningModule):
    def __init__(self, classifier: torch.Tensor) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        metrics = _metrics(classifier)
        self.accuracy, self.plain = metrics["accuracy"], metrics["plain"]
        self.retrieval, self.retrieval_rows = metrics["retrieval"], metrics["retrieval_rows"]
        self.seen = 0
        self.results: dict = {}

    def validation_step(self, batch, batch_idx):
        self.seen += len(batch["id"])
        _update(
            {
                "accuracy": self.accuracy,
                "plain": self.plain,
                "retrieval": self.retrieval,
                "retrieval_rows": self.retrieval_rows,
            },
            batch,
        )

    def on_validation_epoch_end(self) -> None:
        seen = self.all_gather(torch.tensor(self.seen))
        with self.plain.sync_context():
            padded_total = float(self.plain.total)
        self.results = {
            "accuracy": _floats(self.accuracy.compute()),
            "retrieval": _floats(self.retrieval.compute()),
            "retrieval_rows": _floats(self.retrieval_rows.compute()),
            "padded_total": padded_total,
            "samples_per_rank": [int(s) for s in seen.flatten().tolist()],
            "sampler": type(self.trainer.val_dataloaders.sampler).__name__,
            "world_size": self.trainer.world_size,
        }


def main() -> None:
    out, devices = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    data = make_data()
    module = MetricsModule(data["classifier"])
    loader = DataLoader(EmbeddingDataset(data), batch_size=BATCH_SIZE, shuffle=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(module, dataloaders=loader, verbose=False)
    if trainer.global_rank == 0:
        with open(out, "w") as f:
            json.dump(module.results, f)


if __name__ == "__main__":
    from tiny import teardown  # the scripts' folder is on sys.path when run as a script

    main()
    teardown()
