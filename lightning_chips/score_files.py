"""The files of a ``lightning-chips score`` folder (docs/offline.md): the part file of each shard (its scores,
ids, ``group_by`` columns, the shard's report and what the shard was when the run started), which parts a re-run
keeps, their merge into the id-sorted ``scores.npz`` and ``manifest.json``, and what later commands read back
(:func:`read_scores`, :func:`manifest_pool`, :func:`describe_damage`). :mod:`lightning_chips.offline` runs the
pass that writes them; every public name here is importable from there too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_chips.data.checks import SkippedSample
from lightning_chips.data.webdataset import ShardReport, expand_shards
from lightning_chips.engine import check_skipped
from lightning_chips.groups import GroupColumn, group_arrays, read_group_arrays
from lightning_chips.io import CorruptFileError, atomic_savez, atomic_write_json, load_npz
from lightning_chips.round_rows import first_occurrences

__all__ = ["MANIFEST", "PARTS", "SCORES", "RefusedShardError", "describe_damage", "manifest_pool", "read_scores"]

PARTS = "parts"
MANIFEST = "manifest.json"
SCORES = "scores.npz"

_PART_FIX = "Delete it and re-run `lightning-chips score` into the same --output: its shard is scored again."
_SCORES_FIX = "Re-run `lightning-chips score` into its folder: it resumes from the part files and writes it anew."


def part_name(url: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rsplit("/", 1)[-1])[:80]
    return f"{base}-{hashlib.sha1(url.encode()).hexdigest()[:10]}.npz"


def _is_command_or_remote(url: str) -> bool:
    """A shard that ``webdataset.gopen`` opens by running a program: ``pipe:`` (a shell command) or a URL with a
    scheme (curl, gsutil, ais, ...)."""
    return url.startswith("pipe:") or "://" in url


def shard_source(url: str) -> dict[str, Any]:
    """What a part records of its shard as it was when the run started: the size and modification time (ns) of a
    local file; for a ``pipe:`` or URL shard only ``{"remote": True}`` (nothing to stat without reading it)."""
    if _is_command_or_remote(url):
        return {"remote": True}
    stat = os.stat(url)
    return {"size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}


def write_part(path: Path, url: str, ids: np.ndarray, scores: np.ndarray, report: ShardReport, run: str,
                uids: np.ndarray | None = None, groups: dict[str, GroupColumn] | None = None,
                source: dict[str, Any] | None = None) -> None:  # fmt: skip
    """A shard's part: int64 keys as ``ids``, the string ids as ``uids`` when the pool has them, the ``group_by``
    columns (:func:`~lightning_chips.groups.group_arrays`), the shard's report (its ``error`` is None when the
    shard was read to the end) and ``source``, what :func:`shard_source` gave when the run started (so a later run
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
    :func:`shard_source` of the shard at this run's start)."""
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


def completed_shards(parts: Path, urls: Sequence[str], run: str, sources: dict[str, dict[str, Any]]) -> set[str]:
    """Shards of ``urls`` with a part of this run that still stands for them (read to the end, unchanged since:
    :func:`_stale`); a part of another run is an error. Says in one line which shards are scored again and why."""
    done, again = set(), []
    for url in urls:
        path = parts / part_name(url)
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


class _Merged(NamedTuple):
    """The parts of a run merged: one row per id, key-sorted."""

    keys: np.ndarray
    scores: np.ndarray
    reports: list[dict]
    uids: np.ndarray | None  # the string ids of ``keys`` when the pool has string ids
    groups: dict[str, GroupColumn]  # the ``group_by`` columns, aligned with ``keys``
    read: int  # pairs in the parts, repeated ids included
    duplicated: np.ndarray  # the keys that stand in several pairs, sorted


def merge_parts(output: Path, urls: Sequence[str], run: str) -> _Merged:
    """The parts of ``urls`` merged: a uid in several shards keeps its first shard's score (the first pair of a
    repeated id, as in a callback round: :func:`~lightning_chips.round_rows.first_occurrences`). A part that
    another run wrote is an error naming it: the merge never mixes runs."""
    all_ids, all_scores, all_uids, reports, has_uids, groups = [], [], [], [], [], []
    for url in urls:
        path = output / PARTS / part_name(url)
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
    first = first_occurrences(ids)  # in shard order: each id's first pair
    repeated = np.ones(len(ids), dtype=bool)
    repeated[first] = False
    uids = np.concatenate(all_uids)[first] if any(has_uids) else None
    fields = list(groups[0]) if groups else []
    columns = {f: GroupColumn.cat([g[f] for g in groups]).take(first).capped() for f in fields}
    return _Merged(ids[first], scores[first], reports, uids, columns, len(ids), np.unique(ids[repeated]))


def as_given(
    keys: np.ndarray, scores: np.ndarray, uids: np.ndarray | None, groups: dict[str, GroupColumn] | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, GroupColumn]]:
    """Ids as users read them, sorted (int64 ids, or the string ids of a pool that has them), with their scores
    (and group columns)."""
    groups = groups or {}
    if uids is None:
        return keys, scores, groups
    order = np.argsort(uids, kind="stable")
    return uids[order], scores[order], {f: c.take(order) for f, c in groups.items()}


def write_merged(output: Path, config: dict[str, Any], seconds: float, scored_now: int) -> None:
    urls = config["urls"]
    merged = merge_parts(output, urls, config["run"])
    keys, uids, reports = merged.keys, merged.uids, merged.reports
    duplicated = merged.duplicated if uids is None else uids[np.searchsorted(keys, merged.duplicated)]
    ids, scores, groups = as_given(keys, merged.scores, uids, merged.groups)
    bad = sum(len(r["bad"]) for r in reports)
    errors = [r for r in reports if r["error"]]
    skipped = [SkippedSample(b["reason"], key=b["key"], shard=r["url"]) for r in reports for b in r["bad"]]
    check_skipped(skipped, merged.read + bad, config["max_skipped"], round_=0)  # before anything is written
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
