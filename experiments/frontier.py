"""Pareto frontiers of an experiment's solutions (the paper's Fig. 3), from its results.json.

    python experiments/frontier.py --experiment tafeng-mf-baselines --table seed0_solutions \
        [--x rhit pop_kl]

One panel per ``--x`` metric, every solution of every method on each: test Hit@10 against
rHit@10 (both higher is better), Pop-KL@10 (lower is better) or min-Hit@10, with the
frontier of all solutions together drawn through the non-dominated ones. Writes
``experiments/<experiment>/<table>_frontier.png``. Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from records import ROOT, read_table, save_figure  # noqa: E402

#: Panel by x key: (x label, whether a larger x is better).
PANELS = {"rhit": ("rHit@10 (higher is better)", True),
          "pop_kl": ("Pop-KL@10 (lower is better)", False),
          "min_hit": ("min-Hit@10 (higher is better)", True)}


def frontier(points: list[tuple[float, float]], x_larger: bool) -> list[tuple[float, float]]:
    """The points no other point beats in both coordinates (y larger is better), by x."""
    sign = 1 if x_larger else -1
    kept = [p for p in points
            if not any(q != p and sign * q[0] >= sign * p[0] and q[1] >= p[1] for q in points)]
    return sorted(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--x", nargs="+", choices=list(PANELS), default=["rhit", "pop_kl"])
    args = parser.parse_args()
    title, methods = read_table(args.experiment, args.table)
    every = [row for rows in methods.values() for row in rows]
    figure, axes = plt.subplots(1, len(args.x), figsize=(5.5 * len(args.x), 4.5),
                                squeeze=False)
    for ax, key in zip(axes[0], args.x):
        label, larger = PANELS[key]
        for method, rows in methods.items():
            ax.scatter([r[key] for r in rows], [r["hit"] for r in rows], label=method, s=28)
        line = frontier([(r[key], r["hit"]) for r in every], larger)
        ax.plot([p[0] for p in line], [p[1] for p in line], color="black", linewidth=1,
                linestyle="--", label="frontier")
        ax.set_xlabel(label)
        ax.set_ylabel("test Hit@10")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    save_figure(figure, title, ROOT / args.experiment / f"{args.table}_frontier.png")

if __name__ == "__main__":
    main()
