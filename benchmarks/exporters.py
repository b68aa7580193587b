"""torch.export's ONNX exporter (the default) against the legacy TorchScript one, on every arch the tests cover.

Per arch (random weights, every BatchNorm's statistics and each resolution's patch made to differ, 10 classes,
resolutions 32 and 48), each exporter in turn: seconds to export the shared model (`export_shared`: height and width
free, every resolution's session checked against PyTorch) and one resolution's plain model (`export_resolution`),
the largest |logit difference| against PyTorch over both resolutions (float32; the export fails past 1e-3), the
files' bytes, and why the legacy exporter was used where torch.export was asked for. The test suite exports with the
legacy exporter (tests/conftest.py) and with torch.export on two of these archs (tests/test_archs.py).

    python benchmarks/exporters.py [--archs mobilenet_v2,resnet18] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _common import ROOT, table

from rescascade.profiling.export import EXPORTER_ENV, EXPORTERS, export_resolution, export_shared

sys.path.insert(0, str(ROOT))
from tests.test_archs import ARCHS, RES, family_from  # noqa: E402  (the tests' archs and random families)

ARCH_NAMES = [a if isinstance(a, str) else a.values[0] for a in ARCHS]


def export_both(arch: str, out: Path) -> list[list]:
    """One row per exporter for `arch`."""
    family = family_from(arch, classifier="per_resolution")
    with torch.no_grad():  # every patch different
        for i, r in enumerate(RES):
            for p in family.patch_parameters(r):
                p.add_(0.01 * (i + 1))
    rows = []
    for name in EXPORTERS:
        os.environ[EXPORTER_ENV] = name
        folder = out / arch.replace(":", "_") / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            shared, _, meta = export_shared(family, folder, "w" * 64)
            t1 = time.perf_counter()
            plain, one = export_resolution(family, folder, RES[-1], "w" * 64)
            t2 = time.perf_counter()
        diff = max([*meta["max_abs_diff"].values(), one["max_abs_diff"]])
        fallback = meta["fallback"] if name == "dynamo" and meta["exporter"] != "dynamo" else ""
        rows.append([arch, name, meta["exporter"], f"{t1 - t0:.1f}", f"{t2 - t1:.1f}", f"{diff:.1e}",
                     f"{shared.stat().st_size:,}", f"{plain.stat().st_size:,}", fallback or "-"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(ARCH_NAMES), help="comma-separated (default: the tests' archs)")
    ap.add_argument("--out", default=None, help="where the exports go (default: a temporary folder, removed)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        export_both("resnet18", out / "warm-up")  # imports and first-call costs out of the timed rows
        rows = []
        for arch in args.archs.split(","):
            rows += export_both(arch, out)
            print(f"  {arch} done", file=sys.stderr, flush=True)
    print(f"## ONNX exporters: seconds to export, largest |logit difference| against PyTorch, bytes "
          f"(torch {torch.__version__}, {os.cpu_count()} CPUs)\n")
    print(table(["arch", "asked for", "exported by", "shared model s", f"r{RES[-1]} s", "max |diff|",
                 "shared bytes", f"r{RES[-1]} bytes", "why legacy"], rows))


if __name__ == "__main__":
    main()
