"""DDP with 2 CPU processes (gloo) gives the single-process numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_validate.py"


def _run(tmp_path: Path, devices: int, batch_size: int) -> dict:
    out = tmp_path / f"ddp{devices}.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(devices), str(batch_size)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.ddp
def test_contrastive_loss_gathers_negatives_across_ranks(tmp_path):
    """2 ranks x 16 pairs see the same 32 negatives as one process with 32 pairs, so val/loss is identical.

    Without cross-rank gathering each rank would see 16 negatives and the loss would be markedly lower.
    """
    single = _run(tmp_path, devices=1, batch_size=32)
    ddp = _run(tmp_path, devices=2, batch_size=16)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], abs=1e-5)
    local_only = _run(tmp_path, devices=1, batch_size=16)
    assert abs(local_only["val_loss"] - single["val_loss"]) > 0.05
