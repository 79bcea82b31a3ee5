"""Offline outputs that cannot be silently wrong (docs/offline.md, "Concurrency, full disks and damaged files"):
a locked output folder, parts of one run only, checked writes under a file-size limit, reshard sets that appear
complete or not at all, and load errors that name the file."""

from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest

from lightning_chips import OpenCLIPModule
from lightning_chips.data.webdataset import WebDatasetPairs
from lightning_chips.io import CorruptFileError, OutputLock, OutputLockedError, atomic_save
from lightning_chips.offline import (
    LOCK,
    MANIFEST,
    PARTS,
    part_name,
    read_scores,
    score_pool,
)
from lightning_chips.reshard import RESHARD_MANIFEST, select_subset
from lightning_chips.scoring import CHIPS, CLIPScore

from .conftest import TINY_VIT
from .shards import write_pool

SCRIPT = Path(__file__).parent / "scripts" / "offline_faults.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    valid = write_pool(root / "pool", num_pairs=60, per_shard=8, corrupt_image=5, missing_caption=22)
    write_pool(root / "target", num_pairs=16, per_shard=16, uid_offset=0, target_fraction=1.0, split="val",
               prefix="target")  # fmt: skip
    return root, valid


@pytest.fixture(scope="module")
def scored(shards, tmp_path_factory):
    """A complete `score` output (CLIPScore, no target) to select from."""
    root, valid = shards
    out = tmp_path_factory.mktemp("scored") / "out"
    score_pool(_module(), CLIPScore(), str(root / "pool"), str(out), batch_size=16, num_workers=0, trainer=_trainer())
    return out, valid


def _module() -> OpenCLIPModule:
    pl.seed_everything(0)
    return OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT))


def _trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False)  # fmt: skip


def _chips(seed: int = 0) -> CHIPS:
    return CHIPS(sketch_dim=64, bank_size=32, curvature_samples=64, seed=seed)


def _score(root: Path, out: Path, seed: int = 0, **kwargs) -> Path:
    return score_pool(_module(), _chips(seed), str(root / "pool"), str(out), target=str(root / "target"),
                      batch_size=8, num_workers=0, pool_sample=20, seed=seed, trainer=_trainer(), **kwargs)  # fmt: skip


def _script(*args: str, limit: int | None = None, **kwargs) -> subprocess.Popen:
    def preexec() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=preexec, **kwargs)  # fmt: skip


def _cli(*args: str, limit: int | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    def preexec() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "lightning_chips", *args], capture_output=True, text=True,
                          timeout=300, preexec_fn=preexec, cwd=cwd)  # fmt: skip


def _real_files(folder: Path) -> list[Path]:
    """Every file under a real (not hidden, not temporary) name below ``folder``."""
    return [p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts[-2:])]


def _assert_readable(files: list[Path]) -> None:
    """No file under a real name is truncated: each one loads in full."""
    for path in files:
        if path.suffix == ".npz":
            with np.load(path) as f:
                for key in f.files:
                    f[key]  # noqa: B018 - reading every member checks its CRC
        elif path.suffix == ".npy":
            np.load(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".tar":
            list(WebDatasetPairs(str(path), image_size=32))


# --------------------------------------------------------------------------------------------------------------
# one run per output folder
# --------------------------------------------------------------------------------------------------------------
def test_a_second_score_run_on_a_folder_in_use_is_refused_naming_the_first(shards, tmp_path):
    root, _ = shards
    out = tmp_path / "out"
    first = _script("score", str(root / "pool"), str(root / "target"), str(out), "1", "1.0")
    try:
        lock = out / LOCK
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.stat().st_size > 0):  # the first run holds the folder
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run never locked its output folder"
            time.sleep(0.2)
        with pytest.raises(OutputLockedError, match=f"pid {first.pid} on host .* since "):
            _score(root, out, seed=2)
        _, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stderr[-3000:]
    finally:
        first.kill()
    alone = _score(root, tmp_path / "alone", seed=1)
    np.testing.assert_array_equal(read_scores(out)["scores"], read_scores(alone)["scores"])  # not mixed
    assert lock.stat().st_size == 0  # released: the next run may take it
    _score(root, out, seed=1)  # resumes (every shard done) under the released lock


def test_a_part_of_another_run_is_refused_at_the_merge(shards, tmp_path):
    root, _ = shards
    other = tmp_path / "other"
    _score(root, other, seed=1)
    injected = []

    def inject(report) -> None:  # the other run's part of the shard just finished replaces this run's own
        if not injected:
            name = part_name(report.url)
            shutil.copy(other / PARTS / name, tmp_path / "out" / PARTS / name)
            injected.append(name)

    with pytest.raises(RuntimeError, match="was written by another run"):
        _score(root, tmp_path / "out", seed=2, after_shard=inject)
    assert injected and not (tmp_path / "out" / "scores.npz").exists()


def test_a_killed_runs_lock_is_taken_over_and_its_temporaries_removed(shards, tmp_path):
    root, _ = shards
    out = tmp_path / "out"
    dead = _script("die-holding-lock", str(out))
    stdout, _ = dead.communicate(timeout=120)
    assert dead.returncode == -9 and "locked" in stdout
    stale = list((out / PARTS).glob(".*.tmp"))
    assert len(stale) == 1 and (out / LOCK).stat().st_size > 0
    with pytest.warns(UserWarning, match=f"Took over the lock of .* from pid {dead.pid} on host"):
        _score(root, out)
    assert not list((out / PARTS).glob(".*.tmp")) and read_scores(out)["ids"].size > 0


def test_output_lock_refuses_a_second_holder_and_frees_on_release(tmp_path):
    first = OutputLock(tmp_path / LOCK, what="test").acquire()
    assert first.stale is None
    with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
        # flock locks belong to open file descriptions: a second open in this process conflicts like another run
        OutputLock(tmp_path / LOCK, what="test").acquire()
    first.release()
    again = OutputLock(tmp_path / LOCK, what="test").acquire()
    assert again.stale is None  # a clean release leaves nothing stale
    again.release()


# --------------------------------------------------------------------------------------------------------------
# every write checked (a file-size limit plays the full disk)
# --------------------------------------------------------------------------------------------------------------
def test_select_under_a_file_size_limit_fails_and_keeps_the_previous_subset(scored, tmp_path):
    out, _ = scored
    previous = np.arange(5, dtype=np.int64)
    atomic_save(tmp_path / "subset.npy", previous)
    result = _cli("select", "--scores", str(out), "--fraction", "0.5", "--output", str(tmp_path / "subset.npy"),
                  limit=100)  # fmt: skip
    assert result.returncode != 0
    assert "could not write" in result.stderr and "subset.npy" in result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "subset.npy"), previous)
    assert [p.name for p in tmp_path.iterdir()] == ["subset.npy"]  # no temporary left either


def _cli_score(root: Path, out: Path, limit: int | None = None) -> subprocess.CompletedProcess:
    return _cli("score", "--pool", str(root / "pool"), "--output", str(out), "--model", "OpenCLIPModule",
                "--model.model_config", json.dumps(TINY_VIT), "--scorer", "clipscore", "--batch_size", "8",
                "--num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
                limit=limit, cwd=out.parent)  # fmt: skip


def test_score_under_a_file_size_limit_fails_and_leaves_no_truncated_file(tmp_path):
    """A limit the part files fit under but the merged scores.npz does not (sizes measured on a free run; 200 pairs
    in 8 shards make the merged file the largest)."""
    root = tmp_path / "data"
    write_pool(root / "pool", num_pairs=200, per_shard=25)
    free = _cli_score(root, tmp_path / "free")
    assert free.returncode == 0, free.stderr[-3000:]
    small = [p.stat().st_size for p in (tmp_path / "free").rglob("*") if p.is_file() and p.name != "scores.npz"
             and p.name != "manifest.json"]  # fmt: skip
    limit = max(small) + 16
    assert limit < (tmp_path / "free" / "scores.npz").stat().st_size
    out = tmp_path / "out"
    result = _cli_score(root, out, limit=limit)
    assert result.returncode != 0
    assert "could not write" in result.stderr and "scores.npz" in result.stderr
    assert not (out / "scores.npz").exists()
    assert len(list((out / PARTS).glob("*.npz"))) == 8  # the parts made it: a re-run only merges
    _assert_readable(_real_files(out))
    again = _cli_score(root, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "8/8 shards already scored" in again.stderr + again.stdout
    _assert_readable(_real_files(out))
    np.testing.assert_array_equal(read_scores(out)["scores"], read_scores(tmp_path / "free")["scores"])


def test_reshard_under_a_file_size_limit_fails_and_publishes_nothing(scored, tmp_path):
    out, _ = scored
    result = _cli("select", "--scores", str(out), "--count", "20", "--output", str(tmp_path / "subset.npy"),
                  "--reshard", str(tmp_path / "subset" / "%04d.tar"), "--maxcount", "5", limit=20000)  # fmt: skip
    assert result.returncode != 0 and "subset" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".subset.lock"]  # no set, no subset.npy, no temp folder


# --------------------------------------------------------------------------------------------------------------
# reshard sets: complete or invisible
# --------------------------------------------------------------------------------------------------------------
def _set_uids(folder: Path) -> list[int]:
    manifest = json.loads((folder / RESHARD_MANIFEST).read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted([*manifest["shards"], RESHARD_MANIFEST])
    uids = sorted(p["id"] for p in WebDatasetPairs([str(folder / s) for s in manifest["shards"]], image_size=32))
    assert len(uids) == manifest["samples"]
    return uids


@pytest.mark.parametrize("step", ["shard", "shards_written", "manifest_written", "old_moved", "published"])
def test_a_kill_at_any_step_of_a_reshard_leaves_no_set_or_a_complete_one(scored, tmp_path, step):
    out, _ = scored
    pattern = str(tmp_path / "subset" / "%04d.tar")
    old = select_subset(out, tmp_path / "old.npy", count=7, reshard=pattern, maxcount=5)  # the previous set
    new = np.sort(read_scores(out)["ids"][np.lexsort((read_scores(out)["ids"], -read_scores(out)["scores"]))[:13]])
    killed = _script("reshard", str(out), str(tmp_path / "new.npy"), pattern, "13", step)
    killed.communicate(timeout=120)
    assert killed.returncode == 137
    folder = tmp_path / "subset"
    if folder.exists():  # the old set or the new one, each complete
        assert _set_uids(folder) in (old.tolist(), new.tolist())
    else:
        assert step == "old_moved"  # between the two renames: no set at all (documented)
    assert _set_uids(folder) == new.tolist() if step == "published" else True
    assert not (tmp_path / "new.npy").exists()  # the subset file is written after the set
    # the next run finishes the job and leaves no hidden folder behind
    select_subset(out, tmp_path / "new.npy", count=13, reshard=pattern, maxcount=5)
    assert _set_uids(folder) == new.tolist() == np.load(tmp_path / "new.npy").tolist()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".subset.lock"]


def test_reshard_refuses_a_folder_holding_other_files(scored, tmp_path):
    out, _ = scored
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        select_subset(out, tmp_path / "s.npy", count=5, reshard=str(tmp_path / "mixed" / "%04d.tar"))
    assert (tmp_path / "mixed" / "notes.txt").read_text() == "mine" and not (tmp_path / "s.npy").exists()
    with pytest.raises(ValueError, match="folder of its own"):
        select_subset(out, tmp_path / "s.npy", count=5, reshard="%04d.tar")


# --------------------------------------------------------------------------------------------------------------
# damaged inputs: the error names the file, nothing is written
# --------------------------------------------------------------------------------------------------------------
def _copy_scores(scored, tmp_path: Path) -> Path:
    out, _ = scored
    copy_ = tmp_path / "copy"
    shutil.copytree(out, copy_)
    return copy_


def _flip_byte_in_member(path: Path, member: str) -> None:
    """Flip one byte of the stored data of ``member`` inside the zip (its CRC no longer matches)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size - 1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "bit flip in ids", "no scores array", "not an npz"])
def test_a_damaged_scores_file_is_named_and_nothing_is_written(scored, tmp_path, damage):
    copy_ = _copy_scores(scored, tmp_path)
    path = copy_ / "scores.npz"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "bit flip in ids":
        _flip_byte_in_member(path, "ids.npy")
    elif damage == "no scores array":
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files if k != "scores"}
        np.savez(path, **arrays)
    else:
        path.write_text("hello")
    with pytest.raises(CorruptFileError, match=f"{path}.*lightning-chips score"):
        select_subset(copy_, tmp_path / "subset.npy", fraction=0.5)
    assert not (tmp_path / "subset.npy").exists()
    result = _cli("select", "--scores", str(copy_), "--fraction", "0.5", "--output", str(tmp_path / "subset.npy"))
    assert result.returncode != 0 and str(path) in result.stderr and not (tmp_path / "subset.npy").exists()


def _zip_directory_fields(path: Path) -> list[int]:
    """Byte offsets, in a zip's central directory, of each member's version-needed, flags and compression-method
    fields (flips there made zipfile raise NotImplementedError or RuntimeError, which did not name the file) and of
    its comment length (a flip there hid the members after it: the file loaded without them)."""
    data = path.read_bytes()
    end = data.rfind(b"PK\x05\x06")
    count, _, start = struct.unpack("<HII", data[end + 10 : end + 20])
    offsets, at = [], start
    for _ in range(count):
        name, extra, comment = struct.unpack("<HHH", data[at + 28 : at + 34])
        offsets += [at + 6, at + 8, at + 10, at + 11, at + 32, at + 33]
        at += 46 + name + extra + comment
    return offsets


def test_every_single_bit_flip_of_a_scores_file_is_named_or_changes_nothing(scored, tmp_path):
    """A seeded sample of the single-bit flips of a scores.npz, and every flip of the zip-directory fields that
    escaped before: each one is a CorruptFileError naming the file, or loads exactly the original arrays."""
    original = scored[0] / "scores.npz"
    source, reference = original.read_bytes(), read_scores(original)
    bits = set(np.random.default_rng(0).choice(8 * len(source), size=600, replace=False).tolist())
    bits |= {8 * offset + b for offset in _zip_directory_fields(original) for b in range(8)}
    path = tmp_path / "scores.npz"
    for bit in sorted(bits):
        flipped = bytearray(source)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(flipped))
        try:
            got = read_scores(path)
        except CorruptFileError as exc:
            assert str(path) in str(exc), f"bit {bit}: {exc}"
            continue
        except Exception as exc:  # noqa: BLE001 - the point: nothing else may escape
            pytest.fail(f"bit {bit}: {type(exc).__name__}: {exc}")
        assert sorted(got) == sorted(reference), f"bit {bit}: members {sorted(set(reference) ^ set(got))} lost"
        for key, value in reference.items():
            assert np.array_equal(np.asarray(got[key]), np.asarray(value)), f"bit {bit}: {key} changed"


def test_a_damaged_manifest_is_named_before_anything_is_written(scored, tmp_path):
    copy_ = _copy_scores(scored, tmp_path)
    manifest = copy_ / MANIFEST
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(CorruptFileError, match=f"{manifest}.*--pool"):
        select_subset(copy_, tmp_path / "subset.npy", count=5, reshard=str(tmp_path / "subset" / "%04d.tar"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no subset.npy, no set, no lock


def test_a_damaged_part_is_named_and_its_shard_scored_again(shards, tmp_path):
    root, _ = shards
    out = tmp_path / "out"
    _score(root, out)
    before = read_scores(out)
    part = sorted((out / PARTS).glob("*.npz"))[3]
    part.write_bytes(part.read_bytes()[:100])
    (out / "scores.npz").unlink()
    with pytest.warns(UserWarning, match=f"{part.name} is damaged"):
        _score(root, out)
    after = read_scores(out)
    np.testing.assert_array_equal(after["ids"], before["ids"])
    np.testing.assert_allclose(after["scores"], before["scores"], rtol=1e-5, atol=1e-5 * np.abs(before["scores"]).max())
