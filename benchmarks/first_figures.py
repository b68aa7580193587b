"""The first figure a user reads: the cost ratio `build` prints (its defaults, and with `--refine 0`: the profile
alone) against the one `eval` then measures, on the demo's synthetic family and on a small real-photo family.

1. demo: `rescascade demo` (trained on synthetic images, profiled, built with its guarantee at batch 32,
   batch-aware), then `eval` on the test split; the same build with `--refine 0` beside it.
2. photos: a 10-way Imagenette family from the ImageNet MobileNetV2 weights (`--train-per-class` images per class,
   held-out images kept as JPEG files), profiled with its decode, built with the defaults at batch 1 and 32
   (batch-aware) and with `--refine 0`, each measured by `eval --from-bytes` on the test half: the ratio for
   decoded inputs and from the files.

Each build is measured by its own eval; a row's error is the printed figure against that measurement. Goal:
within 10 %.

    python benchmarks/first_figures.py [--part demo|photos|both] [--train-per-class 20] [--quick]

--quick runs the same on a few images (its figures mean nothing).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import IMAGENET_WEIGHTS, IMAGENETTE, ROOT, table  # noqa: E402
from cost_prediction import family, profile  # noqa: E402

from rescascade.build import run_build  # noqa: E402
from rescascade.demo import run_demo  # noqa: E402
from rescascade.evaluate import run_eval  # noqa: E402

QUIET = dict(log=lambda s: None)


def _error(printed: float | None, measured: float) -> str:
    return "n/a" if printed is None else f"{100 * (printed / measured - 1):+.1f}%"


def _row(what: str, b: int, config: dict, ev: dict) -> list:
    """One table row: the figure build printed (test split: decoded inputs / from the files) vs eval's."""
    test = config["expected"]["test"]
    decoded = test.get("decoded_inputs", test)["cost_vs_reference"]
    files = test["cost_vs_reference"] if "decoded_inputs" in test else None
    fb = ev.get("from_bytes")
    stages = " -> ".join(f"r{s['resolution']}" for s in config["stages"])
    return [what, b, stages, "yes" if "cost_check" in config else "no (--refine 0)",
            f"{decoded:.3f}", f"{ev['measured_cost_ratio']:.3f}", _error(decoded, ev["measured_cost_ratio"]),
            "" if files is None else f"{files:.3f}", "" if fb is None else f"{fb['measured_cost_ratio']:.3f}",
            "" if fb is None else _error(files, fb["measured_cost_ratio"])]


def demo_rows(args, log) -> list[list]:
    out = Path(args.out) / "demo"
    t0 = time.perf_counter()
    result = run_demo(str(out), epochs=1 if args.quick else None, train_images=240 if args.quick else None,
                      log=lambda s: None)
    fam = out / "family"
    rows = [_row("demo (synthetic)", 32, result["config"], result["eval"])]
    plain = run_build(fam, batch_size=32, batch_aware=True, measure="auto", combine="auto",
                      guarantee=(0.005, 0.1), refine=0, out=fam / "profile_only.json", plots=False, **QUIET)
    ev = run_eval(fam / "profile_only.json", batch_size=32, repeats=3, plot=False, **QUIET)
    rows.append(_row("demo (synthetic)", 32, plain, ev))
    log(f"  demo in {time.perf_counter() - t0:.0f} s")
    return rows


def photo_rows(args, log) -> list[list]:
    t0 = time.perf_counter()
    fam = family(SimpleNamespace(quick=args.quick, train_per_class=args.train_per_class, out=args.out, epochs=None,
                                 fresh=False), log)
    profile(fam, SimpleNamespace(quick=args.quick))
    rows = []
    for b in (1, 32):
        for refine in ("auto", 0):
            path = fam / f"first_b{b}_{refine}.json"
            config = run_build(fam, batch_size=b, batch_aware=b > 1, refine=refine, out=path, plots=False, **QUIET)
            ev = run_eval(path, batch_size=b, repeats=1 if args.quick else 3, from_bytes=True, plot=False,
                          limit=16 if args.quick else None, **QUIET)
            rows.append(_row(f"photos ({args.train_per_class} per class)", b, config, ev))
    log(f"  photos in {time.perf_counter() - t0:.0f} s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="both", choices=["demo", "photos", "both"])
    ap.add_argument("--train-per-class", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="a few images: checks the pipeline only")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "first_figures"))
    args = ap.parse_args()
    if args.quick:
        args.train_per_class = 4
    rows = []
    if args.part in ("demo", "both"):
        rows += demo_rows(args, print)
    if args.part in ("photos", "both"):
        if not IMAGENET_WEIGHTS.is_file() or not (IMAGENETTE / "manifest_val.csv").is_file():
            sys.exit(f"needs {IMAGENET_WEIGHTS} and {IMAGENETTE} (the shared real data beside the checkout)")
        rows += photo_rows(args, print)
    print("\n## The cost ratio `build` prints (test split) vs the one `eval` measures\n")
    print(table(["family", "batch", "cascade", "cost check", "decoded: printed", "measured", "error",
                 "from files: printed", "measured", "error"], rows))


if __name__ == "__main__":
    main()
