"""The synthetic datasets the benchmarks run on, made by the command a user runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def synth(profile: str, root: Path) -> Path:
    """``morec-rec synth --profile PROFILE --seed 0`` into ``root/PROFILE``; that path."""
    data = root / profile
    subprocess.run([sys.executable, "-m", "morec_rec.jobs.cli", "synth", "--profile", profile,
                    "--seed", "0", "--out", str(data)], check=True)
    return data
