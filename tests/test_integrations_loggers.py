"""A selection fit logged to real W&B (offline) and MLflow (local file store) runs, read back from their stores."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger  # noqa: E402

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs  # noqa: E402
from lightning_chips.gallery import KINDS  # noqa: E402
from lightning_chips.scoring import CHIPS  # noqa: E402

from .conftest import TINY_VIT  # noqa: E402

pytestmark = pytest.mark.slow

K = 3  # gallery size
EPOCHS = 2  # two rounds: the second has "entered" / "left" galleries
STEPS = [0, 2]  # the rounds' global steps: at the fit's start and after the first epoch (2 steps)


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    """W&B offline and quiet, its files under tmp; MLflow's file store allowed (mlflow >= 3.? refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE=true``). Module-scoped: the tests read the stores back under the same settings."""
    tmp_path = tmp_path_factory.mktemp("loggers")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                            "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                            "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                            "MLFLOW_ALLOW_FILE_STORE": "true"}.items():  # fmt: skip
            mp.setenv(name, value)
        yield tmp_path


@pytest.fixture(scope="module")
def logged_fit(offline_env):
    """Two CHIPS rounds on a 64-pair pool with group_by and galleries, logged to W&B (offline) and MLflow."""
    tmp_path = offline_env
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=2e-3)
    data = ScoredSubsetDataModule(TwoDomainPairs(64, noise_fraction=0.2, target_fraction=0.3),
                                  TwoDomainPairs(16, target_fraction=1.0, split="val"), batch_size=8,
                                  steps_per_round=2, eval_batch_size=64)  # fmt: skip
    callback = DataSelectionCallback(CHIPS(sketch_dim=32, bank_size=16, curvature_samples=16), fraction=0.3,
                                     every_n_epochs=1, save_dir=str(tmp_path / "rounds"), group_by=["domain"],
                                     gallery=K, thumbnail_size=16)  # fmt: skip
    wandb_logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="chips")
    tracking_uri = f"file:{tmp_path}/mlruns"
    mlflow_logger = MLFlowLogger(experiment_name="chips", tracking_uri=tracking_uri)
    pl.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, callbacks=[callback],
               logger=[wandb_logger, mlflow_logger], enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, log_every_n_steps=1,
               default_root_dir=tmp_path).fit(module, datamodule=data)  # fmt: skip
    run_dir = wandb_logger.experiment.dir  # .../wandb/offline-run-*/files
    wandb.finish()  # flush and close the offline run
    return {"callback": callback, "wandb_files": run_dir, "tracking_uri": tracking_uri,
            "mlflow_run_id": mlflow_logger.run_id}  # fmt: skip


def _wandb_records(files_dir) -> list:
    """The records of an offline run's ``.wandb`` file: a LevelDB-style log (a 7-byte ``:W&B`` header, 32 KiB
    blocks of chunks with a 7-byte ``crc32, length, type`` header) of ``wandb_internal_pb2.Record`` messages. wandb
    0.31 no longer ships a Python reader (``wandb.sdk.internal.datastore`` is gone), so this is one."""
    import struct
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2

    (log,) = Path(files_dir).parent.glob("*.wandb")
    data = log.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, message = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero-filled space
            continue
        message = chunk if kind in (1, 2) else message + chunk  # FULL / FIRST start a message, MIDDLE / LAST extend
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(message)
            records.append(record)
    return records


def _wandb_history(files_dir) -> list[dict]:
    """The run's history rows (``wandb.log`` calls) as nested dicts."""
    rows = []
    for record in _wandb_records(files_dir):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:
            *path, last = list(item.nested_key) or [item.key]
            node = row
            for key in path:
                node = node.setdefault(key, {})
            node[last] = json.loads(item.value_json)
        rows.append(row)
    return rows


def _expected_metrics(callback) -> dict[str, list[float]]:
    keys = callback.history[0].keys()
    return {f"selection/{k}": [h[k] for h in callback.history] for k in keys}


def test_wandb_offline_run_has_the_rounds_metrics_histogram_and_galleries(logged_fit):
    from pathlib import Path

    from PIL import Image

    callback, files = logged_fit["callback"], Path(logged_fit["wandb_files"])
    assert len(callback.history) == EPOCHS
    expected = _expected_metrics(callback)
    assert "selection/group/domain=target/selected" in expected and "selection/score_q50" in expected
    history = _wandb_history(files)
    rows = [r for r in history if "selection/round" in r]
    assert len(rows) == EPOCHS
    for name, values in expected.items():  # overlap is NaN at round 0 (no previous selection)
        assert [r[name] for r in rows] == pytest.approx(values, abs=1e-6, nan_ok=True), name
    assert [r["trainer/global_step"] for r in rows] == STEPS  # logged at the round's step
    # Images: the score histogram (no native histogram through Lightning's WandbLogger) and the galleries, each a
    # one-image list (WandbLogger.log_image: "images/separated" with the PNG's path in the run's media folder).
    images = [(r["trainer/global_step"], key, value) for r in history for key, value in r.items()
              if isinstance(value, dict) and value.get("_type") == "images/separated"]  # fmt: skip
    tags = ("scores", *KINDS)
    assert sorted((step, key) for step, key, _ in images) == sorted(
        [(STEPS[0], f"selection/{t}") for t in ("scores", "top", "bottom")]  # no entered / left at round 0
        + [(STEPS[1], f"selection/{t}") for t in tags])  # fmt: skip
    for _, key, value in images:  # each history entry points at a PNG in the run's media folder
        (name,) = value["filenames"]
        path = files / name
        assert path.parent == files / "media" / "images" / "selection" and path.name.startswith(key.split("/")[1])
        assert Image.open(path).size == (value["width"], value["height"])
    top = next(files / v["filenames"][0] for s, k, v in images if (s, k) == (STEPS[0], "selection/top"))
    assert np.asarray(Image.open(top).convert("RGB")).shape[1] >= K * 16  # K thumbnails of 16 px in a row


def test_mlflow_file_store_has_the_rounds_metrics_histogram_and_galleries(logged_fit):
    import re

    from PIL import Image

    callback = logged_fit["callback"]
    client = mlflow.tracking.MlflowClient(logged_fit["tracking_uri"])
    run_id = logged_fit["mlflow_run_id"]
    expected = _expected_metrics(callback)
    assert "selection/group/domain=target/selected" in expected
    for name, values in expected.items():
        # Lightning's MLFlowLogger drops characters MLflow refuses: "selection/group/domain=target/kept" is stored as
        # "selection/group/domaintarget/kept".
        stored = re.sub("[^a-zA-Z0-9_/. -]+", "", name)
        history = client.get_metric_history(run_id, stored)
        assert [m.value for m in history] == pytest.approx(values, abs=1e-6, nan_ok=True), name
        assert [m.step for m in history] == STEPS
    # Images go to the run's "images" artifacts (MlflowClient.log_image(key=..., step=...)), "/" in a tag becomes
    # "_"; each PNG has a "compressed" webp preview beside it. The key / step separator is "+" (was "%" in 2.x).
    artifacts = [a.path for a in client.list_artifacts(run_id, "images")]
    pngs = {}
    for path in artifacts:
        if path.endswith(".png"):
            key, step = re.match(r"images/(.+?)[+%]step[+%](\d+)[+%]", path).groups()
            pngs[(int(step), key)] = path
    tags = ("scores", *KINDS)
    assert sorted(pngs) == sorted([(STEPS[0], f"selection_{t}") for t in ("scores", "top", "bottom")]
                                  + [(STEPS[1], f"selection_{t}") for t in tags])  # fmt: skip
    local = client.download_artifacts(run_id, pngs[(STEPS[0], "selection_top")])
    grid = np.asarray(Image.open(local).convert("RGB"))
    assert grid.ndim == 3 and grid.shape[1] >= K * 16  # K thumbnails of 16 px in a row
