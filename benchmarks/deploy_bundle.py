"""Deploying without torch: the exported bundle (`rescascade export`, run by `rescascade.serve.bundle.BundleRunner` on
ONNX Runtime, numpy and Pillow) against rescascade's own runtime (`CascadeRunner`, what `eval` measures).

On the 10-way real-data family (benchmarks/cost_prediction.py's: Imagenette, ImageNet MobileNetV2 weights, ONNX
Runtime CPU) and a cascade built for batch 32 (batch-aware costs):

1. Answers, on every test image (the JPEG files): labels, exit stages and the largest probability difference.
   The script fails if a label, an exit stage or a probability differs at all (one loop, the same ONNX Runtime
   sessions, the same pixels).
2. Cost ratio vs the reference at batch 32 (and 1), `eval`'s protocol for both runtimes at once (per batch the
   four runners -- eval's cascade and reference, the bundle's cascade and reference -- back to back in rotating
   order, 3 passes, median per batch), from decoded images and from the files, `--runs` times: ms per image and
   the ratio of each, and how far the bundle's ratio is from eval's.
3. Preprocessing, the one step the two runtimes compute differently (torch's kernel vs preprocess_np's matrix
   products, same pixels): ms per image per resolution on the test images at batch 1 and 32.

    python benchmarks/deploy_bundle.py [--quick] [--runs 3]

--quick checks the pipeline on a few images of a quickly trained family (three resolutions); its figures mean nothing.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, table  # noqa: E402
from cost_prediction import QUIET, family, profile  # noqa: E402

from rescascade.build import run_build  # noqa: E402
from rescascade.config import read_config  # noqa: E402
from rescascade.export import export_bundle  # noqa: E402
from rescascade.optimizer import Cascade, Stage  # noqa: E402
from rescascade.runtime import CascadeRunner  # noqa: E402
from rescascade.scoring import decode_all, encoded_all, images_to_score  # noqa: E402
from rescascade.serve.bundle import BundleRunner  # noqa: E402
from rescascade.serve.preprocess_np import preprocess_pixels  # noqa: E402
from rescascade.training.preprocess import preprocess  # noqa: E402

PROB_TOLERANCE = 0.0  # the same loop, sessions and pixels: the same numbers


def answers(casc: CascadeRunner, bund: BundleRunner, files: list[bytes], batch: int) -> tuple[list, bool]:
    """Both runtimes on every file, batch by batch: (table row, whether they agree)."""
    diff, same_label, same_exit = 0.0, 0, 0
    for s in range(0, len(files), batch):
        a, b = casc(files[s:s + batch]), bund(files[s:s + batch])
        if a.errors or b.errors:
            raise SystemExit(f"a test file failed to decode: {a.errors or b.errors}")
        same_label += int((a.labels == b.labels).sum())
        same_exit += int((a.exit_stage == b.exit_stage).sum())
        diff = max(diff, float(np.abs(a.probs - b.probs).max()))
    n = len(files)
    ok = same_label == n and same_exit == n and diff <= PROB_TOLERANCE
    return [n, f"{same_label}/{n}", f"{same_exit}/{n}", f"{diff:.1e}", "yes" if ok else "NO"], ok


def side_by_side(runners: list, inputs: list[list], batch: int, repeats: int = 3) -> list[float]:
    """eval's protocol (`_time_side_by_side`) for several runners at once: each batch runs on every runner back to
    back, the order rotating from batch to batch and pass to pass, so slow spells of the machine reach all of them
    alike. inputs[k]: runner k's images. -> ms per image of each runner: per batch the median over the passes,
    summed."""
    n = len(inputs[0])
    starts = range(0, n, batch)
    for runner, items in zip(runners, inputs):  # warm-up at the batch shapes
        runner(items[:batch])
    ms = np.zeros((len(runners), len(starts), repeats))
    for rep in range(repeats):
        for j, s in enumerate(starts):
            for k in np.roll(np.arange(len(runners)), j + rep):
                ms[k, j, rep] = 1000 * runners[k](inputs[k][s:s + batch]).wall_s
    return list(np.median(ms, 2).sum(1) / n)


def preprocessing_rows(decoded: list[torch.Tensor], resolutions: list[int], quick: bool) -> list[list]:
    rows = []
    for b in (1, 32):
        images = np.stack([t.permute(1, 2, 0).numpy() for t in decoded[:b]])
        tensors = torch.from_numpy(images).permute(0, 3, 1, 2)
        for r in resolutions:
            times = {}
            for name, fn in (("torch", lambda: preprocess(tensors, r)), ("numpy", lambda: preprocess_pixels(images, r))):
                fn()
                reps = 3 if quick else max(5, 200 // b)
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                times[name] = 1000 * (time.perf_counter() - t0) / reps / len(images)
            rows.append([b, f"r{r}", f"{times['torch']:.3f}", f"{times['numpy']:.3f}",
                         f"{times['numpy'] / times['torch']:.1f}x"])
    return rows


def family_options(ap: argparse.ArgumentParser) -> None:
    """The options of cost_prediction.py's family (shared with triton_load.py)."""
    ap.add_argument("--quick", action="store_true", help="a few images: checks the pipeline only")
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, help="override the preset's epochs")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "costs"))
    ap.add_argument("--fresh", action="store_true", help="retrain the family")


def batch32_cascade(args, log) -> tuple[Path, Path]:
    """(family dir, cascade.json) of cost_prediction.py's family (trained and profiled if not yet) and its cascade
    built for batch 32, batch-aware, decoded inputs."""
    fam = family(args, log)
    if args.quick or not (fam / "profile.csv").is_file():
        profile(fam, args)
    cascade_json = fam / "deploy_b32.json"
    run_build(fam, batch_size=32, batch_aware=True, out=cascade_json, plots=False, source_size=None, **QUIET)
    return fam, cascade_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    family_options(ap)
    ap.add_argument("--runs", type=int, default=3, help="cost measurements, each of both runtimes")
    ap.add_argument("--images", type=int, help="time on this many test images, spread over the classes (default: "
                                               "all); the answers are always compared on every one")
    args = ap.parse_args()
    log = print
    fam, cascade_json = batch32_cascade(args, log)
    config = read_config(cascade_json)
    bundle = fam / "bundle_b32"
    export_bundle(cascade_json, bundle, **QUIET)
    scored = images_to_score(config, None, "test", 24 if args.quick else None, QUIET["log"])
    decoded, labels, kept = decode_all(scored.images, scored.digests, QUIET["log"])
    files = encoded_all(scored.images, kept, scored.source)
    stages = " -> ".join(f"r{s.resolution}" for s in config.cascade.stages)
    log(f"# Deploying without torch: {stages} (reference r{config.reference}), {len(files)} test images\n")

    casc, bund = CascadeRunner(config, warmup=[1, 32]), BundleRunner(bundle, warmup=[1, 32])
    row, ok = answers(casc, bund, files, 32)
    log("## The bundle's answers vs rescascade's runtime (every test file)\n")
    log(table(["images", "same label", "same exit stage", "max |prob diff|", "identical" if PROB_TOLERANCE == 0 else f"within {PROB_TOLERANCE:g}"], [row]))

    if args.images and args.images < len(files):
        keep = np.unique(np.linspace(0, len(files) - 1, args.images).round().astype(np.int64))
        decoded, files = [decoded[i] for i in keep], [files[i] for i in keep]
    arrays = [t.permute(1, 2, 0).numpy() for t in decoded]
    refr = CascadeRunner(config, stages=Cascade([Stage(config.reference, -math.inf)]), warmup=[1, 32])
    bref = BundleRunner(bundle, reference=True, warmup=[1, 32])
    rows = []
    for run in range(1, args.runs + 1):
        for b in (32, 1):
            for inputs, (torch_items, bundle_items) in (("decoded", (decoded, arrays)), ("files", (files, files))):
                if b == 1 and inputs == "decoded":
                    continue  # batch 1 from the files only: what a service receives one request at a time
                log(f"timing run {run}/{args.runs}: batch {b}, {inputs} ...")
                ec, er, dc, dr = side_by_side([casc, refr, bund, bref],
                                              [torch_items, torch_items, bundle_items, bundle_items], b)
                rows.append([run, b, inputs, f"{ec:.2f}", f"{er:.2f}", f"{ec / er:.3f}", f"{dc:.2f}",
                             f"{dr:.2f}", f"{dc / dr:.3f}", f"{100 * (dc / dr / (ec / er) - 1):+.1f}%"])
    log("\n## Cost ratio vs the reference: rescascade's runtime (eval) and the bundle's, ms per image\n")
    log(table(["run", "batch", "inputs", "eval cascade", "eval r" + str(config.reference), "eval ratio",
               "bundle cascade", "bundle r" + str(config.reference), "bundle ratio", "bundle vs eval"], rows))

    log("\n## Preprocessing of the test images (224x224 sources), ms per image\n")
    resolutions = sorted({s.resolution for s in config.cascade.stages} | {config.reference})
    log(table(["batch", "resolution", "torch (CascadeRunner)", "numpy (bundle)", "numpy / torch"],
              preprocessing_rows(decoded, resolutions, args.quick)))
    if not ok:
        raise SystemExit("the bundle's answers differ from rescascade's runtime")


if __name__ == "__main__":
    main()
