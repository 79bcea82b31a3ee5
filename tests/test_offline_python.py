"""docs/offline.md's Python example runs as written (a tiny model in place of the line that loads one) on a
WebDataset pool, and its outputs are those of the functions it names."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from .conftest import TINY_VIT
from .shards import write_pool

DOC = Path(__file__).resolve().parent.parent / "docs" / "offline.md"


def _example() -> str:
    text = DOC.read_text()
    match = re.search(r"<!-- offline-python-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/offline.md lost its marked Python example"
    return match.group(1)


def test_the_offline_python_example_scores_selects_and_reports(tmp_path, capsys):
    code = _example()
    model_line = next(line for line in code.splitlines() if line.startswith("model = "))
    assert "# your model" in model_line
    code = code.replace(model_line, f"model = OpenCLIPModule(model_config={TINY_VIT!r})")
    write_pool(tmp_path / "pool", num_pairs=24, per_shard=8)
    write_pool(tmp_path / "target", num_pairs=8, per_shard=8, target_fraction=1.0, split="val", prefix="target")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, str(DOC), "exec"), {"__name__": "offline_example"})
    finally:
        os.chdir(cwd)
    out = tmp_path / "scores" / "chips"
    with np.load(out / "scores.npz") as scores:
        ids, values = scores["ids"], scores["scores"]
    assert len(ids) == 24 and np.isfinite(values).all()
    uids = np.load(tmp_path / "subset.npy")
    top = ids[np.lexsort((ids, -values))][: round(0.3 * 24)]  # the top 30 %, ties by id
    assert sorted(uids.tolist()) == sorted(top.tolist())
    assert (out / "report.html").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "CHIPS" and manifest["scored"] == 24 and "target_share" in manifest["estimate"]
    assert f"kept {len(uids)} pairs" in capsys.readouterr().out
