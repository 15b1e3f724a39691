"""Validation metrics over training, one line per run (the paper's Fig. 5), from results.json.

    python experiments/trajectory.py --experiment tafeng-mf-control --table hold_trajectory

Reads a trajectory table that ``experiments/variants.py --trajectory`` recorded (a row per
validation pass of each run) and draws Hit@10, rHit@10, Pop-KL@10 and min-Hit@10 against
the training step, one line per run. Writes ``experiments/<experiment>/<table>.png``.
Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from records import ROOT, read_table, save_figure  # noqa: E402

#: Panel: (key, label).
PANELS = (("hit", "valid Hit@10"), ("rhit", "rHit@10"), ("pop_kl", "Pop-KL@10 (lower is better)"),
          ("min_hit", "min-Hit@10"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--table", required=True)
    args = parser.parse_args()
    title, runs = read_table(args.experiment, args.table)
    figure, axes = plt.subplots(1, len(PANELS), figsize=(16, 4))
    for ax, (key, label) in zip(axes, PANELS):
        for run, rows in runs.items():
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=run, linewidth=1.2)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(figure, title, ROOT / args.experiment / f"{args.table}.png")

if __name__ == "__main__":
    main()
