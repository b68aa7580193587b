"""Optimizer speed: 50,000 examples x 5 resolutions x 1000 classes (synthetic predictions, MAC-like costs).

Target: the greedy < 0.5 s. Prints greedy vs exact cost and time, plus the one-off cost of turning logits into
per-stage confidences (log-softmax over 1000 classes), which every method shares.

    python benchmarks/optimizer_speed.py [--n 50000] [--classes 1000] [--grid 16]
"""
from __future__ import annotations

import argparse
import math
import time

from rescascade.costs import CostModel
from rescascade.optimizer import Cascade, Stage, StageViews, exact_search, greedy, reference_resolution, simulate
from rescascade.synthetic_predictions import synthetic_predictions

RES = [96, 128, 160, 192, 224]
MACS = {96: 56, 128: 99, 160: 154, 192: 221, 224: 300}  # MobileNetV2 1.0 MMACs (slim README)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--grid", type=int, default=16, help="exact search: thresholds per resolution")
    args = ap.parse_args()

    t = time.perf_counter()
    preds = synthetic_predictions(args.n, RES, num_classes=args.classes, seed=0)
    t_gen = time.perf_counter() - t
    costs = CostModel("macs", "-", 1, False, {r: {1: MACS[r] / MACS[224]} for r in RES})
    views = StageViews(preds)
    t = time.perf_counter()
    for r in RES:
        views.view((), r)
    t_conf = time.perf_counter() - t
    ref = reference_resolution(views, RES)
    ref_out = simulate(Cascade([Stage(ref, -math.inf)]), views, costs)

    rows = []
    t = time.perf_counter()
    g = greedy(views, costs, ref, RES)
    t_greedy = time.perf_counter() - t
    g_out = simulate(g, views, costs)
    rows.append(("greedy (Streeter), tolerance 0", g, g_out, t_greedy, ""))
    extra = {s.resolution: [s.threshold] for s in g.stages[:-1]}
    t = time.perf_counter()
    ex, nodes, cut = exact_search(views, costs, RES, ref_out.correct, grid=args.grid, extra_thresholds=extra)
    t_exact = time.perf_counter() - t
    ex_out = simulate(ex, views, costs)
    rows.append((f"exact, {args.grid}-quantile grid + greedy's", ex, ex_out, t_exact,
                 f"{nodes} nodes" + (" (cut)" if cut else "")))

    print(f"\n{args.n:,} examples x {len(RES)} resolutions x {args.classes} classes; reference r{ref} "
          f"top-1 {100 * ref_out.accuracy:.2f}%")
    print(f"generate logits {t_gen:.2f} s; confidences (log-softmax, shared by all methods) {t_conf:.2f} s\n")
    print("| method | cascade | top-1 | cost vs r224 (MACs) | seconds | note |")
    print("|---|---|---|---|---|---|")
    for name, c, o, secs, note in rows:
        print(f"| {name} | {c.describe()} | {100 * o.accuracy:.2f}% | {o.mean_cost / ref_out.mean_cost:.3f} | "
              f"{secs:.3f} | {note} |")
    gap = g_out.mean_cost / ex_out.mean_cost - 1
    print(f"\ngreedy cost gap to exact: {100 * gap:+.2f}%; greedy time {t_greedy:.3f} s "
          f"({'meets' if t_greedy < 0.5 else 'MISSES'} the < 0.5 s target)")


if __name__ == "__main__":
    main()
