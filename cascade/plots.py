"""Figures people compare: the cost/accuracy Pareto plot and the exit histogram."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from training.fileio import atomic_path  # noqa: E402


def pareto_plot(path, cands, front, chosen, reference_cost: float, reference_acc: float, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([c.outcome.mean_cost for c in cands], [100 * c.outcome.accuracy for c in cands], s=10, alpha=0.35,
               color="grey", label="greedy cascades (tolerance sweep)")
    ax.plot([c.outcome.mean_cost for c in front], [100 * c.outcome.accuracy for c in front], "-o", ms=3,
            color="tab:blue", label="Pareto front (calib)")
    singles = [c for c in cands if len(c.cascade.stages) == 1]
    for c in singles:
        ax.scatter(c.outcome.mean_cost, 100 * c.outcome.accuracy, marker="s", color="black", s=25, zorder=3)
        ax.annotate(f"r{c.cascade.stages[0].resolution}", (c.outcome.mean_cost, 100 * c.outcome.accuracy),
                    textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.axhline(100 * reference_acc, color="tab:red", lw=0.8, ls="--", label="reference accuracy")
    ax.axvline(reference_cost, color="tab:red", lw=0.8, ls=":")
    if chosen is not None:
        ax.scatter(chosen.outcome.mean_cost, 100 * chosen.outcome.accuracy, marker="*", s=180, color="tab:orange",
                   zorder=4, label=f"chosen: {chosen.cascade.describe()}")
    ax.set_xlabel("expected cost per image (ms, measured profile)")
    ax.set_ylabel("top-1 on calib (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    _save(fig, path)


def exit_histogram(path, stage_names: list[str], calib_exits: list[float], test_exits: list[float]) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    x = range(len(stage_names))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [100 * e for e in calib_exits], w, label="calib")
    ax.bar([i + w / 2 for i in x], [100 * e for e in test_exits], w, label="test")
    ax.set_xticks(list(x))
    ax.set_xticklabels(stage_names)
    ax.set_ylabel("images exiting (%)")
    ax.set_title("where images exit the cascade", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def _save(fig, path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def fmt_ms(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3f}"
