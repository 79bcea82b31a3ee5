"""``WebDatasetDataModule``: continual pre-training on the current selection of a WebDataset pool.

The streaming counterpart of :class:`~lightning_chips.data.ScoredSubsetDataModule`. The pool stays in its tar
shards; :class:`~lightning_chips.DataSelectionCallback` scores it shard-wise on every rank each round, and the
training stream keeps only the selected uids. One Lightning epoch is one selection round of exactly
``steps_per_round`` batches on every rank (DDP needs equal batch counts), drawn by cycling over the rank's shards
with a seeded shuffle buffer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, get_worker_info
from typing_extensions import override

from lightning_chips.data.datamodule import clip_normalize, resolve_tokenizer
from lightning_chips.data.subset import PairCollate, SelectionDataLoader
from lightning_chips.data.webdataset import ShardCollate, ShardReport, WebDatasetPairs, iter_raw_samples
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
    so every rank gives the same number of batches whatever the selection. Seeded by
    ``(seed, epoch, rank, worker)``.
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
    ) -> None:
        super().__init__()
        self.pool, self.live = pool, live
        self.batches, self.batch_size = batches, batch_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer

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
        while remaining > 0:
            found = 0
            for i in rng.permutation(len(mine)):
                for raw in self._selected_raw(pool, mine[i]):
                    found += 1
                    buffer.append(raw)
                    if len(buffer) < self.shuffle_buffer:
                        continue
                    pair = pool.decode(buffer.pop(int(rng.integers(len(buffer)))))
                    if pair is not None:
                        yield pair
                        remaining -= 1
                        if remaining == 0:
                            return
            if found == 0:
                raise RuntimeError(
                    f"Rank {pool.rank}, worker {worker}: none of its {len(mine)} shards holds a selected pair, so it "
                    "cannot fill its batches; use fewer dataloader workers or a pool split into more shards."
                )

    @staticmethod
    def _selected_raw(pool: WebDatasetPairs, url: str) -> Iterator[dict[str, bytes]]:
        """Undecoded samples of ``url`` whose uid is selected (images are decoded only when drawn)."""
        report = ShardReport(url)
        for _, raw in iter_raw_samples(url, report):
            if pool.selected(raw):
                yield raw


class WebDatasetDataModule(LightningDataModule):
    """A WebDataset pool to select from, a target set, and training batches from the live selection.

    Pair it with :class:`~lightning_chips.DataSelectionCallback`. Each round every rank scores its shards
    (``shards[rank::world]``), the scores are gathered, and every rank keeps the same selected uids; the
    training stream (:class:`SelectedStream`) then reads only those. Before the first selection the whole
    pool is streamed. Use at least ``world_size x num_workers`` shards.

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
        uid_field: the int64 id's field in each sample's ``.json``.
        worker_start_method: ``"spawn"`` / ``"forkserver"`` / ``"fork"`` dataloader workers.
        tokenizer: an open_clip model name whose tokenizer to use (default: the model's).
        context_length: tokenizer context length (default: the model's).

    Example::

        >>> dm = WebDatasetDataModule("pool/{000000..000099}.tar", target="target/", batch_size=256,
        ...                           steps_per_round=500, num_workers=8)
        >>> trainer = Trainer(callbacks=[DataSelectionCallback("chips", fraction=0.3, pool_sample=8192)])
    """

    streaming = True

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
        tokenizer: str | None = None,
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
        self.rank, self.world_size = 0, 1

    @override
    def setup(self, stage: str) -> None:
        from lightning_chips.offline import _ListDataset, _load_target

        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        image_size = int(self.image_size_arg or getattr(module, "image_size", None) or 224)
        if trainer is not None:
            self.rank, self.world_size = trainer.global_rank, trainer.world_size
        if self.collate is None:
            tokenizer = resolve_tokenizer(self.tokenizer_name, self.context_length, module)
            self.collate = PairCollate(tokenizer, clip_normalize())
        if self.pool is None:
            self.pool = WebDatasetPairs(self.pool_spec, image_size=image_size, uid_field=self.uid_field)
        self.pool.bind(self.rank, self.world_size)
        if self.target is None and self.target_spec is not None:
            if isinstance(self.target_spec, Dataset):
                self.target = self.target_spec
            else:
                pairs, self.target_report = _load_target(self.target_spec, image_size, self.uid_field)
                self.target = _ListDataset(pairs)

    def _require_setup(self) -> tuple[WebDatasetPairs, PairCollate]:
        if self.pool is None or self.collate is None:
            self.setup("fit")
        assert self.pool is not None and self.collate is not None
        return self.pool, self.collate

    def _loader(self, dataset: Dataset, batch_size: int, collate: Callable, cls: type = DataLoader) -> DataLoader:
        workers = self.num_workers
        if isinstance(dataset, WebDatasetPairs):
            workers = min(workers, len(dataset.shards_of_rank()))
        return cls(dataset, batch_size=batch_size, collate_fn=collate, num_workers=workers,
                   multiprocessing_context=self.worker_start_method if workers > 0 else None)  # fmt: skip

    @override
    def train_dataloader(self) -> DataLoader:
        pool, collate = self._require_setup()
        if self._train_loader is None:
            trainer = self.trainer
            accumulate = getattr(trainer, "accumulate_grad_batches", 1) if trainer is not None else 1
            live = _Live(lambda: self.selection, (lambda: trainer.current_epoch) if trainer is not None else lambda: 0)
            stream = SelectedStream(pool, live, batches=self.steps_per_round * accumulate, batch_size=self.batch_size,
                                    seed=self.seed, shuffle_buffer=self.shuffle_buffer)  # fmt: skip
            self._train_loader = self._loader(stream, self.batch_size, collate, SelectionDataLoader)
        return self._train_loader

    def pool_dataloader(self, indices: Sequence[int] | None = None) -> DataLoader:
        """This rank's shards, unshuffled, for a scoring pass (``indices`` are not supported: shards stream).

        Each shard's :class:`~lightning_chips.data.webdataset.ShardReport` (its skipped samples and read error)
        comes in ``batch["reports"]`` of the batch that holds the shard's last pair (a batch may hold reports
        only: its ``"id"`` is then empty), and each pair's shard index in ``batch["shard"]``; the selection
        round counts and names the skipped samples from them.
        """
        if indices is not None:
            raise ValueError("A WebDataset pool streams its shards; it cannot be indexed.")
        pool, collate = self._require_setup()
        reporting = copy.copy(pool)
        reporting.reports = True
        return self._loader(reporting, self.eval_batch_size, ShardCollate(collate.tokenizer, collate.normalize))

    def pool_sample(self, size: int | None, round: int) -> Iterator[dict[str, Any]]:
        """Batches of the first ``size`` valid pool pairs, shards in an order seeded by ``(seed, round)``; every
        rank reads the same ones."""
        pool, collate = self._require_setup()
        return pool.sample_batches(size, [self.seed, round], self.eval_batch_size, collate)

    def target_dataloader(self, target: Dataset | None = None, indices: Sequence[int] | None = None) -> DataLoader:
        """Unshuffled loader over the target set (or the given one)."""
        _, collate = self._require_setup()
        target = target if target is not None else self.target
        if target is None:
            raise ValueError("No target set: pass `target` to WebDatasetDataModule or to DataSelectionCallback.")
        data = target if indices is None else Subset(target, list(indices))
        return DataLoader(data, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate)

    @override
    def val_dataloader(self) -> DataLoader | list:
        _, collate = self._require_setup()
        return [] if self.val is None else DataLoader(self.val, batch_size=self.eval_batch_size, collate_fn=collate)
