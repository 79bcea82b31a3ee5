"""What every CLIP adapter shares, below both :mod:`lightning_chips.adapters` (open_clip and the resolution) and
:mod:`lightning_chips.transformers_adapters` (Hugging Face): the :class:`SupportsEndPoint` protocol, the
:class:`CLIPAdapter` base, :class:`ProtocolAdapter`, :class:`UnsupportedModelError` with its hint, and
:class:`ResidualTail` (SigLIP's attention-pool head, which both families have).

Every name here is also importable from :mod:`lightning_chips.adapters`, where users find them; this module keeps
the ``transformers`` adapters from importing the module that resolves to them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lightning_chips.endpoint import EndPoint

__all__ = [
    "CLIPAdapter",
    "PROTOCOL_HINT",
    "ProtocolAdapter",
    "ResidualTail",
    "SupportsEndPoint",
    "UnsupportedModelError",
]

PROTOCOL_HINT = (
    "Implement lightning_chips.adapters.SupportsEndPoint on your module (image_features(images) -> [B, d_v], "
    "text_features(tokens) -> [B, d_t], endpoint() -> EndPoint) or pass a CLIPAdapter subclass."
)
"""The sentence every :class:`UnsupportedModelError` ends with: what to implement instead."""


@runtime_checkable
class SupportsEndPoint(Protocol):
    """Implement these three methods on any module (e.g. your LightningModule) to use lightning-chips with it.

    ``image_features(images) -> [B, d_v]`` and ``text_features(tokens) -> [B, d_t]`` return the features just
    before the linear projection heads, and ``endpoint()`` returns the live :class:`EndPoint` such that
    ``endpoint().embed_image(image_features(images))`` is the model's normalised image embedding (and likewise
    for text).
    """

    def image_features(self, images: Tensor) -> Tensor: ...

    def text_features(self, tokens: Tensor) -> Tensor: ...

    def endpoint(self) -> EndPoint: ...


class UnsupportedModelError(TypeError):
    """Raised when no adapter can reach a model's pre-projection features and end-point parameters."""


class CLIPAdapter(ABC):
    """Uniform access to a CLIP's pre-projection features and end-point parameters.

    Subclass it (three methods) to support a model family that :func:`~lightning_chips.adapters.resolve_adapter`
    does not know, or implement :class:`SupportsEndPoint` on the model itself.
    """

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The module whose parameters the adapter reads (used for device, dtype and train/eval mode)."""

    @abstractmethod
    def image_features(self, images: Tensor) -> Tensor:
        """Pre-projection image features ``h_v`` of shape ``[B, d_v]``."""

    @abstractmethod
    def text_features(self, tokens: Tensor) -> Tensor:
        """Pre-projection text features ``h_t`` of shape ``[B, d_t]``."""

    @abstractmethod
    def endpoint(self) -> EndPoint:
        """The live end-point parameters."""

    def trim_tokens(self, tokens: Tensor) -> Tensor:
        """``tokens`` cut to the positions the text tower reads: a prefix, so ``text_features`` is unchanged.

        The default keeps every position. :class:`~lightning_chips.adapters.OpenCLIPAdapter` drops the trailing
        padding after the last pooled token of the batch when the text tower is causal (or masks padding) and pools
        at the end-of-text, first or eos token, or (Hugging Face towers, which mask padding) pools the class token or
        the mean: those positions never reach the pooled feature, and short captions padded to a context of 77 cost
        a fraction of the full sequence. Called once per batch (not under ``vmap``), before :meth:`text_features`.
        """
        return tokens

    def encode_image(self, images: Tensor) -> Tensor:
        """Normalised image embeddings ``[B, e]`` through the end point."""
        return self.endpoint().embed_image(self.image_features(images))

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Normalised text embeddings ``[B, e]`` through the end point (tokens cut by :meth:`trim_tokens` first)."""
        return self.endpoint().embed_text(self.text_features(self.trim_tokens(tokens)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.module).__name__})"


class ProtocolAdapter(CLIPAdapter):
    """Adapter for a module that implements :class:`SupportsEndPoint` itself."""

    def __init__(self, model: SupportsEndPoint) -> None:
        if not isinstance(model, SupportsEndPoint):
            raise UnsupportedModelError(unsupported_message(model))
        self._model = model

    @property
    def module(self) -> nn.Module:
        return self._model  # type: ignore[return-value]

    def image_features(self, images: Tensor) -> Tensor:
        return self._model.image_features(images)

    def text_features(self, tokens: Tensor) -> Tensor:
        return self._model.text_features(tokens)

    def endpoint(self) -> EndPoint:
        return self._model.endpoint()


class ResidualTail:
    """A head whose output is ``r + linear(h)`` (SigLIP's attention-pool head, ``r + mlp(norm(r))``): the end point is
    ``linear`` and the features are ``[h, r]`` (:attr:`EndPoint.image_residual`).

    ``h`` (the input of ``linear``) and ``r`` (the input of ``residual_at``, the module that first reads the residual
    stream) are read during the model's own forward ``run`` with forward pre-hooks, so nothing of the model is
    re-implemented; then pooled over the head's tokens as the head pools its output (``"token"``: the first;
    ``"avg"``: the mean; both commute with ``r + W h + b``).
    """

    def __init__(self, run: Callable[[Tensor], Tensor], linear: nn.Linear, residual_at: nn.Module, pool: str) -> None:
        if pool not in ("token", "avg"):
            raise UnsupportedModelError(f"A residual head that pools its tokens by {pool!r} has no end point here "
                                        "('token' or 'avg' pooling is supported). " + PROTOCOL_HINT)  # fmt: skip
        self.run, self.linear, self.residual_at, self.pool = run, linear, residual_at, pool

    def features(self, x: Tensor) -> Tensor:
        captured: dict[str, Tensor] = {}

        def keep(name: str) -> Callable:
            return lambda _module, args: captured.__setitem__(name, args[0])

        hooks = [self.linear.register_forward_pre_hook(keep("h")),
                 self.residual_at.register_forward_pre_hook(keep("r"))]  # fmt: skip
        try:
            self.run(x)
        finally:
            for hook in hooks:
                hook.remove()
        h, r = captured["h"], captured["r"]
        h, r = (h[:, 0], r[:, 0]) if self.pool == "token" else (h.mean(1), r.mean(1))
        return torch.cat([h, r], dim=-1)


def unsupported_message(model: object) -> str:
    return (
        f"lightning-chips cannot find a CLIP in {type(model).__name__}: it is not an open_clip CLIP/CustomTextCLIP "
        "or a transformers CLIPModel, does not hold one under `model` or `clip` or as its one direct child of such "
        "a type, and does not implement the SupportsEndPoint protocol. " + PROTOCOL_HINT
    )
