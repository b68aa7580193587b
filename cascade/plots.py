"""Figures people compare: the cost/accuracy Pareto plot and the exit histogram."""
from __future__ import annotations

import math

from matplotlib.figure import Figure

from rescascade.serve.fileio import atomic_path

# Figures are drawn on a Figure of their own (matplotlib's Agg canvas when saved), never through pyplot: the
# caller's backend and open figures are left as they are.


def pareto_plot(path, cands, front, chosen, reference_cost: float, reference_acc: float, title: str) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
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
    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
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


def eval_plot(report: dict, path) -> None:
    """`eval`'s figure: measured ms per image and top-1, the cascade beside the reference (a PNG at `path`)."""
    c, ref = report["cascade"], report["reference"]
    fig = Figure(figsize=(8, 3.4))
    axes = fig.subplots(1, 2)
    axes[0].bar(["cascade", ref.get("stage") or f"r{ref['resolution']}"], [c["ms_per_image"], ref["ms_per_image"]],
                color=["tab:orange", "tab:grey"])
    if report["predicted_cost_ratio"] is not None:
        axes[0].axhline(report["predicted_cost_ratio"] * ref["ms_per_image"], ls="--", color="tab:blue",
                        label="predicted (profile)")
        axes[0].legend(fontsize=7)
    axes[0].set_ylabel("ms per image (measured)")
    axes[1].bar(["cascade", ref.get("stage") or f"r{ref['resolution']}"], [100 * c["accuracy"], 100 * ref["accuracy"]],
                color=["tab:orange", "tab:grey"])
    lo = min(c["accuracy"], ref["accuracy"]) * 100
    axes[1].set_ylim(max(0, lo - 5), min(100, max(c["accuracy"], ref["accuracy"]) * 100 + 2))
    axes[1].set_ylabel(f"top-1 on {report['split']} (%)")
    fig.suptitle(f"{report['backend']} {report['precision']}, batch {report['batch_size']}: measured", fontsize=10)
    _save(fig, path)


def _save(fig, path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def fmt_ms(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3f}"
