"""Adapters for Hugging Face ``transformers`` CLIPs: ``CLIPModel`` (and why SigLIP has no end point).

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

``SiglipModel`` / ``Siglip2Model`` raise :class:`~lightning_chips.adapters.UnsupportedModelError`: their vision
tower has no projection after its attention-pool (MAP) head, and that head ends in a residual MLP,
``pooled = h + mlp(layernorm(h))``. The image embedding is therefore not ``W^T f + b`` of any features ``f`` with
``W, b`` the last linear layer's parameters (the residual ``h`` is a per-sample term that
:class:`~lightning_chips.endpoint.EndPoint` has no room for).
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

from lightning_chips.adapters import PROTOCOL_HINT, CLIPAdapter, UnsupportedModelError
from lightning_chips.endpoint import EndPoint

__all__ = ["TransformersCLIPAdapter", "is_transformers_clip", "transformers_adapter"]

_CLIP = (("transformers.models.clip.modeling_clip", "CLIPModel"),)
_SIGLIP = (
    ("transformers.models.siglip.modeling_siglip", "SiglipModel"),
    ("transformers.models.siglip2.modeling_siglip2", "Siglip2Model"),
)


def _loaded(names: tuple[tuple[str, str], ...]) -> tuple[type, ...]:
    """The classes among ``names`` whose modules are imported (a model can only be an instance of those)."""
    modules = ((sys.modules.get(module), name) for module, name in names)
    return tuple(getattr(module, name) for module, name in modules if module is not None and hasattr(module, name))


def is_transformers_clip(model: object) -> bool:
    """Whether ``model`` is a ``transformers`` ``CLIPModel``, ``SiglipModel`` or ``Siglip2Model`` (without importing
    ``transformers``)."""
    return isinstance(model, _loaded(_CLIP) + _loaded(_SIGLIP))


def transformers_adapter(model: nn.Module) -> CLIPAdapter:
    """The adapter for a ``transformers`` CLIP.

    Raises:
        UnsupportedModelError: for SigLIP models (their image tower ends in a residual MLP, not a linear map) and
            anything that is not a ``transformers`` ``CLIPModel``.
    """
    if isinstance(model, _loaded(_SIGLIP)):
        raise UnsupportedModelError(
            f"transformers {type(model).__name__}: the vision tower has no projection after its attention-pool (MAP) "
            "head, which ends in a residual MLP (pooled = h + mlp(layernorm(h))); the image embedding is not a "
            "linear map of any features, so it has no end point (EndPoint holds no per-sample residual). "
            + PROTOCOL_HINT
        )
    return TransformersCLIPAdapter(model)


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
        model = self._model
        image, text = model.visual_projection, model.text_projection
        return EndPoint(
            image_proj=image.weight.T,
            text_proj=text.weight.T,
            logit_scale=model.logit_scale,
            image_bias=image.bias,
            text_bias=text.bias,
        )
