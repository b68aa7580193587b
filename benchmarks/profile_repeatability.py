"""Profile repeatability: two profiles of the same family back to back; every median must agree within 5 %.

MobileNetV2 1.0, five resolutions, ONNX Runtime CPU (the profiler's default protocol).

    python benchmarks/profile_repeatability.py [--backend onnxruntime] [--batch-sizes 1,8] [--tolerance 0.05]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import ROOT, imagenet_family, table

from rescascade.profiling.measure import Protocol
from rescascade.profiling.profile import run_profile
from rescascade.runtime import decision_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    args = ap.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    work = ROOT / ".bench"
    fam = imagenet_family(work / "mnv2_family")
    protocol = Protocol(min_seconds=args.min_seconds)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_profile(fam, args.backend, "fp32", sizes, protocol=protocol, out=Path(tmp) / f"p{i}.csv",
                            log=lambda s: None, decision_step=decision_step) for i in range(2)]
    a, b = (r.set_index(["resolution", "batch_size"]) for r in runs)
    rows, worst = [], 0.0
    for key in a.index:
        d = b.loc[key, "median_ms"] / a.loc[key, "median_ms"] - 1
        worst = max(worst, abs(d))
        rows.append([key[0], key[1], f"{a.loc[key, 'median_ms']:.3f}", f"{b.loc[key, 'median_ms']:.3f}",
                     f"{100 * d:+.1f}%", f"{a.loc[key, 'cv']:.3f}", "ok" if abs(d) <= args.tolerance else "OVER"])
    print(f"\n{args.backend} fp32, MobileNetV2 1.0, two profiles back to back\n")
    print(table(["res", "batch", "median ms (run 1)", "median ms (run 2)", "difference", "CV (run 1)", "within 5%"],
                rows))
    print(f"\nlargest difference {100 * worst:.1f}% ({'PASS' if worst <= args.tolerance else 'FAIL'}: "
          f"target {100 * args.tolerance:.0f}%)")


if __name__ == "__main__":
    main()
