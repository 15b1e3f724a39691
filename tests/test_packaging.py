"""``pip install .`` into an environment that already holds torch, torchrec and FBGEMM.

pip must install the package alone (no torch, torchrec or FBGEMM, nor the ``plot`` extra),
and the installed package, not this checkout, must run an example: synthesize the tiny
profile and train one epoch on it.

The environment is a new venv whose site-packages reach this interpreter's packages through
a directory of links, less morec-rec itself (an editable install here) and matplotlib (the
``plot`` extra): nothing is downloaded, and pip runs with ``--no-index`` (it would fail if
it wanted anything that is not there).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
#: What the package is built from (the rest of the checkout is not part of it).
SOURCES = ("pyproject.toml", "setup.cfg", "README.md", "morec_rec")
#: This interpreter's site-packages (the dev venv's under `make test`).
HERE = sorted({Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")})
#: Entries of this site-packages the new environment does not get: this package, the plot
#: extra, and .pth files (a linked directory's .pth files would not run anyway).
LEFT_OUT = re.compile(
    r"(morec_rec|__editable__|matplotlib|mpl_toolkits|pylab|__pycache__)|.*\.pth$")
#: The hard requirements, each with a version range; torchrec and the rest are extras.
CORE = {"numpy", "pyarrow", "torch", "tqdm"}
TRAIN = ["--model", "mf", "--batch-size", "128", "--num-workers", "0", "--embedding-dim", "16",
         "--max-epochs", "1"]

PROBE = """
import importlib.metadata, importlib.util, json, fbgemm_gpu, morec_rec, torch, torchrec
print(json.dumps({
    "morec_rec": morec_rec.__file__,
    "stack": [m.__file__ for m in (torch, torchrec, fbgemm_gpu)],
    "matplotlib": importlib.util.find_spec("matplotlib") is not None,
    "requires": importlib.metadata.requires("morec-rec"),
}))
"""


def _run(*command: str | Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _existing_environment(tmp: Path, env: dict[str, str]) -> Path:
    """A new venv that holds this interpreter's packages but morec-rec and matplotlib."""
    links = tmp / "existing"
    links.mkdir()
    for site in HERE:
        for entry in site.iterdir():
            if not LEFT_OUT.match(entry.name) and not (links / entry.name).exists():
                (links / entry.name).symlink_to(entry)
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp, env=env)
    python = venv / "bin" / "python"
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                   cwd=tmp, env=env).stdout.strip()
    (Path(purelib) / "existing.pth").write_text(f"{links}\n")
    return venv


@pytest.mark.slow
def test_pip_install_into_an_existing_torchrec_environment(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    venv = _existing_environment(tmp_path, env)
    python, lib = venv / "bin" / "python", venv / "lib"
    before = {p.relative_to(lib) for p in lib.rglob("*")}

    # A copy of the sources: pip builds in the source tree, which must stay untouched.
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    done = _run(python, "-m", "pip", "install", "--no-index", "--no-build-isolation", source,
                cwd=tmp_path, env=env)
    installed = re.findall(r"^Successfully installed (.*)$", done.stdout, re.MULTILINE)
    assert len(installed) == 1 and re.fullmatch(r"morec-rec-\S+", installed[0]), done.stdout
    added = {p.relative_to(lib) for p in lib.rglob("*")} - before  # python3.X/site-packages/…
    assert {p.parts[2].split("-")[0] for p in added} == {"morec_rec"}, sorted(map(str, added))

    # Run from elsewhere, so that neither this checkout nor its editable install is found.
    work = tmp_path / "work"
    work.mkdir()
    probe = json.loads(_run(python, "-c", PROBE, cwd=work, env=env).stdout)
    assert Path(probe["morec_rec"]).is_relative_to(venv)
    assert not Path(probe["morec_rec"]).resolve().is_relative_to(ROOT)
    for module in probe["stack"]:  # the environment's own torch, torchrec and FBGEMM
        assert any(Path(module).resolve().is_relative_to(site) for site in HERE), module
    assert not probe["matplotlib"]

    requirements = [Requirement(r) for r in probe["requires"]]
    core = [r for r in requirements if r.marker is None]
    assert {r.name for r in core} == CORE
    assert all(r.specifier for r in core), [str(r) for r in core]
    extras = {extra: {r.name for r in requirements
                      if r.marker is not None and r.marker.evaluate({"extra": extra})}
              for extra in ("torchrec", "plot")}
    assert extras == {"torchrec": {"torch", "torchrec", "fbgemm-gpu"}, "plot": {"matplotlib"}}

    morec = venv / "bin" / "morec-rec"
    _run(morec, "synth", "--profile", "tiny", "--seed", "0", "--out", work / "data",
         cwd=work, env=env)
    _run(morec, "train", "--data", work / "data", "--out", work / "run", *TRAIN,
         cwd=work, env=env)
    log = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == [1]
