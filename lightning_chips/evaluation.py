"""``ZeroShotEvaluation``: zero-shot classification and retrieval of any supported CLIP during training."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from typing_extensions import override

from lightning_chips.adapters import CLIPAdapter, resolve_adapter
from lightning_chips.data.builtin import CLASSNAMES, TEMPLATES, TwoDomainPairs
from lightning_chips.data.preprocess import model_image_input, resolve_tokenizer
from lightning_chips.data.subset import PairCollate
from lightning_chips.ids import id_keys
from lightning_chips.metrics import RetrievalRecallAtK, ZeroShotAccuracy, build_zero_shot_classifier

__all__ = ["BuiltinZeroShotTask", "RetrievalTask", "ZeroShotEvaluation", "ZeroShotTask"]


class ZeroShotTask:
    """A zero-shot classification set: items ``{"image", "label", "id"}``, class names and prompt templates.

    Args:
        dataset: map-style dataset of labelled images.
        classnames: class names, indexed by ``label``.
        templates: prompt templates (``"a photo of a {}."``).
    """

    def __init__(self, dataset: Dataset, classnames: Sequence[str], templates: Sequence[str]) -> None:
        if len(dataset) == 0:
            raise ValueError("A ZeroShotTask needs a non-empty dataset.")
        if not classnames or not templates:
            raise ValueError("A ZeroShotTask needs class names and at least one prompt template.")
        self.dataset, self.classnames, self.templates = dataset, list(classnames), list(templates)


class BuiltinZeroShotTask(ZeroShotTask):
    """Zero-shot classification on one domain of the built-in data (test split by default).

    Args:
        domain: ``"general"`` or ``"target"``.
        num_samples: images in the set.
        image_size: image side.
        split: ``"test"`` (default) or ``"val"``.
        seed: data seed.
    """

    def __init__(
        self, domain: str = "target", num_samples: int = 1000, image_size: int = 32, split: str = "test", seed: int = 0
    ) -> None:
        if domain not in CLASSNAMES:
            raise ValueError(f"`domain` must be one of {sorted(CLASSNAMES)}, got {domain!r}.")
        dataset = TwoDomainPairs(
            num_samples, target_fraction=1.0 if domain == "target" else 0.0, image_size=image_size, split=split,
            seed=seed,
        )  # fmt: skip
        super().__init__(dataset, CLASSNAMES[domain], TEMPLATES[domain])


class RetrievalTask:
    """An image-caption retrieval set: items ``{"image", "text", "id"}`` (one caption per item; items sharing an
    id are several captions of one image).

    Args:
        dataset: map-style dataset of image-caption pairs.
    """

    def __init__(self, dataset: Dataset) -> None:
        if len(dataset) == 0:
            raise ValueError("A RetrievalTask needs a non-empty dataset.")
        self.dataset = dataset


class ZeroShotEvaluation(Callback):
    """Evaluate zero-shot classification and retrieval on named sets at the end of validation epochs.

    Logs ``zeroshot/{name}/acc1``, ``acc5``, ``mean_per_class_recall`` (classification) and
    ``zeroshot/{name}/image_retrieval_recall@k`` / ``text_retrieval_recall@k`` (retrieval), plus for each group
    (default: ``avg`` over all sets) the mean of its classification ``acc1`` and of its retrieval recalls, like
    CHIPS's "medical avg" and "general avg". Under DDP every rank evaluates a contiguous shard and the metrics
    sync (results are de-duplicated by id, so they equal the single-process numbers).

    Args:
        tasks: named :class:`ZeroShotTask` / :class:`RetrievalTask` sets.
        groups: group name -> task names to average (default ``{"avg": all}``).
        every_n_epochs: evaluate every this many validation epochs.
        batch_size: evaluation batch size.
        num_workers: dataloader workers.
        normalize: ``"clip"`` normalises images in [0, 1] with open_clip's mean/std; ``"none"`` leaves them.
        tokenizer: open_clip model name whose tokenizer to use (default: the model's ``get_tokenizer()``).
        retrieval_k: recall cut-offs.
        adapter: an explicit adapter for a model :func:`resolve_adapter` does not know.

    Example::

        >>> evaluation = ZeroShotEvaluation({"target": BuiltinZeroShotTask("target", 500),
        ...                                  "general": BuiltinZeroShotTask("general", 500)})
    """

    def __init__(
        self,
        tasks: dict[str, ZeroShotTask | RetrievalTask],
        *,
        groups: dict[str, list[str]] | None = None,
        every_n_epochs: int = 1,
        batch_size: int = 256,
        num_workers: int = 0,
        normalize: str = "clip",
        tokenizer: str | Callable[[list[str]], Tensor] | None = None,
        retrieval_k: Sequence[int] = (1, 5, 10),
        adapter: CLIPAdapter | None = None,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("ZeroShotEvaluation needs at least one task.")
        for name, task in tasks.items():
            if not isinstance(task, ZeroShotTask | RetrievalTask):
                raise ValueError(f"Task {name!r} must be a ZeroShotTask or a RetrievalTask, got {type(task).__name__}.")
        groups = {"avg": list(tasks)} if groups is None else groups
        for group, members in groups.items():
            unknown = set(members) - set(tasks)
            if unknown:
                raise ValueError(f"Group {group!r} names unknown tasks {sorted(unknown)}; known: {sorted(tasks)}.")
        if every_n_epochs < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError("`every_n_epochs` and `batch_size` must be >= 1 and `num_workers` >= 0.")
        if normalize not in ("clip", "none"):
            raise ValueError(f"`normalize` must be 'clip' or 'none', got {normalize!r}.")
        self.tasks, self.groups = tasks, groups
        self.every_n_epochs, self.batch_size, self.num_workers = every_n_epochs, batch_size, num_workers
        self.normalize, self.tokenizer_name = normalize, tokenizer
        self.retrieval_k = tuple(retrieval_k)
        self.adapter = adapter
        self.last: dict[str, float] = {}

    def _loader(self, dataset: Dataset, rank: int, world: int, collate: PairCollate) -> tuple[DataLoader, int]:
        """This rank's contiguous shard of ``dataset`` and the dataset index it starts at."""
        shard = np.array_split(np.arange(len(dataset)), world)[rank].tolist()
        loader = DataLoader(Subset(dataset, shard), batch_size=self.batch_size, collate_fn=collate,
                            num_workers=self.num_workers)  # fmt: skip
        return loader, (shard[0] if shard else 0)

    @torch.no_grad()
    def evaluate(self, pl_module: LightningModule, rank: int = 0, world: int = 1) -> dict[str, float]:
        """Run every task with the module's current weights; returns the flat metric dict (all ranks)."""
        adapter = resolve_adapter(pl_module, self.adapter)
        tokenizer = resolve_tokenizer(self.tokenizer_name, None, pl_module)
        collate = PairCollate(tokenizer, model_image_input(pl_module, normalize=self.normalize == "clip"))
        device = next(adapter.module.parameters()).device
        module = adapter.module
        was_training = module.training
        module.eval()
        results: dict[str, float] = {}
        try:
            for name, task in self.tasks.items():
                loader, position = self._loader(task.dataset, rank, world, collate)
                if isinstance(task, ZeroShotTask):
                    classifier = build_zero_shot_classifier(adapter, tokenizer, task.classnames, task.templates)
                    metric = ZeroShotAccuracy(classifier).to(device)
                    for batch in loader:
                        images = adapter.encode_image(batch["image"].to(device))
                        metric.update(images, batch["label"].to(device), ids=_id_tensor(batch["id"]).to(device))
                else:
                    metric = RetrievalRecallAtK(self.retrieval_k).to(device)
                    for batch in loader:
                        ids = _id_tensor(batch["id"]).to(device)
                        images = adapter.encode_image(batch["image"].to(device))
                        texts = adapter.encode_text(batch["text"].to(device))
                        # images are identified by their id, captions by their dataset index
                        text_ids = torch.arange(position, position + len(ids), device=device)
                        position += len(ids)
                        metric.update(images, ids, texts, ids, text_ids=text_ids)
                for key, value in metric.compute().items():
                    results[f"zeroshot/{name}/{key}"] = float(value)
        finally:
            module.train(was_training)
        for group, members in self.groups.items():
            for key in ("acc1", *(f"{d}_retrieval_recall@{k}" for k in self.retrieval_k for d in ("image", "text"))):
                values = [results[f"zeroshot/{m}/{key}"] for m in members if f"zeroshot/{m}/{key}" in results]
                if values:
                    results[f"zeroshot/{group}/{key}"] = float(np.mean(values))
        return results

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        results = self.evaluate(pl_module, trainer.global_rank, trainer.world_size)
        self.last = results
        for key, value in results.items():
            pl_module.log(key, value, rank_zero_only=True)
        shown = {k: v for k, v in results.items() if k.endswith("/acc1") or k.endswith("recall@1")}
        rank_zero_info("[lightning-chips] zero-shot: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items())))


def _id_tensor(ids: Any) -> Tensor:
    """A batch's ids as an int64 tensor of keys (string ids: :func:`lightning_chips.ids.id_keys`)."""
    return torch.from_numpy(id_keys(ids)) if isinstance(ids, list | tuple) else torch.as_tensor(ids)
