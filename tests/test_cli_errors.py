"""The command line a newcomer meets: a help that lists every subcommand, user errors as one line with a hint
(the traceback behind --verbose), --strict for pipelines, and a reshard that finds its pool from the manifest."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

from .conftest import TINY_VIT
from .shards import write_pool


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``lightning-chips ARGS`` run by ``main`` in this process, as the console script runs it (no interpreter start
    and Lightning import per call): its exit code, stdout and stderr; an exception that escapes ``main`` is printed
    as the interpreter would print it, exit code 1. tests/test_cli_one_line.py runs the command in a subprocess."""
    from lightning_chips.cli import main

    out, err, code, here = io.StringIO(), io.StringIO(), 0, os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def _run_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_chips", *args], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    write_pool(root / "pool", num_pairs=24, per_shard=8, corrupt_image=3)
    (root / "empty_target").mkdir()
    return root


def _score_args(pool: Path, output: Path, *extra: str) -> list[str]:
    return ["score", "--pool", str(pool), "--output", str(output), "--model", "OpenCLIPModule",
            "--model.model_config", json.dumps(TINY_VIT), "--scorer", "clipscore", "--num_workers", "0",
            "--batch_size", "16", "--pool_sample", "null", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip


def test_help_lists_every_subcommand_with_what_it_does():
    result = _run_process("--help")  # the console script's own process: answers without importing Lightning
    assert result.returncode == 0
    for name in ("fit", "validate", "test", "predict", "score", "select", "report"):
        assert any(line.split()[:1] == [name] and len(line.split()) > 3 for line in result.stdout.splitlines()), name
    assert "lightning-chips SUBCOMMAND --help" in result.stdout


def _one_line_error(result: subprocess.CompletedProcess, command: str, *words: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"lightning-chips {command}: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    for word in words:
        assert word in errors[0], errors[0]
    assert "--verbose" in result.stderr  # the hint


def test_user_errors_are_one_line_with_a_hint_and_the_traceback_is_behind_verbose(pool, tmp_path):
    scores = tmp_path / "scores"
    _one_line_error(_run(*_score_args(pool / "missing", scores)), "score", "does not exist")
    _one_line_error(_run(*_score_args(pool / "pool", scores, "--target", str(pool / "empty_target"))), "score",
                    "target")  # fmt: skip
    _one_line_error(_run(*_score_args(pool / "pool", scores)[:-8], "--scorer", "chipz"), "score", "chipz",
                    "did you mean 'chips'")  # fmt: skip
    _one_line_error(_run("select", "--scores", str(tmp_path / "none"), "--fraction", "0.3", "--output",
                         str(tmp_path / "s.npy")), "select", "No scores file")  # fmt: skip
    verbose = _run("select", "--scores", str(tmp_path / "none"), "--fraction", "0.3", "--output",
                   str(tmp_path / "s.npy"), "--verbose")  # fmt: skip
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr
    unknown = _run("select", "--scores", str(tmp_path), "--fracton", "0.3", "--output", str(tmp_path / "s.npy"))
    _one_line_error(unknown, "select", "'--fracton'", "did you mean '--fraction'")
    assert len(unknown.stderr.splitlines()) == 2  # no usage block


def test_strict_makes_skipped_samples_a_failure_after_writing_the_outputs(pool, tmp_path):
    relaxed = _run(*_score_args(pool / "pool", tmp_path / "relaxed"))
    assert relaxed.returncode == 0, relaxed.stderr[-2000:]
    strict = _run(*_score_args(pool / "pool", tmp_path / "strict", "--strict"))
    assert strict.returncode == 3, strict.stderr[-2000:]
    assert "1 samples were skipped" in strict.stderr
    assert (tmp_path / "strict" / "scores.npz").exists()  # the outputs are written all the same
    bad = _run("select", "--scores", str(tmp_path / "strict"), "--fraction", "1.5", "--output",
               str(tmp_path / "s.npy"))  # fmt: skip
    _one_line_error(bad, "select", "fraction")
    assert not (tmp_path / "s.npy").exists()


def test_reshard_finds_the_pool_from_the_manifest_wherever_it_runs_and_names_the_manifest_when_it_cannot(
    pool, tmp_path
):
    work = tmp_path / "work"
    shutil.copytree(pool / "pool", work / "pool")
    scored = _run(*_score_args(Path("pool"), Path("scores")), cwd=work)  # relative paths, run from work/
    assert scored.returncode == 0, scored.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _run("select", "--scores", str(work / "scores"), "--count", "5", "--output", "subset.npy",
                  "--reshard", "subset/%06d.tar", cwd=elsewhere)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(np.load(elsewhere / "subset.npy")) == 5 and list((elsewhere / "subset").glob("*.tar"))
    shutil.move(work / "pool", tmp_path / "moved")
    moved = _run("select", "--scores", str(work / "scores"), "--count", "5", "--output", "again.npy",
                 "--reshard", "again/%06d.tar", cwd=elsewhere)  # fmt: skip
    _one_line_error(moved, "select", str(work / "scores" / "manifest.json"), "--pool")
    assert not (elsewhere / "again.npy").exists() and not (elsewhere / "again").exists()
    assert not [p for p in os.listdir(elsewhere) if p.startswith(".again")]  # no partial output


@pytest.mark.parametrize("command", ["score", "select", "report"])
def test_every_option_of_the_offline_commands_says_what_it_does(command):
    from lightning_chips.cli import offline_parser

    parser = offline_parser(command)
    silent = [a.option_strings[0] for a in parser._actions if a.option_strings and len((a.help or "").split()) < 2]
    assert silent == []
    names = {a.option_strings[0] for a in parser._actions if a.option_strings}
    assert "--verbose" in names and ("--strict" in names) == (command == "score")


def test_score_group_by_then_report_from_the_command_line(tmp_path):
    """`score --group-by domain` (the dashed spelling) keeps the json field; `report --fraction` pages it, with
    the top-k read back from the manifest's shards."""
    write_pool(tmp_path / "pool", num_pairs=24, per_shard=8, json_fields=("domain",))
    scores = tmp_path / "scores"
    result = _run(*_score_args(tmp_path / "pool", scores, "--group-by", "domain"))
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(scores / "scores.npz") as f:
        assert f["group_fields"].tolist() == ["domain"]
        top = f["ids"][np.lexsort((f["ids"], -f["scores"].astype(np.float64)))][:3].tolist()
    result = _run("report", str(scores), "--fraction", "0.25", "--gallery", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[lightning-chips] report: 1 rounds" in result.stdout + result.stderr
    page = (scores / "report.html").read_text()
    shown = re.findall(r'data-kind="top"[^>]*data-id="([^"]+)"|data-id="([^"]+)"[^>]*data-kind="top"', page)
    assert [int(a or b) for a, b in shown] == top
    assert "domain" in page
