"""OpenCLIPModule: builds open_clip models from names, configs and checkpoints; trains with InfoNCE."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import open_clip
import pytest
import torch

from lightning_chips.data import TwoDomainDataModule
from lightning_chips.models import OpenCLIPModule
from lightning_chips.models.open_clip_module import cosine_with_warmup


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**{**defaults, **kwargs})


class LossHistory(pl.Callback):
    def __init__(self):
        self.losses, self.lrs, self.scales = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.scales.append(float(pl_module.model.logit_scale.detach().exp()))


def test_fifty_steps_on_builtin_data_lower_the_training_loss(tmp_path, tiny_vit_config):
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=tiny_vit_config, lr=1e-3, warmup_steps=5, weight_decay=0.1)
    data = TwoDomainDataModule(num_train=1600, num_val=64, batch_size=32, seed=0)
    history = LossHistory()
    trainer = _trainer(tmp_path, max_steps=50, callbacks=[history], limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    assert len(history.losses) == 50
    first, last = sum(history.losses[:10]) / 10, sum(history.losses[-10:]) / 10
    assert last < first - 0.3, (first, last)
    # The data followed the model: tokens at the model's context length, images at its size.
    batch = next(iter(data.train_dataloader()))
    assert batch["text"].shape[1] == 16 and batch["image"].shape[-1] == 32


def test_loss_is_open_clips_symmetric_infonce(tiny_vit_config):
    module = OpenCLIPModule(model_config=tiny_vit_config)
    images, tokens = torch.randn(6, 3, 32, 32), torch.randint(1, 400, (6, 16))
    batch = {"image": images, "text": tokens, "id": torch.arange(6)}
    loss, scale = module._shared_step(batch)
    x = module.model.encode_image(images, normalize=True)
    y = module.model.encode_text(tokens, normalize=True)
    logits = scale * x @ y.T
    target = torch.arange(6)
    expected = 0.5 * (
        torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
    )
    torch.testing.assert_close(loss, expected)


def test_schedule_is_linear_warmup_then_cosine(tmp_path, tiny_vit_config):
    module = OpenCLIPModule(model_config=tiny_vit_config, lr=2e-3, warmup_steps=4, min_lr_ratio=0.1)
    data = TwoDomainDataModule(num_train=320, num_val=32, batch_size=32)
    history = LossHistory()
    trainer = _trainer(tmp_path, max_steps=12, callbacks=[history], limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    # lr read after optimizer step t (0-based) and the scheduler step is the value for step t + 1.
    for t, lr in enumerate(history.lrs):
        step = t + 1
        if step < 4:
            expected = 2e-3 * (step + 1) / 4
        else:
            progress = min(1.0, (step - 4) / (12 - 4))
            expected = 2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert lr == pytest.approx(expected, rel=1e-6), t
    assert cosine_with_warmup(10**6, warmup_steps=4, total_steps=float("inf")) == 1.0


def test_logit_scale_is_clamped_after_each_step(tmp_path, tiny_vit_config):
    module = OpenCLIPModule(model_config=tiny_vit_config, lr=0.5, max_logit_scale=20.0)
    with torch.no_grad():
        module.model.logit_scale.fill_(math.log(50.0))
    history = LossHistory()
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[history], limit_val_batches=0)
    trainer.fit(module, datamodule=TwoDomainDataModule(num_train=64, num_val=32, batch_size=16))
    assert max(history.scales) <= 20.0 + 1e-4


def test_no_weight_decay_on_gains_biases_and_scale(tiny_vit_config):
    module = OpenCLIPModule(model_config=tiny_vit_config, weight_decay=0.3)
    optimizer = module.configure_optimizers()["optimizer"]
    no_decay, decay = optimizer.param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.3
    assert "logit_scale" in {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(module.model.parameters()))


def test_registered_model_name_builds_without_network():
    module = OpenCLIPModule(model_name="RN50", pretrained=None)
    assert isinstance(module.model, open_clip.CLIP)
    assert module.context_length == 77 and module.image_size == 224
    assert module.get_tokenizer()(["a cat"]).shape == (1, 77)


def test_custom_text_config(tiny_vit_config):
    module = OpenCLIPModule(model_config={**tiny_vit_config, "custom_text": True})
    assert isinstance(module.model, open_clip.CustomTextCLIP)


def test_pretrained_local_checkpoints_round_trip(tmp_path, tiny_vit_config):
    source = OpenCLIPModule(model_config=tiny_vit_config)
    # An open_clip state dict (as open_clip's training script saves it, under "state_dict" with "module." keys).
    path = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.model.state_dict().items()}}, path)
    loaded = OpenCLIPModule(model_config=tiny_vit_config, pretrained=str(path))
    for (name, a), b in zip(source.model.state_dict().items(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # A Lightning checkpoint of this module.
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(source, datamodule=TwoDomainDataModule(num_train=32, num_val=16, batch_size=16))
    ckpt = tmp_path / "module.ckpt"
    trainer.save_checkpoint(ckpt)
    from_ckpt = OpenCLIPModule(model_config=tiny_vit_config, pretrained=str(ckpt))
    assert torch.equal(from_ckpt.model.visual.proj, source.model.visual.proj)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one model source"),
        ({"model_name": "ViT-B-16", "model_config": {"embed_dim": 1}}, "exactly one model source"),
        ({"model_name": "ViT-B-61"}, "Did you mean"),
        ({"model_name": "RN50", "pretrained": "/no/such/file.pt"}, "not found"),
        ({"model_config": {"embed_dim": 8}}, "lacks"),
        ({"model_config": "TINY", "pretrained": "openai"}, "local checkpoint file"),
        ({"model_name": "RN50", "lr": 0.0}, "`lr`"),
        ({"model_name": "RN50", "betas": (0.9, 1.5)}, "`betas`"),
    ],
)
def test_bad_arguments_say_what_to_change(kwargs, match, tiny_vit_config):
    if kwargs.get("model_config") == "TINY":
        kwargs["model_config"] = tiny_vit_config
    with pytest.raises(ValueError, match=match):
        OpenCLIPModule(**kwargs)
