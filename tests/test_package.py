"""The package's structure: what users import, and what its modules may import from each other."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_chips

PACKAGE = Path(lightning_chips.__file__).parent


def test_no_module_imports_a_private_name_of_another_module():
    """Private names (``_x``) stay inside their module: what two modules share is public, documented API."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_chips"):
                offenders += [f"{path.relative_to(PACKAGE)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_")]  # fmt: skip
    assert offenders == []


def test_the_pure_math_does_not_import_the_adapters_or_lightning():
    """``lightning_chips.functional`` is tensor math: it takes the end point type from its own module, not from
    the adapters (open_clip internals) or Lightning. The full-parameter influence functions run the model's towers
    and are the one exception."""
    offenders = []
    for path in sorted((PACKAGE / "functional").glob("*.py")):
        if path.name == "influence_full.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                offenders += [f"{path.name}: {n}" for n in names
                              if n.startswith(("lightning_chips.adapters", "lightning", "open_clip"))
                              and not n.startswith("lightning_chips.")
                              or n.startswith("lightning_chips.adapters")]  # fmt: skip
    assert offenders == []


def test_every_registered_scorer_and_select_are_importable_from_the_package():
    from lightning_chips.scoring import SCORERS

    exported = {name: getattr(lightning_chips, name) for name in lightning_chips.__all__}
    assert {cls.__name__ for cls in SCORERS.values()} <= set(exported)
    assert exported["select"] is __import__("lightning_chips.selection", fromlist=["select"]).select
    assert len(set(lightning_chips.__all__)) == len(lightning_chips.__all__)


def test_every_non_composite_scorer_builds_with_its_defaults():
    from lightning_chips.scoring import SCORERS, build_scorer

    for name in SCORERS:
        if name not in ("chain", "intersect"):  # composites are made of other scorers
            assert build_scorer(name).name == name


def test_the_real_datasets_are_optional():
    """The benchmark-only real datasets live in ``lightning_chips.datasets``, which importing the library (its
    callback, data modules, scorers and CLI) never loads."""
    import subprocess
    import sys

    code = ("import sys, lightning_chips, lightning_chips.data, lightning_chips.offline, lightning_chips.cli; "
            "print('lightning_chips.datasets' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_a_module_over_500_lines_says_why_it_is_one_thing():
    """Long modules are allowed only when they are one cohesive thing, and their docstring says which."""
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 500:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "One module" not in doc:
                unexplained.append(f"{path.relative_to(PACKAGE)} ({text.count(chr(10))} lines)")
    assert unexplained == []


def test_the_round_reads_data_modules_through_the_pool_contract_only():
    """The callback and the engine know data modules only as ``SelectablePool`` (no duck-typed loader names)."""
    for name in ("callback.py", "engine.py"):
        text = (PACKAGE / name).read_text()
        for duck in ("pool_dataloader", "target_dataloader", 'getattr(datamodule, "streaming"', 'batch["reports"]'):
            assert duck not in text, (name, duck)
