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
silently mixed in. Memory per
rank is one batch, the prepared scorer and the scores of the shards in flight; the merge holds the score arrays.

One module (over 500 lines) because it is one thing: the ``score`` pass, from its run identity and lock through
the predict task to the part files and their merge.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_chips.adapters import CLIPAdapter, resolve_adapter
from lightning_chips.data.checks import SkippedSample
from lightning_chips.data.pool import ShardPool
from lightning_chips.data.preprocess import model_image_input, resolve_tokenizer
from lightning_chips.data.subset import PairCollate
from lightning_chips.data.target import ListDataset, load_target_pairs
from lightning_chips.data.webdataset import ShardReport, WebDatasetPairs, expand_shards
from lightning_chips.engine import (
    Collective,
    check_max_skipped,
    check_skipped,
    prepare_round,
    round_learning_rate,
    score_batch,
)
from lightning_chips.features import iter_features
from lightning_chips.groups import GroupColumn, batch_values, check_group_by, group_arrays, read_group_arrays
from lightning_chips.ids import id_key, ids_array
from lightning_chips.io import (
    CorruptFileError,
    OutputLock,
    atomic_savez,
    atomic_write_json,
    load_npz,
    remove_stale_temporaries,
)
from lightning_chips.metrics import PromptEncoder
from lightning_chips.scoring import RoundContext, Scorer

__all__ = ["RefusedShardError", "describe_damage", "manifest_pool", "model_fingerprint", "read_scores", "score_pool"]

PARTS = "parts"
MANIFEST = "manifest.json"
SCORES = "scores.npz"
LOCK = ".lightning-chips.lock"

_PART_FIX = "Delete it and re-run `lightning-chips score` into the same --output: its shard is scored again."
_SCORES_FIX = "Re-run `lightning-chips score` into its folder: it resumes from the part files and writes it anew."


# --------------------------------------------------------------------------------------------------------------
# fingerprints and part files
# --------------------------------------------------------------------------------------------------------------
def model_fingerprint(module: torch.nn.Module) -> str:
    """A 16-hex digest of a module's parameters and buffers (names, shapes, dtypes and values)."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _part_name(url: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rsplit("/", 1)[-1])[:80]
    return f"{base}-{hashlib.sha1(url.encode()).hexdigest()[:10]}.npz"


def _is_command_or_remote(url: str) -> bool:
    """A shard that ``webdataset.gopen`` opens by running a program: ``pipe:`` (a shell command) or a URL with a
    scheme (curl, gsutil, ais, ...)."""
    return url.startswith("pipe:") or "://" in url


def _shard_source(url: str) -> dict[str, Any]:
    """What a part records of its shard as it was when the run started: the size and modification time (ns) of a
    local file; for a ``pipe:`` or URL shard only ``{"remote": True}`` (nothing to stat without reading it)."""
    if _is_command_or_remote(url):
        return {"remote": True}
    stat = os.stat(url)
    return {"size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}


def _write_part(path: Path, url: str, ids: np.ndarray, scores: np.ndarray, report: ShardReport, run: str,
                uids: np.ndarray | None = None, groups: dict[str, GroupColumn] | None = None,
                source: dict[str, Any] | None = None) -> None:  # fmt: skip
    """A shard's part: int64 keys as ``ids``, the string ids as ``uids`` when the pool has them, the ``group_by``
    columns (:func:`~lightning_chips.groups.group_arrays`), the shard's report (its ``error`` is None when the
    shard was read to the end) and ``source``, what :func:`_shard_source` gave when the run started (so a later run
    sees a shard that changed since)."""
    extra = ({} if uids is None else {"uids": uids}) | group_arrays(groups or {})
    if source is not None:
        extra["source"] = np.asarray(json.dumps({**source, "read_to_end": report.error is None}))
    atomic_savez(
        path,
        **extra,
        ids=ids.astype(np.int64),
        scores=scores.astype(np.float32),
        url=np.asarray(url),
        run=np.asarray(run),
        report=np.asarray(json.dumps(report.as_dict())),
    )


def _read_part(path: Path) -> dict[str, Any]:
    """A part file; a damaged one is a :class:`~lightning_chips.io.CorruptFileError` naming it."""
    f = load_npz(path, ("ids", "scores", "url", "run", "report"), what="part file of `lightning-chips score`",
                 fix=_PART_FIX)  # fmt: skip
    try:
        report = json.loads(str(f["report"]))
        source = json.loads(str(f["source"])) if "source" in f else None  # (parts of earlier versions have none)
        if not isinstance(report, dict) or not isinstance(source, dict | None):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise CorruptFileError(f"{path} is damaged: its shard report is not JSON ({exc}). {_PART_FIX}") from exc
    uids = f["uids"] if "uids" in f else None
    return {"ids": f["ids"], "scores": f["scores"], "url": str(f["url"]), "run": str(f["run"]), "report": report,
            "uids": uids, "groups": read_group_arrays(f), "source": source}  # fmt: skip


def _stale(part: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Why a part of this run no longer stands for its shard (None when it does): the shard was not read to the
    end, or the local file's size or modification time differ from what the part recorded (``now``:
    :func:`_shard_source` of the shard at this run's start)."""
    error = part["report"].get("error")
    if error:
        return f"it was not read to the end ({error})"
    was = part["source"]
    if was is None or was.get("remote") or now.get("remote"):
        return None  # a part of an earlier version, or a pipe: / URL shard: nothing to compare
    if (was.get("size"), was.get("mtime_ns")) != (now["size"], now["mtime_ns"]):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now["mtime_ns"] / 1e9))
        return f"it changed since it was scored ({was.get('size')} -> {now['size']} bytes, modified {when})"
    return None


def _completed_shards(parts: Path, urls: Sequence[str], run: str, sources: dict[str, dict[str, Any]]) -> set[str]:
    """Shards of ``urls`` with a part of this run that still stands for them (read to the end, unchanged since:
    :func:`_stale`); a part of another run is an error. Says in one line which shards are scored again and why."""
    done, again = set(), []
    for url in urls:
        path = parts / _part_name(url)
        if not path.exists():
            continue
        try:
            part = _read_part(path)
        except CorruptFileError as exc:  # a damaged part (it cannot be half-written, but disks fail): re-score
            rank_zero_warn(f"Re-scoring {url}: {exc}")
            continue
        if part["run"] != run:
            raise ValueError(
                f"{path.parent.parent} holds scores of another run (different model, scorer, target or pool "
                f"sample: run {part['run']} != {run}). Use a new `--output` directory or delete it."
            )
        reason = _stale(part, sources[url])
        if reason is None:
            done.add(url)
        else:
            again.append(f"{url}: {reason}")
    if again:
        more = f"; and {len(again) - 3} more" if len(again) > 3 else ""
        rank_zero_info(f"[lightning-chips] score: scoring {len(again)} shard{'s' * (len(again) != 1)} again (the "
                       "part is replaced): " + "; ".join(again[:3]) + more)  # fmt: skip
    return done


def read_scores(path: str | os.PathLike) -> dict[str, Any]:
    """Load a ``scores.npz`` (or a directory holding one): ``ids`` (sorted: int64, or strings for a pool with string
    ids), ``scores`` (float32) and the metadata strings."""
    path = Path(path)
    if path.is_dir():
        path = path / SCORES
    if not path.exists():
        raise FileNotFoundError(f"No scores file at {path}: run `lightning-chips score` first.")
    arrays = load_npz(path, ("ids", "scores"), what="scores file of `lightning-chips score`", fix=_SCORES_FIX)
    if arrays["ids"].shape != arrays["scores"].shape or arrays["ids"].ndim != 1:
        raise CorruptFileError(f"{path} is damaged: {arrays['ids'].shape} ids but {arrays['scores'].shape} scores. "
                               f"{_SCORES_FIX}")  # fmt: skip
    return {key: (value if value.dtype.kind in "if" or value.ndim else str(value)) for key, value in arrays.items()}


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
        self.buffers: dict[int, tuple[list[Tensor], list[Tensor], list, list[list[str]]]] = {}
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
            given = list(batch["id"]) if isinstance(batch["id"], list | tuple) else None  # string ids
            (features,) = iter_features(self._adapter(), [batch], device=self.device)
            scores = score_batch(self.scorer, features)
            ids = features.ids.cpu()
            uids = given if given is not None else ids.tolist()
            fields = self.config["group_by"]
            values = [batch_values(batch, f, len(ids)) for f in fields]
            for s in shard.unique().tolist():
                mask = shard == s
                empty: tuple = ([], [], [], [[] for _ in fields])
                got_ids, got_scores, got_uids, got_groups = self.buffers.setdefault(s, empty)
                got_ids.append(ids[mask])
                got_scores.append(scores[mask])
                got_uids.extend(u for u, m in zip(uids, mask.tolist(), strict=True) if m)
                for column, vs in zip(got_groups, values, strict=True):
                    column.extend(v for v, m in zip(vs, mask.tolist(), strict=True) if m)
            self.scored_now += len(ids)
        for report in reports:
            self._finish_shard(report)
        return scores  # not kept: the trainer runs with return_predictions=False

    def _finish_shard(self, report: ShardReport) -> None:
        c = self.config
        index = c["urls"].index(report.url)
        fields = c["group_by"]
        got_ids, got_scores, got_uids, got_groups = self.buffers.pop(index, ([], [], [], [[] for _ in fields]))
        ids = torch.cat(got_ids).numpy() if got_ids else np.zeros(0, np.int64)
        scores = torch.cat(got_scores).numpy() if got_scores else np.zeros(0, np.float32)
        if len(ids) != report.samples:
            raise RuntimeError(f"Shard {report.url}: {report.samples} pairs read but {len(ids)} scored.")
        columns = zip(fields, got_groups, strict=True)
        groups = {f: GroupColumn.from_values(np.array(v, dtype=str)).capped() for f, v in columns}
        _write_part(Path(c["output"]) / PARTS / _part_name(report.url), report.url, ids, scores, report, c["run"],
                    ids_array(got_uids) if any(isinstance(u, str) for u in got_uids) else None, groups,
                    c["sources"][report.url])  # fmt: skip
        if c["after_shard"] is not None:
            c["after_shard"](report)

    def on_predict_end(self) -> None:
        c = self.config
        if self.buffers:
            raise RuntimeError(f"Shards {sorted(self.buffers)} were scored but never reported complete.")
        output = Path(c["output"])
        rank, world = self.global_rank, self.trainer.world_size
        mine = c["urls"][rank::world]
        ids, scores, _, uids, _ = _merge_parts(output, mine, c["run"])
        ids, scores, _ = _as_given(ids, scores, uids)
        atomic_savez(output / f"scores-rank{rank}.npz", ids=ids, scores=scores, rank=np.asarray(rank))
        scored_now = int(self.trainer.strategy.reduce(torch.tensor(float(self.scored_now), device=self.device),
                                                      reduce_op="sum"))  # fmt: skip
        self.trainer.strategy.barrier("lightning_chips_score_merge")
        seconds = time.perf_counter() - self.started
        estimated = {**c, "estimate": self.scorer.round_metrics()}  # e.g. CHIPS's noise share, for the manifest
        # rank 0 merges; every rank learns whether it could (an error there, e.g. too many skipped pairs or a full
        # disk, ends every rank instead of leaving the others at a barrier)
        Collective(self.trainer).agree(
            0, "the merged scores", lambda: _write_merged(output, estimated, seconds, scored_now) if rank == 0 else None
        )


_Merged = tuple[np.ndarray, np.ndarray, list[dict], "np.ndarray | None", dict[str, GroupColumn]]


def _merge_parts(output: Path, urls: Sequence[str], run: str) -> _Merged:
    """Key-sorted scores of the parts of ``urls`` (a uid in several shards keeps its first shard's score), the
    shard reports, the string ids of those keys when the pool has string ids (else None), and the ``group_by``
    columns aligned with the keys. A part that another run wrote is an error naming it: the merge never mixes
    runs."""
    all_ids, all_scores, all_uids, reports, has_uids, groups = [], [], [], [], [], []
    for url in urls:
        path = output / PARTS / _part_name(url)
        if not path.exists():
            raise RuntimeError(f"Shard {url} has no scores in {output / PARTS}; re-run `score` to finish it.")
        part = _read_part(path)
        if part["run"] != run or part["url"] != url:
            raise RuntimeError(
                f"{path} was written by another run (run {part['run']}, shard {part['url']}; this run is {run}): "
                f"two runs wrote into {output}. Delete that folder and score again, or use another --output."
            )
        all_ids.append(part["ids"])
        all_scores.append(part["scores"])
        all_uids.append(part["uids"] if part["uids"] is not None else part["ids"].astype(str))
        has_uids.append(part["uids"] is not None)
        reports.append(part["report"])
        groups.append(part["groups"])
    ids = np.concatenate(all_ids) if all_ids else np.zeros(0, np.int64)
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0, np.float32)
    unique, first = np.unique(ids, return_index=True)  # first occurrence in shard order
    uids = np.concatenate(all_uids)[first] if any(has_uids) else None
    fields = list(groups[0]) if groups else []
    columns = {f: GroupColumn.cat([g[f] for g in groups]).take(first).capped() for f in fields}
    return unique, scores[first], reports, uids, columns


def _as_given(
    keys: np.ndarray, scores: np.ndarray, uids: np.ndarray | None, groups: dict[str, GroupColumn] | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, GroupColumn]]:
    """Ids as users read them, sorted (int64 ids, or the string ids of a pool that has them), with their scores
    (and group columns)."""
    groups = groups or {}
    if uids is None:
        return keys, scores, groups
    order = np.argsort(uids, kind="stable")
    return uids[order], scores[order], {f: c.take(order) for f, c in groups.items()}


def _write_merged(output: Path, config: dict[str, Any], seconds: float, scored_now: int) -> None:
    urls = config["urls"]
    keys, scores, reports, uids, groups = _merge_parts(output, urls, config["run"])
    all_ids = np.concatenate([_read_part(output / PARTS / _part_name(u))["ids"] for u in urls])
    values, counts = np.unique(all_ids, return_counts=True)
    duplicated_keys = values[counts > 1]
    duplicated = duplicated_keys if uids is None else uids[np.searchsorted(keys, duplicated_keys)]
    ids, scores, groups = _as_given(keys, scores, uids, groups)
    bad = sum(len(r["bad"]) for r in reports)
    errors = [r for r in reports if r["error"]]
    skipped = [SkippedSample(b["reason"], key=b["key"], shard=r["url"]) for r in reports for b in r["bad"]]
    check_skipped(skipped, len(all_ids) + bad, config["max_skipped"], round_=0)  # before anything is written
    atomic_savez(
        output / SCORES,
        ids=ids,
        scores=scores,
        method=np.asarray(config["method"]),
        scorer=np.asarray(config["scorer"]),
        model_fingerprint=np.asarray(config["model_fingerprint"]),
        run=np.asarray(config["run"]),
        **group_arrays(groups),
    )
    manifest = {
        "method": config["method"],
        "scorer": config["scorer"],
        "scorer_config": config["scorer_config"],
        "model_fingerprint": config["model_fingerprint"],
        "run": config["run"],
        "pool": [_relative_to(url, output) for url in urls],  # local shards relative to this folder
        "pool_sample": config["pool_sample"],
        "seed": config["seed"],
        "image_size": config["image_size"],
        "uid_field": config["uid_field"],
        "group_by": list(config["group_by"]),
        "target": config["target_report"],
        "estimate": config.get("estimate", {}),
        "scored": int(len(ids)),
        "skipped": bad,
        "duplicates": {"count": int(len(duplicated)), "ids": duplicated[:20].tolist()},
        "unreadable_shards": [{"url": r["url"], "error": r["error"]} for r in errors],
        "shards": {r["url"]: {k: v for k, v in r.items() if k != "url"} for r in reports},
    }
    atomic_write_json(output / MANIFEST, manifest)
    if len(duplicated):
        rank_zero_warn(
            f"{len(duplicated)} uids occur in several shards (first: {duplicated[:5].tolist()}); each keeps the "
            f"score from its first shard. See {output / MANIFEST}."
        )
    damage = describe_damage(manifest)
    rank_zero_info(
        f"[lightning-chips] score: {len(ids)} pairs from {len(urls)} shards by {config['method']} "
        f"({scored_now} scored now, the rest resumed), {bad} samples skipped, {len(errors)} unreadable shards, "
        f"{seconds:.1f}s -> {output / SCORES}" + (f". Damage: {damage}" if errors else "")
    )


def describe_damage(manifest: dict[str, Any], *, named: int = 3) -> str | None:
    """One sentence on the damage a ``manifest.json`` of ``score`` records (None when there is none): the skipped
    samples, the shards not read to the end (the first ``named`` with their errors, then how many more), and that
    the pairs after a shard's damage point were not scored (re-running ``score`` after repairing the shard scores
    them). ``score``, ``select`` and ``report`` print it."""
    skipped = manifest.get("skipped") if isinstance(manifest.get("skipped"), int) else 0
    shards = manifest.get("unreadable_shards")
    shards = [s for s in shards if isinstance(s, dict)] if isinstance(shards, list) else []
    if not skipped and not shards:
        return None
    text = f"{skipped} sample{'s' * (skipped != 1)} skipped (named in manifest.json)"
    if shards:
        names = "; ".join(f"{s.get('url')} ({s.get('error')})" for s in shards[:named])
        more = f"; and {len(shards) - named} more" if len(shards) > named else ""
        text += (f"; {len(shards)} shard{'s' * (len(shards) != 1)} not read to the end: {names}{more}. The pairs after "
                 "the damage point were not scored: repair the shard and re-run the same `lightning-chips score` "
                 "command, which scores it again")  # fmt: skip
    return text


class RefusedShardError(ValueError):
    """A ``manifest.json`` names a ``pipe:`` or URL shard, which lightning-chips opens only from the user's own
    ``--pool`` (:func:`manifest_pool`)."""


def manifest_pool(entries: Any, manifest: str | os.PathLike) -> list[str]:
    """The pool shards a ``manifest.json`` of ``score`` names (``entries``, its ``pool``), as local paths (relative
    entries are read from the manifest's folder, where ``score`` writes them relative to).

    Only local files are taken from a manifest: a ``pipe:`` entry would run a shell command and a URL a download
    program (webdataset opens them with curl, gsutil, ais, ...), so a score folder shared by someone else could make
    ``select --reshard`` or ``report`` run what its manifest says. Such shards are read only from the user's own
    ``--pool``.

    Raises:
        CorruptFileError: ``entries`` is not a non-empty list of strings.
        RefusedShardError: an entry (or what it expands to: braces, ``::``) is a ``pipe:`` or URL shard; the message
            says to pass ``--pool``.
        FileNotFoundError, ValueError: a listed shard does not exist (moved?), or the list does not expand.
    """
    manifest = Path(manifest)
    fix = "Pass --pool (the shards that were scored), or re-run `lightning-chips score` into that folder."
    if not (isinstance(entries, list) and entries and all(isinstance(u, str) for u in entries)):
        raise CorruptFileError(f"{manifest} is damaged: it names no pool shards. {fix}")

    def refuse(url: str) -> None:
        if _is_command_or_remote(url):
            raise RefusedShardError(
                f"{manifest} names the pool shard {url[:200]!r}; lightning-chips opens `pipe:` and URL shards (which "
                "run a shell command or a download program) only from your own --pool, never from a manifest. Pass "
                "--pool with the shards that were scored."
            )

    import braceexpand

    paths = []
    for entry in entries:
        refuse(entry.strip())
        path = entry if os.path.isabs(entry) else os.path.normpath(os.path.join(manifest.parent, entry))
        for part in path.split("::"):  # what expand_shards will open, before it checks any file
            for url in braceexpand.braceexpand(part.strip()):
                refuse(url.strip())
        paths.append(path)
    missing = [u for u in paths if not any(ch in u for ch in "{}*?[:") and not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} pool shards that {manifest} lists do not exist (first: {missing[0]}; relative paths are "
            "read from the manifest's folder). Pass --pool with the shards' new place."
        )
    urls = expand_shards(paths)
    for url in urls:  # (checked above already: braces and `::` could build a command out of innocent parts)
        refuse(url)
    return urls


def _relative_to(url: str, folder: Path) -> str:
    """A local shard path relative to ``folder`` (so the output folder and the pool can move together); remote
    URLs unchanged."""
    if "://" in url or url.startswith("pipe:"):
        return url
    return os.path.relpath(os.path.abspath(url), os.path.abspath(folder))


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
    sources = {url: _shard_source(url) for url in urls}  # before any shard is read: a later change is seen
    done = _completed_shards(out / PARTS, urls, run, sources)
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
