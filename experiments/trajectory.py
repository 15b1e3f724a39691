"""Validation metrics over training, one line per run (the paper's Fig. 5), from results.json.

    python experiments/trajectory.py --experiment tafeng-mf-control --table hold_trajectory

Reads a trajectory table that ``experiments/variants.py --trajectory`` recorded (a row per
validation pass of each run) and draws Hit@10, rHit@10, Pop-KL@10 and min-Hit@10 against
the training step, one line per run. Writes ``experiments/<experiment>/<table>.png``.
Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent
#: Panel: (key, label).
PANELS = (("hit", "valid Hit@10"), ("rhit", "rHit@10"), ("pop_kl", "Pop-KL@10 (lower is better)"),
          ("min_hit", "min-Hit@10"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--table", required=True)
    args = parser.parse_args()
    record = json.loads((ROOT / args.experiment / "results.json").read_text())
    rows = record["tables"][args.table]["rows"]
    runs = list(dict.fromkeys(row["row"] for row in rows))
    figure, axes = plt.subplots(1, len(PANELS), figsize=(16, 4))
    for ax, (key, label) in zip(axes, PANELS):
        for run in runs:
            mine = [row for row in rows if row["row"] == run]
            ax.plot([r["step"] for r in mine], [r[key] for r in mine], label=run, linewidth=1.2)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{args.experiment}: {record['tables'][args.table]['title']}", fontsize=10)
    figure.tight_layout()
    out = ROOT / args.experiment / f"{args.table}.png"
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
