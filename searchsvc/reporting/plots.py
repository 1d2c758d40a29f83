"""Plots of a run, as PNG bytes (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import io
import json
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from searchsvc.reporting.rows import ResultRow, pareto_front  # noqa: E402


def trajectory_png(rows: list[ResultRow], teacher_params: int, teacher_accuracy: float, title: str,
                   size: str = "params") -> bytes:
    """Parameters (or another `size` column) vs accuracy, one colour per trial, each trajectory starting
    at the teacher (the seed's plot); a trial without iterations is one point.

    The Pareto front across all trials is the dashed line; accuracy in %, parameters on a log axis.
    """
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    trials = sorted({r.get("trial") for r in rows})
    colours = plt.get_cmap("tab10")
    for index, trial in enumerate(trials):
        path = sorted((r for r in rows if r.get("trial") == trial and r.ok), key=lambda r: r.get("iteration", 0))
        sample = json.loads(path[0].get("sample")) if path else {}
        label = f"trial {index + 1}: " + ", ".join(f"{k}={_short(v)}" for k, v in sorted(sample.items()))
        xs = [teacher_params] + [r.get(size) for r in path]
        ys = [100 * teacher_accuracy] + [100 * r.accuracy for r in path]
        ax.plot(xs, ys, marker="o", markersize=4, color=colours(index % 10), label=label, alpha=0.85)
    front = sorted((r for r in rows if r.spec_hash in pareto_front(rows, size)), key=lambda r: r.get(size))
    if front:
        ax.step([r.get(size) for r in front], [100 * r.accuracy for r in front], where="post",
                linestyle="--", color="black", linewidth=1, label="Pareto front (chosen on validation)")
    ax.scatter([teacher_params], [100 * teacher_accuracy], marker="*", s=180, color="black", zorder=5,
               label=f"teacher ({teacher_params:,} params, {100 * teacher_accuracy:.2f} %)")
    ax.set_xscale("log")
    ax.set_xlabel(f"{size.replace('_', ' ')} (count, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def sensitivity_png(table: list[dict[str, Any]], baseline: float, title: str) -> bytes:
    """Validation accuracy vs sparsity level, one line per pruned weight (Distiller's sensitivity plot)."""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    weights = sorted({t["weight"] for t in table})
    colours = plt.get_cmap("tab20")
    for index, weight in enumerate(weights):
        points = sorted((t for t in table if t["weight"] == weight), key=lambda t: t["level"])
        ax.plot([100 * t["level"] for t in points], [100 * (t["val_accuracy"] or 0) for t in points], marker="o",
                markersize=3, color=colours(index % 20), label=weight.removesuffix(".weight"), alpha=0.85)
    ax.axhline(100 * baseline, color="black", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("sparsity of the one pruned layer (%)")
    ax.set_ylabel("validation accuracy (%): the schedule is chosen on it")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, loc="lower left", ncol=2)
    return _png(fig)


def front_png(rows: list[ResultRow], front: set[str], metric: str, label: str, teacher: dict[str, Any]) -> bytes:
    """Accuracy vs one cost metric: every valid candidate, the Pareto front as a step line, the teacher ★."""
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    ax.scatter([r.get(metric) for r in rows], [100 * r.accuracy for r in rows], s=14, alpha=0.5, label="candidates")
    best = sorted((r for r in rows if r.spec_hash in front), key=lambda r: r.get(metric))
    ax.step([r.get(metric) for r in best], [100 * r.accuracy for r in best], where="post", color="black",
            linestyle="--", linewidth=1, marker="o", markersize=4, label="Pareto front (chosen on validation)")
    if teacher.get(metric) is not None:
        ax.scatter([teacher[metric]], [100 * teacher["accuracy"]], marker="*", s=180, color="crimson", zorder=5,
                   label="teacher")
    _accuracy_axes(ax, metric, label)
    return _png(fig)


def overlay_png(runs: list[tuple[str, list[ResultRow]]], metric: str, label: str,
                teacher: dict[str, Any]) -> bytes:
    """Several runs' Pareto fronts on one plot (`compare`): per run (its label, its valid rows) the candidates
    as faint points and the front, chosen on validation and drawn at test accuracy, in the run's colour."""
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    colours = plt.get_cmap("tab10")
    for index, (name, rows) in enumerate(runs):
        points = [r for r in rows if r.get(metric) is not None]
        if not points:
            continue
        colour = colours(index % 10)
        ax.scatter([r.get(metric) for r in points], [100 * r.accuracy for r in points], s=10, alpha=0.3, color=colour)
        front = sorted((r for r in points if r.spec_hash in pareto_front(points, metric)), key=lambda r: r.get(metric))
        ax.step([r.get(metric) for r in front], [100 * r.accuracy for r in front], where="post", color=colour,
                linewidth=1.5, marker="o", markersize=4, label=name)
    if teacher.get(metric) is not None:
        ax.scatter([teacher[metric]], [100 * teacher["accuracy"]], marker="*", s=180, color="black", zorder=5,
                   label="teacher")
    _accuracy_axes(ax, metric, label)
    return _png(fig)


def _accuracy_axes(ax: Any, metric: str, label: str) -> None:
    """Test accuracy against a cost: counts on a log axis (they span decades), latencies not."""
    logscale = metric != "latency_ms"
    if logscale:
        ax.set_xscale("log")
    ax.set_xlabel(f"{label}{', log scale' if logscale else ''}")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def progress_png(rows: list[ResultRow]) -> bytes:
    """Reward (and accuracy) of each evaluation in the order they were recorded, with the best so far: the
    agent's learning curve for n2n, the sweep's progress for the others."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), dpi=110, sharex=True)
    index = list(range(1, len(rows) + 1))
    rewards = [r.reward if r.ok else float("nan") for r in rows]
    best, running = [], float("-inf")
    for value in rewards:
        running = max(running, value) if value == value else running  # NaN (invalid) leaves the best alone
        best.append(running)
    top.scatter(index, rewards, s=10, alpha=0.6, label="reward")
    top.plot(index, best, color="black", linewidth=1, label="best so far")
    top.set_ylabel("reward")
    top.legend(fontsize=7, loc="lower right")
    bottom.scatter(index, [100 * r.accuracy for r in rows], s=10, alpha=0.6, color="tab:green")
    bottom.set_ylabel("test accuracy (%)")
    bottom.set_xlabel("evaluation (in the order recorded)")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    return _png(fig)


def schedule_png(histories: dict[str, list[dict[str, Any]]], panels: list[tuple[str, str]], title: str) -> bytes:
    """Per-epoch values of each candidate's training history, one panel per (history key, axis label), one
    line per candidate: AGP's sparsity schedule, RigL's density and the share of weights it moved."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels) + 0.6), dpi=110, sharex=True,
                             squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (key, label) in zip(axes[:, 0], panels):
        for index, (name, history) in enumerate(histories.items()):
            points = [(h["epoch"], 100 * h[key]) for h in history if h.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, color=colours(index % 10), label=name, alpha=0.85)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0, 0].set_title(title)
    axes[0, 0].legend(fontsize=7, loc="best", ncol=2)
    axes[-1, 0].set_xlabel("epoch")
    return _png(fig)


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
