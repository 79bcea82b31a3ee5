"""Adapters for Hugging Face ``transformers`` CLIPs: ``CLIPModel`` and ``SiglipModel``.

:func:`lightning_chips.adapters.resolve_adapter` reaches this module only when ``transformers`` is already imported
(a model can be one of its classes only then), and the module itself never imports ``transformers``: it looks the
classes up in ``sys.modules``. Users without ``transformers`` pay nothing; install it with the ``transformers``
extra (``pip install "lightning-chips[transformers]"``).

``CLIPModel`` (:class:`TransformersCLIPAdapter`):

- image: the pooled class token after ``vision_model.post_layernorm`` (``vision_model(...).pooler_output``), then
  ``visual_projection`` (an ``nn.Linear``; ``W_v`` is its weight transposed, ``b_v`` its bias, None for CLIP);
- text: the pooled end-of-text token after ``text_model.final_layer_norm`` (``text_model(...).pooler_output``),
  then ``text_projection``; the pooled position follows ``CLIPTextTransformer`` exactly: the first position of
  ``config.eos_token_id``, or, for legacy configs whose ``eos_token_id`` is 2, the position of the largest token id;
- the logit scale ``logit_scale``; no logit bias (InfoNCE).

``text_features(tokens)`` takes token ids ``[B, L]`` and passes **no attention mask**: the text transformer is
causal and pools at the end-of-text token, so the padding after it never reaches the pooled feature, whatever the
mask. A mask built from ``config.pad_token_id`` would be wrong here: Hugging Face's CLIP tokenizers pad with the
end-of-text id (the pooled token itself would be masked), and the original configs' ``pad_token_id`` (1) is an
ordinary token. :meth:`TransformersCLIPAdapter.trim_tokens` cuts each batch after its last pooled position (exact,
for the same reason).

``SiglipModel`` (:class:`TransformersSiglipAdapter`, the sigmoid loss):

- image: the vision tower has no projection after its attention-pool (MAP) head, which ends in a residual MLP,
  ``pooled = r + mlp(layernorm(r))``: the end point is the MLP's last layer ``fc2`` and the features are ``[h, r]``
  (its input and the residual, read with forward pre-hooks during the model's own forward;
  :class:`~lightning_chips.adapter_base.ResidualTail`, ``EndPoint.image_residual``);
- text: the last token after ``final_layer_norm``, then ``text_model.head`` (weight and bias);
- the logit scale and the logit bias (``EndPoint.logit_bias``: the sigmoid loss).

SigLIP is trained without an attention mask on captions padded to the full context and pools the last token, so
``text_features`` passes no mask and no position is trimmed. ``Siglip2Model`` (patch inputs with spatial shapes)
raises :class:`~lightning_chips.adapter_base.UnsupportedModelError`; open_clip's SigLIP 2 configs resolve through the
open_clip adapter.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

from lightning_chips.adapter_base import PROTOCOL_HINT, CLIPAdapter, ResidualTail, UnsupportedModelError
from lightning_chips.endpoint import EndPoint

__all__ = ["TransformersCLIPAdapter", "TransformersSiglipAdapter", "is_transformers_clip", "transformers_adapter"]

_CLIP = (("transformers.models.clip.modeling_clip", "CLIPModel"),)
_SIGLIP = (("transformers.models.siglip.modeling_siglip", "SiglipModel"),)
_SIGLIP2 = (("transformers.models.siglip2.modeling_siglip2", "Siglip2Model"),)


def _loaded(names: tuple[tuple[str, str], ...]) -> tuple[type, ...]:
    """The classes among ``names`` whose modules are imported (a model can only be an instance of those)."""
    modules = ((sys.modules.get(module), name) for module, name in names)
    return tuple(getattr(module, name) for module, name in modules if module is not None and hasattr(module, name))


def is_transformers_clip(model: object) -> bool:
    """Whether ``model`` is a ``transformers`` ``CLIPModel``, ``SiglipModel`` or ``Siglip2Model`` (without importing
    ``transformers``)."""
    return isinstance(model, _loaded(_CLIP) + _loaded(_SIGLIP) + _loaded(_SIGLIP2))


def transformers_adapter(model: nn.Module) -> CLIPAdapter:
    """The adapter for a ``transformers`` CLIP.

    Raises:
        UnsupportedModelError: for ``Siglip2Model`` and anything that is not a ``transformers`` ``CLIPModel`` or
            ``SiglipModel``.
    """
    if isinstance(model, _loaded(_SIGLIP2)):
        raise UnsupportedModelError(
            f"transformers {type(model).__name__} is not supported yet (its vision tower takes patches with spatial "
            "shapes); open_clip's SigLIP 2 configs are. " + PROTOCOL_HINT
        )
    if isinstance(model, _loaded(_SIGLIP)):
        return TransformersSiglipAdapter(model)
    return TransformersCLIPAdapter(model)


def _linear_endpoint(model: nn.Module, image: nn.Linear, text: nn.Linear, **extra: object) -> EndPoint:
    """The end point of a ``transformers`` CLIP whose towers end in the linear maps ``image`` and ``text``."""
    return EndPoint(image_proj=image.weight.T, text_proj=text.weight.T, logit_scale=model.logit_scale,
                    image_bias=image.bias, text_bias=text.bias, **extra)  # type: ignore[arg-type]  # fmt: skip


class TransformersCLIPAdapter(CLIPAdapter):
    """Adapter for ``transformers`` ``CLIPModel`` (see the module docstring for the end point and the padding).

    Example::

        >>> from transformers import CLIPConfig, CLIPModel  # doctest: +SKIP
        >>> adapter = resolve_adapter(CLIPModel(CLIPConfig()))  # doctest: +SKIP
        >>> adapter.encode_text(input_ids)  # == F.normalize(model.get_text_features(input_ids))  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, _loaded(_CLIP)):
            raise UnsupportedModelError(f"{type(model).__name__} is not a transformers CLIPModel. " + PROTOCOL_HINT)
        self._model = model

    @property
    def module(self) -> nn.Module:
        return self._model

    def image_features(self, images: Tensor) -> Tensor:
        return self._model.vision_model(pixel_values=images, return_dict=True).pooler_output

    def text_features(self, tokens: Tensor) -> Tensor:
        return self._model.text_model(input_ids=tokens, return_dict=True).pooler_output

    def _pooled_positions(self, tokens: Tensor) -> Tensor | None:
        """The position ``CLIPTextTransformer`` pools in each row, or None when its rule is not a single id."""
        eos = getattr(self._model.text_model, "eos_token_id", None)
        if not isinstance(eos, int):
            return None
        if eos == 2:  # legacy configs: the end-of-text token has the largest id
            return tokens.argmax(dim=-1)
        return (tokens == eos).int().argmax(dim=-1)  # the first end-of-text (position 0 in a row without one)

    def trim_tokens(self, tokens: Tensor) -> Tensor:
        """``tokens`` cut after the batch's last pooled end-of-text token (the tower is causal, so exact)."""
        if tokens.dim() != 2 or tokens.shape[1] <= 1:
            return tokens
        pooled = self._pooled_positions(tokens)
        return tokens if pooled is None else tokens[:, : int(pooled.max()) + 1]

    def endpoint(self) -> EndPoint:
        return _linear_endpoint(self._model, self._model.visual_projection, self._model.text_projection)


class TransformersSiglipAdapter(CLIPAdapter):
    """Adapter for ``transformers`` ``SiglipModel`` (see the module docstring for the end point).

    Example::

        >>> from transformers import SiglipConfig, SiglipModel  # doctest: +SKIP
        >>> adapter = resolve_adapter(SiglipModel(SiglipConfig()))  # doctest: +SKIP
        >>> adapter.endpoint().loss  # doctest: +SKIP
        'sigmoid'
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, _loaded(_SIGLIP)):
            raise UnsupportedModelError(f"{type(model).__name__} is not a transformers SiglipModel. " + PROTOCOL_HINT)
        vision = model.vision_model
        head = getattr(vision, "head", None) if getattr(vision, "use_head", True) else None
        if head is None or not isinstance(getattr(getattr(head, "mlp", None), "fc2", None), nn.Linear):
            raise UnsupportedModelError(
                f"This {type(model).__name__}'s vision tower has no attention-pool head ending in a linear map "
                "(vision_use_head=False?), so it has no image end point. " + PROTOCOL_HINT
            )
        self._model = model
        self._image = ResidualTail(lambda images: vision(pixel_values=images), head.mlp.fc2, head.layernorm, "token")

    @property
    def module(self) -> nn.Module:
        return self._model

    def image_features(self, images: Tensor) -> Tensor:
        return self._image.features(images)

    def text_features(self, tokens: Tensor) -> Tensor:
        text = self._model.text_model
        captured: list[Tensor] = []
        hook = text.head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            text(input_ids=tokens)
        finally:
            hook.remove()
        return captured[0]

    def endpoint(self) -> EndPoint:
        model = self._model
        return _linear_endpoint(model, self._image.linear, model.text_model.head, logit_bias=model.logit_bias,
                                image_residual=True)  # fmt: skip
