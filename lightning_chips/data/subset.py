"""``ScoredSubsetDataModule``: train on the current selection of a pool; serve the pool and target for scoring."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from typing_extensions import override

from lightning_chips.data.checks import CheckedPairs, SkippedSample
from lightning_chips.data.preprocess import (
    MissingTokenizer,
    model_context_length,
    model_image_input,
    resolve_tokenizer,
)
from lightning_chips.data.sampler import ScoredSubsetSampler
from lightning_chips.selection import Selection

if TYPE_CHECKING:
    from lightning_chips.data.pool import MapPool, PoolItem

__all__ = ["PairCollate", "ScoredSubsetDataModule", "SelectionDataLoader"]


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


def hide_unset_loaders(datamodule: LightningDataModule, **sets: object) -> None:
    """Make ``NAME_dataloader`` read as not overridden for each ``NAME`` whose set is None, so Lightning neither
    runs that loop nor warns "You passed in a `val_dataloader` but have no `validation_step`" for a data module
    without a validation set (Lightning checks whether the method is overridden, not what it returns)."""
    for name, value in sets.items():
        if value is None:
            method = f"{name}_dataloader"
            setattr(datamodule, method, functools.partial(getattr(LightningDataModule, method), datamodule))


class ScoredSubsetDataModule(LightningDataModule):
    """A pool to select from, a target set to select for, and training batches drawn from the live selection.

    Pair it with :class:`~lightning_chips.DataSelectionCallback`: the callback scores the pool (through the
    :class:`~lightning_chips.data.pool.SelectablePool` methods :meth:`target_batches`, :meth:`pool_sample_batches`,
    :meth:`scoring_batches`) and hands each new :class:`Selection` to
    :attr:`selection`; the training sampler (:class:`ScoredSubsetSampler`) draws ``steps_per_round`` batches per
    epoch from it, so one Lightning epoch is one selection round. Before any selection the whole pool is
    sampled.

    Items are dicts ``{"image", "text": str | LongTensor, "id": int[, "label": int]}``. The image may be a PIL
    image, a uint8 image, or a float ``[3, H, W]`` tensor in [0, 1]: the data module applies the model's own
    open_clip preprocessing (:mod:`lightning_chips.data.preprocess`); a float tensor outside [0, 1] is taken as
    already normalised and passes through unchanged, with a warning. String captions are tokenized per batch with
    the ``tokenizer`` given or the model's own (``get_tokenizer()``, e.g. :class:`~lightning_chips.models.
    OpenCLIPModule`, or a ``transformers`` tokenizer / processor the module holds), with the model's context length
    (:func:`~lightning_chips.data.preprocess.resolve_tokenizer`: a tokenizer or ``context_length`` that disagrees
    with it is an error at setup). Captions that are already token ids need no tokenizer; they are stacked without
    padding, so one batch's items must have the same length, at most the model's context length
    (:class:`PairCollate`). A model without a tokenizer and a set whose captions are strings is an error at setup
    naming what to pass.
    A directory of images and captions is :class:`~lightning_chips.data.ImageCaptionFolder` (``lazy=True``).

    **Bad samples.** Every dataset is read through :class:`~lightning_chips.data.checks.CheckedPairs`: an item
    whose loading raises (an undecodable, empty or over-limit image, ...) or that fails the checks of
    :func:`~lightning_chips.data.checks.check_pair` (missing id, empty or non-UTF-8 caption) is a
    :class:`~lightning_chips.data.checks.SkippedSample`. The scoring passes hand them over beside each batch
    (``(batch, skipped)``); the callback skips them, never selects them
    and names them in the round file. In training and evaluation batches (before the first selection, or in
    ``val`` / ``test``) a bad pair's slot is filled with a copy of a valid pair of the batch and recorded in
    :attr:`skipped` with a warning. An item that is not a dict with ``image`` and ``text`` is a ``TypeError``
    naming its index.

    Args:
        pool: map-style dataset of candidate pairs.
        target: map-style dataset of target-domain pairs (the callback may also be given its own).
        batch_size: training batch size per device.
        steps_per_round: optimizer steps per selection round (= Lightning epoch).
        num_workers: dataloader workers.
        val: optional validation dataset.
        test: optional test dataset.
        eval_batch_size: batch size of the scoring and evaluation passes (default: ``batch_size``).
        seed: seed of the training draws (with the round and the epoch).
        persistent_workers: keep training workers alive across rounds (they still see each new selection).
        transform: PIL image -> normalised tensor, for items whose image is a PIL image (or uint8); default: the
            model's open_clip preprocess (the training augmentation for training batches, the evaluation transform
            for scoring and evaluation, as ``open_clip.create_model_and_transforms`` gives them).
        normalize: ``"clip"`` normalises float images in [0, 1] with the model's mean / std (an image with values
            outside [0, 1] is taken as already normalised and passes through, with a warning); ``"none"`` leaves
            float images as they are.
        tokenizer: an open_clip model name, a callable, or a ``transformers`` tokenizer (default: the model's own;
            a model without one whose captions are strings needs this).
        context_length: tokenizer context length (default: the model's; another one is an error).

    Example::

        >>> from lightning_chips.data import TwoDomainPairs
        >>> dm = ScoredSubsetDataModule(TwoDomainPairs(1000), TwoDomainPairs(50, target_fraction=1.0, split="val"),
        ...                             batch_size=32, steps_per_round=20, context_length=16)
    """

    def __init__(
        self,
        pool: Dataset,
        target: Dataset | None = None,
        batch_size: int = 64,
        steps_per_round: int = 100,
        *,
        num_workers: int = 0,
        val: Dataset | None = None,
        test: Dataset | None = None,
        eval_batch_size: int | None = None,
        seed: int = 0,
        persistent_workers: bool = True,
        transform: Callable[[Any], Tensor] | None = None,
        normalize: Literal["clip", "none"] = "clip",
        tokenizer: str | Callable[[list[str]], Tensor] | None = None,
        context_length: int | None = None,
    ) -> None:
        super().__init__()
        if not hasattr(pool, "__getitem__") or not hasattr(pool, "__len__"):
            raise ValueError(f"`pool` must be a map-style dataset (with __getitem__ and __len__), got {type(pool)}.")
        if len(pool) == 0:
            raise ValueError("`pool` is empty: there is nothing to select from.")
        if target is not None and len(target) == 0:
            raise ValueError("`target` is empty; pass at least one target-domain pair, or None.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        if steps_per_round < 1:
            raise ValueError(f"`steps_per_round` must be >= 1, got {steps_per_round}.")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}.")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"`eval_batch_size` must be >= 1, got {eval_batch_size}.")
        if normalize not in ("clip", "none"):
            raise ValueError(f"`normalize` must be 'clip' or 'none', got {normalize!r}.")
        self.pool, self.target, self.val, self.test = pool, target, val, test
        self.batch_size, self.steps_per_round = batch_size, steps_per_round
        self.num_workers, self.persistent_workers = num_workers, persistent_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self.normalize, self.transform = normalize, transform
        self.tokenizer_name, self.context_length = tokenizer, context_length
        self.selection: Selection | None = None
        self._checked: dict[int, CheckedPairs] = {}
        self.collate: PairCollate | None = None
        self.train_collate: PairCollate | None = None
        self.sampler: ScoredSubsetSampler | None = None
        self._train_loader: DataLoader | None = None
        hide_unset_loaders(self, val=val, test=test)

    # -- setup ------------------------------------------------------------------------------------------------
    @override
    def setup(self, stage: str) -> None:
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        if self.collate is None:
            tokenizer = resolve_tokenizer(self.tokenizer_name, self.context_length, module, required=False)
            if isinstance(tokenizer, MissingTokenizer):
                self._check_no_strings(tokenizer)
            length = model_context_length(module) or self.context_length
            normalize = self.normalize == "clip"
            self.collate = PairCollate(tokenizer, model_image_input(module, self.transform, normalize=normalize),
                                       length)  # fmt: skip
            self.train_collate = PairCollate(
                tokenizer, model_image_input(module, self.transform, train=True, normalize=normalize), length
            )
        accumulate = getattr(trainer, "accumulate_grad_batches", 1) if trainer is not None else 1
        if self.sampler is None:
            self.sampler = ScoredSubsetSampler(
                len(self.pool),
                self.steps_per_round * self.batch_size * accumulate,
                seed=self.seed,
                selection_fn=lambda: self.selection,
                epoch_fn=(lambda: trainer.current_epoch) if trainer is not None else None,
            )
        if trainer is not None:
            self.sampler.set_distributed(trainer.global_rank, trainer.world_size)

    def _check_no_strings(self, tokenizer: MissingTokenizer) -> None:
        """Without a tokenizer, the first item of each dataset must carry token ids, not a caption string: said at
        setup, before any training step, rather than at the first batch (an item that fails to load is not
        judged here)."""
        for name, dataset in (("pool", self.pool), ("target", self.target), ("val", self.val), ("test", self.test)):
            if dataset is None or len(dataset) == 0:
                continue
            try:
                item = dataset[0]
            except Exception:  # a bad sample: the checks of the passes name it
                continue
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                raise ValueError(f"The {name} set's captions are strings. {tokenizer.message}")

    def checked(self, dataset: Dataset) -> CheckedPairs:
        """The :class:`~lightning_chips.data.checks.CheckedPairs` view of ``dataset`` (one per dataset)."""
        if id(dataset) not in self._checked:
            self._checked[id(dataset)] = CheckedPairs(dataset)
        return self._checked[id(dataset)]

    @property
    def skipped(self) -> dict[str, list[SkippedSample]]:
        """The bad pairs met in training and evaluation batches so far, per dataset (``"pool"``, ``"target"``,
        ``"val"``, ``"test"``); the scoring rounds' bad pairs are in the callback's round files and history."""
        names = {"pool": self.pool, "target": self.target, "val": self.val, "test": self.test}
        found = {}
        for name, dataset in names.items():
            checked = self._checked.get(id(dataset)) if dataset is not None else None
            if checked is not None and checked.skipped:
                found[name] = [checked.skipped[i] for i in sorted(checked.skipped)]
        return found

    def _require_setup(self) -> PairCollate:
        if self.collate is None:
            self.setup("fit")
        assert self.collate is not None
        return self.collate

    # -- loaders ----------------------------------------------------------------------------------------------
    @override
    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        collate = self.train_collate
        if self._train_loader is None:
            self._train_loader = SelectionDataLoader(
                self.checked(self.pool),
                batch_size=self.batch_size,
                sampler=self.sampler,
                collate_fn=collate,
                num_workers=self.num_workers,
                persistent_workers=self.persistent_workers and self.num_workers > 0,
                drop_last=False,
            )
        return self._train_loader

    def _eval_loader(self, dataset: Dataset, indices: Sequence[int] | None = None, *, fill: bool = False) -> DataLoader:
        collate = self._require_setup()
        data = self.checked(dataset)
        data = data if indices is None else Subset(data, list(indices))
        cls = SelectionDataLoader if fill else DataLoader
        return cls(data, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate,
                   num_workers=self.num_workers)  # fmt: skip

    # -- the SelectablePool contract (lightning_chips.data.pool): what a selection round reads ----------------------
    def scoring_pool(self) -> MapPool:
        """The :class:`~lightning_chips.data.pool.MapPool` that serves this module's selection rounds."""
        from lightning_chips.data.pool import MapPool  # pool.py builds on this module's collate

        return MapPool(self.pool, self.target, self._require_setup(), self.eval_batch_size, self.num_workers,
                       checked=self.checked)  # fmt: skip

    def pool_size(self) -> int:
        return len(self.pool)  # type: ignore[arg-type]

    def target_batches(self, target: Dataset | None, rank: int, world: int) -> Iterator[PoolItem]:
        """This rank's share of the target set (or the given one), bad pairs alongside (see
        :class:`~lightning_chips.data.pool.SelectablePool`)."""
        return self.scoring_pool().target_batches(target, rank, world)

    def pool_sample_batches(self, size: int | None, round: int, seed: int, rank: int,
                            world: int) -> Iterator[PoolItem]:  # fmt: skip
        """This rank's part of ``size`` pool pairs drawn with ``numpy.random.default_rng([seed, round])``."""
        return self.scoring_pool().pool_sample_batches(size, round, seed, rank, world)

    def scoring_batches(self, rank: int, world: int) -> Iterator[PoolItem]:
        """This rank's contiguous share of the pool, unshuffled, bad pairs alongside."""
        return self.scoring_pool().scoring_batches(rank, world)

    @override
    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val is None else self._eval_loader(self.val, fill=True)

    @override
    def test_dataloader(self) -> DataLoader | list:
        return [] if self.test is None else self._eval_loader(self.test, fill=True)
