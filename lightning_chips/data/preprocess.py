"""How an item's image and caption become the model's input: the model's own open_clip preprocessing and tokenizer.

Pools and targets may yield PIL images, ``uint8`` tensors or arrays, or float tensors (``[3, H, W]``):

* a PIL image (or a ``uint8`` tensor / ``HWC`` array, turned into one) goes through the model's open_clip
  preprocess (resize, centre crop, to tensor, normalise with the model's mean and std): the transform
  ``open_clip.create_model_and_transforms`` returns, rebuilt from the model's preprocess configuration, or the
  ``transform`` the user passes;
* a float tensor in ``[0, 1]`` is normalised with the model's mean and std (it is taken to be already resized);
* a float tensor with values outside ``[0, 1]`` is already normalised (an open_clip ``image_transform`` output):
  it passes through unchanged, with a warning that says so (normalising it again would silently corrupt it).

A caption that is already token ids needs no tokenizer. A string caption is tokenized with the tokenizer the user
passes or the model's own (``get_tokenizer()``, as :class:`~lightning_chips.models.OpenCLIPModule` has, or the
``transformers`` tokenizer / processor a module holds), with the model's context length
(:func:`model_context_length`); a tokenizer or ``context_length`` that disagrees with it, or a string caption for a
model without a tokenizer, is an error that says what to pass, never a silent guess (:func:`resolve_tokenizer`).
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
    "MissingTokenizer",
    "TransformersTokenizer",
    "clip_normalize",
    "find_open_clip",
    "model_context_length",
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


class MissingTokenizer:
    """The tokenizer of a model that has none (see :func:`resolve_tokenizer` with ``required=False``): batches whose
    captions are already token ids need none, and calling it (a caption string to tokenize, a prompt to embed) raises
    a ``ValueError`` that says what to pass. Picklable, so it works in dataloader worker processes."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __call__(self, texts: list[str] | str) -> Tensor:
        raise ValueError(self.message)

    def __repr__(self) -> str:
        return "MissingTokenizer()"


class TransformersTokenizer:
    """A ``transformers`` tokenizer (or the tokenizer of a processor) as a lightning-chips tokenizer: captions ->
    ``LongTensor[B, context_length]`` input ids, padded to ``context_length`` with the tokenizer's pad token and
    truncated to it (``padding="max_length"``, as CLIP and SigLIP text towers were trained). Loads nothing.

    Args:
        tokenizer: a ``transformers`` tokenizer (``PreTrainedTokenizerBase``) or a processor holding one.
        context_length: tokens per caption (the text tower's ``max_position_embeddings``).
    """

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer = _transformers_tokenizer(tokenizer)
        if self.tokenizer is None:
            raise TypeError(f"Not a transformers tokenizer or processor: {type(tokenizer).__name__}.")
        self.context_length = int(context_length)

    def __call__(self, texts: list[str] | str) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.context_length,
                             return_tensors="pt")  # fmt: skip
        return out["input_ids"]

    def __repr__(self) -> str:
        return f"TransformersTokenizer({type(self.tokenizer).__name__}, context_length={self.context_length})"


def _transformers_tokenizer(obj: Any) -> Any | None:
    """``obj`` when it is a ``transformers`` tokenizer, a processor's tokenizer, else None (nothing is imported)."""
    for candidate in (obj, getattr(obj, "tokenizer", None)):
        if (candidate is not None and type(candidate).__module__.split(".")[0] == "transformers"
                and hasattr(candidate, "model_max_length") and callable(candidate)):  # fmt: skip
            return candidate
    return None


def _candidates(module: Any) -> list[Any]:
    """The module, the models it holds under ``model`` / ``clip`` and its one direct child module (if it has just
    one): where a CLIP and its tokenizer are looked for (as :func:`~lightning_chips.adapters.resolve_adapter` looks
    for the CLIP)."""
    found = [module]
    children = list(module.children()) if callable(getattr(module, "children", None)) else []
    only_child = children[0] if len(children) == 1 else None
    for value in (getattr(module, "model", None), getattr(module, "clip", None), only_child):
        if value is not None and all(value is not f for f in found):
            found.append(value)
    return found


def model_context_length(module: Any) -> int | None:
    """The number of text tokens a model takes, or None when it does not say.

    Read from the module or the model it holds under ``model`` / ``clip``: a ``context_length`` attribute (open_clip
    ``CLIP`` / ``CustomTextCLIP``, :class:`~lightning_chips.models.OpenCLIPModule`,
    :class:`~lightning_chips.models.TwoTowerCLIP`), else a ``transformers`` CLIPModel / SiglipModel's
    ``config.text_config.max_position_embeddings``.
    """
    if module is None:
        return None
    for candidate in _candidates(module):
        value = getattr(candidate, "context_length", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        length = getattr(getattr(getattr(candidate, "config", None), "text_config", None), "max_position_embeddings",
                         None)  # fmt: skip
        if isinstance(length, int) and not isinstance(length, bool):
            return length
    return None


def _declared_length(tokenizer: Any) -> int | None:
    """The context length a tokenizer says it pads / truncates to (open_clip's tokenizers have ``context_length``)."""
    value = getattr(tokenizer, "context_length", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _wrap_transformers(tokenizer: Any, size: int | None, option: str) -> Any:
    """A ``transformers`` tokenizer / processor as a :class:`TransformersTokenizer` of ``size`` tokens (default: its
    own ``model_max_length`` when it has a real one); anything else as it is."""
    hf = _transformers_tokenizer(tokenizer)
    if hf is None or isinstance(tokenizer, TransformersTokenizer):
        return tokenizer
    size = size or (hf.model_max_length if hf.model_max_length < 100_000 else None)
    if size is None:
        raise ValueError(f"The transformers tokenizer {type(hf).__name__} has no maximum length and the model does "
                         f"not say its context length; pass {option}.")  # fmt: skip
    return TransformersTokenizer(hf, size)


def _module_tokenizer(module: Any) -> Any | None:
    """The tokenizer a model holds: its ``get_tokenizer()``, else a ``tokenizer`` / ``processor`` attribute (of the
    module or its ``model`` / ``clip``) that is a ``transformers`` tokenizer or processor or an open_clip tokenizer
    (a callable with a ``context_length``); None when it holds none."""
    if callable(getattr(module, "get_tokenizer", None)):
        return module.get_tokenizer()
    for candidate in _candidates(module):
        for name in ("tokenizer", "processor"):
            value = getattr(candidate, name, None)
            if _transformers_tokenizer(value) is not None or (callable(value) and _declared_length(value)):
                return value
    return None


def _option(name: str, command_line: bool, value: Any = None) -> str:
    """How the user passes an option: ``tokenizer=`` / ``context_length=16`` or ``--tokenizer`` / ``--context_length
    16`` on the command line."""
    if command_line:
        return f"`--{name}`" if value is None else f"`--{name} {value}`"
    return f"`{name}=`" if value is None else f"`{name}={value}`"


def resolve_tokenizer(
    tokenizer: str | Callable[[list[str]], Tensor] | None,
    context_length: int | None,
    module: Any = None,
    *,
    required: bool = True,
    command_line: bool = False,
) -> Callable[[list[str]], Tensor]:
    """Pick the tokenizer for a data module, and check that it agrees with the model's context length.

    Order: ``tokenizer`` (an open_clip model name, whose tokenizer is built with ``context_length``, else with that
    open_clip model's own context length; a callable; or a ``transformers`` tokenizer / processor); the attached
    LightningModule's own tokenizer: its ``get_tokenizer()`` (e.g. :class:`~lightning_chips.models.OpenCLIPModule`),
    else a ``tokenizer`` / ``processor`` attribute of the module or of the model it holds under ``model`` / ``clip``
    (a ``transformers`` tokenizer or processor, as a transformers CLIPModel / SiglipModel comes with, is wrapped in
    :class:`TransformersTokenizer`: ``max_length`` padding to the model's context length). Nothing is downloaded
    here beyond what a named open_clip tokenizer itself fetches. With no model attached (a data module used on its
    own): open_clip's default BPE tokenizer with ``context_length`` (77 when None).

    The model's context length is :func:`model_context_length`. A ``context_length``, or a tokenizer that says how
    many tokens it gives (``tokenizer.context_length``, as open_clip's tokenizers do), that differs from it is a
    ``ValueError`` naming both lengths and what to pass: a model with 16 positions fed 77 tokens would otherwise
    fail in its first step. (A tokenizer that does not say is checked on every batch by
    :class:`~lightning_chips.data.PairCollate`.)

    Args:
        tokenizer: an open_clip model name, a callable mapping a list of captions to token ids, a ``transformers``
            tokenizer or processor, or None (the model's).
        context_length: tokens per caption (default: the model's).
        module: the LightningModule the data feeds, or None.
        required: with False, a model without a tokenizer gives a :class:`MissingTokenizer`, which fails only when
            called (captions that are already token ids need no tokenizer); with True (default) that is the error.
        command_line: name the options ``--tokenizer`` / ``--context_length`` in the errors (``lightning-chips
            score``), not ``tokenizer=`` / ``context_length=``.

    Raises:
        ValueError: for a model without a tokenizer when ``required`` and none is given (its vocabulary is unknown:
            a guess would train on wrong tokens), or a ``context_length`` or tokenizer length that disagrees with
            the model's.
    """
    import open_clip

    cli = command_line
    if context_length is not None and (isinstance(context_length, bool) or not isinstance(context_length, int)
                                       or context_length < 2):  # fmt: skip
        raise ValueError(f"{_option('context_length', cli)} must be an integer >= 2 (start and end tokens), got "
                         f"{context_length!r}.")  # fmt: skip
    model = type(module).__name__
    length = model_context_length(module)
    if context_length is not None and length is not None and context_length != length:
        raise ValueError(
            f"{_option('context_length', cli, context_length)} disagrees with the context length of the model "
            f"{model} ({length} tokens); leave it unset, or pass {length}."
        )
    if tokenizer is None and module is not None:
        found = _module_tokenizer(module)
        if found is None:
            message = (
                f"{model} has no tokenizer (no get_tokenizer() method, no `tokenizer` or `processor` attribute), so "
                "captions given as strings, and prompts to embed, cannot be tokenized. Pass "
                f"{_option('tokenizer', cli)}{'' if cli else ' to the data module'} (an open_clip model name whose "
                "tokenizer to use, such as 'ViT-B-32', with "
                f"{_option('context_length', cli, length if length is not None else 'N')} for the model's context "
                "length" + ("" if cli else ", or a callable mapping a list of captions to token ids")
                + "), or give the LightningModule a get_tokenizer() method returning its tokenizer"
                + ("." if cli else "; captions given as token ids need none.")
            )  # fmt: skip
            if required:
                raise ValueError(message)
            return MissingTokenizer(message)
        found = _wrap_transformers(found, context_length or length, _option("context_length", cli))
        given = _declared_length(found)
        if context_length is not None and given is not None and given != context_length:
            raise ValueError(
                f"{_option('context_length', cli, context_length)} disagrees with the model's tokenizer ({given} "
                "tokens); leave it unset to use the model's."
            )
        if given is not None and length is not None and given != length:
            raise ValueError(
                f"The tokenizer of the model {model} gives {given} tokens per caption but the model takes {length} "
                f"(its context length). Fix its tokenizer, or pass {_option('tokenizer', cli)} with "
                f"{_option('context_length', cli, length)}."
            )
        return found
    if tokenizer is None:
        return open_clip.tokenizer.SimpleTokenizer(context_length=context_length or 77)
    if isinstance(tokenizer, str):
        found, what = open_clip.get_tokenizer(tokenizer, context_length=context_length), f"tokenizer {tokenizer!r}"
    elif _transformers_tokenizer(tokenizer) is not None:
        found = _wrap_transformers(tokenizer, context_length or length, _option("context_length", cli))
        what = f"tokenizer {type(found.tokenizer).__name__}"
    elif callable(tokenizer):
        found, what = tokenizer, "tokenizer given"
    else:
        raise TypeError(
            f"{_option('tokenizer', cli)} must be an open_clip model name, a callable mapping a list of captions to "
            f"token ids or a transformers tokenizer, got {type(tokenizer).__name__}."
        )
    given = _declared_length(found)
    if context_length is not None and given is not None and given != context_length:
        raise ValueError(f"The {what} gives {given} tokens per caption, not the "
                         f"{_option('context_length', cli, context_length)} asked for.")  # fmt: skip
    if given is not None and length is not None and given != length:
        raise ValueError(
            f"The {what} gives {given} tokens per caption but the model {model} takes {length} (its context "
            f"length). Pass {_option('context_length', cli, length)} with {_option('tokenizer', cli)} to pad and "
            "truncate the captions to the model's length."
        )
    return found
