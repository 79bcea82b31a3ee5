"""SigLIP training: a model with a logit bias trains with the sigmoid loss (OpenCLIPModule, TwoTowerCLIP), the bias
is logged and returned by the end point, and under DDP the loss sees the other ranks' texts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from open_clip.loss import ClipLoss, SigLipLoss
from torch.utils.data import DataLoader, Dataset

from lightning_chips import OpenCLIPModule, TwoDomainPairs
from lightning_chips.data import PairCollate, clip_normalize
from lightning_chips.models import TwoTowerCLIP
from lightning_chips.models.open_clip_module import check_loss_process_group

from .conftest import TINY_VIT

SIGLIP_VIT = {**TINY_VIT, "init_logit_bias": -10.0, "init_logit_scale": math.log(10.0)}
SCRIPT = Path(__file__).parent / "scripts" / "ddp_siglip_step.py"


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.biases: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.biases.append(float(trainer.callback_metrics["train/logit_bias"]))


def _fit(module: pl.LightningModule, loader: DataLoader, steps: int) -> Losses:
    record = Losses()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[record])  # fmt: skip
    trainer.fit(module, loader)
    return record


class Repeat(Dataset):
    """The same ``n`` pairs, ``times`` times over (one fixed batch per step)."""

    def __init__(self, data: Dataset, times: int) -> None:
        self.data, self.times = data, times

    def __len__(self) -> int:
        return len(self.data) * self.times

    def __getitem__(self, i: int):
        return self.data[i % len(self.data)]


def test_a_siglip_shaped_open_clip_model_trains_with_the_sigmoid_loss_and_logs_its_bias():
    module = OpenCLIPModule(model_config=SIGLIP_VIT, lr=1e-3, weight_decay=0.0)
    assert module.sigmoid_loss and isinstance(module.loss, SigLipLoss)
    assert not OpenCLIPModule(model_config=TINY_VIT).sigmoid_loss  # InfoNCE models keep ClipLoss
    assert isinstance(OpenCLIPModule(model_config=TINY_VIT).loss, ClipLoss)
    pairs = Repeat(TwoDomainPairs(16, target_fraction=0.5), 8)
    loader = DataLoader(pairs, batch_size=16, collate_fn=PairCollate(module.get_tokenizer(), clip_normalize()))
    record = _fit(module, loader, 8)
    print("siglip open_clip losses", [round(v, 4) for v in record.losses], "bias", record.biases[-1])
    assert len(record.losses) == 8 and all(math.isfinite(v) for v in record.losses)
    assert record.losses[-1] < record.losses[0] - 0.5
    assert record.biases[0] == pytest.approx(-10.0, abs=1e-2) and record.biases[-1] != record.biases[0]
    assert module.model.logit_bias.item() == pytest.approx(record.biases[-1], abs=5e-3)  # logged before each step


def test_two_tower_sigmoid_loss_trains_and_its_end_point_has_the_bias():
    torch.manual_seed(0)
    n, d_v, d_t = 32, 12, 10
    image, text = torch.randn(n, d_v), torch.randn(n, d_t)
    pairs = [{"image": image[i], "text": text[i], "id": i} for i in range(n)]
    model = TwoTowerCLIP(image_tower=None, text_tower=None, image_dim=d_v, text_dim=d_t, embed_dim=6, loss="sigmoid",
                         lr=0.05)  # fmt: skip
    ep = model.endpoint()
    assert ep.loss == "sigmoid" and float(ep.logit_bias) == -10.0 and ep.logit_bias.requires_grad
    assert float(ep.scale()) == pytest.approx(10.0)  # SigLIP's initial scale
    assert isinstance(model.loss, SigLipLoss)
    record = _fit(model, DataLoader(Repeat(pairs, 20), batch_size=n, collate_fn=PairCollate()), 20)
    print("two-tower sigmoid losses", [round(v, 3) for v in record.losses[::4]], "bias", record.biases[-1])
    assert record.losses[-1] < 0.8 * record.losses[0]
    assert model.endpoint().logit_bias is model.logit_bias and float(model.logit_bias) != -10.0
    infonce = TwoTowerCLIP(image_tower=None, text_tower=None, image_dim=d_v, text_dim=d_t)
    assert infonce.endpoint().logit_bias is None and infonce.endpoint().loss == "infonce"
    with pytest.raises(ValueError, match="`loss` must be 'infonce' or 'sigmoid'"):
        TwoTowerCLIP(image_tower=None, text_tower=None, image_dim=d_v, text_dim=d_t, loss="softmax")


def test_a_multi_rank_loss_without_the_default_process_group_is_an_error():
    trainer = SimpleNamespace(world_size=2, global_rank=0, strategy=SimpleNamespace())
    with pytest.raises(RuntimeError, match="no process group is initialised"):
        check_loss_process_group(trainer)


def _step(tmp_path: Path, devices: int, exchange: bool) -> tuple[list[dict], torch.Tensor]:
    out = tmp_path / f"siglip{devices}_{int(exchange)}"
    result = subprocess.run([sys.executable, str(SCRIPT), str(out), str(devices), str(int(exchange))],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(devices)]
    return ranks, torch.load(f"{out}.pt")


@pytest.mark.ddp
def test_ddp_sigmoid_loss_and_gradient_are_the_single_process_ones_of_the_global_batch(tmp_path):
    """One SGD step on 2 ranks x 8 pairs against one process on the 16 pairs.

    What is compared: SigLIP's loss over the global batch is ``-(1/16) sum_{i,j} log sigmoid(...)`` over all 16 x 16
    pairs; rank r's ``SigLipLoss`` is its 8 images against all 16 texts divided by 8, so the *sum* of the two rank
    losses is twice the global loss and their *mean* (the logged ``train/loss``, averaged over the ranks) is the
    global loss. DDP averages the ranks' gradients, i.e. the gradient of that mean: the weights after the step equal
    the single-process ones. Without the exchange (each rank's texts only) they measurably do not.
    """
    (single,), single_weights = _step(tmp_path, 1, True)
    ddp, ddp_weights = _step(tmp_path, 2, True)
    assert single["loss_type"] == ddp[0]["loss_type"] == "SigLipLoss" and ddp[0]["world_size"] == 2
    mean = (ddp[0]["loss"] + ddp[1]["loss"]) / 2
    print("single", single["loss"], "ranks", ddp[0]["loss"], ddp[1]["loss"], "mean", mean,
          "max weight difference", float((ddp_weights - single_weights).abs().max()))  # fmt: skip
    assert mean == pytest.approx(single["loss"], abs=1e-5)
    assert ddp[0]["loss"] + ddp[1]["loss"] == pytest.approx(2 * single["loss"], abs=2e-5)  # not the sum
    assert abs(ddp[0]["loss"] - ddp[1]["loss"]) > 1e-3  # each rank's own loss is not the global one
    assert ddp[0]["logged"] == ddp[1]["logged"] == pytest.approx(single["loss"], abs=1e-5)
    torch.testing.assert_close(ddp_weights, single_weights, rtol=0, atol=1e-6)
    _, alone = _step(tmp_path, 2, False)
    assert (alone - single_weights).abs().max() > 100 * (ddp_weights - single_weights).abs().max() + 1e-5
