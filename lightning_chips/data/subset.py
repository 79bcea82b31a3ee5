"""``ScoredSubsetDataModule``: train on the current selection of a pool; serve the pool and target for scoring."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from typing_extensions import override

from lightning_chips.data.checks import CheckedPairs, SkippedSample
from lightning_chips.data.collate import PairCollate, SelectionDataLoader
from lightning_chips.data.pool import MapBatches, MapPool, PoolMethods
from lightning_chips.data.preprocess import (
    MissingTokenizer,
    model_context_length,
    model_image_input,
    resolve_tokenizer,
)
from lightning_chips.data.sampler import ScoredSubsetSampler
from lightning_chips.selection import Selection

__all__ = ["PairCollate", "ScoredSubsetDataModule", "SelectionDataLoader"]  # the collates live in collate.py


class ScoredSubsetDataModule(PoolMethods, LightningDataModule):
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
        # Lightning runs a loop (and warns when the model has no step for it) when the loader method is overridden:
        # the loaders of the sets given are bound here, as LightningDataModule.from_datasets binds them (a subclass
        # that defines its own loader method keeps it)
        if val is not None and type(self).val_dataloader is LightningDataModule.val_dataloader:
            self.val_dataloader = self._val_loader  # type: ignore[method-assign]
        if test is not None and type(self).test_dataloader is LightningDataModule.test_dataloader:
            self.test_dataloader = self._test_loader  # type: ignore[method-assign]

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
    @override
    def scoring_pool(self) -> MapPool:
        """The :class:`~lightning_chips.data.pool.MapPool` that serves this module's selection rounds: contiguous
        shares per rank, a pool sample of ``numpy.random.default_rng([seed, round])``, pairs read back by index."""
        return MapPool(self.pool, self.target, self._require_setup(), self.eval_batch_size, self.num_workers,
                       checked=self.checked)  # fmt: skip

    def pool_size(self) -> int:
        return len(self.pool)  # type: ignore[arg-type]

    def indexed_batches(self, indices: np.ndarray, rank: int, world: int) -> MapBatches:
        """This rank's share of the pool pairs at ``indices``, for a candidate round
        (:class:`~lightning_chips.data.pool.IndexedPool`)."""
        return self.scoring_pool().indexed_batches(indices, rank, world)

    def _val_loader(self) -> DataLoader:
        return self._eval_loader(self.val, fill=True)  # type: ignore[arg-type]

    def _test_loader(self) -> DataLoader:
        return self._eval_loader(self.test, fill=True)  # type: ignore[arg-type]
