"""What decoding a JPEG costs each stage: per (source size, resolution), the decode the cascade runtime does.

A family that decodes per stage (family.json preprocessing.decode_scale "stage") decodes a JPEG at the smallest
DCT scale that covers the stage's resize (`serve.images.jpeg_scale`); "full" decodes in full for every stage.
The profile times exactly that call, `training.images.decode`, on a JPEG of each source size, round-robin like
the inference rows, and `rescascade profile` writes profile_decode.csv beside profile.csv. The JPEG is synthetic (seeded noise summed over
octaves, so its spectrum falls off as a photo's does; quality 90): its bytes per pixel are recorded, since the
entropy decoding's cost grows with them; `build --refine` corrects the estimate with the runtime's own timings
on real images.
"""
from __future__ import annotations

import datetime as _dt
import io
import math
from functools import partial

import numpy as np
import pandas as pd
from PIL import Image

from rescascade.serve.images import jpeg_scale
from rescascade.serve.preprocess_np import preprocess_pixels
from rescascade.training.images import decode
from rescascade.training.preprocess import preprocess, stage_min_side

from .measure import Protocol, cpu_timer, run_protocol, summarize

DECODE_COLUMNS = ["source_width", "source_height", "resolution", "decoded_for", "decode_scale", "scale",
                  "decoded_width", "decoded_height", "jpeg_bytes", "bits_per_pixel", "median_ms", "p90_ms", "p99_ms",
                  "cv", "n_iters", "preprocess_ms", "decoder", "smoke", "measured_at"]
JPEG_QUALITY = 90


def synthetic_photo(width: int, height: int, seed: int = 0, quality: int = JPEG_QUALITY) -> bytes:
    """A width x height JPEG (quality 90) of seeded noise summed over octaves with amplitude growing with the
    octave's scale: smooth areas and edges at every scale, as in a photo, so it compresses and decodes like one
    (a flat or white-noise image would be far cheaper or dearer to decode)."""
    rng = np.random.default_rng(seed)
    octaves = max(1, int(math.log2(max(width, height))) - 1)
    image = None
    for k in reversed(range(octaves)):  # coarse to fine: upsample what is there, add this octave's noise
        size = (max(1, -(-width // 2 ** k)), max(1, -(-height // 2 ** k)))
        if image is not None:
            image = np.stack([np.asarray(Image.fromarray(image[..., c], mode="F").resize(size, Image.BILINEAR))
                              for c in range(3)], axis=-1)
        noise = rng.normal(size=(size[1], size[0], 3)).astype(np.float32) * math.sqrt(2 ** k)
        image = noise if image is None else image + noise
    image = (image - image.mean()) / (image.std() + 1e-6) * 48 + 128
    buf = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def time_decode(sizes: list[tuple[int, int]], resolutions: list[int], crop_fraction: float, decode_scale: str,
                protocol: Protocol, log=print, numpy_inputs: bool = False) -> pd.DataFrame:
    """Time `decode` of a synthetic JPEG of each (width, height) in `sizes` for each stage resolution, and the
    stage's preprocessing of one image from that decode (resize, crop, normalize: it grows with the source),
    round-robin over `protocol.rounds`; stages that decode at the same scale share one decode timing. A family
    that decodes per stage also gets, per stage r and larger resolution R, r's preprocessing from R's decode
    (decoded_for R: a cascade decoded once at R's scale, `Cascade.decode_at`). -> profile_decode.csv's rows
    (DECODE_COLUMNS; times in ms per image). numpy_inputs: time the preprocessing of the ONNX Runtime CPU engine
    (`serve.preprocess_np`), else torch's."""
    import PIL
    rows, times, jobs = [], {}, {}
    for w, h in sizes:
        data = synthetic_photo(w, h)
        for r in resolutions:
            side = stage_min_side(r, crop_fraction, decode_scale)
            scale = jpeg_scale(w, h, side)
            jobs.setdefault((w, h, scale), (data, side))
    pairs = [(r, R) for r in resolutions for R in resolutions if R == r or (R > r and decode_scale == "stage")]
    prep = {}  # (w, h, r, R) -> times of preprocessing one image for stage r from the decode stage R gets
    decoded = {key: decode(data, None, side)[None] for key, (data, side) in jobs.items()}  # once, not per round
    for k in range(protocol.rounds):
        part = protocol.round(k)
        for key, (data, side) in jobs.items():
            times.setdefault(key, []).append(run_protocol(cpu_timer(lambda d=data, s=side: decode(d, None, s)), part))
        for w, h in sizes:
            for r, R in pairs:
                image = decoded[w, h, jpeg_scale(w, h, stage_min_side(R, crop_fraction, decode_scale))]
                if numpy_inputs:
                    step = partial(preprocess_pixels, image.permute(0, 2, 3, 1).numpy(), r, crop_fraction)
                else:
                    step = partial(preprocess, image, r, crop_fraction)
                prep.setdefault((w, h, r, R), []).append(run_protocol(cpu_timer(step), part))
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for w, h in sizes:
        for r, R in pairs:
            side = stage_min_side(R, crop_fraction, decode_scale)
            scale = jpeg_scale(w, h, side)
            data, _ = jobs[w, h, scale]
            stats = summarize(np.concatenate(times[w, h, scale]))
            rows.append({"source_width": w, "source_height": h, "resolution": r, "decoded_for": R,
                         "decode_scale": decode_scale,
                         "scale": scale, "decoded_width": -(-w // scale), "decoded_height": -(-h // scale),
                         "jpeg_bytes": len(data), "bits_per_pixel": round(8 * len(data) / (w * h), 3),
                         "median_ms": stats["median_ms"], "p90_ms": stats["p90_ms"], "p99_ms": stats["p99_ms"],
                         "cv": stats["cv"], "n_iters": stats["n_iters"],
                         "preprocess_ms": float(np.median(np.concatenate(prep[w, h, r, R]))),
                         "decoder": f"pillow-{PIL.__version__}",
                         "smoke": protocol.smoke, "measured_at": now})
    return pd.DataFrame(rows, columns=DECODE_COLUMNS)
