"""The package's layers import downwards only: base (config, errors, collectives) ← data
preparation ← the plugin ← the reference jobs; the public surface (``morec_rec``) sits on
the plugin; the plugin imports no TorchRec, and the backbones nothing of MoRec."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "morec_rec"
#: Layer of a module, by its dotted name's prefix; a module imports only its layer or below.
LAYERS = [("morec_rec.jobs", 4), ("morec_rec.plugin", 2), ("morec_rec.data", 1),
          ("morec_rec.config", 0), ("morec_rec.errors", 0), ("morec_rec.collectives", 0),
          ("morec_rec.version", 0),
          ("morec_rec", 3)]  # the public surface: the plugin's names, for the jobs and users


def layer(module: str) -> int:
    return next(rank for prefix, rank in LAYERS
                if module == prefix or module.startswith(prefix + "."))


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return found


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-local and TYPE_CHECKING too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize(("module", "path"), modules(), ids=[m for m, _ in modules()])
def test_imports_point_down(module: str, path: Path) -> None:
    upward = sorted(name for name in imports(path)
                    if name.split(".")[0] == "morec_rec" and layer(name) > layer(module))
    assert not upward, f"{module} imports {upward}, above its layer"


@pytest.mark.parametrize(("module", "path"), [(m, p) for m, p in modules()
                                              if m.startswith("morec_rec.plugin")])
def test_the_plugin_imports_no_torchrec(module: str, path: Path) -> None:
    assert not {n for n in imports(path) if n.split(".")[0] in ("torchrec", "fbgemm_gpu")}


def test_the_backbones_know_nothing_of_morec() -> None:
    for path in (PACKAGE / "jobs" / "models").glob("*.py"):
        if path.name == "scorer.py":  # ranks for the plugin's evaluation, not a model
            continue
        known = {n for n in imports(path) if n.startswith("morec_rec.")}
        assert known <= {"morec_rec.errors", "morec_rec.data.arrays", "morec_rec.jobs.models",
                         "morec_rec.jobs.collate", "morec_rec.jobs.models.mf",
                         "morec_rec.jobs.models.sasrec"}, path


def test_a_module_that_imports_upward_is_caught(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from morec_rec.jobs.cli import main\n")
    assert layer("morec_rec.plugin.morec") < max(layer(n) for n in imports(bad))
