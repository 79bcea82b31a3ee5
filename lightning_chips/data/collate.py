"""Collates and loaders: how pairs become batches (:class:`PairCollate`, :class:`ShardCollate`) and the training
loader that reads the selection in force when an epoch starts (:class:`SelectionDataLoader`). Shared by the data
modules, the pools of :mod:`lightning_chips.data.pool` and ``lightning-chips score``."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset, default_collate

from lightning_chips.data.checks import CheckedPairs, ShardReport, SkippedSample

__all__ = ["LazyIterator", "PairCollate", "SelectionDataLoader", "ShardCollate", "StreamCollate"]


class PairCollate:
    """Collate ``{"image", "text", "id", ...}`` items; string captions are tokenized as a batch.

    ``image`` turns each item's image into the model's input (an
    :class:`~lightning_chips.data.preprocess.ImageInput`: PIL, uint8 or float images, the model's preprocess and
    normalisation) before the batch is stacked; None stacks the images as they are.
    :class:`~lightning_chips.data.checks.SkippedSample` items (pairs of a :class:`~lightning_chips.data.checks.
    CheckedPairs` pool that failed to load) are left out of the tensors and listed in ``batch["bad"]``; a batch of
    bad pairs only is ``{"id": <empty>, "bad": [...]}``. Picklable, so it works in dataloader worker processes.

    **Captions.** Strings are tokenized with ``tokenizer`` (None, or a
    :class:`~lightning_chips.data.preprocess.MissingTokenizer`: an error that says what to pass). Captions that are
    already token ids (an integer tensor, array, or a list of ints) need no tokenizer: they are stacked as they
    are, without padding, so the items of a batch must have the same number of tokens (pad them in the dataset, with
    the pad id of the tokenizer that made them: a pad id cannot be guessed, open_clip pads with 0, a transformers
    CLIP tokenizer with its end-of-text id). Float tensors (precomputed text features) are stacked as they are.
    With ``context_length`` (the model's), token ids longer than it, given or from the tokenizer, are an error
    naming both lengths (shorter ones pass: open_clip text towers take any length up to theirs).

    Args:
        tokenizer: maps a list of captions to ``LongTensor[B, L]``; None when the captions are token ids.
        image: the per-item image transform, or None.
        context_length: the model's context length, checked on every batch; None: no check.
    """

    def __init__(
        self,
        tokenizer: Callable[[list[str]], Tensor] | None = None,
        image: Callable[[Any], Tensor] | None = None,
        context_length: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.image = image
        self.context_length = context_length

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("Cannot collate an empty batch.")
        bad = [item for item in items if isinstance(item, SkippedSample)]
        if bad:
            items = [item for item in items if not isinstance(item, SkippedSample)]
            batch = PairCollate.__call__(self, items) if items else {"id": torch.empty(0, dtype=torch.int64)}
            batch["bad"] = bad
            return batch
        texts = [item["text"] for item in items]
        images = [item["image"] if self.image is None else self.image(item["image"]) for item in items]
        rest = _collate_rest(items)
        rest["image"] = torch.stack([torch.as_tensor(image) for image in images])
        if isinstance(texts[0], str):
            if self.tokenizer is None:
                raise ValueError("The pool yields caption strings but no tokenizer is set; pass one to the datamodule.")
            rest["text"] = self.tokenizer(texts)
            self._check_length(rest["text"], "the tokenizer gives")
        else:
            rest["text"] = _stack_texts(texts, items)
            self._check_length(rest["text"], "the dataset gives")
        return rest

    def _check_length(self, tokens: Any, source: str) -> None:
        if (self.context_length is None or not isinstance(tokens, Tensor) or tokens.dim() != 2
                or tokens.is_floating_point() or tokens.shape[-1] <= self.context_length):  # fmt: skip
            return
        raise ValueError(
            f"Captions of {tokens.shape[-1]} tokens ({source}) but the model's context length is "
            f"{self.context_length}: tokenize with the model's context length (`context_length={self.context_length}`"
            " for a named tokenizer), or truncate the token ids in the dataset."
        )


def _stack_texts(texts: list[Any], items: Sequence[dict[str, Any]]) -> Tensor:
    """Captions given as token ids (or precomputed text features) as one tensor; token ids of different lengths are
    an error naming the items (see :class:`PairCollate`: no pad id is guessed)."""
    tensors = [torch.as_tensor(text) for text in texts]  # a list of ints is int64
    if len({tuple(t.shape) for t in tensors}) > 1 and not any(t.is_floating_point() for t in tensors):
        shown = ", ".join(f"id {item.get('id')!r}: {tuple(t.shape)}" for item, t in zip(items[:4], tensors[:4],
                                                                                       strict=True))  # fmt: skip
        raise ValueError(
            f"The captions of a batch are token ids of different lengths ({shown}, ...); they are stacked without "
            "padding, so pad them in the dataset to one length (the model's context length), with the pad id of the "
            "tokenizer that made them."
        )
    return torch.stack(tensors)


def _collate_rest(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fields of ``items`` other than image and text: ``default_collate`` d when every item has the field and
    it collates (ids, labels, indices, numbers, strings); otherwise, and always for a WebDataset sample's parsed
    ``"json"``, a list with one value per item (None where an item lacks it), so metadata of any shape passes
    through to ``group_by``."""
    names = list(dict.fromkeys(k for item in items for k in item if k not in ("text", "image")))
    rest: dict[str, Any] = {}
    for name in names:
        values = [item.get(name) for item in items]
        if name != "json" and all(name in item for item in items):
            try:
                rest[name] = default_collate(values)
                continue
            except (TypeError, RuntimeError, KeyError):
                pass
            if name in ("id", "label", "index", "shard"):  # the fields a round reads must collate
                rest[name] = default_collate(values)
        rest[name] = values
    return rest


class LazyIterator:
    """Creates the real dataloader iterator at the first ``next()``, not at ``iter()``."""

    def __init__(self, loader: DataLoader) -> None:
        self._loader, self._iterator = loader, None

    def __iter__(self) -> LazyIterator:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = DataLoader.__iter__(self._loader)
        batch = next(self._iterator)
        if isinstance(batch, dict) and "bad" in batch:
            batch = _fill_bad_slots(batch, self._loader.dataset)
        return batch

    def __len__(self) -> int:
        return len(self._loader)


class SelectionDataLoader(DataLoader):
    """A DataLoader whose workers start (and whose sampler is read) at the first batch, not at ``iter()``.

    Lightning calls ``iter()`` on the training loader early (e.g. when ``estimated_stepping_batches`` is read in
    ``configure_optimizers``, before any hook a selection round can run in), and worker processes prefetch
    indices as soon as their iterator exists. Deferring the iterator to the first ``next()`` makes every epoch,
    the first one included, draw from the selection and epoch in force when it starts.

    A batch holding pairs that failed to load (``batch["bad"]``, see :class:`PairCollate`) keeps its size: each
    bad pair's slot is filled with a copy of a valid pair of the same batch (so every DDP rank's batch has the
    same size), the bad pairs are recorded in the pool's :attr:`~lightning_chips.data.checks.CheckedPairs.skipped`
    and a warning names them. A batch without any valid pair is an error naming its pairs.
    """

    def __iter__(self) -> LazyIterator:  # type: ignore[override]
        return LazyIterator(self)


def _fill_bad_slots(batch: dict[str, Any], dataset: Any) -> dict[str, Any]:
    """Record ``batch["bad"]`` and fill its slots with copies of the batch's valid pairs (see
    :class:`SelectionDataLoader`)."""
    bad: list[SkippedSample] = batch.pop("bad")
    named = ", ".join(f"index {b.index} (id {b.id}): {b.reason}" for b in bad[:5])
    checked = dataset.dataset if isinstance(dataset, Subset) else dataset
    if isinstance(checked, CheckedPairs):  # kept without the loading tracebacks (one per bad pair would add up)
        checked.skipped.update({b.index: dataclasses.replace(b, traceback="") for b in bad})
    n = len(batch["id"])
    if n == 0:
        raise RuntimeError(
            f"Every pair of a batch failed to load ({len(bad)} pairs: {named}); fix or remove these samples."
        )
    fill = torch.arange(n + len(bad)) % n
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
            batch[key] = value[fill]
        elif isinstance(value, list | tuple) and len(value) == n:
            batch[key] = [value[i] for i in fill.tolist()]
    warnings.warn(
        f"{len(bad)} pair(s) of a batch could not be used and their slots were filled with copies of other pairs "
        f"of the batch: {named}.",
        UserWarning,
        stacklevel=2,
    )
    return batch


class ShardCollate(PairCollate):
    """:class:`PairCollate` that passes :class:`ShardReport` items through as ``batch["reports"]``.

    A batch may hold only reports (e.g. a shard with no valid pair); its ``"id"`` is then empty.
    """

    def __call__(self, items: Sequence[dict[str, Any] | ShardReport]) -> dict[str, Any]:  # type: ignore[override]
        reports = [item for item in items if isinstance(item, ShardReport)]
        pairs = [item for item in items if not isinstance(item, ShardReport)]
        batch = super().__call__(pairs) if pairs else {"id": torch.empty(0, dtype=torch.int64)}
        batch["reports"] = reports
        return batch


class StreamCollate(PairCollate):
    """:class:`PairCollate` that gathers the pairs' ``"reports"`` (see :class:`~lightning_chips.data.SelectedStream`)
    into ``batch["reports"]``."""

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        reports = [report for item in items for report in item.get("reports", ())]
        batch = super().__call__([{k: v for k, v in item.items() if k != "reports"} for item in items])
        batch["reports"] = reports
        return batch
