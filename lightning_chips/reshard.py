"""``lightning-chips select``: the top of a scores file as a subset, and the selected samples copied into new shards.

:func:`select_subset` reads a ``scores.npz`` of ``lightning-chips score`` (every input checked before anything is
written) and saves the sorted uids of its top ``fraction`` / ``count``; with ``reshard`` it also copies the selected
samples, byte for byte, into a new set of shards that appears complete or not at all (:func:`reshard_samples`;
docs/offline.md, "What a reader of a reshard set must check").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_chips.data.checks import BadSample, parse_id
from lightning_chips.data.webdataset import ShardReport, expand_shards, iter_raw_samples
from lightning_chips.ids import id_key, id_keys
from lightning_chips.io import CorruptFileError, OutputLock, atomic_save, atomic_write_json, load_json, publish_mode
from lightning_chips.offline import MANIFEST, describe_damage, manifest_pool, read_scores
from lightning_chips.selection import select

__all__ = ["RESHARD_MANIFEST", "reshard_samples", "select_subset"]

RESHARD_MANIFEST = "reshard.json"


def select_subset(
    scores: str | os.PathLike,
    output: str | os.PathLike,
    *,
    fraction: float | None = None,
    count: int | None = None,
    reshard: str | None = None,
    pool: str | list[str] | None = None,
    maxcount: int = 10000,
    uid_field: str | None = None,
) -> np.ndarray:
    """The top ``fraction`` (or ``count``) of a scores file as sorted uids, saved to ``output`` (``.npy``).

    Ties are broken by id, so the subset is deterministic. With ``reshard`` (a ``ShardWriter`` pattern such as
    ``subset/shard-%06d.tar``) the selected samples are also copied, byte for byte, from the pool's shards
    (``pool``, default: the pool recorded in the scores' manifest) into new shards of ``maxcount`` samples, in a
    folder of their own that appears complete or not at all (:func:`reshard_samples`).

    Every input (the scores file, the manifest, the pool's shards) is read and checked before anything is written;
    a damaged file is a :class:`~lightning_chips.io.CorruptFileError` that names it. The reshard set is written
    before ``output``, so a failed reshard leaves no subset file either. The summary line says what damage the
    scores' manifest records (skipped samples, shards not read to the end, named): pairs that were never scored
    cannot be selected.

    Args:
        scores: a ``scores.npz`` of ``lightning-chips score``, or its output folder.
        output: the ``.npy`` file the selected uids are written to (sorted; int64 or strings, as in the pool).
        fraction: the share of the scored pairs to keep, in (0, 1] (give this or ``count``).
        count: the number of pairs to keep (give this or ``fraction``).
        reshard: a pattern for new shards holding the selected samples, e.g. ``subset/shard-%06d.tar`` (a folder of
            their own); None writes only ``output``.
        pool: the shards to copy from (default: the pool the scores' ``manifest.json`` records, relative paths read
            from the manifest's folder; only local files are taken from a manifest, ``pipe:`` and URL shards only
            from ``pool``).
        maxcount: samples per new shard.
        uid_field: the id's field in each sample's ``.json`` when resharding (default: the ``uid_field`` the scores
            were made with, from the manifest, else ``"uid"``).

    Returns:
        The selected uids.

    Example::

        >>> select_subset("scores/chips/scores.npz", "subset.npy", fraction=0.3, reshard="subset/%06d.tar")
    """
    if (fraction is None) == (count is None):
        raise ValueError("Give exactly one of `fraction` or `count`.")
    if maxcount < 1:
        raise ValueError(f"`maxcount` (samples per output shard) must be >= 1, got {maxcount}.")
    loaded = read_scores(scores)
    ids, values = np.asarray(loaded["ids"]), np.asarray(loaded["scores"])
    keys = id_keys(ids)  # string ids are selected by their keys (lightning_chips.ids)
    if count is not None and not 1 <= count <= len(ids):
        raise ValueError(f"`count` must be in [1, {len(ids)}] (the scored pairs), got {count}.")
    if not np.isfinite(values).all():
        raise ValueError(f"The scores file has non-finite scores (ids {ids[~np.isfinite(values)][:5].tolist()}).")
    manifest, manifest_path = _manifest_beside(scores, required=reshard is not None and pool is None)
    damage = describe_damage(manifest) if manifest is not None else None
    if uid_field is None:
        uid_field = manifest.get("uid_field") if manifest is not None else None
        uid_field = uid_field if isinstance(uid_field, str) and uid_field else "uid"
    elif not isinstance(uid_field, str) or not uid_field:
        raise ValueError(f"`uid_field` must be a non-empty string, got {uid_field!r}.")
    urls = None
    if reshard is not None:
        _reshard_folder(reshard)
        if pool is None:
            pool = manifest_pool(manifest.get("pool") if isinstance(manifest, dict) else None, manifest_path)
        urls = expand_shards(pool)  # a missing shard is an error here, before any output
    chosen_keys = select(keys, values, fraction=fraction, count=count, method=str(loaded.get("method", ""))).ids
    chosen = np.sort(ids[np.isin(keys, chosen_keys)])  # as given: int64 or strings
    output = Path(output)
    message = f"[lightning-chips] select: {len(chosen)}/{len(ids)} uids -> {output}"
    if damage is not None:
        message += f" (the scores miss damaged input: {damage})"
    if urls is not None:
        written = reshard_samples(urls, chosen, reshard, maxcount=maxcount, uid_field=uid_field)
        message += f"; {len(written)} shards -> {Path(reshard).parent}"
    atomic_save(output, chosen)
    rank_zero_info(message)
    return chosen


def _manifest_beside(scores: str | os.PathLike, *, required: bool) -> tuple[dict[str, Any] | None, Path]:
    """The ``manifest.json`` beside a scores file (or in its folder). Without ``required`` a missing or damaged one
    gives None (a damaged one with a warning): ``select`` needs it only for the pool of ``--reshard``."""
    path = Path(scores) / MANIFEST if Path(scores).is_dir() else Path(scores).parent / MANIFEST
    fix = ("Pass --pool (the shards that were scored), or re-run `lightning-chips score` into that folder to write it "
           "anew.")  # fmt: skip
    try:
        manifest = load_json(path, what="manifest of `lightning-chips score`", fix=fix)
    except (FileNotFoundError, CorruptFileError) as exc:
        if required:
            raise
        if isinstance(exc, CorruptFileError):
            rank_zero_warn(f"{exc} (the skipped samples and damaged shards it records are not known)")
        return None, path
    if not isinstance(manifest, dict):
        if required:
            raise CorruptFileError(f"{path} is damaged: it is not a JSON object. {fix}")
        return None, path
    return manifest, path


_FAULT: Any = None
"""Tests only: called with the name of each step of :func:`reshard_samples` (to kill the process there)."""


def _fault(step: str) -> None:
    if _FAULT is not None:
        _FAULT(step)


class _Unreadable(str):
    """Why a pool sample has no readable uid (what :func:`_sample_uid` gives instead of its key)."""


def _sample_uid(raw: dict[str, bytes], uid_field: str) -> int | _Unreadable:
    """The int64 key of the uid in ``uid_field`` of a raw sample's json, or why there is none."""
    if "json" not in raw:
        return _Unreadable("no json member")
    try:
        meta = json.loads(raw["json"])
    except (UnicodeDecodeError, ValueError) as exc:
        return _Unreadable(f"json does not parse ({exc})")
    if not isinstance(meta, dict) or meta.get(uid_field) is None:
        return _Unreadable(f"no {uid_field!r} in its json")
    try:
        return id_key(parse_id(meta[uid_field], name=uid_field))
    except BadSample as exc:
        return _Unreadable(str(exc))


def _read_problems(unreadable: list[dict[str, str]], errors: list[dict[str, str]], uid_field: str) -> str:
    """``"; N pool samples have no readable uid_field (first: ...); M pool shards ..."``, or ``""``."""
    text = ""
    if unreadable:
        first = "; ".join(f"{u['shard']} {u['key']}: {u['reason']}" for u in unreadable[:3])
        text += f"; {len(unreadable)} pool samples have no readable {uid_field!r} and were passed over (first: {first})"
    if errors:
        first = "; ".join(f"{e['url']}: {e['error']}" for e in errors[:3])
        text += f"; {len(errors)} pool shards could not be read to the end ({first})"
    return text


def _reshard_folder(pattern: str) -> Path:
    """The folder of a reshard ``pattern``, checked: the pattern names files in a folder of their own."""
    if not isinstance(pattern, str) or "%" not in Path(pattern).name:
        raise ValueError(f"`reshard` must be a pattern whose file name has a %d field, e.g. 'subset/shard-%06d.tar', "
                         f"got {pattern!r}.")  # fmt: skip
    folder = Path(pattern).parent
    if str(folder) in ("", ".") or folder.resolve() == folder.resolve().parent:
        raise ValueError(f"`reshard` needs a folder of its own for the new shards, e.g. 'subset/shard-%06d.tar', "
                         f"got {pattern!r}.")  # fmt: skip
    return folder.resolve()


def _check_replaceable(folder: Path) -> None:
    """``folder`` may be replaced by a new reshard set: absent, empty, or a set an earlier reshard wrote."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"--reshard: {folder} exists and is not a folder.")
    entries = sorted(os.listdir(folder))
    if not entries:
        return
    if RESHARD_MANIFEST in entries:
        try:
            known = set(load_json(folder / RESHARD_MANIFEST, what="reshard manifest", fix="")["shards"])
        except (CorruptFileError, KeyError, TypeError):
            known = {e for e in entries if e.endswith(".tar")}  # our folder, with a damaged manifest
        foreign = [e for e in entries if e != RESHARD_MANIFEST and e not in known]
        if not foreign:
            return
    else:
        foreign = entries
    raise ValueError(
        f"--reshard: {folder} holds files that are not a reshard set of lightning-chips ({', '.join(foreign[:5])}"
        f"{', ...' if len(foreign) > 5 else ''}); the new set replaces the whole folder, so give it a folder of its "
        "own (a new one, or one an earlier --reshard wrote)."
    )


def reshard_samples(
    pool: str | Sequence[str], uids: np.ndarray, pattern: str, *, maxcount: int = 10000, uid_field: str = "uid"
) -> list[str]:
    """Copy the samples of ``pool`` whose uid is in ``uids`` into new shards named by ``pattern`` (``%06d``).

    Every member of a sample is copied unchanged. A uid found in several shards is copied once; a uid that is not
    found is an error. The uid of each sample is ``uid_field`` of its ``.json``; a sample without a readable one
    (no json, json that does not parse, no such field, a value that is not an int64 or a string) is counted and
    named, never silently passed over: in ``reshard.json`` (``unreadable``), in a warning, and in the error when
    selected uids are missing. Shards that cannot be read to the end are named the same way (``shard_errors``).

    The set is published complete or not at all: the shards and ``reshard.json`` (the shard names, the number of
    samples, a digest of the uids, the source shards) are written in a hidden folder ``.NAME.reshard-*`` beside the
    pattern's folder ``NAME``, which is then renamed to ``NAME`` in one step (a previous set is moved aside first
    and deleted after). The folder gets the permissions the umask gives (``0755`` under ``022``), as the shards
    ShardWriter writes in it do. A kill leaves either no ``NAME`` (re-run) or the complete set; the next run removes
    the hidden folders a killed run left. The folder holds the lock ``.NAME.lock`` (beside it) while a run writes
    it; a second run is refused.
    """
    import webdataset as wds

    folder = _reshard_folder(pattern)
    parent, name = folder.parent, folder.name
    keys = id_keys(uids)
    wanted, first = np.unique(keys, return_index=True)
    given = np.asarray(uids)[first]  # the uids as the user gave them, aligned with `wanted`
    urls = expand_shards(pool)
    parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(parent / f".{name}.lock", what="lightning-chips select --reshard"):
        for leftover in parent.glob(f".{name}.reshard-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in parent.glob(f".{name}.old-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        _check_replaceable(folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.reshard-", dir=parent))
        os.chmod(tmp, publish_mode(directory=True))  # mkdtemp makes it 0700: publish what the umask gives
        old: Path | None = None
        published = False
        try:
            seen = np.zeros(len(wanted), dtype=bool)
            unreadable: list[dict[str, str]] = []  # samples without a readable uid: (shard, key, reason)
            errors: list[dict[str, str]] = []  # shards not read to the end
            sink = wds.ShardWriter(str(tmp / Path(pattern).name), maxcount=maxcount, verbose=0,
                                   post=lambda _: _fault("shard"))  # fmt: skip
            with sink:
                for url in urls:
                    report = ShardReport(url)
                    for key, raw in iter_raw_samples(url, report):
                        uid = _sample_uid(raw, uid_field)
                        if isinstance(uid, _Unreadable):
                            unreadable.append({"shard": url, "key": key, "reason": str(uid)})
                            continue
                        pos = int(np.searchsorted(wanted, uid))
                        if pos < len(wanted) and wanted[pos] == uid and not seen[pos]:
                            seen[pos] = True
                            sink.write({"__key__": key.rsplit("/", 1)[-1], **raw})
                    if report.error is not None:
                        errors.append({"url": url, "error": report.error})
            problems = _read_problems(unreadable, errors, uid_field)
            if not seen.all():
                raise ValueError(f"{int((~seen).sum())} selected uids are not in the pool read with uid_field "
                                 f"{uid_field!r} (first: {given[~seen][:5].tolist()}){problems}. Is `pool` the pool "
                                 "that was scored, and `uid_field` the field its uids were read from?")  # fmt: skip
            if problems:
                rank_zero_warn(f"select --reshard: every selected uid was found and copied, but{problems} (named in "
                               f"{folder / RESHARD_MANIFEST}).")  # fmt: skip
            shards = sorted(os.listdir(tmp))
            _fault("shards_written")
            digest = hashlib.sha1(np.ascontiguousarray(wanted).tobytes()).hexdigest()
            atomic_write_json(tmp / RESHARD_MANIFEST, {
                "shards": shards, "samples": int(len(wanted)), "uids_sha1": digest, "pool": urls,
                "uid_field": uid_field, "unreadable": {"count": len(unreadable), "first": unreadable[:20]},
                "shard_errors": errors,
            })  # fmt: skip
            _fault("manifest_written")
            if folder.exists():
                old = parent / f".{name}.old-{os.getpid()}"
                os.rename(folder, old)
                _fault("old_moved")
            os.rename(tmp, folder)  # the commit point: the set is visible, complete
            published = True
            _fault("published")
        except BaseException as exc:
            if old is not None and not published and not folder.exists():
                os.rename(old, folder)  # an error (not a kill) before the commit: put the previous set back
                old = None
            if isinstance(exc, OSError) and not published:  # say which output could not be written
                raise OSError(exc.errno, f"could not write the reshard set {folder}: {exc.strerror or exc}") from exc
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and published:
                shutil.rmtree(old, ignore_errors=True)
    return [str(folder / shard) for shard in shards]
