"""``LabelledPairs``: the base of every labelled image-caption dataset the project ships.

The built-in :class:`~lightning_chips.data.TwoDomainPairs` and the optional real datasets
(:mod:`lightning_chips.datasets`: openclipart, Fashion-MNIST, Animal-MNIST) hold the same per-pair metadata as
read-only arrays and yield the same items; they differ only in where an image comes from (rendered or decoded)
and how captions are made. This base holds what they share: the metadata contract, ``__getitem__``, index checks
and the validation of ``tokenizer`` / ``transform``.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["LabelledPairs"]


class LabelledPairs(Dataset):
    """Map-style image-caption pairs with labels, domains and a record of which captions were made noisy.

    Subclasses set the metadata attributes and implement :meth:`load_image` and :meth:`clean_caption`.

    Attributes:
        ids: ``int64`` stable pair ids (read-only).
        labels: ``int64`` class index of each pair within its domain (read-only).
        domains: ``int64`` domain index of each pair (read-only).
        noisy: ``bool``, whether the pair's caption was replaced by another pair's (read-only).
        captions: the caption each pair yields (the replacement for a noisy pair).
        tokenizer: ``None`` (items carry caption strings) or a callable mapping a list of captions to token ids.
        transform: ``None`` or a callable applied to the ``[3, S, S]`` float image in ``[0, 1]``.

    Items are ``{"image", "text", "id", "label", "domain", "noisy"}``.
    """

    ids: np.ndarray
    labels: np.ndarray
    domains: np.ndarray
    noisy: np.ndarray
    captions: list[str]
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def set_callables(
        self,
        tokenizer: Callable[[list[str]], torch.Tensor] | None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> None:
        """Validate and set ``tokenizer`` and ``transform`` (a clear error for anything not callable)."""
        if tokenizer is not None and not callable(tokenizer):
            raise ValueError(
                f"tokenizer must be None or a callable mapping a list of captions to a tensor of token ids "
                f"(e.g. open_clip.get_tokenizer('ViT-B-32')), got {type(tokenizer).__name__}."
            )
        if transform is not None and not callable(transform):
            raise ValueError(
                f"transform must be None or a callable taking and returning a [3, S, S] image tensor, "
                f"got {type(transform).__name__}."
            )
        self.tokenizer = tokenizer
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One pair ``{"image": float32 [3, S, S] in [0, 1] (then transform), "text": caption or token ids, "id",
        "label", "domain", "noisy"}``."""
        i = self._index(index)
        image = self.load_image(i)
        if self.transform is not None:
            image = self.transform(image)
        caption = self.captions[i]
        text: str | torch.Tensor = caption if self.tokenizer is None else self.tokenizer([caption])[0]
        return {
            "image": image,
            "text": text,
            "id": int(self.ids[i]),
            "label": int(self.labels[i]),
            "domain": int(self.domains[i]),
            "noisy": bool(self.noisy[i]),
        }

    def load_image(self, index: int) -> torch.Tensor:
        """The image of pair ``index`` as a float32 ``[3, S, S]`` tensor in ``[0, 1]`` (before ``transform``)."""
        raise NotImplementedError

    def clean_caption(self, index: int) -> str:
        """The true caption of pair ``index`` (equal to ``captions[index]`` unless the pair is noisy)."""
        raise NotImplementedError

    def _index(self, index: int) -> int:
        """``index`` as a position in ``[0, len)`` (negative indices count from the end)."""
        if isinstance(index, bool) or not isinstance(index, Integral):
            raise TypeError(f"index must be an integer, got {type(index).__name__}.")
        n = len(self)
        i = int(index) + n if int(index) < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"index {index} is out of range for a dataset of {n} pairs.")
        return i
