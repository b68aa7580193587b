"""Which architectures turn resolution into the most saving: per-resolution cost relative to 224 for several
BatchNorm CNNs, measured with `rescascade profile` on ONNX Runtime CPU (batch 1 and 32), beside the FLOPs ratio
(torch's FlopCounterMode) and `info`'s family / one-model parameter ratio. On an NVIDIA GPU the same table:
`--backend torch-cuda-graphs --precision fp16 --batch-sizes 1,32,256`.

Each arch is a family of five resolutions with random weights (cost does not depend on the values), saved, profiled
with the profiler's round-robin protocol and read back from its profile.csv; every arch in one run, side by side.

    python benchmarks/arch_costs.py [--archs mobilenet_v2,resnet18,...] [--backend onnxruntime] [--precision fp32]
                                    [--batch-sizes 1,32] [--min-seconds 1]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import table
from torch.utils.flop_counter import FlopCounterMode

from rescascade.profiling.measure import Protocol, fingerprint
from rescascade.profiling.profile import run_profile
from rescascade.runtime import decision_step
from rescascade.serve.limits import default_threads
from rescascade.training.family import ResolutionFamily
from rescascade.training.progress import progress
from rescascade.training.store import save_family

ARCHS = "mobilenet_v2,resnet18,resnet50,efficientnet_b0,timm:mobilenetv4_conv_small"
RESOLUTIONS = (96, 128, 160, 192, 224)


def flops(model: torch.nn.Module, resolution: int) -> int:
    """FLOPs of one image's forward (torch's counter: 2 per multiply-add of convolutions and matmuls)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, resolution, resolution))
    return counter.get_total_flops()


def measure(arch: str, work: Path, backend: str, precision: str, batch_sizes: list[int],
            protocol: Protocol) -> list[list]:
    torch.manual_seed(0)
    fam = ResolutionFamily(RESOLUTIONS, num_classes=1000, arch=arch).eval()
    doc = save_family(fam, work / arch.replace(":", "_"), provenance={"data": {"source_size": [375, 500]}})
    profile = run_profile(work / arch.replace(":", "_"), backend, precision, batch_sizes, protocol=protocol,
                          log=lambda s: None, decision_step=decision_step).set_index(["resolution", "batch_size"])
    fl = {r: flops(fam.plain_model(r), r) for r in RESOLUTIONS}
    top = max(RESOLUTIONS)
    rows = []
    for r in RESOLUTIONS:
        row = [arch if r == RESOLUTIONS[0] else "", f"{doc['parameters']['family_over_one_model']:.3f}x"
               if r == RESOLUTIONS[0] else "", r, f"{fl[r] / 1e9:.2f}", f"{fl[r] / fl[top]:.2f}"]
        for b in batch_sizes:
            ms, ms_top = profile.loc[(r, b), "median_ms"], profile.loc[(top, b), "median_ms"]
            row += [f"{ms / b:.2f}", f"{ms / ms_top:.2f}"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default=ARCHS)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--min-seconds", type=float, default=1.0)
    args = ap.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    protocol = Protocol(warmup_iters=3, warmup_seconds=0.2, min_iters=10, min_seconds=args.min_seconds, rounds=3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in progress(args.archs.split(","), desc="archs", unit="arch"):
            rows += measure(arch, Path(tmp), args.backend, args.precision, batch_sizes, protocol)
    fp = fingerprint()
    print(f"\n{args.backend} {args.precision} on {fp.get('gpu', fp['cpu'])} (ONNX Runtime {fp.get('onnxruntime')}, "
          f"{default_threads()} CPU threads); ms per image (median of the profile's batches); ratios vs r224\n")
    headers = ["arch", "family / one model", "r", "GFLOPs", "FLOPs vs 224"]
    for b in batch_sizes:
        headers += [f"b{b} ms/img", f"b{b} vs 224"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
