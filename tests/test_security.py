"""What files from someone else can make lightning-chips do (docs/offline.md, "Security"): a score folder's manifest
cannot make `select --reshard` or `report` run a command (`pipe:` and URL shards only from the user's own --pool),
and a checkpoint is unpickled with weights_only=True unless the user opts in with `trust_checkpoint=True`."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.data.webdataset import WebDatasetPairs
from lightning_chips.offline import MANIFEST, RefusedShardError, read_scores, score_pool
from lightning_chips.report import build_report
from lightning_chips.reshard import select_subset
from lightning_chips.scoring import CLIPScore, Random

from .conftest import TINY_VIT
from .shards import write_pool


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, **kwargs)  # fmt: skip


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_chips", *args], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A score folder over 2 local shards: ``(folder, shards)``."""
    root = tmp_path_factory.mktemp("security")
    write_pool(root / "pool", num_pairs=16, per_shard=8)
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT))
    score_pool(module, CLIPScore(), str(root / "pool"), str(root / "out"), batch_size=8, num_workers=0,
               trainer=_trainer())  # fmt: skip
    return root / "out", sorted(str(p) for p in (root / "pool").glob("*.tar"))


def _shared_folder(scored, tmp_path: Path, pool: list[str]) -> Path:
    """A copy of the score folder whose manifest names ``pool`` (as a folder shared by someone else could)."""
    folder = tmp_path / "shared"
    shutil.copytree(scored[0], folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "pool": pool}))
    return folder


# --------------------------------------------------------------------------------------------------------------
# a score folder cannot run commands
# --------------------------------------------------------------------------------------------------------------
def test_a_manifest_naming_a_pipe_shard_is_refused_by_select_and_report_and_runs_nothing(scored, tmp_path):
    marker = tmp_path / f"RAN-{uuid.uuid4().hex}"
    folder = _shared_folder(scored, tmp_path, [f"pipe:touch {marker} && cat {scored[1][0]}"])
    result = _cli("select", "--scores", str(folder), "--count", "3", "--output", str(tmp_path / "subset.npy"),
                  "--reshard", str(tmp_path / "subset" / "%04d.tar"))  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "pipe:touch" in result.stderr and "only from your own --pool" in result.stderr
    assert "Pass --pool" in result.stderr
    with pytest.raises(RefusedShardError, match=r"pipe:touch.*Pass --pool"):
        build_report(folder, tmp_path / "report.html")
    assert not marker.exists()  # the command never ran
    assert not (tmp_path / "subset.npy").exists() and not (tmp_path / "subset").exists()
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize(
    "entry",
    ["https://example.invalid/pool-000000.tar", "pool-000000.tar::pipe:touch {marker}", "  pipe:touch {marker}"],
    ids=["url", "pipe-after-a-join", "pipe-after-spaces"],
)
def test_command_or_url_shards_are_refused_from_a_manifest_in_any_spelling(scored, tmp_path, entry):
    marker = tmp_path / f"RAN-{uuid.uuid4().hex}"
    folder = _shared_folder(scored, tmp_path, [entry.format(marker=marker)])
    with pytest.raises(RefusedShardError, match="never from a manifest"):
        select_subset(folder, tmp_path / "s.npy", count=3, reshard=str(tmp_path / "subset" / "%04d.tar"))
    with pytest.raises(RefusedShardError, match="Pass --pool"):
        build_report(folder, tmp_path / "report.html")
    assert not marker.exists() and not (tmp_path / "s.npy").exists()


def test_a_manifest_with_braces_builds_no_command(scored, tmp_path):
    """Braces are expanded after a relative entry is joined to the manifest's folder: a local (missing) path."""
    marker = tmp_path / f"RAN-{uuid.uuid4().hex}"
    folder = _shared_folder(scored, tmp_path, [f"{{pi,x}}pe:touch {marker}"])
    with pytest.raises(ValueError, match="does not exist"):
        select_subset(folder, tmp_path / "s.npy", count=3, reshard=str(tmp_path / "subset" / "%04d.tar"))
    assert not marker.exists()


def test_pipe_shards_of_the_users_own_pool_are_read(scored, tmp_path):
    folder = _shared_folder(scored, tmp_path, ["pipe:false"])  # what the manifest says does not matter
    own = [f"pipe:cat {shard}" for shard in scored[1]]
    chosen = select_subset(folder, tmp_path / "s.npy", count=5, reshard=str(tmp_path / "subset" / "%04d.tar"),
                           pool=own)  # fmt: skip
    assert sorted(p["id"] for p in WebDatasetPairs(str(tmp_path / "subset"), image_size=32)) == chosen.tolist()
    scores = read_scores(folder)
    assert len(chosen) == 5 and set(chosen.tolist()) <= set(scores["ids"].tolist())
    page = build_report(folder, tmp_path / "report.html", pool=own, gallery=2).read_text("utf-8")
    assert page.count('data-kind="top"') == 2  # the gallery was read through the user's pipe: shards


# --------------------------------------------------------------------------------------------------------------
# checkpoints are not unpickled in full unless trusted
# --------------------------------------------------------------------------------------------------------------
def _touch(path: str) -> dict:
    Path(path).touch()
    return {}


class Smuggled:
    """An object whose unpickling runs code (here: creates a file)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return _touch, (self.path,)


def test_a_checkpoint_holding_other_objects_is_refused_unless_trusted(tmp_path):
    pl.seed_everything(0)
    source = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT))
    data = ScoredSubsetDataModule(TwoDomainPairs(32), None, batch_size=8, steps_per_round=2)
    callback = DataSelectionCallback(Random(), fraction=0.5, every_n_epochs=1, save_dir="", progress=False)
    trainer = _trainer(max_epochs=1, callbacks=[callback])
    trainer.fit(source, datamodule=data)
    ckpt = tmp_path / "module.ckpt"
    trainer.save_checkpoint(ckpt)  # a real Lightning checkpoint: optimizer, scheduler and callback states, hparams
    state = torch.load(ckpt, weights_only=False)
    assert any(key.startswith("DataSelectionCallback") for key in state["callbacks"])

    loaded = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), pretrained=str(ckpt))  # no opt-in needed
    assert torch.equal(loaded.model.visual.proj, source.model.visual.proj)

    marker = tmp_path / f"RAN-{uuid.uuid4().hex}"
    state["hyper_parameters"]["note"] = Smuggled(str(marker))
    evil = tmp_path / "evil.ckpt"
    torch.save(state, evil)
    with pytest.raises(ValueError, match=r"evil\.ckpt.*_touch.*unpickling them can run code.*trust_checkpoint=True"):
        OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), pretrained=str(evil))
    assert not marker.exists()  # refused before anything ran
    trusted = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), pretrained=str(evil), trust_checkpoint=True)
    assert marker.exists()  # what the opt-in allows: the file's code ran
    assert torch.equal(trusted.model.visual.proj, source.model.visual.proj)
    assert "trust_checkpoint" not in trusted.hparams  # a decision about a file, not saved with the model
    with pytest.raises(ValueError, match="`trust_checkpoint` must be True or False"):
        OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), trust_checkpoint="yes")


def test_trust_checkpoint_is_reachable_from_the_command_line_and_yaml():
    from lightning_chips.cli import offline_parser

    parser = offline_parser("score")
    base = ["--pool", "p", "--output", "o", "--scorer", "lightning_chips.scoring.CLIPScore", "--model",
            "lightning_chips.models.OpenCLIPModule", "--model.model_config", json.dumps(TINY_VIT)]  # fmt: skip
    assert parser.parse_args(base).model.init_args.trust_checkpoint is False
    cfg = parser.parse_args([*base, "--model.init_args.trust_checkpoint", "true"])
    assert cfg.model.init_args.trust_checkpoint is True
