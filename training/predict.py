"""Logits of every resolution on held-out images, written as predictions/{calib,test}.npz.

Each resolution sees the source image with its own eval preprocessing (resize r/0.875, center-crop r), as a
deployed cascade would. Inference runs each resolution as a plain torchvision model in channels_last.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .data import EvalDataset, ImageSet, collate_skipping
from rescascade.serve.errors import RescascadeError
from rescascade.serve.fileio import atomic_path
from .preprocess import CROP_FRACTION, to_model_input
from .progress import progress

PREDICTIONS_SCHEMA = 1


def predict_logits(models: dict, images: ImageSet, batch_size: int = 64,
                   device: str = "cpu", workers: int = 0, crop_fraction: float = CROP_FRACTION,
                   desc: str = "predict", decode_scale: str = "full", decoded_at: bool = False) -> dict:
    """models: resolution -> an nn.Module, or any callable input -> logits (e.g. an ONNX Runtime engine's run).
    decode_scale: "stage" decodes a JPEG at each resolution's own DCT scale, as the cascade runtime does for a
    family that records it (`data.EvalDataset`); "full": one full decode for every resolution. decoded_at (with
    "stage"): also predict every resolution r from the decode at each larger resolution R's scale, the pixels a
    cascade decoded once gives it (K(K-1)/2 more inferences per image).
    Returns logits [N, R, C], labels, ids, pixel_digests (training.images.pixel_digest of each decoded image),
    resolutions, skipped (count) and unreadable ([{id, error}]) over the images that failed to decode; with
    decoded_at, decoded_at_pairs [P, 2] (r, R) and decoded_at_logits [N, P, C]."""
    resolutions = sorted(models)
    pairs = [(r, at) for at in resolutions for r in resolutions if r < at] \
        if decoded_at and decode_scale == "stage" else []
    ds = EvalDataset(images, resolutions, crop_fraction, decode_scale, pairs)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate_skipping)
    for m in models.values():
        if isinstance(m, torch.nn.Module):
            m.to(device, memory_format=torch.channels_last).eval()
    chunks, labels, positions, digests, unreadable = [], [], [], [], []
    t0 = time.perf_counter()
    with torch.inference_mode(), progress(total=len(ds), desc=desc, unit="img") as bar:
        for batch, bad in loader:
            unreadable += [{"id": b.id, "error": b.error} for b in bad]
            bar.update(len(bad))
            if batch is None:
                continue
            views, y, pos, digest = batch
            digests += list(digest)
            out = []
            for r, v in zip(resolutions + [r for r, _ in pairs], views):
                x = to_model_input(v.to(device)).contiguous(memory_format=torch.channels_last)
                out.append(models[r](x).float().cpu())
            chunks.append(torch.stack(out, 1))
            labels.append(y)
            positions.append(pos)
            bar.update(len(y))
    if not chunks:
        raise RescascadeError(f"no readable images among {len(ds)} to predict on")
    pos = torch.cat(positions).numpy()
    logits = torch.cat(chunks).numpy().astype(np.float32)
    extra = {"decoded_at_pairs": np.array(pairs, dtype=np.int64).reshape(-1, 2),
             "decoded_at_logits": logits[:, len(resolutions):]} if pairs else {}
    return {"logits": logits[:, :len(resolutions)], **extra, "labels": torch.cat(labels).numpy(),
            "resolutions": np.array(resolutions, dtype=np.int64), "ids": np.array([images.ids[i] for i in pos]),
            "pixel_digests": np.array(digests), "skipped": len(unreadable), "unreadable": unreadable,
            "seconds": time.perf_counter() - t0}


def write_predictions(path, pred: dict, weights_sha256: str | None = None, split: str = "") -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, schema_version=np.int64(PREDICTIONS_SCHEMA), logits=pred["logits"], labels=pred["labels"],
                     resolutions=pred["resolutions"], ids=pred["ids"], split=np.array(split),
                     weights_sha256=np.array(weights_sha256 or ""),
                     pixel_digests=pred.get("pixel_digests", np.array([], dtype=str)),
                     **{k: pred[k] for k in ("decoded_at_pairs", "decoded_at_logits") if k in pred})


def top1(pred: dict) -> dict[int, float]:
    correct = pred["logits"].argmax(-1) == pred["labels"][:, None]
    return {int(r): float(correct[:, k].mean()) for k, r in enumerate(pred["resolutions"])}
