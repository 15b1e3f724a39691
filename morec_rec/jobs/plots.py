"""Figures of a run's ``log.jsonl``: the controller, the sampling masses, a metric comparison.

    controller.png  per held objective: its controlled value against the target ℓ̂ (±5%),
                    and β
    masses.png      per objective with groups: each group's sampling mass over steps
    metrics.png     Hit@10, rHit@10, Pop-KL@10 and MinHit@10 of several runs side by side

Figures are built with :class:`matplotlib.figure.Figure`, never ``pyplot``: nothing is
registered globally (no backend to choose, no figure to close), so a figure is freed when
its function returns. Every PNG is written atomically: a reader sees the previous file or
the whole new one.

A resumed run logs again the steps after its checkpoint; the step and update series keep the
records logged last (see :func:`_series`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from morec_rec.jobs.run import read_log
from morec_rec.plugin.eval.metrics import LOWER_IS_BETTER, METRICS
from morec_rec.plugin.sampling.sampler import BATCH

DPI = 120
#: The band |ℓ_o − ℓ̂| ≤ 5%·ℓ̂ within which the controller holds its quantity.
TARGET_TOLERANCE = 0.05
COMPARED = tuple(f"{name}@10" for name in METRICS)  # the bars of metrics.png, in this order

Record = dict[str, Any]


def plot_controller(records: Sequence[Record], path: Path) -> Path | None:
    """Writes, per objective held by a controller, its controlled value with the target ℓ̂
    and its β.

    Returns ``path``, or None (writing nothing) when no step record has a "coefficient".
    """
    steps = [r for r in _series(records, "step") if "coefficient" in r]
    held = list(dict.fromkeys(name for r in steps for name in r["coefficient"]))
    if not held:
        return None
    fig = Figure(figsize=(6.4, 3.6 * len(held)), layout="constrained")
    axes = fig.subplots(2 * len(held), 1, sharex=True, height_ratios=[2, 1] * len(held),
                        squeeze=False)[:, 0]
    for name, loss_ax, beta_ax in zip(held, axes[0::2], axes[1::2]):
        rows = [r for r in steps if name in r["coefficient"]]
        _plot_held(loss_ax, beta_ax, name, rows)
    axes[-1].set_xlabel("step")
    return _save(fig, path)


def _plot_held(loss_ax: Axes, beta_ax: Axes, name: str, rows: Sequence[Record]) -> None:
    x = [r["step"] for r in rows]
    target = np.array([r["target"][name] for r in rows])
    loss_ax.plot(x, [r["controlled"][name] for r in rows],
                 label="ℓ (controlled: loss or validation measure)")
    # A step line: the target is constant in a run, but drawn as logged should it move.
    loss_ax.plot(x, target, "--", color="black", drawstyle="steps-post", label="target ℓ̂")
    loss_ax.fill_between(x, target * (1 - TARGET_TOLERANCE), target * (1 + TARGET_TOLERANCE),
                         step="post", color="black", alpha=0.1,
                         label=f"ℓ̂ ± {TARGET_TOLERANCE:.0%}")
    loss_ax.set(title=f"{name}: controlled value against its target", ylabel="ℓ")
    loss_ax.legend(fontsize="small")
    beta_ax.plot(x, [r["coefficient"][name] for r in rows], color="C2")
    beta_ax.set(title=f"{name}: controller output", ylabel="β")


def plot_masses(records: Sequence[Record], path: Path) -> Path | None:
    """Writes each objective's group masses over steps, stacked, one subplot per objective.

    Masses hold from their update's step until the next update of that objective; the last
    ones extend to the final step of any record. Returns ``path``, or None (writing nothing)
    when no update record holds masses.
    """
    updates = _series(records, "update")
    names = list(dict.fromkeys(name for r in updates for name in r["masses"]))
    if not names:
        return None
    final = max(r["step"] for r in records if isinstance(r.get("step"), int))
    # The batch shares are masses over the objectives, named in the step records' losses.
    objectives = next((list(r["objective_loss"]) for r in _series(records, "step")), None)
    fig = Figure(figsize=(6.4, 2.8 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for name, ax in zip(names, axes):
        rows = [r for r in updates if name in r["masses"]]
        steps, masses = [r["step"] for r in rows], [r["masses"][name] for r in rows]
        if name == BATCH and objectives is not None:
            _plot_masses(ax, "each objective's share of a batch", "objective", objectives,
                         steps, masses, final)
        else:
            _plot_masses(ax, f"{name}: sampling mass per group", "group",
                         [str(g) for g in range(len(masses[0]))], steps, masses, final)
    axes[-1].set_xlabel("step")
    return _save(fig, path)


def _plot_masses(ax: Axes, title: str, legend_title: str, labels: list[str], steps: list[int],
                 masses: list[list[float]], final: int) -> None:
    x = [*steps, final]
    y = np.array([*masses, masses[-1]]).T  # (groups, len(x))
    # Groups are ordered (by popularity, price, ...), so a sequential colormap shows the order.
    colors = colormaps["viridis"](np.linspace(0, 1, len(y)))
    ax.stackplot(x, y, step="post", colors=colors, labels=labels)
    ax.set(title=title, ylabel="mass", xlim=(x[0], x[-1]))
    ax.legend(title=legend_title, fontsize="x-small", title_fontsize="small", loc="upper left",
              bbox_to_anchor=(1.01, 1), ncols=1 + len(y) // 12, reverse=True)


def plot_comparison(rows: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    """Writes one bar subplot per metric, one bar per row (e.g. "base", "morec"), labelled.

    The metrics are those of ``COMPARED`` present in every row, in that order.

    Raises:
        ValueError: ``rows`` is empty or has no such metric in common.
    """
    metrics = [m for m in COMPARED if all(m in row for row in rows.values())]
    if not rows or not metrics:
        raise ValueError(f"no metric of {COMPARED} is in every row of {list(rows)}")
    names = list(rows)
    fig = Figure(figsize=((0.8 + 0.4 * len(names)) * len(metrics), 3.4), layout="constrained")
    for metric, ax in zip(metrics, fig.subplots(1, len(metrics), squeeze=False)[0]):
        bars = ax.bar(range(len(names)), [rows[n][metric] for n in names],
                      color=[f"C{i}" for i in range(len(names))], label=names)
        ax.bar_label(bars, fmt="{:.4g}", fontsize="x-small")
        ax.margins(y=0.15)  # room for the labels above the tallest bar
        ax.set_xticks([])  # the runs are named once, in the figure's legend
        lower = metric.partition("@")[0] in LOWER_IS_BETTER
        ax.set_title(f"{metric}\n({'lower' if lower else 'higher'} is better)", fontsize="medium")
    fig.legend(handles=list(bars), loc="outside lower center", ncols=len(names),
               fontsize="small")
    return _save(fig, path)


def plot_run(log_path: Path, out_dir: Path,
             rows: Mapping[str, Mapping[str, float]] | None = None) -> list[Path]:
    """Writes ``controller.png``, ``masses.png`` (each when its log has something to plot)
    and ``metrics.png`` (when ``rows`` is given) into ``out_dir``; returns the paths written.
    """
    records = read_log(log_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_controller(records, out_dir / "controller.png"),
               plot_masses(records, out_dir / "masses.png")]
    if rows is not None:
        written.append(plot_comparison(rows, out_dir / "metrics.png"))
    return [p for p in written if p is not None]


def _series(records: Sequence[Record], kind: str) -> list[Record]:
    """The records of ``kind`` with strictly increasing steps, superseded ones dropped.

    A record at a step not after the previous one starts a resumed stretch of the run: it
    replaces the records logged before it at the same or later steps.
    """
    kept: list[Record] = []
    for r in records:
        if r.get("kind") != kind:
            continue
        while kept and kept[-1]["step"] >= r["step"]:
            kept.pop()
        kept.append(r)
    return kept


def _save(fig: Figure, path: Path) -> Path:
    """Writes ``fig`` to ``path`` as PNG via a temporary file in the same directory."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(partial, "xb") as f:
            fig.savefig(f, format="png", dpi=DPI)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
