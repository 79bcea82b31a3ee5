"""``WebDatasetDataModule``: continual pre-training on the current selection of a WebDataset pool.

The streaming counterpart of :class:`~lightning_chips.data.ScoredSubsetDataModule`. The pool stays in its tar
shards; :class:`~lightning_chips.DataSelectionCallback` scores it shard-wise on every rank each round, and the
training stream keeps only the selected uids. One Lightning epoch is one selection round of exactly
``steps_per_round`` batches on every rank (DDP needs equal batch counts), drawn by cycling over the rank's shards
with a seeded shuffle buffer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import numpy as np
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from typing_extensions import override

from lightning_chips.data.checks import ShardReport, SkippedSample
from lightning_chips.data.collate import LazyIterator, PairCollate, SelectionDataLoader, StreamCollate
from lightning_chips.data.pool import PoolMethods, ShardPool
from lightning_chips.data.preprocess import model_context_length, model_image_input, resolve_tokenizer
from lightning_chips.data.target import ListDataset, load_target_pairs
from lightning_chips.data.webdataset import WebDatasetPairs, iter_raw_samples
from lightning_chips.selection import Selection

__all__ = ["SelectedStream", "WebDatasetDataModule"]


class _Live:
    """The selection and epoch in force, read live in the main process and frozen when pickled into a worker
    (workers are started at each epoch's first batch, after the round that chose the selection)."""

    def __init__(self, selection_fn: Callable[[], Selection | None], epoch_fn: Callable[[], int]) -> None:
        self.selection_fn, self.epoch_fn = selection_fn, epoch_fn

    def snapshot(self) -> tuple[np.ndarray | None, int]:
        selection = self.selection_fn()
        return (None if selection is None else np.asarray(selection.ids, dtype=np.int64)), int(self.epoch_fn())

    def __getstate__(self) -> dict[str, Any]:
        ids, epoch = self.snapshot()
        return {"ids": ids, "epoch": epoch}

    def __setstate__(self, state: dict[str, Any]) -> None:
        ids, epoch = state["ids"], state["epoch"]
        self.selection_fn = lambda: None if ids is None else Selection(ids, ids, None, round=-1)
        self.epoch_fn = lambda: epoch


class SelectedStream(IterableDataset):
    """Exactly ``batches x batch_size`` selected pairs per epoch from one rank's shards.

    Each dataloader worker owns ``shards[worker::workers]`` and yields a whole number of batches (the rank's
    ``batches`` spread over its workers), cycling over its shards in a seeded order through a shuffle buffer,
    so every rank gives the same number of batches whatever the selection. The stream depends only on
    ``(seed, epoch, rank, worker)`` and the selection in force, never on what was read before, so a fit resumed
    from a round-end checkpoint draws the batches of the uninterrupted one.

    A sample that cannot be used (see :func:`~lightning_chips.data.webdataset.decode_pair`) is found when it is
    drawn from the buffer: it is skipped, its place taken by the next draw (batches stay full), and it is not
    buffered again in this epoch. A shard whose reading ends in an error gives the pairs before the damage. With
    ``reports=True`` what was found travels with the next pair drawn, as ``pair["reports"]``: a list of
    :class:`~lightning_chips.data.webdataset.ShardReport` (skipped samples with their key, uid and reason; the
    read error), so that it reaches the main process through the batch from a worker too.
    """

    def __init__(
        self,
        pool: WebDatasetPairs,
        live: _Live,
        *,
        batches: int,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        reports: bool = False,
    ) -> None:
        super().__init__()
        self.pool, self.live = pool, live
        self.batches, self.batch_size = batches, batch_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.reports = reports

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ids, epoch = self.live.snapshot()
        pool = self.pool.with_selection(ids)
        shards = pool.shards_of_rank()
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        active = min(workers, len(shards))
        if worker >= active:
            return
        quota = self.batches // active + int(worker < self.batches % active)
        mine = shards[worker::active]
        rng = np.random.default_rng([self.seed, epoch, pool.rank, worker])
        remaining, buffer = quota * self.batch_size, []
        known_bad: dict[tuple[str, str], str] = {}  # (shard, key) -> reason: not buffered again this epoch
        unreadable: set[str] = set()
        pending: dict[str, ShardReport] = {}  # found since the last pair drawn, by shard

        def found_bad(url: str, key: str, reason: str, uid: int | None) -> None:
            known_bad[(url, key)] = reason
            pending.setdefault(url, ShardReport(url)).skip(key, reason, uid)

        while remaining > 0:
            found = 0
            for i in rng.permutation(len(mine)):
                url = mine[i]
                read = ShardReport(url)  # only for a read error: its message counts the samples read before it
                for key, raw in iter_raw_samples(url, read, pool.uid_field):
                    read.samples += 1
                    if (url, key) in known_bad or not pool.selected(raw):
                        continue
                    found += 1
                    buffer.append((url, key, raw))
                    if len(buffer) < self.shuffle_buffer:
                        continue
                    shard, drawn_key, drawn = buffer.pop(int(rng.integers(len(buffer))))
                    pair = pool.decode_or_reason(drawn)
                    if isinstance(pair, str):
                        if (shard, drawn_key) not in known_bad:  # a copy buffered before it was found
                            found_bad(shard, drawn_key, pair, pool.uid(drawn))
                        continue
                    if self.reports and pending:
                        pair["reports"], pending = list(pending.values()), {}
                    yield pair
                    remaining -= 1
                    if remaining == 0:
                        return
                for bad in read.bad_samples():  # the sample a read error cut off
                    if (url, bad.key) not in known_bad:
                        found_bad(url, bad.key, bad.reason, bad.id)
                if read.error and url not in unreadable:
                    unreadable.add(url)
                    pending.setdefault(url, ShardReport(url)).error = read.error
            if found == 0:
                detail = f" ({len(known_bad)} of their samples could not be used)" if known_bad else ""
                raise RuntimeError(
                    f"Rank {pool.rank}, worker {worker}: none of its {len(mine)} shards holds a selected pair{detail}, "
                    "so it cannot fill its batches; use fewer dataloader workers or a pool split into more shards."
                )


class _StreamSkips:
    """The bad samples and unreadable shards one rank's training stream met, recorded in the main process; each
    is warned about once, at the end of the epoch it was first met in."""

    def __init__(self) -> None:
        self.bad: dict[tuple[str, str], SkippedSample] = {}
        self.errors: dict[str, str] = {}
        self.rank, self.world_size = 0, 1
        self.epoch_fn: Callable[[], int] = lambda: 0
        self._new_bad: list[SkippedSample] = []
        self._new_errors: dict[str, str] = {}
        self._epoch: int | None = None

    def add(self, reports: Iterable[ShardReport]) -> None:
        for report in reports:
            for sample in report.bad_samples():
                if (sample.shard, sample.key) not in self.bad:
                    self.bad[(sample.shard, sample.key)] = sample
                    self._new_bad.append(sample)
            if report.error and report.url not in self.errors:
                self.errors[report.url] = self._new_errors[report.url] = report.error
            if self._epoch is None and (self._new_bad or self._new_errors):
                self._epoch = int(self.epoch_fn())

    def warn(self) -> None:
        """One warning naming what was met for the first time since the last warning (nothing new: none)."""
        if not self._new_bad and not self._new_errors:
            return
        where = f"rank {self.rank}, " if self.world_size > 1 else ""
        parts = []
        if self._new_bad:
            named = "; ".join(b.describe() for b in self._new_bad[:5])
            more = "; ..." if len(self._new_bad) > 5 else ""
            parts.append(f"skipped {len(self._new_bad)} pool samples that could not be used (their places in the "
                         f"batches went to other pairs): {named}{more}")  # fmt: skip
        if self._new_errors:
            named = "; ".join(f"{url}: {error}" for url, error in list(self._new_errors.items())[:5])
            parts.append(f"{len(self._new_errors)} pool shards could not be read to the end (the pairs before the "
                         f"damage were used): {named}")  # fmt: skip
        warnings.warn(
            f"[lightning-chips] training stream ({where}epoch {self._epoch}): " + "; ".join(parts)
            + ". `datamodule.skipped['pool']` and `datamodule.shard_errors` list them all.",
            UserWarning,
            stacklevel=2,
        )  # fmt: skip
        self._new_bad, self._new_errors, self._epoch = [], {}, None


class _StreamIterator(LazyIterator):
    """A :class:`SelectionDataLoader` iterator that takes ``batch["reports"]`` out of each batch into the
    loader's :class:`_StreamSkips` (so the LightningModule never sees them) and warns at the epoch's end."""

    def __next__(self) -> Any:
        skips: _StreamSkips = self._loader.skips
        try:
            batch = super().__next__()
        except StopIteration:
            skips.warn()
            raise
        if isinstance(batch, dict):
            skips.add(batch.pop("reports", ()))
        return batch


class _StreamLoader(SelectionDataLoader):
    """The training loader of a :class:`WebDatasetDataModule`: a :class:`SelectionDataLoader` whose batches'
    shard reports go to ``skips``."""

    def __init__(self, *args: Any, skips: _StreamSkips | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skips = skips if skips is not None else _StreamSkips()

    def __iter__(self) -> _StreamIterator:  # type: ignore[override]
        return _StreamIterator(self)


class WebDatasetDataModule(PoolMethods, LightningDataModule):
    """A WebDataset pool to select from, a target set, and training batches from the live selection.

    Pair it with :class:`~lightning_chips.DataSelectionCallback`. Each round every rank scores its shards
    (``shards[rank::world]``), the scores are gathered, and every rank keeps the same selected uids; the
    training stream (:class:`SelectedStream`) then reads only those. Before the first selection the whole
    pool is streamed; the bad samples and unreadable shards it meets are recorded in :attr:`skipped` and
    :attr:`shard_errors` and named in a warning. Use at least ``world_size x num_workers`` shards. A fit resumed
    from a checkpoint saved at an epoch end draws the uninterrupted fit's batches; Lightning cannot resume this
    iterable stream from the middle of an epoch (it warns, and the epoch restarts from its first batches).

    Args:
        pool: the pool's shards (brace pattern, ``::``-joined, list, directory or glob).
        target: target pairs: shards, a directory of ``NAME.jpg`` + ``NAME.txt``, or a map-style dataset.
        batch_size: training batch size per device.
        steps_per_round: optimizer steps per selection round (= Lightning epoch).
        num_workers: dataloader workers (training and scoring).
        val: optional map-style validation dataset.
        eval_batch_size: batch size of the scoring passes (default: ``batch_size``).
        seed: seed of the training stream and of the pool sample's shard order.
        shuffle_buffer: undecoded samples held (per worker) to shuffle the training stream.
        image_size: image side; default: the model's ``image_size``.
        uid_field: the id's field in each sample's ``.json`` (an int64 or a string).
        worker_start_method: ``"spawn"`` / ``"forkserver"`` / ``"fork"`` dataloader workers.
        tokenizer: an open_clip model name, a callable, or a ``transformers`` tokenizer (default: the model's own,
            see :func:`~lightning_chips.data.preprocess.resolve_tokenizer`; shards hold caption strings, so a model
            without one needs this).
        context_length: tokenizer context length (default: the model's; another one is an error at setup).

    Example::

        >>> dm = WebDatasetDataModule("pool/{000000..000099}.tar", target="target/", batch_size=256,
        ...                           steps_per_round=500, num_workers=8)
        >>> trainer = Trainer(callbacks=[DataSelectionCallback("chips", fraction=0.3, pool_sample=8192)])
    """

    def __init__(
        self,
        pool: str | list[str],
        target: str | list[str] | Dataset | None = None,
        batch_size: int = 64,
        steps_per_round: int = 100,
        *,
        num_workers: int = 0,
        val: Dataset | None = None,
        eval_batch_size: int | None = None,
        seed: int = 0,
        shuffle_buffer: int = 2000,
        image_size: int | None = None,
        uid_field: str = "uid",
        worker_start_method: Literal["fork", "spawn", "forkserver"] | None = None,
        tokenizer: str | Callable[[list[str]], Tensor] | None = None,
        context_length: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("steps_per_round", steps_per_round),
                            ("shuffle_buffer", shuffle_buffer)):  # fmt: skip
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}.")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"`eval_batch_size` must be >= 1, got {eval_batch_size}.")
        self.pool_spec, self.target_spec, self.val = pool, target, val
        self.batch_size, self.steps_per_round = batch_size, steps_per_round
        self.num_workers, self.worker_start_method = num_workers, worker_start_method
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.image_size_arg, self.uid_field = image_size, uid_field
        self.tokenizer_name, self.context_length = tokenizer, context_length
        self.selection: Selection | None = None
        self.pool: WebDatasetPairs | None = None
        self.target: Dataset | None = None
        self.collate: PairCollate | None = None
        self.target_report: dict | None = None
        self._train_loader: DataLoader | None = None
        self._skips = _StreamSkips()
        self.rank, self.world_size = 0, 1
        # bound as in ScoredSubsetDataModule: no validation loop (nor its warning) without val; a subclass's own wins
        if val is not None and type(self).val_dataloader is LightningDataModule.val_dataloader:
            self.val_dataloader = self._val_loader  # type: ignore[method-assign]

    @override
    def setup(self, stage: str) -> None:
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        image_size = int(self.image_size_arg or getattr(module, "image_size", None) or 224)
        if trainer is not None:
            self.rank, self.world_size = trainer.global_rank, trainer.world_size
        self._skips.rank, self._skips.world_size = self.rank, self.world_size
        if self.collate is None:
            tokenizer = resolve_tokenizer(self.tokenizer_name, self.context_length, module)  # shards hold strings
            length = model_context_length(module) or self.context_length
            self.collate = PairCollate(tokenizer, model_image_input(module, image_size=image_size), length)
        if self.pool is None:
            self.pool = WebDatasetPairs(self.pool_spec, image_size=image_size, uid_field=self.uid_field)
        self.pool.bind(self.rank, self.world_size)
        if self.target is None and self.target_spec is not None:
            if isinstance(self.target_spec, Dataset):
                self.target = self.target_spec
            else:
                pairs, self.target_report = load_target_pairs(self.target_spec, image_size, self.uid_field)
                self.target = ListDataset(pairs)

    def _require_setup(self) -> tuple[WebDatasetPairs, PairCollate]:
        if self.pool is None or self.collate is None:
            self.setup("fit")
        assert self.pool is not None and self.collate is not None
        return self.pool, self.collate

    def _loader(self, dataset: Dataset, batch_size: int, collate: Callable, cls: type = DataLoader,
                **kwargs: Any) -> DataLoader:  # fmt: skip
        workers = self.num_workers
        if isinstance(dataset, WebDatasetPairs):
            workers = min(workers, len(dataset.shards_of_rank()))
        return cls(dataset, batch_size=batch_size, collate_fn=collate, num_workers=workers,
                   multiprocessing_context=self.worker_start_method if workers > 0 else None, **kwargs)  # fmt: skip

    @property
    def skipped(self) -> dict[str, list[SkippedSample]]:
        """The pool samples this rank's training stream met that could not be used, so far: ``{"pool": [...]}``
        (each once, sorted by shard and key; empty when there were none), like
        :attr:`~lightning_chips.data.ScoredSubsetDataModule.skipped`.

        Before the first selection (``warmup_steps > 0``) the stream reads the whole pool, bad samples included;
        each is skipped when it is drawn (its place in the batch goes to the next pair drawn, so batches stay
        full) and recorded here, and a warning at the end of the epoch names the new ones. Once a selection is
        in force, bad samples are not selected and not read. The selection rounds count and name every bad
        sample of the pool in the round files, whatever the stream drew; see the callback's ``skipped``.
        """
        found = [self._skips.bad[k] for k in sorted(self._skips.bad)]
        return {"pool": found} if found else {}

    @property
    def shard_errors(self) -> dict[str, str]:
        """The shards this rank's training stream could not read to the end, so far (URL -> error), sorted."""
        return dict(sorted(self._skips.errors.items()))

    @override
    def teardown(self, stage: str) -> None:
        self._skips.warn()  # what a stream stopped mid-epoch (max_steps, an exception) met and has not named yet

    @override
    def train_dataloader(self) -> DataLoader:
        pool, collate = self._require_setup()
        if self._train_loader is None:
            trainer = self.trainer
            accumulate = getattr(trainer, "accumulate_grad_batches", 1) if trainer is not None else 1
            epoch_fn = (lambda: trainer.current_epoch) if trainer is not None else lambda: 0
            live = _Live(lambda: self.selection, epoch_fn)
            stream = SelectedStream(pool, live, batches=self.steps_per_round * accumulate, batch_size=self.batch_size,
                                    seed=self.seed, shuffle_buffer=self.shuffle_buffer, reports=True)  # fmt: skip
            self._skips.epoch_fn = epoch_fn
            self._train_loader = self._loader(stream, self.batch_size, StreamCollate(collate.tokenizer,
                                              collate.image, collate.context_length), _StreamLoader,
                                              skips=self._skips)  # fmt: skip
        return self._train_loader

    # -- the SelectablePool contract (lightning_chips.data.pool): what a selection round reads ----------------------
    @override
    def scoring_pool(self) -> ShardPool:
        """The :class:`~lightning_chips.data.pool.ShardPool` that serves this module's selection rounds: rank ``r``
        scores ``shards[r::world]``; the pool sample is drawn with ``(seed, round)`` from a seeded subset of the
        shards, each read by one rank (docs/offline.md, "The pool sample"); pairs are read back by uid."""
        pool, collate = self._require_setup()
        return ShardPool(pool, self.target, collate, self.eval_batch_size, self.num_workers, self.worker_start_method)

    def pool_size(self) -> None:
        return None  # a stream's length is known only once it is read

    def _val_loader(self) -> DataLoader:
        _, collate = self._require_setup()
        return DataLoader(self.val, batch_size=self.eval_batch_size, collate_fn=collate)  # type: ignore[arg-type]
