"""Runtime overhead: the cascade runner's wall time against the sum of its stages' own work on the same inputs.

A three-stage cascade r96 -> r160 -> r224 of MobileNetV2 1.0 on ONNX Runtime CPU, thresholds set so that about
half the batch exits at each early stage. For each batch, the runner is timed end to end; then the same rows
each stage received are pushed through the runner's engine directly (its numpy preprocessing and its sessions,
timed apart).
Overhead = runner wall / (sum of stage preprocessing + inference) - 1; target <= 5 %. Interleaved, medians.

A second table times preprocessing alone per resolution, side by side: torchvision's to_dtype + normalize on a
channels-first batch (how the runtime preprocessed before) against training.preprocess (channels-last resize, one
fused normalize into a contiguous buffer), on the same decoded images, one torch thread as the runtime uses.

    python benchmarks/runtime_overhead.py [--batch-sizes 1,32] [--batches 24] [--repeats 5]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from _common import IMAGENETTE, ROOT, imagenet_family, table

from rescascade.config import read_config, write_config
from rescascade.profiling.measure import torch_threads
from rescascade.runtime import CascadeRunner
from rescascade.serve.confidence import confidence, log_probs
from rescascade.serve.fileio import sha256_file
from rescascade.training.preprocess import (IMAGENET_MEAN, IMAGENET_STD, channels_last_batch, preprocess,
                                            resize_center_crop)
from rescascade.training.store import read_family_json, weights_id

STAGES = (96, 160, 224)


def source_images(n: int) -> list[torch.Tensor]:
    if (IMAGENETTE / "manifest_val.csv").is_file():
        from _shared_data import shared_imagenette
        _, val = shared_imagenette(str(IMAGENETTE), "native")
        return [val.read(i) for i in range(0, n * 7, 7)][:n]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8, generator=g) for _ in range(n)]


def write_cascade(fam, thresholds) -> str:
    doc = read_family_json(fam)
    path = fam / "overhead_cascade.json"
    expected = {"n": 1, "exit_fractions": [1 / len(STAGES)] * len(STAGES)}  # not measured: no drift test here
    write_config(path, {
        "family": {"path": ".", "family_json_sha256": sha256_file(fam / "family.json"), "weights_sha256": weights_id(doc),
                   "resolutions": doc["resolutions"], "num_classes": doc["num_classes"]},
        "profile": {"backend": "onnxruntime", "precision": "fp32", "batch_size": 32},
        "confidence": {"measure": "max_prob", "temperatures": {str(r): 1.0 for r in STAGES}, "combine": False},
        "stages": [{"resolution": r, "threshold": t} for r, t in zip(STAGES, thresholds)],
        "reference": {"resolution": 224}, "expected": {"calib": expected, "test": expected}})
    return path


def preprocess_before(images: list[torch.Tensor], r: int) -> torch.Tensor:
    """The previous path: stack channels-first, resize, to_dtype + normalize (three passes over the floats)."""
    x = resize_center_crop(torch.stack([im.contiguous() for im in images]), r)
    return TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))


def preprocess_table(images: list[torch.Tensor], b: int, repeats: int) -> str:
    batch = images[:b]
    rows = []
    with torch_threads(1):
        for r in (96, 128, 160, 192, 224):
            def now():  # the runtime's path
                return preprocess(channels_last_batch(batch).permute(0, 3, 1, 2), r)
            assert torch.allclose(preprocess_before(batch, r), now(), atol=1e-5)
            ms = {"before": [], "now": []}
            for _ in range(repeats * 10):  # interleaved
                for name, fn in (("before", lambda: preprocess_before(batch, r)), ("now", now)):
                    t0 = time.perf_counter()
                    fn()
                    ms[name].append(1000 * (time.perf_counter() - t0) / b)
            t_before, t_now = np.median(ms["before"]), np.median(ms["now"])
            rows.append([r, f"{t_before:.3f}", f"{t_now:.3f}", f"{t_before / t_now:.2f}x"])
    return table(["resolution", "before ms/image", "now ms/image", "speed-up"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--batches", type=int, default=24, help="distinct input batches per batch size")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    fam = imagenet_family(ROOT / ".bench" / "mnv2_family")
    images = source_images(256)
    # thresholds: the median confidence of each early stage on these images (about half exit at each)
    probe = CascadeRunner(read_config(write_cascade(fam, [0.0, 0.0, None])))
    ths = []
    for r in STAGES[:2]:
        x = torch.stack([preprocess(im, r) for im in images[:64]])
        ths.append(float(np.median(confidence(log_probs(probe.engine.infer(r, x.numpy())), "max_prob"))))
    sizes = [int(v) for v in args.batch_sizes.split(",")]
    runner = CascadeRunner(read_config(write_cascade(fam, ths + [None])), batch_size=max(sizes))
    engine = runner.engine  # ONNX Runtime's CPU engine: numpy inputs, the bundle's sessions
    rows = []
    for b in sizes:
        batches = [images[(i * b) % len(images):][:b] for i in range(args.batches)]
        batches = [x if len(x) == b else images[:b] for x in batches]
        walls, pres, infs = [], [], []
        for rep in range(args.repeats + 1):  # the first pass warms up every shape
            w_rep, p_rep, i_rep = [], [], []
            for batch in batches:
                res = runner(batch)
                pre = inf = 0.0
                arrays = [im.permute(1, 2, 0).numpy() for im in batch]
                for k, r in enumerate(STAGES):
                    rows_k = np.flatnonzero(res.exit_stage >= k)
                    if not len(rows_k):
                        continue
                    t0 = time.perf_counter()
                    x = engine.stage_input(arrays, rows_k, r)
                    t1 = time.perf_counter()
                    engine.infer(r, x)
                    t2 = time.perf_counter()
                    pre, inf = pre + t1 - t0, inf + t2 - t1
                w_rep.append(res.wall_s)
                p_rep.append(pre)
                i_rep.append(inf)
            if rep:
                walls.append(w_rep)
                pres.append(p_rep)
                infs.append(i_rep)
        wall = np.median(walls, 0).sum()
        pre, inf = np.median(pres, 0).sum(), np.median(infs, 0).sum()
        exits = np.bincount(np.concatenate([runner(x).exit_stage for x in batches]), minlength=3) / (b * len(batches))
        rows.append([b, " / ".join(f"{100 * e:.0f}%" for e in exits), f"{1000 * inf / len(batches):.2f}",
                     f"{1000 * pre / len(batches):.2f}", f"{1000 * wall / len(batches):.2f}",
                     f"{100 * (wall / (pre + inf) - 1):+.1f}%", f"{100 * (wall / inf - 1):+.1f}%"])
    print(f"\ncascade r96 -> r160 -> r224, MobileNetV2 1.0, ONNX Runtime CPU, {torch.get_num_threads()} threads, "
          f"{args.batches} batches x {args.repeats} passes (median per batch)\n")
    print(table(["batch", "exits per stage", "inference ms/batch", "preprocess ms/batch", "runner wall ms/batch",
                 "overhead vs stage work", "overhead vs inference only"], rows))
    print("\ntarget: overhead vs stage work (preprocessing + inference, both part of a stage's profiled cost) <= 5%")
    source = "x".join(str(v) for v in images[0].shape[1:])
    print(f"\npreprocessing alone, batch 32 of {source} decoded images, 1 torch thread (median of "
          f"{args.repeats * 10} interleaved runs)\n")
    print(preprocess_table(images, 32, args.repeats))


if __name__ == "__main__":
    main()
