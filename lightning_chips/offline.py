"""Offline scoring and selection over WebDataset shards: ``lightning-chips score`` and ``lightning-chips select``.

``score_pool`` is a ``Trainer.predict`` pass, so Lightning's strategies spread it over devices and nodes (DDP):

1. :func:`lightning_chips.engine.prepare_round`, as a callback round does: every rank extracts its share of the
   target and its part of the pool sample (``pool_sample`` pairs drawn with ``(seed, 0)`` from a seeded subset of
   the shards, each drawn shard read by one rank; docs/offline.md, "The pool sample"; the sample of a callback's
   round 0 with that seed), the shares are gathered, and every rank prepares the scorer on the same pairs;
2. rank ``r`` streams its shards (``shards[r::world]``; a worker reads ``shards_of_rank[w::workers]``), scores
   each batch and, when a shard ends, writes ``parts/<shard>.npz`` (ids, scores, skipped samples) atomically;
3. each rank writes ``scores-rank{r}.npz`` from its parts; rank 0 merges every part into the id-sorted
   ``scores.npz`` (ids, scores, method, scorer, model fingerprint) and ``manifest.json`` (per shard: pairs
   scored, skipped samples with key and reason, read errors).

Re-running with the same arguments skips the shards whose part exists (a killed run resumes where it stopped),
unless the part says its shard was not read to the end or the shard's size or modification time changed since
(then the shard is scored again); a part written for another model, scorer, target or pool sample is an error, not
silently mixed in. Memory per rank is one batch, the prepared scorer and the scores of the shards in flight; the
merge holds the score arrays.

This module is the ``score`` pass, from its run identity and lock through the predict task; the files it writes
and reads back (part files, their merge, ``scores.npz``, ``manifest.json``) are :mod:`lightning_chips.score_files`.
A batch is read into rows, and a repeated id keeps its first pair, as in a callback round
(:mod:`lightning_chips.round_rows`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_chips.adapters import CLIPAdapter, resolve_adapter
from lightning_chips.data.pool import ShardPool
from lightning_chips.data.preprocess import model_image_input, resolve_tokenizer
from lightning_chips.data.subset import PairCollate
from lightning_chips.data.target import ListDataset, load_target_pairs
from lightning_chips.data.webdataset import ShardReport, WebDatasetPairs, expand_shards
from lightning_chips.engine import Collective, check_max_skipped, prepare_round, round_learning_rate, score_batch
from lightning_chips.groups import GroupEncoder, batch_values, check_group_by
from lightning_chips.ids import id_key, ids_array
from lightning_chips.io import OutputLock, atomic_savez, remove_stale_temporaries
from lightning_chips.metrics import PromptEncoder
from lightning_chips.round_rows import Rows, iter_rows
from lightning_chips.score_files import (  # the folder's files; their public names are importable from here too
    MANIFEST,  # noqa: F401 (read from here by reshard.py and users)
    PARTS,
    SCORES,
    RefusedShardError,
    as_given,
    completed_shards,
    describe_damage,
    manifest_pool,
    merge_parts,
    part_name,
    read_scores,
    shard_source,
    write_merged,
    write_part,
)
from lightning_chips.scoring import RoundContext, Scorer

__all__ = ["RefusedShardError", "describe_damage", "manifest_pool", "model_fingerprint", "read_scores", "score_pool"]

LOCK = ".lightning-chips.lock"


# --------------------------------------------------------------------------------------------------------------
# the run's identity
# --------------------------------------------------------------------------------------------------------------
def model_fingerprint(module: torch.nn.Module) -> str:
    """A 16-hex digest of a module's parameters and buffers (names, shapes, dtypes and values)."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# score
# --------------------------------------------------------------------------------------------------------------
class _PoolScoring(LightningModule):
    """The predict task of :func:`score_pool` (internal): holds the user's CLIP module and the scorer."""

    def __init__(self, model: LightningModule, scorer: Scorer, config: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.scorer = scorer
        self.config = config
        self.buffers: dict[int, tuple[list[Rows], GroupEncoder]] = {}  # per shard in flight: its scored rows
        self.scored_now = 0
        self.started = 0.0
        self._resolved_tokenizer: Any = None

    # -- data -----------------------------------------------------------------------------------------------------
    def _adapter(self) -> CLIPAdapter:
        return resolve_adapter(self.model, self.config["adapter"])

    def _tokenizer(self) -> Any:
        """``--tokenizer`` (with ``--context_length``) or the model's own, checked against its context length."""
        if self._resolved_tokenizer is None:
            c = self.config
            self._resolved_tokenizer = resolve_tokenizer(c["tokenizer"], c["context_length"], self.model,
                                                         command_line=True)  # fmt: skip
        return self._resolved_tokenizer

    def _pool(self) -> ShardPool:
        """The pool as the round engine reads it (the same :class:`~lightning_chips.data.pool.ShardPool` a
        :class:`~lightning_chips.data.WebDatasetDataModule` scores through)."""
        c = self.config
        pairs = WebDatasetPairs(c["urls"], image_size=c["image_size"], uid_field=c["uid_field"])
        target = None if c["target_pairs"] is None else ListDataset(c["target_pairs"])
        collate = PairCollate(self._tokenizer(), model_image_input(self.model))
        return ShardPool(pairs, target, collate, c["batch_size"], c["num_workers"], c["worker_start_method"],
                         skip=c["done"])  # fmt: skip

    def predict_dataloader(self) -> DataLoader:
        return self._pool().scoring_loader(self.global_rank, self.trainer.world_size)

    # -- prepare ------------------------------------------------------------------------------------------------
    def on_predict_start(self) -> None:
        c = self.config
        self.started = time.perf_counter()
        self._check_same_weights()
        adapter = self._adapter()
        text_encoder = PromptEncoder(adapter, self._tokenizer())
        context = RoundContext(learning_rate=c["learning_rate"], text_encoder=text_encoder, seed=c["seed"])
        self.target_skipped = prepare_round(
            self.scorer, adapter, self._pool(), context, pool_sample=c["pool_sample"],
            collective=Collective(self.trainer), device=self.device,
            precision=self.trainer.precision_plugin.forward_context,
        )  # fmt: skip
        rank_zero_info(f"[lightning-chips] score: prepared {self.scorer.summary()}")

    def _check_same_weights(self) -> None:
        """Every rank must score with the same weights (predict does not broadcast them as DDP training does)."""
        if self.trainer.world_size == 1:
            return
        mine = torch.tensor([int(self.config["model_fingerprint"][:15], 16)], device=self.device)
        everyone = self.trainer.strategy.all_gather(mine).reshape(-1).tolist()
        if len(set(everyone)) > 1:
            raise RuntimeError(
                "The ranks hold different model weights (randomly initialised without a common seed?); load "
                "pretrained weights, or set `--seed_everything` so every rank builds the same model."
            )

    # -- score --------------------------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        reports: list[ShardReport] = batch.pop("reports")
        scores = torch.zeros(0)
        if len(batch["id"]):
            shard = batch.pop("shard").cpu()
            values = {f: batch_values(batch, f, len(shard)) for f in self.config["group_by"]}
            # the batch read as a callback round reads it (ids, string ids), inside predict's precision context
            (rows,) = iter_rows(self._adapter(), [(batch, [])], [], device=self.device, progress=False,
                                description="score", precision=contextlib.nullcontext)  # fmt: skip
            scores = rows.scores = score_batch(self.scorer, rows.features)  # type: ignore[arg-type]
            rows.features = None
            for s in shard.unique().tolist():
                mask = shard == s
                parts, groups = self.buffers.setdefault(s, ([], self._group_encoder()))
                part, keep = rows.take(torch.nonzero(mask).reshape(-1)), mask.tolist()
                part.groups = groups({f: [v for v, k in zip(vs, keep, strict=True) if k] for f, vs in values.items()},
                                     len(part.ids))  # fmt: skip
                parts.append(part)
            self.scored_now += len(rows.ids)
        for report in reports:
            self._finish_shard(report)
        return scores  # not kept: the trainer runs with return_predictions=False

    def _group_encoder(self) -> GroupEncoder:
        """A shard's ``group_by`` keys: every value of the shard kept until its part is written, which keeps the
        most frequent (:meth:`~lightning_chips.groups.GroupColumn.capped`)."""
        return GroupEncoder(self.config["group_by"], max_values=sys.maxsize)

    def _finish_shard(self, report: ShardReport) -> None:
        c = self.config
        parts, encoder = self.buffers.pop(c["urls"].index(report.url), ([], self._group_encoder()))
        if parts:
            rows = Rows.cat(parts)
            ids, scores, keys = rows.ids.numpy(), rows.scores.numpy(), rows.groups.numpy()  # type: ignore[union-attr]
            uids = None if rows.uids is None else ids_array(rows.uids)
        else:  # no pair of the shard could be scored
            ids, scores, uids = np.zeros(0, np.int64), np.zeros(0, np.float32), None
            keys = np.zeros((0, len(encoder.fields)), np.int64)
        if len(ids) != report.samples:
            raise RuntimeError(f"Shard {report.url}: {report.samples} pairs read but {len(ids)} scored.")
        groups = {f: column.capped() for f, column in encoder.columns(keys).items()}
        write_part(Path(c["output"]) / PARTS / part_name(report.url), report.url, ids, scores, report, c["run"],
                    uids, groups, c["sources"][report.url])  # fmt: skip
        if c["after_shard"] is not None:
            c["after_shard"](report)

    def on_predict_end(self) -> None:
        c = self.config
        if self.buffers:
            raise RuntimeError(f"Shards {sorted(self.buffers)} were scored but never reported complete.")
        output = Path(c["output"])
        rank, world = self.global_rank, self.trainer.world_size
        mine = c["urls"][rank::world]
        merged = merge_parts(output, mine, c["run"])
        ids, scores, _ = as_given(merged.keys, merged.scores, merged.uids)
        atomic_savez(output / f"scores-rank{rank}.npz", ids=ids, scores=scores, rank=np.asarray(rank))
        scored_now = int(self.trainer.strategy.reduce(torch.tensor(float(self.scored_now), device=self.device),
                                                      reduce_op="sum"))  # fmt: skip
        self.trainer.strategy.barrier("lightning_chips_score_merge")
        seconds = time.perf_counter() - self.started
        estimated = {**c, "estimate": self.scorer.round_metrics()}  # e.g. CHIPS's noise share, for the manifest
        # rank 0 merges; every rank learns whether it could (an error there, e.g. too many skipped pairs or a full
        # disk, ends every rank instead of leaving the others at a barrier)
        Collective(self.trainer).agree(
            0, "the merged scores", lambda: write_merged(output, estimated, seconds, scored_now) if rank == 0 else None
        )


def _target_digest(pairs: list[dict] | None) -> str:
    """A digest of the target pairs' ids, captions and images (part of the run's identity)."""
    if pairs is None:
        return "none"
    digest = hashlib.blake2b(digest_size=8)
    for pair in pairs:
        digest.update(np.int64(id_key(pair["id"])).tobytes() + pair["text"].encode())
        digest.update(pair["image"].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_PROBE_CAPTIONS = ["a photo of a dog.", "Fluorescence micrograph of HeLa cells, 40x", "", "x " * 300]


def _tokenizer_digest(tokenizer: Callable[[list[str]], Any]) -> str:
    """A digest of the token ids ``tokenizer`` gives fixed probe captions (short, long, empty, over any context):
    two tokenizers, or context lengths, that would tokenize a pool differently give different digests."""
    ids = torch.as_tensor(tokenizer(_PROBE_CAPTIONS))
    return hashlib.sha1(f"{tuple(ids.shape)}".encode() + ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def score_pool(
    model: LightningModule,
    scorer: Scorer,
    pool: str | list[str],
    output: str,
    target: str | list[str] | None = None,
    *,
    batch_size: int = 256,
    num_workers: int = 4,
    worker_start_method: Literal["fork", "spawn", "forkserver"] | None = None,
    pool_sample: int | None = 8192,
    seed: int = 0,
    image_size: int | None = None,
    uid_field: str = "uid",
    trainer: Trainer | None = None,
    adapter: CLIPAdapter | None = None,
    after_shard: Any = None,
    learning_rate: float | None = None,
    group_by: list[str] | str | None = None,
    max_skipped: float | None = 0.05,
    tokenizer: str | Callable[[list[str]], Tensor] | None = None,
    context_length: int | None = None,
) -> Path:
    """Score every pair of a WebDataset pool with ``scorer`` under ``model``; write ``output/scores.npz``.

    Args:
        model: the CLIP LightningModule (e.g. :class:`~lightning_chips.models.OpenCLIPModule` with its
            ``pretrained`` weights); it also gives the tokenizer and, unless ``image_size`` is set, the image size.
        scorer: a :class:`~lightning_chips.scoring.Scorer` (``build_scorer("chips")``, ...).
        pool: the pool's shards (brace pattern, ``::``-joined, list, directory or glob).
        output: output directory (created); re-running into it resumes.
        target: target pairs: WebDataset shards or a directory of ``NAME.jpg`` + ``NAME.txt``; required by
            scorers that need a target (CHIPS, NormSim, the influence baselines).
        batch_size: pairs per forward pass.
        num_workers: dataloader workers per rank (at most one per shard of the rank).
        worker_start_method: ``"spawn"`` / ``"forkserver"`` / ``"fork"`` workers (default: the platform's).
        pool_sample: pool pairs given to ``scorer.prepare`` (bank, curvature), drawn from a seeded subset of the
            shards (docs/offline.md, "The pool sample"); ``None`` = the whole pool (needed by set-level scorers such
            as ClipCov; holds O(N d) features).
        seed: seed of the pool sample's draw.
        image_size: image side; default: the model's ``image_size``.
        uid_field: the id's field in each sample's ``.json`` (an int64 or a string).
        trainer: the Trainer that runs the pass (devices, nodes, strategy, precision); default: one device.
        adapter: an explicit :class:`~lightning_chips.adapters.CLIPAdapter` for a model the resolver cannot read.
        after_shard: called with each :class:`~lightning_chips.data.webdataset.ShardReport` once its part is
            written (progress hooks, tests).
        learning_rate: the learning rate of the checkpoint being scored, which TracIn weights its scores by
            (``eta g^T u``); default the model's ``lr`` (an attribute or hyperparameter, as ``OpenCLIPModule(lr=...)``
            has), else 1.
        group_by: fields of each sample's json (a list, or comma-separated) to keep per pair in ``scores.npz``
            (``group_fields``, ``group_values_{i}``, ``group_codes_{i}``; :mod:`lightning_chips.groups`), for
            ``lightning-chips report``'s composition of pool and selection. Part of the run's identity.
        max_skipped: the largest share of the pool's pairs that may fail to load or the checks (duplicate ids do
            not count); above it no ``scores.npz`` is written and the error names the count and the first reasons
            (the part files stay: re-run with a higher limit, or after repairing the data, to finish). ``None`` or
            1: no limit. The same rule as :class:`~lightning_chips.DataSelectionCallback`'s ``max_skipped``.
        tokenizer: an open_clip model name whose tokenizer tokenizes the captions and prompts (e.g. ``ViT-B-32``),
            or a callable (captions -> ``[B, L]`` token ids; Python only), for a model without its own
            (``get_tokenizer()``, a transformers tokenizer or processor); default: the model's.
        context_length: tokens per caption; default: the model's context length, which a tokenizer or value that
            differs from it is an error against (before any work).

    The tokenizer in use, whichever it is, is part of the run's identity through the token ids it gives a few fixed
    probe captions: resuming into the same ``output`` with a tokenizer that tokenizes differently is refused.

    Returns:
        The path of ``scores.npz`` (ids sorted, float32 scores, ``method``, ``scorer``, ``model_fingerprint``).

    Example::

        >>> score_pool(OpenCLIPModule("ViT-B-16", pretrained="ckpt/vit_b16.pt"), CHIPS(),
        ...            "pool/{000000..000999}.tar", "scores/chips", target="target/",
        ...            trainer=Trainer(accelerator="gpu", devices=8, strategy="ddp"))
    """
    if not isinstance(scorer, Scorer):
        raise TypeError(f"`scorer` must be a lightning_chips Scorer, got {type(scorer).__name__}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    if num_workers < 0:
        raise ValueError(f"`num_workers` must be >= 0, got {num_workers}.")
    if pool_sample is not None and pool_sample < 2:
        raise ValueError(f"`pool_sample` must be >= 2 or None (the whole pool), got {pool_sample}.")
    if scorer.requires_target and target is None:
        raise ValueError(f"The {type(scorer).__name__} scorer needs target pairs: pass `target`.")
    if learning_rate is None:
        learning_rate = round_learning_rate(model)  # as a callback round reads it; a predict pass has no optimizer
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"`learning_rate` must be a finite number > 0, got {learning_rate}.")
    learning_rate = float(learning_rate)
    max_skipped = check_max_skipped(max_skipped)
    group_fields = list(check_group_by(group_by))
    resolved = resolve_adapter(model, adapter)  # fail before any work if the CLIP cannot be reached
    # the same for a missing or wrong tokenizer; what it makes of fixed probe captions is part of the run's identity
    tokens = _tokenizer_digest(resolve_tokenizer(tokenizer, context_length, model, command_line=True))
    image_size = int(image_size or getattr(model, "image_size", None) or 224)
    urls = expand_shards(pool)
    target_pairs, target_report = (None, None)
    if target is not None:
        target_pairs, target_report = load_target_pairs(target, image_size, uid_field)
    fingerprint = model_fingerprint(resolved.module)
    target_digest = _target_digest(target_pairs)
    # the scorer's whole configuration (Scorer.config: every setting), so a run with other settings is another run
    run_spec = [fingerprint, scorer.config(), target_digest, pool_sample, seed, image_size, uid_field, learning_rate]
    if group_fields:  # (without it the identity of earlier runs is unchanged)
        run_spec.append(group_fields)
    run_spec.append(tokens)
    run = hashlib.sha1(json.dumps(run_spec).encode()).hexdigest()[:16]
    out = Path(output)
    trainer = trainer if trainer is not None else Trainer(
        accelerator="auto", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False
    )  # fmt: skip
    # One run per output folder: rank 0 holds the folder's lock for the whole run (the other ranks of a DDP run
    # start inside `trainer.predict`, after it); a second run is refused, a killed run's lock is taken over.
    lock = OutputLock(out / LOCK, what="lightning-chips score") if trainer.global_rank == 0 else None
    if lock is not None:
        lock.acquire()
        removed = [p for d in (out, out / PARTS) for p in remove_stale_temporaries(d)]
        if lock.stale is not None:
            rank_zero_warn(
                f"Took over the lock of {out} from {OutputLock.describe(lock.stale)}, which is no longer running "
                f"(killed?); removed its {len(removed)} temporary files and resume from its complete part files."
            )
    try:
        return _score_locked(model, scorer, out, urls, run, fingerprint, target_pairs, target_report, trainer, {
            "batch_size": batch_size, "num_workers": num_workers, "worker_start_method": worker_start_method,
            "pool_sample": pool_sample, "seed": seed, "image_size": image_size, "uid_field": uid_field,
            "adapter": adapter, "after_shard": after_shard, "learning_rate": learning_rate, "group_by": group_fields,
            "max_skipped": max_skipped, "tokenizer": tokenizer, "context_length": context_length,
        })  # fmt: skip
    finally:
        if lock is not None:
            lock.release()


def _score_locked(
    model: LightningModule,
    scorer: Scorer,
    out: Path,
    urls: list[str],
    run: str,
    fingerprint: str,
    target_pairs: list[dict] | None,
    target_report: dict | None,
    trainer: Trainer,
    options: dict[str, Any],
) -> Path:
    """The part of :func:`score_pool` that writes into ``out`` (under its lock on rank 0)."""
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    sources = {url: shard_source(url) for url in urls}  # before any shard is read: a later change is seen
    done = completed_shards(out / PARTS, urls, run, sources)
    config = {
        "urls": urls,
        "sources": sources,
        "done": sorted(done),
        "output": str(out),
        "run": run,
        "model_fingerprint": fingerprint,
        "method": type(scorer).__name__,
        "scorer": repr(scorer),
        "scorer_config": scorer.config(),
        "target_pairs": target_pairs,
        "target_report": target_report,
        **options,
    }
    if done:
        rank_zero_info(f"[lightning-chips] score: resuming, {len(done)}/{len(urls)} shards already scored")
    if trainer.world_size > len(urls):
        rank_zero_warn(f"{trainer.world_size} ranks but only {len(urls)} shards: some ranks will idle.")
    task = _PoolScoring(model, scorer, config)
    trainer.predict(task, return_predictions=False)
    return out / SCORES
