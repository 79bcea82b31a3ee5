"""How an item's image and caption become the model's input: the model's own open_clip preprocessing and tokenizer.

Pools and targets may yield PIL images, ``uint8`` tensors or arrays, or float tensors (``[3, H, W]``):

* a PIL image (or a ``uint8`` tensor / ``HWC`` array, turned into one) goes through the model's open_clip
  preprocess (resize, centre crop, to tensor, normalise with the model's mean and std): the transform
  ``open_clip.create_model_and_transforms`` returns, rebuilt from the model's preprocess configuration, or the
  ``transform`` the user passes;
* a float tensor in ``[0, 1]`` is normalised with the model's mean and std (it is taken to be already resized);
* a float tensor with values outside ``[0, 1]`` is already normalised (an open_clip ``image_transform`` output):
  it passes through unchanged, with a warning that says so (normalising it again would silently corrupt it).

The tokenizer is the model's (``get_tokenizer()``, as :class:`~lightning_chips.models.OpenCLIPModule` has) or the
one the user passes; a model without one is an error that says how to pass one, never a silent guess.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ImageInput",
    "clip_normalize",
    "find_open_clip",
    "model_image_input",
    "resolve_tokenizer",
]

CLIP_MEAN: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
"""open_clip's ``OPENAI_DATASET_MEAN``, the default normalisation of open_clip models."""
CLIP_STD: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
"""open_clip's ``OPENAI_DATASET_STD``."""

_TOLERANCE = 1e-3  # a [0, 1] image may overshoot by float rounding after resampling

ALREADY_NORMALISED = (
    "An item's image is a float tensor with values outside [0, 1] ({low:.3g}..{high:.3g}): it looks already "
    "normalised (e.g. by open_clip's image_transform), so it is used as it is, not normalised again. Give the pool "
    "PIL images, uint8 images or float tensors in [0, 1] to let lightning-chips apply the model's preprocessing."
)


class ImageInput:
    """Turns one item's image into the model's input tensor (see the module docstring). Picklable, so it works in
    dataloader worker processes.

    Args:
        transform: PIL image -> normalised ``[3, S, S]`` tensor (the model's open_clip preprocess); None: a PIL
            image is an error naming what to pass.
        mean: the per-channel mean a float tensor in ``[0, 1]`` is normalised with.
        std: the per-channel standard deviation.
        normalize: False leaves float tensors as they are (``ScoredSubsetDataModule(normalize="none")``).

    Example::

        >>> to_input = ImageInput(None, CLIP_MEAN, CLIP_STD)
        >>> to_input(torch.ones(3, 4, 4)).max().item() > 1  # [0, 1] -> normalised
        True
    """

    def __init__(
        self,
        transform: Callable[[Any], Tensor] | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        normalize: bool = True,
    ) -> None:
        self.transform, self.mean, self.std, self.normalize = transform, tuple(mean), tuple(std), normalize

    def __call__(self, image: Any) -> Tensor:
        if isinstance(image, np.ndarray):
            image = _array_to_image(image)
        if isinstance(image, Tensor) and image.dtype == torch.uint8:
            from torchvision.transforms.functional import to_pil_image

            image = to_pil_image(image)
        if not isinstance(image, Tensor):
            if self.transform is None:
                raise TypeError(
                    f"Got a {type(image).__name__} image but no image transform: attach the model (its open_clip "
                    "preprocess is used) or pass `transform=` (e.g. the preprocess open_clip.create_model_and_"
                    "transforms returns) to the data module."
                )
            return self.transform(image)
        if not image.is_floating_point() or not self.normalize:
            return image
        low, high = float(image.min()), float(image.max())
        if low < -_TOLERANCE or high > 1 + _TOLERANCE:
            warnings.warn(ALREADY_NORMALISED.format(low=low, high=high), UserWarning, stacklevel=2)
            return image
        mean = image.new_tensor(self.mean)[:, None, None]
        std = image.new_tensor(self.std)[:, None, None]
        return (image - mean) / std

    def __repr__(self) -> str:
        return f"ImageInput(transform={self.transform!r}, mean={self.mean}, std={self.std})"


def _array_to_image(array: np.ndarray) -> Any:
    """An ``HWC`` / ``HW`` uint8 array as a PIL image; another array as a tensor (``CHW``)."""
    if array.dtype == np.uint8 and array.ndim in (2, 3) and (array.ndim == 2 or array.shape[-1] in (1, 3, 4)):
        from PIL import Image

        return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
    return torch.from_numpy(np.ascontiguousarray(array))


def clip_normalize() -> ImageInput:
    """Normalise ``[0, 1]`` float images with open_clip's OpenAI mean / std (images outside ``[0, 1]`` are taken as
    already normalised and pass through, with a warning); see :class:`ImageInput`."""
    return ImageInput(None, CLIP_MEAN, CLIP_STD)


def find_open_clip(module: Any) -> Any | None:
    """The open_clip CLIP a LightningModule holds (the module itself, or its ``model`` / ``clip``), or None."""
    for candidate in (module, getattr(module, "model", None), getattr(module, "clip", None)):
        if candidate is not None and hasattr(candidate, "visual") and hasattr(candidate, "encode_image"):
            return candidate
    return None


def model_image_input(module: Any = None, transform: Callable[[Any], Tensor] | None = None, *, train: bool = False,
                      normalize: bool = True, image_size: int | None = None) -> ImageInput:  # fmt: skip
    """The :class:`ImageInput` of a model: its open_clip preprocess (``train=True``: the training augmentation
    open_clip's ``create_model_and_transforms`` gives) and normalisation, or ``transform`` when given; without an
    open_clip model, resize + centre crop to ``image_size`` (default 224) and open_clip's OpenAI mean / std."""
    import open_clip

    clip = find_open_clip(module) if module is not None else None
    cfg = open_clip.get_model_preprocess_cfg(clip) if clip is not None else {}
    mean, std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
    if transform is None and clip is not None:
        transform = open_clip.image_transform(
            cfg["size"], is_train=train, mean=mean, std=std, resize_mode=cfg.get("resize_mode"),
            interpolation=cfg.get("interpolation"), fill_color=cfg.get("fill_color", 0),
        )  # fmt: skip
    if transform is None:
        size = int(image_size or getattr(module, "image_size", None) or 224)
        transform = open_clip.image_transform(size, is_train=False, mean=mean, std=std)
    return ImageInput(transform, mean, std, normalize)


def resolve_tokenizer(
    tokenizer: str | Callable[[list[str]], Tensor] | None, context_length: int | None, module: Any = None
) -> Callable[[list[str]], Tensor]:
    """Pick the tokenizer for a data module.

    Order: ``tokenizer`` (an open_clip model name, or a callable); the attached LightningModule's
    ``get_tokenizer()`` (e.g. :class:`~lightning_chips.models.OpenCLIPModule`, so data and model agree on the
    context length); with no model attached (a data module used on its own), open_clip's default BPE tokenizer
    with ``context_length`` (77 when None).

    Raises:
        ValueError: for a model without ``get_tokenizer()`` when no tokenizer is given (its vocabulary is unknown:
            a guess would train on wrong tokens), or a ``context_length`` the model's tokenizer disagrees with.
    """
    import open_clip

    if callable(tokenizer):
        return tokenizer
    if tokenizer is not None:
        return open_clip.get_tokenizer(tokenizer, context_length=context_length)
    if module is not None and callable(getattr(module, "get_tokenizer", None)):
        found = module.get_tokenizer()
        if context_length is not None and getattr(found, "context_length", context_length) != context_length:
            raise ValueError(
                f"`context_length={context_length}` disagrees with the model's tokenizer "
                f"({found.context_length}); leave it unset to use the model's."
            )
        return found
    if module is not None:
        raise ValueError(
            f"{type(module).__name__} has no get_tokenizer(), so its tokenizer is unknown. Pass `tokenizer=` to the "
            "data module (an open_clip model name such as 'ViT-B-32', or a callable mapping a list of captions to "
            "token ids), or give the LightningModule a get_tokenizer() method returning its tokenizer."
        )
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length or 77)
