"""`lightning-chips` answers a user error in one line and a hint, exit code 2, for the Lightning subcommands as for
the offline ones: misspelled keys (with a "did you mean"), invalid values, missing files and checkpoints. The full
jsonargparse message or traceback is behind --verbose, and `fit --help` starts with examples and warns of
nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401  (before capsys: Lightning's log handler keeps the real stderr)
import pytest
import yaml

from .conftest import TINY_VIT

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
# what Lightning prints before an error in building the classes; not the CLI's answer
BANNER = re.compile(r"^(INFO: )?(Seed set to|GPU available|TPU available|HPU available|💡 Tip)")


def _run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_chips", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=None if env is None else {**os.environ, **env})  # fmt: skip


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> Path:
    """The quickstart with a misspelled callback key (`fracton`) and with a misspelled top-level key (`traner`)."""
    root = tmp_path_factory.mktemp("one_line")
    config = yaml.safe_load(QUICKSTART.read_text())
    config["trainer"]["callbacks"][0]["init_args"]["fracton"] = config["trainer"]["callbacks"][0]["init_args"].pop(
        "fraction"
    )
    (root / "nested.yaml").write_text(yaml.safe_dump(config))
    config = yaml.safe_load(QUICKSTART.read_text())
    config["traner"] = config.pop("trainer")
    (root / "top.yaml").write_text(yaml.safe_dump(config))
    return root


SCORE = ["score", "--pool", "pool", "--output", "out", "--model", "OpenCLIPModule", "--scorer", "clipscore"]
ERRORS = {
    "nested key": (["fit", "--config", "nested.yaml"], ["trainer.callbacks[0].init_args.fracton", "'fraction'"]),
    "top-level key": (["fit", "--config", "top.yaml"], ["'traner'", "did you mean 'trainer'"]),
    "score option": ([*SCORE, "--num_workr", "0"], ["'--num_workr'", "did you mean '--num_workers'"]),
    "missing pretrained": (
        [*SCORE, "--model.init_args.model_config", json.dumps(TINY_VIT), "--model.init_args.pretrained", "/nope.pt"],
        ["/nope.pt", "OpenCLIPModule"],
    ),
    "missing ckpt_path": (["fit", "--config", str(QUICKSTART), "--ckpt_path", "/nope/last.ckpt"], ["/nope/last.ckpt"]),
    "invalid value": (
        ["fit", "--config", str(QUICKSTART), "--trainer.max_epochs", "abc"],
        ["'abc'", "trainer.max_epochs", "int"],
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_a_user_error_is_one_line_naming_it_and_a_hint_with_exit_code_2(configs, case):
    args, words = ERRORS[case]
    result = _run(*args, cwd=configs)
    assert result.returncode == 2, result.stderr[-3000:]
    said = [line for line in (result.stdout + result.stderr).splitlines() if line.strip() and not BANNER.match(line)]
    assert len(said) <= 3, said
    assert said[0].startswith(f"lightning-chips {args[0]}: error: "), said
    for word in words:
        assert word in said[0], said[0]
    assert "--verbose" in said[1] and "--help" in said[1]  # the hint
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr


def test_fit_help_starts_with_examples_and_warns_of_nothing(tmp_path):
    """The page is built once (importing Lightning), then answered from the help cache without importing it."""
    cache = {"LIGHTNING_CHIPS_CACHE": str(tmp_path / "cache"), "COLUMNS": "100"}
    result = _run("fit", "--help", cwd=tmp_path, env=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""  # no "LightningCLI's args parameter is intended to run from within Python"
    head = result.stdout.splitlines()[:12]
    assert head[0].startswith("usage: lightning-chips fit") and "examples:" in head
    assert any(line.strip().startswith("lightning-chips fit --config") for line in head), head
    assert "--trainer.max_epochs" in result.stdout and "--data CONFIG" in result.stdout
    (stored,) = (tmp_path / "cache" / "help").iterdir()
    assert stored.name.startswith("fit-") and stored.read_text() == result.stdout
    again = subprocess.run(
        [sys.executable, "-c", "import sys; from lightning_chips.cli import main; main(['fit', '--help']); "
         "print(sorted(m for m in ('lightning', 'torch', 'jsonargparse') if m in sys.modules), file=sys.stderr)"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, **cache},
    )  # fmt: skip
    assert again.returncode == 0 and again.stdout == result.stdout
    assert again.stderr.strip() == "[]"  # nothing heavy was imported for the second answer
    off = _run("fit", "--help", cwd=tmp_path, env={**cache, "LIGHTNING_CHIPS_CACHE": ""})  # cache off: built again
    assert off.stdout == result.stdout and len(list((tmp_path / "cache" / "help").iterdir())) == 1


def test_help_cache_key_follows_what_builds_the_page(monkeypatch, tmp_path):
    from lightning_chips import help_cache

    key = help_cache.help_key("fit", columns=100)
    assert help_cache.help_key("fit", columns=100) == key
    assert help_cache.help_key("fit", columns=80) != key and help_cache.help_key("score", columns=100) != key
    real = help_cache.metadata.version
    monkeypatch.setattr(help_cache.metadata, "version", lambda n: "0.0" if n == "lightning" else real(n))
    assert help_cache.help_key("fit", columns=100) != key  # another Lightning builds another page
    monkeypatch.setenv("LIGHTNING_CHIPS_CACHE", str(tmp_path))
    help_cache.store_help("k.txt", "page")
    assert help_cache.cached_help("k.txt") == "page" and help_cache.cached_help("other.txt") is None
    (tmp_path / "help" / "bad.txt").write_bytes(b"\xff\xfe")  # unreadable: built again, not an error
    assert help_cache.cached_help("bad.txt") is None


# In the test process (no interpreter start): the other kinds of mistakes, and --verbose.
MORE = {
    "unknown option": (["--trainer.max_epohcs", "2"], ["--trainer.max_epohcs", "did you mean '--trainer.max_epochs'"]),
    "unknown model key": (["--model.init_args.lrr", "1"], ["model.init_args.lrr", "did you mean 'lr'"]),
    "unknown class": (["--model", "OpenCLIPModul"], ["model: unknown class 'OpenCLIPModul'", "'OpenCLIPModule'"]),
    "unknown module": (["--model", "lightning_chips.modls.OpenCLIPModule"], ["'modls'", "did you mean 'models'"]),
    "invalid choice": (["--trainer.precision", "33"], ["'33'", "trainer.precision", "'bf16-mixed'"]),
    "refused by the class": (["--model.init_args.model_config", "null", "--model.init_args.model_name", "ViT-B-61"],
                             ["OpenCLIPModule: Unknown open_clip model_name 'ViT-B-61'"]),
    "missing config": (["--config", "/nope.yaml"], ["--config '/nope.yaml': no such file"]),
}  # fmt: skip


def _main_error(capsys, args: list[str]) -> str:
    from lightning_chips.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if line.strip() and not BANNER.match(line)]
    assert len(said) == 2 and "--help" in said[1], said  # the error and the hint
    return said[0]


@pytest.mark.parametrize("case", list(MORE))
def test_every_kind_of_mistake_is_one_line_with_what_is_wrong(capsys, case):
    extra, words = MORE[case]
    base = [] if case == "missing config" else ["--config", str(QUICKSTART)]
    line = _main_error(capsys, ["fit", *base, *extra])
    assert line.startswith("lightning-chips fit: error: ")
    for word in words:
        assert word in line, line


def test_an_unknown_subcommand_is_one_line_before_any_import(capsys):
    assert "did you mean 'fit'" in _main_error(capsys, ["fitt", "--config", "x.yaml"])


def test_verbose_shows_the_full_parser_message(capsys, configs):
    from lightning_chips.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(configs / "nested.yaml"), "--verbose"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Does not validate against any of the Union subtypes" in err and "Given value:" in err
    assert err.startswith("usage: lightning-chips fit")
