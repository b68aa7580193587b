"""K models for the price of one at deployment: what a bundle stores and what its sessions cost.

MobileNetV2 1.0 (the shared ImageNet weights, 1000 classes) at 96..224, each resolution's BatchNorms made to differ
as trained patches do. Side by side in one run: bytes of one ONNX model per resolution (how bundles were stored
before schema 3) vs the shared model + one packed patch per resolution; per-image latency of each resolution's session at
batch 1 and 32 (ONNX Runtime CPU), per-resolution file vs shared model + patch (BatchNorm folded per session, the
default) vs one copy of the weights for every stage (`BundleRunner(weights="shared")`), timed in alternation;
resident memory of five loaded sessions vs one, each form in a fresh process.

    python benchmarks/bundle_storage.py [--rounds 7] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import IMAGENET_WEIGHTS, ROOT, imagenet_family, table

from rescascade.profiling.export import export_resolution, export_shared
from rescascade.serve.ort import session_options, shared_weights, stage_session, unpack_patch
from rescascade.training.family import PatchedBatchNorm2d
from rescascade.training.store import load_family, save_family, weights_id

RES = (96, 128, 160, 192, 224)


def family_with_patches(out: Path) -> Path:
    """The ImageNet family with every resolution's BatchNorm patch moved a little (seeded): five distinct patches."""
    fam_dir = out / "family"
    if (fam_dir / "family.json").is_file():
        return fam_dir
    family, _ = load_family(imagenet_family(out / "plain", RES))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in (m for m in family.modules() if isinstance(m, PatchedBatchNorm2d)):
            for key in bn.keys:
                bn.weight[key].mul_(1 + 0.05 * torch.randn(bn.num_features, generator=g))
                bn.bias[key].add_(0.05 * torch.randn(bn.num_features, generator=g))
    save_family(family, fam_dir, provenance={"data": {"source_size": [224, 224]}})
    return fam_dir


FORMS = ("per-resolution file", "shared + patch", "one weights copy")


def sessions(form: str, files: dict, resolutions) -> dict:
    """resolution -> ONNX Runtime session of one form: "per-resolution file", "shared + patch" (the bundle's
    default: BatchNorm folded per session) or "one weights copy" (`BundleRunner(weights="shared")`)."""
    out = {}
    weights = shared_weights(files["shared"]) if form == "one weights copy" else None
    for r in resolutions:
        if form != "per-resolution file":
            patch = unpack_patch(Path(files["patches"][str(r)]).read_bytes())
            out[r] = (stage_session(files["shared"], patch, r, session_options(), ["CPUExecutionProvider"], weights),
                      (patch, weights))
        else:
            import onnxruntime as ort
            out[r] = (ort.InferenceSession(files["per_resolution"][str(r)], session_options(),
                                           providers=["CPUExecutionProvider"]), None)
    return out


def resident_mib(form: str, files: dict, k: int) -> float:
    """Resident memory (MiB) a fresh process gains by loading the top k resolutions' sessions and running each once."""
    code = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import numpy as np
from bundle_storage import sessions
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
before = rss()
opened = sessions({form!r}, json.loads({json.dumps(files)!r}), {list(RES[-k:])!r})
for r, (s, _) in opened.items():
    s.run(None, {{"input": np.zeros((1, 3, r, r), np.float32)}})
print(rss() - before)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(run.stdout.strip().splitlines()[-1])


def latency_rows(files: dict, rounds: int) -> list[list]:
    """ms per image of each resolution at batch 1 and 32, the forms timed in alternation (median of rounds)."""
    forms = FORMS
    opened = {f: sessions(f, files, RES) for f in forms}
    rows = []
    for r in RES:
        x = np.random.default_rng(r).random((32, 3, r, r), dtype=np.float32)
        want = opened[forms[0]][r][0].run(None, {"input": x})[0]
        same = max(np.abs(opened[f][r][0].run(None, {"input": x})[0] - want).max() for f in forms[1:])
        for b in (1, 32):
            times = {f: [] for f in forms}
            for _ in range(rounds):
                for f in forms:
                    session = opened[f][r][0]
                    for _ in range(2):
                        session.run(None, {"input": x[:b]})
                    t0, n = time.perf_counter(), 0
                    while time.perf_counter() - t0 < 0.2:
                        session.run(None, {"input": x[:b]})
                        n += 1
                    times[f].append(1000 * (time.perf_counter() - t0) / n / b)
            med = {f: float(np.median(v)) for f, v in times.items()}
            rows.append([f"r{r}", b, f"{med[forms[0]]:.3f}", f"{med[forms[1]]:.3f}", f"{med[forms[2]]:.3f}",
                         f"{med[forms[1]] / med[forms[0]]:.3f}", f"{med[forms[2]] / med[forms[0]]:.3f}", f"{same:.1e}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7, help="alternating timing rounds per resolution and batch")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "bundle_storage"))
    args = ap.parse_args()
    if not IMAGENET_WEIGHTS.is_file():
        print(f"note: {IMAGENET_WEIGHTS} is absent: random weights (sizes and latency do not depend on them)")
    fam_dir = family_with_patches(Path(args.out))
    family, doc = load_family(fam_dir)
    wid = weights_id(doc)
    shared, patches, meta = export_shared(family, fam_dir, wid)
    per_res = {str(r): str(export_resolution(family, fam_dir, r, wid)[0]) for r in RES}
    files = {"shared": str(shared), "patches": {str(r): str(p) for r, p in patches.items()}, "per_resolution": per_res}
    one = Path(per_res["224"]).stat().st_size
    old = sum(Path(p).stat().st_size for p in per_res.values())
    new = shared.stat().st_size + sum(p.stat().st_size for p in patches.values())
    print("## Bundle bytes, MobileNetV2 1.0 at 96..224 (x one resolution's ONNX file)\n")
    print(table(["stored", "MB", "x one model"],
                [["one model per resolution (bundle schema 1-2)", f"{old / 1e6:.2f}", f"{old / one:.3f}"],
                 ["shared model + 5 packed patches (schema 4)", f"{new / 1e6:.2f}", f"{new / one:.3f}"],
                 ["  of which the shared model", f"{shared.stat().st_size / 1e6:.2f}",
                  f"{shared.stat().st_size / one:.3f}"],
                 ["  of which one patch", f"{patches[96].stat().st_size / 1e6:.3f}",
                  f"{patches[96].stat().st_size / one:.4f}"]]))
    print("\n## Per-image latency, ms (ONNX Runtime CPU, median of alternating rounds)\n")
    print(table(["stage", "batch", *FORMS, "ratio shared + patch", "ratio one weights copy", "max |logit diff|"],
                latency_rows(files, args.rounds)))
    print("\n## Resident memory of loaded sessions, MiB (a fresh process each)\n")
    print(table(["form", "1 stage (r224)", "5 stages"],
                [[f, f"{resident_mib(f, files, 1):.0f}", f"{resident_mib(f, files, 5):.0f}"]
                 for f in FORMS]))


if __name__ == "__main__":
    main()
