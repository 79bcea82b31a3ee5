"""How lightning-chips reaches the features and end-point parameters of a CLIP.

One module: every adapter that follows an open_clip tower's own forward up to its end point (ViT, ModifiedResNet,
timm and Hugging Face towers, open_clip's text transformer) and the resolution that picks one; the protocol for
custom modules and the adapter base live in :mod:`lightning_chips.adapter_base` (importable from here too), the
``transformers`` CLIPs in :mod:`lightning_chips.transformers_adapters`.

Every scorer in this package works in CLIP's *end-point subspace*: the last linear map of each tower before the
normalisation (weight and bias), the logit scale, and SigLIP's logit bias (docs/methods.md, CHIPS). With
pre-projection features ``h_v`` and ``h_t`` (the inputs of those two linear maps), the model's embeddings are

.. math::

    x = \\mathrm{normalize}(W_v^\\top h_v + b_v), \\qquad y = \\mathrm{normalize}(W_t^\\top h_t + b_t),
    \\qquad S_{ij} = e^{\\texttt{logit\\_scale}} \\, x_i \\cdot y_j \\; [+ \\texttt{logit\\_bias}].

An *adapter* gives uniform access to ``h_v``, ``h_t`` and the live parameters (:class:`EndPoint`).
:func:`resolve_adapter` finds one for

1. an object that already is a :class:`CLIPAdapter`;
2. any module implementing the :class:`SupportsEndPoint` protocol (``image_features``, ``text_features``,
   ``endpoint``) -- the way to plug in a custom LightningModule;
3. an open_clip ``CLIP`` or ``CustomTextCLIP`` (:class:`OpenCLIPAdapter`) or a ``transformers`` ``CLIPModel``
   (:class:`lightning_chips.transformers_adapters.TransformersCLIPAdapter`), given directly, held under ``model``
   or ``clip``, or held as the one direct child module of such a type.

Anything else raises :class:`UnsupportedModelError`, which names the protocol to implement (and, for a known
family without a linear end point such as SigLIP's attention-pool image head, says why).

Example::

    >>> import open_clip, torch
    >>> from lightning_chips.adapters import resolve_adapter
    >>> model = open_clip.create_model("RN50")  # doctest: +SKIP
    >>> adapter = resolve_adapter(model)  # doctest: +SKIP
    >>> h_v = adapter.image_features(torch.randn(2, 3, 224, 224))  # doctest: +SKIP
    >>> ep = adapter.endpoint()  # doctest: +SKIP
    >>> torch.allclose(ep.embed_image(h_v), model.encode_image(images, normalize=True), atol=1e-5)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_chips.adapter_base import (
    PROTOCOL_HINT,
    CLIPAdapter,
    ProtocolAdapter,
    ResidualTail,
    SupportsEndPoint,
    UnsupportedModelError,
    unsupported_message,
)
from lightning_chips.endpoint import EndPoint

__all__ = [
    "CLIPAdapter",
    "EndPoint",
    "OpenCLIPAdapter",
    "PROTOCOL_HINT",
    "ProtocolAdapter",
    "ResidualTail",
    "SupportsEndPoint",
    "UnsupportedModelError",
    "resolve_adapter",
]


@dataclass(frozen=True)
class _LinearTail:
    """A head split at its last linear map: ``head(x) == linear(features(x))``, exactly."""

    steps: tuple[Callable[[Tensor], Tensor], ...]
    linear: nn.Linear

    def features(self, x: Tensor) -> Tensor:
        for step in self.steps:
            x = step(x)
        return x


def _is_noop(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and module.p == 0)


def _split_at_last_linear(head: nn.Module) -> _LinearTail | None:
    """``head`` as the steps before its last linear map and that map, or None when it does not end in one.

    Knows ``nn.Linear``; ``nn.Sequential`` (recursively, ignoring trailing identities and zero-rate dropouts) as
    in open_clip's MLP heads; timm's ``Mlp`` (``fc1, act, drop1, norm, fc2``, with ``drop2`` a no-op); and timm's
    attention pools, whose output projection is applied before a token or mean pooling (both linear, so the
    projection of the pooled input is the same, and ``pool(x, pre_logits=True)`` gives that input).
    """
    if isinstance(head, nn.Linear):
        return _LinearTail((), head)
    if isinstance(head, nn.Sequential):
        children = list(head)
        while children and _is_noop(children[-1]):
            children.pop()
        tail = _split_at_last_linear(children[-1]) if children else None
        return None if tail is None else _LinearTail((*children[:-1], *tail.steps), tail.linear)
    layers = sys.modules.get("timm.layers")  # a timm module can only be here once timm is imported
    if layers is None:
        return None
    if type(head) is getattr(layers, "Mlp", None) and _is_noop(head.drop2) and isinstance(head.fc2, nn.Linear):
        return _LinearTail((head.fc1, head.act, head.drop1, head.norm), head.fc2)
    pools = tuple(getattr(layers, name) for name in ("AttentionPool2d", "RotAttentionPool2d") if hasattr(layers, name))
    if type(head) in pools and isinstance(head.proj, nn.Linear):
        return _LinearTail((functools.partial(head, pre_logits=True),), head.proj)
    return None


def _timm_pre_logits(trunk: nn.Module, images: Tensor) -> Tensor:
    """A timm model's input to its classifier (``forward_head(..., pre_logits=True)``)."""
    return trunk.forward_head(trunk.forward_features(images), pre_logits=True)


def _timm_image_tail(visual: nn.Module) -> _LinearTail | ResidualTail:
    """open_clip ``TimmModel``: the end point is the head's last linear map (``timm_proj`` linear or mlp, or a
    custom attention pool's projection), or, with no head (``timm_proj`` empty), the trunk's own classifier."""
    trunk = visual.trunk
    if len(visual.head) > 0:
        tail = _split_at_last_linear(visual.head)
        if tail is None:
            raise UnsupportedModelError(
                f"open_clip timm image tower head {visual.head} does not end in a linear map, so it has no end "
                "point. " + PROTOCOL_HINT
            )
        return _LinearTail((trunk, *tail.steps), tail.linear)
    classifier = trunk.get_classifier() if hasattr(trunk, "get_classifier") else None
    if isinstance(classifier, nn.Linear):  # timm's contract: forward_head(pre_logits=True) is its input
        return _LinearTail((functools.partial(_timm_pre_logits, trunk),), classifier)
    attn_pool = getattr(trunk, "attn_pool", None)
    mlp = getattr(attn_pool, "mlp", None)
    if mlp is not None:  # SigLIP (timm_pool 'map', timm_proj 'none'): r + mlp(norm(r)), the MLP's last layer
        tail = _split_at_last_linear(mlp)
        after = [getattr(trunk, name, None) for name in ("fc_norm", "head_drop", "head")]
        if tail is None or not all(m is None or _is_noop(m) for m in after):
            raise UnsupportedModelError(
                f"open_clip timm image tower {type(trunk).__name__}: its attention pool's MLP does not end in a "
                "linear map, or layers follow the pool, so it has no end point. " + PROTOCOL_HINT
            )
        return ResidualTail(visual, tail.linear, attn_pool.norm, getattr(attn_pool, "pool", "token") or "none")
    raise UnsupportedModelError(
        f"open_clip timm image tower {type(trunk).__name__} has no projection head (timm_proj 'none') and its "
        f"classifier is {type(classifier).__name__}, not a linear map, so it has no end point. " + PROTOCOL_HINT
    )


class OpenCLIPAdapter(CLIPAdapter):
    """Adapter for open_clip's ``CLIP`` and ``CustomTextCLIP``.

    The end point of each tower is its last linear map before the normalisation; the feature functions follow
    open_clip 3.x's own ``forward`` step by step and stop at that map's input.

    Image towers:

    - ``VisionTransformer``: features after ``ln_post`` and pooling; ``W_v = visual.proj``.
    - ``ModifiedResNet``: the attention-pool output before its ``c_proj``; ``W_v = c_proj.weight^T``,
      ``b_v = c_proj.bias``.
    - ``TimmModel``: ``timm_proj`` ``linear`` (the head's ``proj``, after its dropout) or ``mlp`` (the MLP's
      second layer ``fc2``; the features are its hidden activation), after any ``timm_pool`` including the
      attention pools (with no projection after an attention pool, its own output projection); with
      ``timm_proj`` empty/null the trunk's classifier (``trunk.get_classifier()``, e.g. after a ``map`` pool), the
      features being ``trunk.forward_head(..., pre_logits=True)``. ``timm_proj: none`` after SigLIP's ``map`` pool:
      the pool ends in a residual MLP, ``r + mlp(norm(r))``; the end point is the MLP's last layer and the
      features are ``[h, r]`` (its input and the residual: :class:`ResidualTail`, ``EndPoint.image_residual``).

    Text towers: the built-in ``CLIP`` text transformer and ``CustomTextCLIP`` with an open_clip
    ``TextTransformer`` (features after ``ln_final`` at the pooled token; ``W_t = text_projection``, or its weight
    transposed when it is an ``nn.Linear``), and ``HFTextEncoder`` (``hf_proj_type`` ``linear`` or ``mlp``: the last
    linear layer of ``proj``; the features are the pooler's output, or the MLP's hidden activation; the attention
    mask is built from the Hugging Face config's ``pad_token_id``, as open_clip does).

    The logit bias (``init_logit_bias``, SigLIP's sigmoid loss) is ``EndPoint.logit_bias`` when the model has one.

    Raises:
        UnsupportedModelError: for towers without a linear map at the end (CoCa, a ViT without ``proj``, a Hugging
            Face tower with an identity projection).
    """

    def __init__(self, model: nn.Module) -> None:
        import open_clip
        from open_clip.hf_model import HFTextEncoder
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import TextTransformer, VisionTransformer

        if not isinstance(model, open_clip.CLIP | open_clip.CustomTextCLIP):
            raise UnsupportedModelError(unsupported_message(model))
        self._model = model
        self._image_tail: _LinearTail | ResidualTail | None = None
        self._text_tail: _LinearTail | None = None
        visual = model.visual
        if isinstance(visual, VisionTransformer):
            if visual.proj is None:
                raise UnsupportedModelError(
                    "This open_clip VisionTransformer has no projection head (visual.proj is None); there is no "
                    "image end point to score in. " + PROTOCOL_HINT
                )
            self._image_kind = "vit"
        elif isinstance(visual, ModifiedResNet):
            self._image_kind = "resnet"
        elif isinstance(visual, TimmModel):
            self._image_kind = "timm"
            self._image_tail = _timm_image_tail(visual)
        else:
            raise UnsupportedModelError(
                f"open_clip image tower {type(visual).__name__} is not supported (ViT, ModifiedResNet and timm "
                "towers are). " + PROTOCOL_HINT
            )
        if isinstance(model, open_clip.CLIP):
            self._text_kind = "clip"
            projection = model.text_projection
        elif isinstance(model.text, TextTransformer):
            self._text_kind = "custom"
            projection = model.text.text_projection
        elif isinstance(model.text, HFTextEncoder):
            self._text_kind = "hf"
            self._text_tail = projection = _split_at_last_linear(model.text.proj)
            if projection is None:
                raise UnsupportedModelError(
                    f"This open_clip Hugging Face text tower's projection {model.text.proj} does not end in a linear "
                    "map (hf_proj_type linear or mlp does), so it has no end point. " + PROTOCOL_HINT
                )
        else:
            raise UnsupportedModelError(
                f"CustomTextCLIP text tower {type(model.text).__name__} is not supported (open_clip's "
                "TextTransformer and HFTextEncoder are). " + PROTOCOL_HINT
            )
        if projection is None:
            raise UnsupportedModelError("This open_clip text tower has no projection head. " + PROTOCOL_HINT)
        self._trim = self._trim_rule()

    @property
    def module(self) -> nn.Module:
        return self._model

    # -- image ---------------------------------------------------------------------------------------------------
    def image_features(self, images: Tensor) -> Tensor:
        visual = self._model.visual
        if self._image_kind == "vit":
            x = visual._embeds(images)
            x = visual.transformer(x)
            pooled, _ = visual._pool(x)
            return pooled
        if self._image_kind == "timm":
            return self._image_tail.features(images)
        x = visual.stem(images)
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        return _attnpool_features(visual.attnpool, x)

    # -- text ----------------------------------------------------------------------------------------------------
    def _trim_rule(self) -> tuple[str, bool, int] | None:
        """``(pool, causal, pad_id)`` when trailing positions can be cut without changing the pooled feature.

        Exact when the pooled position depends only on the tokens up to it (``argmax`` = end-of-text, ``eos``,
        ``first``), no class token is appended after the sequence (its position would move), and either every
        position attends only to earlier ones (a causal mask: cut after the batch's last pooled token) or padding
        is masked out as keys (cut after the batch's last non-padding token). A Hugging Face tower masks its
        padding (``pad_token_id``) and its class-token and mean poolers read the non-padding tokens only
        (``mask``: cut after the last one); its max pooler fills the *kept* positions in open_clip 3.x, so it keeps
        every position. ``None`` otherwise (``last`` pooling, an unmasked bidirectional tower).
        """
        model = self._model
        if self._text_kind == "hf":
            from open_clip.hf_model import ClsLastHiddenStatePooler, ClsPooler, MeanPooler

            pad_id = getattr(model.text.config, "pad_token_id", None)
            if type(model.text.pooler) not in (ClsPooler, ClsLastHiddenStatePooler, MeanPooler) or pad_id is None:
                return None
            return "mask", False, int(pad_id)
        if self._text_kind == "clip":
            pool, causal, pad_masked, pad_id = model.text_pool_type, model.attn_mask is not None, False, 0
        else:
            text = model.text
            if text.cls_emb is not None:
                return None
            pool, causal = text.pool_type, text.attn_mask is not None
            pad_masked, pad_id = bool(text.use_pad_mask), int(text.pad_id)
        if pool not in ("argmax", "eos", "first") or not (causal or pad_masked):
            return None
        if pool == "eos" and self._eos_id() is None:
            return None
        return pool, causal, pad_id

    def _eos_id(self) -> int | None:
        model = self._model
        return getattr(model, "text_eos_id", None) if self._text_kind == "clip" else getattr(model.text, "eos_id", None)

    def trim_tokens(self, tokens: Tensor) -> Tensor:
        if self._trim is None or tokens.dim() != 2 or tokens.shape[1] <= 1:
            return tokens
        pool, causal, pad_id = self._trim
        if pool in ("first", "mask"):
            needed = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        elif pool == "argmax":
            needed = tokens.argmax(dim=-1)
        else:  # the first end-of-sequence token of each row (position 0 when a row has none, as open_clip pools)
            needed = (tokens == self._eos_id()).int().argmax(dim=-1)
        if not causal:  # bidirectional with masked padding: every non-padding token is read by the pooled one
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            needed = torch.maximum(needed, torch.where(tokens != pad_id, positions, 0).amax(dim=-1))
        return tokens[:, : int(needed.max()) + 1]

    def text_features(self, tokens: Tensor) -> Tensor:
        from open_clip.transformer import text_global_pool

        model = self._model
        length = tokens.shape[1]
        if self._text_kind == "clip":
            cast_dtype = model.transformer.get_cast_dtype()
            x = model.token_embedding(tokens).to(cast_dtype)
            x = x + model.positional_embedding[:length].to(cast_dtype)
            attn_mask = None if model.attn_mask is None else model.attn_mask[:length, :length]
            x = model.transformer(x, attn_mask=attn_mask)
            x = model.ln_final(x)
            return text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        text = model.text
        if self._text_kind == "hf":  # HFTextEncoder.forward up to its projection's last linear layer
            attn_mask = (tokens != text.config.pad_token_id).long()
            out = text.transformer(input_ids=tokens, attention_mask=attn_mask)
            return self._text_tail.features(text.pooler(out, attn_mask))
        x, attn_mask = text._embeds(tokens)
        if attn_mask is not None and attn_mask.shape[-1] != x.shape[1]:  # the plain causal mask is not sliced there
            attn_mask = attn_mask[..., : x.shape[1], : x.shape[1]]
        x = text.transformer(x, attn_mask=attn_mask)
        if text.cls_emb is not None:
            return text.ln_final(text_global_pool(x, pool_type="last"))
        x = text.ln_final(x)
        return text_global_pool(x, tokens, pool_type=text.pool_type, eos_token_id=getattr(text, "eos_id", None))

    # -- end point -----------------------------------------------------------------------------------------------
    def endpoint(self) -> EndPoint:
        model = self._model
        if self._image_kind == "vit":
            image_proj, image_bias = model.visual.proj, None
        elif self._image_kind == "timm":
            image_proj, image_bias = self._image_tail.linear.weight.T, self._image_tail.linear.bias
        else:
            c_proj = model.visual.attnpool.c_proj
            image_proj, image_bias = c_proj.weight.T, c_proj.bias
        if self._text_kind == "hf":
            projection = self._text_tail.linear
        else:
            projection = model.text_projection if self._text_kind == "clip" else model.text.text_projection
        if isinstance(projection, nn.Linear):
            text_proj, text_bias = projection.weight.T, projection.bias
        else:
            text_proj, text_bias = projection, None
        return EndPoint(
            image_proj=image_proj,
            text_proj=text_proj,
            logit_scale=model.logit_scale,
            image_bias=image_bias,
            text_bias=text_bias,
            logit_bias=getattr(model, "logit_bias", None),
            image_residual=isinstance(self._image_tail, ResidualTail),
        )


def _attnpool_features(attnpool: nn.Module, x: Tensor) -> Tensor:
    """open_clip's ``AttentionPool2d.forward`` up to (excluding) its output projection ``c_proj``.

    ``c_proj`` is applied inside ``multi_head_attention_forward`` as the attention's output projection; it is
    linear, so running the same attention with an identity output projection yields its input.
    """
    x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)  # NCHW -> (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + attnpool.positional_embedding[:, None, :].to(x.dtype)
    width = x.shape[-1]
    identity = torch.eye(width, dtype=x.dtype, device=x.device)
    out, _ = F.multi_head_attention_forward(
        query=x,
        key=x,
        value=x,
        embed_dim_to_check=width,
        num_heads=attnpool.num_heads,
        q_proj_weight=attnpool.q_proj.weight,
        k_proj_weight=attnpool.k_proj.weight,
        v_proj_weight=attnpool.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([attnpool.q_proj.bias, attnpool.k_proj.bias, attnpool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=identity,
        out_proj_bias=None,
        use_separate_proj_weight=True,
        training=attnpool.training,
        need_weights=False,
    )
    return out[0]


def _unwrap(model: object) -> object:
    """Strip wrappers that hide the user's module: DDP/FSDP-style ``.module`` and ``torch.compile``'s ``_orig_mod``."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
    return model


def _is_clip(model: object) -> bool:
    """An open_clip ``CLIP``/``CustomTextCLIP`` or a ``transformers`` CLIP (``CLIPModel``, and the SigLIP models,
    which :func:`_clip_adapter` refuses with the reason). ``transformers`` is never imported here: a model can
    only be one of its classes once it is imported."""
    import open_clip

    if isinstance(model, open_clip.CLIP | open_clip.CustomTextCLIP):
        return True
    if sys.modules.get("transformers") is None:
        return False
    from lightning_chips.transformers_adapters import is_transformers_clip

    return is_transformers_clip(model)


def _clip_adapter(model: nn.Module) -> CLIPAdapter:
    import open_clip

    if isinstance(model, open_clip.CLIP | open_clip.CustomTextCLIP):
        return OpenCLIPAdapter(model)
    from lightning_chips.transformers_adapters import transformers_adapter

    return transformers_adapter(model)


def _find_clip(model: object) -> nn.Module | None:
    """The CLIP in ``model``: itself, else under ``model``, else under ``clip``, else its one direct child module
    that is a CLIP (several such children are ambiguous: the error asks which one)."""
    for candidate in (model, getattr(model, "model", None), getattr(model, "clip", None)):
        candidate = _unwrap(candidate)
        if _is_clip(candidate):
            return candidate
    if not isinstance(model, nn.Module):
        return None
    children = [(name, _unwrap(child)) for name, child in model.named_children()]
    found = [(name, child) for name, child in children if _is_clip(child)]
    if len(found) > 1:
        names = ", ".join(f"`{name}` ({type(child).__name__})" for name, child in found)
        raise UnsupportedModelError(
            f"{type(model).__name__} holds several CLIPs ({names}); put the one to score under `model` or `clip`, "
            "or pass adapter=resolve_adapter(module.<name>)."
        )
    return found[0][1] if found else None


def resolve_adapter(model: object, adapter: CLIPAdapter | None = None) -> CLIPAdapter:
    """Return the :class:`CLIPAdapter` for ``model``.

    Resolution order: ``adapter`` if given; ``model`` itself if it is a ``CLIPAdapter``; a module implementing
    :class:`SupportsEndPoint`; a CLIP (open_clip ``CLIP``/``CustomTextCLIP``, :class:`OpenCLIPAdapter`;
    ``transformers`` ``CLIPModel``, :class:`lightning_chips.transformers_adapters.TransformersCLIPAdapter`) found
    as ``model`` itself, else under ``model.model``, else under ``model.clip`` (e.g.
    :class:`lightning_chips.models.OpenCLIPModule`), else as the one direct child module of ``model`` that is a
    CLIP, in that order. DDP and ``torch.compile`` wrappers are looked through at each step.

    Args:
        model: a LightningModule, an ``nn.Module``, or an adapter.
        adapter: an explicit adapter, returned as is.

    Raises:
        UnsupportedModelError: when nothing matches (the message names the protocol to implement), when ``model``
            has several CLIP children and none under ``model``/``clip``, or when the CLIP found has no linear end
            point (the message says why, e.g. SigLIP's attention-pool image head).

    Example::

        >>> import open_clip
        >>> cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32,
        ...        "patch_size": 8}, "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64,
        ...        "heads": 2, "layers": 2}}
        >>> resolve_adapter(open_clip.CLIP(**cfg))
        OpenCLIPAdapter(CLIP)
    """
    if adapter is not None:
        if not isinstance(adapter, CLIPAdapter):
            raise TypeError(f"`adapter` must be a lightning_chips.adapters.CLIPAdapter, got {type(adapter).__name__}.")
        return adapter
    model = _unwrap(model)
    if isinstance(model, CLIPAdapter):
        return model
    if isinstance(model, SupportsEndPoint):
        return ProtocolAdapter(model)
    clip = _find_clip(model)
    if clip is None:
        raise UnsupportedModelError(unsupported_message(model))
    return _clip_adapter(clip)
