"""``OpenCLIPModule``: continual pre-training of an open_clip model with Lightning."""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import pickle
import re
from collections.abc import Callable, Iterator
from copy import deepcopy
from typing import Any, Literal

import open_clip
import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch import LightningModule
from open_clip.loss import ClipLoss, SigLipLoss
from torch import Tensor, nn
from typing_extensions import override

__all__ = ["CHECKPOINT_SAFE_TYPES", "OpenCLIPModule", "check_loss_process_group", "cosine_with_warmup"]

CHECKPOINT_SAFE_TYPES: tuple[type, ...] = (AttributeDict,)
"""The types a local checkpoint may hold besides what ``torch.load(weights_only=True)`` always allows (tensors,
numbers, strings, lists, tuples, dicts, ``OrderedDict``, dtypes, ...): the hyper-parameter container older Lightning
versions saved. A Lightning checkpoint of :class:`OpenCLIPModule` (its ``DataSelectionCallback`` and
``ModelCheckpoint`` states included) needs nothing else."""


def cosine_with_warmup(step: int, *, warmup_steps: int, total_steps: float, min_lr_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio``.

    .. math::

        f(t) = \\frac{t + 1}{T_w} \\ (t < T_w), \\qquad
        f(t) = r + (1 - r) \\tfrac{1}{2} \\big(1 + \\cos(\\pi \\min(1, \\tfrac{t - T_w}{T - T_w}))\\big)

    With an unknown (infinite) ``total_steps`` the rate stays at 1 after warmup.

    Example::

        >>> [round(cosine_with_warmup(t, warmup_steps=2, total_steps=6), 3) for t in range(7)]
        [0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not math.isfinite(total_steps):
        return 1.0
    decay_steps = max(1.0, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class OpenCLIPModule(LightningModule):
    """Continual pre-training (CPT) of an open_clip CLIP with the symmetric InfoNCE loss, or SigLIP's sigmoid loss.

    The model is an open_clip ``CLIP`` or ``CustomTextCLIP``, built from a registered open_clip name
    (``model_name="ViT-B-16"``) or from an inline config dict in open_clip's JSON format (``model_config``).
    Weights come from ``pretrained``: ``None`` (random init, no network), an open_clip tag such as
    ``"laion2b_s34b_b88k"`` (downloaded by open_clip; needs a network), or a local checkpoint path (an open_clip
    state dict, or a Lightning checkpoint of this module). A local checkpoint is read with ``torch.load(...,
    weights_only=True)``: tensors, numbers, strings, containers and the few types a Lightning checkpoint of this
    module holds (:data:`CHECKPOINT_SAFE_TYPES`). Unpickling anything else can run code, so a file holding other
    objects is refused with an error naming their types, unless ``trust_checkpoint=True``.

    The loss is open_clip's ``ClipLoss``

    .. math::

        \\mathcal{L} = \\tfrac{1}{2}\\big[\\mathrm{CE}(s X Y^\\top, I) + \\mathrm{CE}(s Y X^\\top, I)\\big],
        \\qquad s = e^{\\texttt{logit\\_scale}},

    with features gathered across ranks under DDP (every rank sees the global batch as negatives). A model with a
    logit bias (an open_clip config with ``init_logit_bias``, as SigLIP / SigLIP2 have) trains with open_clip's
    ``SigLipLoss`` instead, the sigmoid loss over every image-text pair of the global batch

    .. math::

        \\mathcal{L} = -\\tfrac{1}{B} \\textstyle\\sum_{i, j} \\log \\sigma\\big(z_{ij} (s\\, x_i^\\top y_j + b)\\big),
        \\qquad z_{ij} = 1 \\text{ if } i = j \\text{ else } -1,

    where under DDP each rank sums over its own ``B`` images and the texts of every rank, which ``SigLipLoss``
    passes from rank to rank (``loss_dist_impl``) over the default ``torch.distributed`` process group that
    Lightning's strategy initialises (checked in :meth:`setup`). The mean of the ranks' losses is the loss of the
    global batch, and DDP's gradient averaging then gives the single-process gradient of the global batch (tested:
    2 processes x 8 pairs against one process with 16). The optimiser
    is AdamW without weight decay on gains, biases and the logit scale (as open_clip's training script), with a
    per-step linear warmup and cosine schedule over ``trainer.estimated_stepping_batches``. After each step the
    logit scale is clamped to ``[0, log(max_logit_scale)]``.

    Batches are dicts ``{"image": Tensor[B, 3, H, W], "text": LongTensor[B, L], "id": LongTensor[B]}``.
    Logged: ``train/loss``, ``train/lr``, ``train/logit_scale`` (the scale ``s = 1/tau``), ``val/loss``; for a
    sigmoid-loss model also ``train/logit_bias`` (``b``), and ``train/loss`` is then averaged over the ranks (each
    rank's own loss covers only its images).

    :func:`lightning_chips.adapters.resolve_adapter` finds the CLIP under ``self.model``, so data-selection
    callbacks work with this module out of the box.

    Args:
        model_name: a registered open_clip model name (see ``open_clip.list_models()``), or ``hf-hub:`` /
            ``local-dir:`` identifiers as open_clip accepts them.
        model_config: an inline open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, optional
            ``custom_text``, ...). Exactly one of ``model_name`` and ``model_config`` must be given.
        pretrained: ``None``, an open_clip pretrained tag (with ``model_name`` only), or a local checkpoint path.
        lr: peak learning rate.
        weight_decay: AdamW weight decay on matrices and embeddings.
        betas: AdamW betas (CHIPS / open_clip: ``(0.9, 0.98)``).
        eps: AdamW epsilon (CHIPS / open_clip: ``1e-6``).
        warmup_steps: linear warmup steps.
        min_lr_ratio: final learning rate of the cosine schedule as a fraction of ``lr``.
        local_loss: compute the loss only against the local rank's rows of the gathered logits (open_clip option).
        gather_with_grad: back-propagate through the cross-rank gather (open_clip option). On by default: it
            makes the DDP gradient equal the single-process gradient of the global batch (without it, DDP's
            gradient averaging scales the contrastive gradient by ``1 / world_size``).
        lock_image: freeze the image tower except its projection (LiT-style).
        lock_text: freeze the text tower except its projection.
        max_logit_scale: clamp of ``exp(logit_scale)`` after each step (open_clip: 100).
        loss_dist_impl: (sigmoid-loss models) how ``SigLipLoss`` passes the text features between ranks, open_clip's
            ``dist_impl``: ``"bidir"`` (default: neighbour exchange in both directions), ``"shift"``, ``"reduce"``
            or ``"gather"``; all give the same loss and gradient.
        cache_dir: open_clip download cache for pretrained tags.
        trust_checkpoint: unpickle every object of a local ``pretrained`` checkpoint (``weights_only=False``), for
            a file from a source you trust that holds more than weights (e.g. a custom object in its hyper-parameters).
            Off by default: a downloaded checkpoint could otherwise run code when it is loaded. In YAML
            ``trust_checkpoint: true``; on the command line ``--model.init_args.trust_checkpoint true``.

    Raises:
        ValueError: on an unknown model name, a missing/duplicate model source, a tag with an inline config, a
            missing checkpoint file, an invalid hyper-parameter, or a checkpoint holding objects outside the safe
            types without ``trust_checkpoint=True``.

    Example::

        >>> from lightning_chips.models import OpenCLIPModule
        >>> module = OpenCLIPModule(model_config={
        ...     "embed_dim": 32,
        ...     "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        ...     "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        ... }, lr=1e-3, warmup_steps=10)
        >>> module.get_tokenizer()(["a red circle"]).shape
        torch.Size([1, 16])
    """

    def __init__(
        self,
        model_name: str | None = None,
        model_config: dict[str, Any] | None = None,
        pretrained: str | None = None,
        *,
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        lock_image: bool = False,
        lock_text: bool = False,
        max_logit_scale: float = 100.0,
        loss_dist_impl: Literal["bidir", "shift", "reduce", "gather"] = "bidir",
        cache_dir: str | None = None,
        trust_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(trust_checkpoint, bool):
            raise ValueError(f"`trust_checkpoint` must be True or False, got {trust_checkpoint!r}.")
        if (model_name is None) == (model_config is None):
            raise ValueError(
                "OpenCLIPModule needs exactly one model source: `model_name` (a registered open_clip name such as "
                "'ViT-B-16') or `model_config` (an inline open_clip config dict)."
            )
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr}.")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {betas}.")
        if eps <= 0:
            raise ValueError(f"`eps` must be > 0, got {eps}.")
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}.")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"`min_lr_ratio` must be in [0, 1], got {min_lr_ratio}.")
        if max_logit_scale <= 1.0:
            raise ValueError(f"`max_logit_scale` must be > 1 (it bounds exp(logit_scale)), got {max_logit_scale}.")
        if loss_dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"`loss_dist_impl` must be bidir, shift, reduce or gather, got {loss_dist_impl!r}.")
        self.save_hyperparameters(ignore=["trust_checkpoint"])  # a decision about a file here, not the model's config

        self.model: nn.Module = _build_model(model_name, model_config, pretrained, cache_dir, trust_checkpoint)
        if lock_image:
            _freeze_tower_except_projection(self.model, "image")
        if lock_text:
            _freeze_tower_except_projection(self.model, "text")
        self.loss: nn.Module
        if self.sigmoid_loss:
            self.loss = SigLipLoss(dist_impl=loss_dist_impl)
        else:
            self.loss = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True)
        self._tokenizer: Callable[[list[str]], Tensor] | None = None

    # -- model access ----------------------------------------------------------------------------------------------
    @property
    def sigmoid_loss(self) -> bool:
        """Whether the model trains with SigLIP's sigmoid loss: it has a logit bias (``init_logit_bias``)."""
        return getattr(self.model, "logit_bias", None) is not None

    @property
    def context_length(self) -> int:
        """Number of text tokens the model expects."""
        return int(self.model.context_length)

    @property
    def image_size(self) -> int:
        """Input image side length of the model's image tower."""
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    def get_tokenizer(self) -> Callable[[list[str]], Tensor]:
        """The tokenizer that matches the model (open_clip's, with the model's context length): for a registered
        name, the one ``open_clip.get_tokenizer`` gives; for an inline config, a Hugging Face tokenizer when its
        ``text_cfg`` names one (``hf_tokenizer_name``, loaded by ``transformers``: cached or downloaded), else
        open_clip's BPE tokenizer, with the config's ``tokenizer_kwargs``."""
        if self._tokenizer is None:
            if self.hparams.model_name is not None:
                self._tokenizer = open_clip.get_tokenizer(self.hparams.model_name, context_length=self.context_length,
                                                          cache_dir=self.hparams.cache_dir)  # fmt: skip
            else:
                text_cfg = self.hparams.model_config.get("text_cfg", {})
                kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
                if text_cfg.get("hf_tokenizer_name"):
                    self._tokenizer = open_clip.tokenizer.HFTokenizer(
                        text_cfg["hf_tokenizer_name"], context_length=self.context_length,
                        cache_dir=self.hparams.cache_dir, tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs,
                    )  # fmt: skip
                else:
                    self._tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length, **kwargs)
        return self._tokenizer

    @override
    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised image and text embeddings and the logit scale ``exp(logit_scale)``."""
        out = self.model(images, tokens)
        if isinstance(out, dict):
            return out["image_features"], out["text_features"], out["logit_scale"]
        return out[0], out[1], out[2]

    # -- Lightning hooks -------------------------------------------------------------------------------------------
    @override
    def setup(self, stage: str) -> None:
        self.loss.rank = self.global_rank
        self.loss.world_size = self.trainer.world_size if self._trainer is not None else 1
        if self.loss.world_size > 1:
            check_loss_process_group(self.trainer)

    def _shared_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if not isinstance(batch, dict) or "image" not in batch or "text" not in batch:
            raise TypeError(
                "OpenCLIPModule expects batches that are dicts with 'image' (float tensor) and 'text' (token ids), "
                f"got {type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else "")
            )
        image_features, text_features, logit_scale = self(batch["image"], batch["text"])
        if self.sigmoid_loss:
            return self.loss(image_features, text_features, logit_scale, self.model.logit_bias), logit_scale
        return self.loss(image_features, text_features, logit_scale), logit_scale

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, logit_scale = self._shared_step(batch)
        batch_size = batch["image"].shape[0]
        # a rank's sigmoid loss covers its own images only: the mean over the ranks is the global batch's
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=self.sigmoid_loss)
        self.log("train/logit_scale", logit_scale.detach(), batch_size=batch_size)
        if self.sigmoid_loss:
            self.log("train/logit_bias", self.model.logit_bias.detach().reshape(()), batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=True, batch_size=batch_size)
        return loss

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        loss, _ = self._shared_step(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["image"].shape[0])
        return loss

    @override
    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        loss, _ = self._shared_step(batch)
        self.log("test/loss", loss, sync_dist=True, batch_size=batch["image"].shape[0])
        return loss

    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, math.log(self.hparams.max_logit_scale))

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            excluded = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            # ("bias" covers SigLIP's logit_bias)
            (no_decay if excluded else decay).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": no_decay, "weight_decay": 0.0},
                {"params": decay, "weight_decay": self.hparams.weight_decay},
            ],
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            eps=self.hparams.eps,
        )
        total = float(self.trainer.estimated_stepping_batches) if self._trainer is not None else math.inf
        warmup, min_ratio = self.hparams.warmup_steps, self.hparams.min_lr_ratio

        def schedule(step: int) -> float:
            return cosine_with_warmup(step, warmup_steps=warmup, total_steps=total, min_lr_ratio=min_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def check_loss_process_group(trainer: Any) -> None:
    """open_clip's ``ClipLoss`` and ``SigLipLoss`` exchange features over the default ``torch.distributed`` process
    group with global ranks; the strategy's group must be that one (Lightning's DDP strategies initialise it), or a
    rank would gather from or send to the wrong processes. Raises ``RuntimeError`` when it is not."""
    import torch.distributed as dist

    world, rank = trainer.world_size, trainer.global_rank
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"The contrastive loss exchanges features between the {world} ranks through torch.distributed, but no "
            "process group is initialised: use a torch.distributed strategy (ddp, ddp_spawn, fsdp, deepspeed)."
        )
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(
            f"The default torch.distributed group has rank {dist.get_rank()} of {dist.get_world_size()}, but the "
            f"trainer has rank {rank} of {world}; the loss exchanges features over the default group."
        )
    group = getattr(trainer.strategy, "_ddp_kwargs", {}).get("process_group")
    if group is not None and group is not dist.group.WORLD:
        raise RuntimeError(
            "The strategy's DistributedDataParallel has its own `process_group`, but the loss exchanges features over "
            "the default group: leave `process_group` unset."
        )


def _build_model(
    model_name: str | None,
    model_config: dict[str, Any] | None,
    pretrained: str | None,
    cache_dir: str | None,
    trust_checkpoint: bool = False,
) -> nn.Module:
    trusted = {"weights_only": False} if trust_checkpoint else {}  # open_clip loads with weights_only=True otherwise
    if model_name is not None:
        schema, _ = open_clip.factory.parse_model_name(model_name)
        if schema is None and model_name.replace("/", "-") not in open_clip.list_models():
            close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5)
            raise ValueError(
                f"Unknown open_clip model_name {model_name!r}. "
                + (f"Did you mean one of {close}? " if close else "")
                + "See open_clip.list_models(), or pass an inline `model_config`."
            )
        if pretrained is not None and _looks_like_path(pretrained) and not os.path.isfile(pretrained):
            raise ValueError(f"`pretrained` checkpoint file not found: {pretrained!r}.")
        local = pretrained is not None and os.path.isfile(pretrained)
        weights = _lightning_weights(pretrained, trust_checkpoint) if local else None
        if weights is not None:
            model = open_clip.create_model(model_name, pretrained=None, cache_dir=cache_dir)
            model.load_state_dict(weights, strict=True)
            return model
        with _refusing_unsafe(pretrained if local else None):
            return open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir,
                                          **(trusted if local else {}))  # fmt: skip

    config = deepcopy(dict(model_config))
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        raise ValueError(f"`model_config` lacks {missing}; an open_clip config has embed_dim, vision_cfg, text_cfg.")
    custom_text = bool(config.pop("custom_text", False)) or "hf_model_name" in config["text_cfg"]
    if "multimodal_cfg" in config:
        raise ValueError("CoCa configs (with `multimodal_cfg`) are not supported by OpenCLIPModule.")
    model = (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**config)
    if pretrained is not None:
        if not os.path.isfile(pretrained):
            raise ValueError(
                f"With an inline `model_config`, `pretrained` must be a local checkpoint file; {pretrained!r} is not "
                "one. Pretrained tags need a registered `model_name`."
            )
        weights = _lightning_weights(pretrained, trust_checkpoint)
        if weights is not None:
            model.load_state_dict(weights, strict=True)
        else:
            with _refusing_unsafe(pretrained):
                open_clip.load_checkpoint(model, pretrained, **trusted)
    return model


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz"))


def _allowing(types: list[type]) -> contextlib.AbstractContextManager:
    """``torch.serialization.safe_globals(types)`` (torch >= 2.5); on torch 2.4, which lacks it, the types are added
    to the process-wide allowlist."""
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is not None:
        return scoped(types)
    torch.serialization.add_safe_globals(types)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _refusing_unsafe(path: str | None) -> Iterator[None]:
    """Turn ``torch.load``'s refusal of an object outside the safe types (``weights_only=True``) into a
    ``ValueError`` that names the file, the refused types and the opt-in."""
    try:
        yield
    except pickle.UnpicklingError as exc:
        if path is None:
            raise
        try:
            refused = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # an older torch, or a file it cannot list: take the names from the message
            refused = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(exc))))
        raise ValueError(
            f"Checkpoint {path!r} holds objects of types that loading with weights_only=True does not allow "
            f"({', '.join(refused) or 'see the cause below'}); unpickling them can run code. If you trust the file, "
            "pass `trust_checkpoint=True` to OpenCLIPModule (YAML `trust_checkpoint: true`, command line "
            "`--model.init_args.trust_checkpoint true`)."
        ) from exc


def _lightning_weights(path: str, trust_checkpoint: bool = False) -> dict[str, Tensor] | None:
    """The CLIP weights of a Lightning checkpoint of this module (``model.*`` keys), or None for other files.

    Read with ``weights_only=True`` and :data:`CHECKPOINT_SAFE_TYPES` (anything else is a ``ValueError`` naming the
    refused types), or unpickled in full with ``trust_checkpoint``."""
    if not path.endswith(".ckpt"):
        return None
    if trust_checkpoint:
        state = torch.load(path, map_location="cpu", weights_only=False)
    else:
        with _refusing_unsafe(path), _allowing(list(CHECKPOINT_SAFE_TYPES)):
            state = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(state, dict) and "state_dict" in state and "pytorch-lightning_version" in state):
        return None
    prefix = "model."
    weights = {key[len(prefix) :]: value for key, value in state["state_dict"].items() if key.startswith(prefix)}
    if not weights:
        raise ValueError(
            f"Lightning checkpoint {path!r} holds no `model.*` weights; is it an OpenCLIPModule checkpoint?"
        )
    return weights


def _freeze_tower_except_projection(model: nn.Module, tower: str) -> None:
    from lightning_chips.adapters import OpenCLIPAdapter

    endpoint = OpenCLIPAdapter(model).endpoint()
    keep = {id(t) for t in endpoint.tensors()}
    # `image_proj` may be a transposed view of an nn.Linear weight: keep its base parameter too.
    keep |= {id(t._base) for t in endpoint.tensors() if t._base is not None}
    towers = {"image": [model.visual]}
    towers["text"] = (
        [model.text]
        if isinstance(model, open_clip.CustomTextCLIP)
        else [model.transformer, model.token_embedding, model.ln_final]
    )
    for module in towers[tower]:
        for param in module.parameters():
            if id(param) not in keep:
                param.requires_grad_(False)
    if tower == "text" and isinstance(model, open_clip.CLIP):
        model.positional_embedding.requires_grad_(False)
