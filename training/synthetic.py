"""A built-in, resolution-sensitive synthetic image set: no files, generated deterministically from a seed.

Half the classes are *coarse*: a disk whose colour names the class, visible at any resolution. The other half
are *fine*: a grey disk whose class is only in a fine periodic texture (stripe direction / checker), 3-5 px
per period at the source size, which antialiased downsampling erases at low resolution. So a low-resolution
model is confident on the coarse half and unsure on the fine half: a cascade has something real to exploit.
Colour jitter, texture contrast and noise vary per image, so some images are hard at every resolution.
"""
from __future__ import annotations

import numpy as np
import torch

from rescascade.serve.errors import ConfigError

COARSE_HUES = np.array([[0.85, 0.20, 0.20], [0.20, 0.70, 0.25], [0.20, 0.35, 0.90], [0.90, 0.80, 0.15],
                        [0.75, 0.30, 0.80], [0.15, 0.80, 0.80]])
FINE_PATTERNS = ("horizontal", "vertical", "checker", "diagonal", "antidiagonal", "dots")


def class_names(num_classes: int) -> list[str]:
    n_coarse = num_classes // 2
    return [f"coarse_{i}" for i in range(n_coarse)] + [f"fine_{FINE_PATTERNS[i]}" for i in range(num_classes - n_coarse)]


def _pattern(kind: str, xx: np.ndarray, yy: np.ndarray, period: np.ndarray, phase: np.ndarray) -> np.ndarray:
    w = np.float32(2 * np.pi) / period[:, None, None]
    ph = phase[:, None, None]
    if kind == "horizontal":
        return np.sin(w * yy + ph)
    if kind == "vertical":
        return np.sin(w * xx + ph)
    if kind == "checker":
        return np.sign(np.sin(w * xx + ph) * np.sin(w * yy + ph))
    if kind == "diagonal":
        return np.sin(w * (xx + yy) / np.float32(np.sqrt(2)) + ph)
    if kind == "antidiagonal":
        return np.sin(w * (xx - yy) / np.float32(np.sqrt(2)) + ph)
    if kind == "dots":
        return (np.sin(w * xx + ph) * np.sin(w * yy + ph)) ** 2 * 2 - 1
    raise ValueError(kind)


def make_synthetic(n: int, num_classes: int = 8, size: int = 112, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n images uint8 [n, 3, size, size] and labels int64 [n], balanced over classes, deterministic in seed."""
    if not 2 <= num_classes <= 2 * len(FINE_PATTERNS):
        raise ConfigError(f"--synthetic-classes: synthetic data has 2..{2 * len(FINE_PATTERNS)} classes, got "
                          f"{num_classes}")
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    n_coarse = num_classes // 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    chunk = 256
    for start in range(0, n, chunk):
        lab = labels[start:start + chunk]
        m = len(lab)
        # smooth background: a random colour gradient, plus pixel noise. float32, channels first and in place:
        # float64 pixels or a trailing colour axis cost several times the time for the same values
        c0, c1 = (rng.uniform(0.1, 0.9, (m, 3)).astype(np.float32)[:, :, None, None] for _ in range(2))
        angle = rng.uniform(0, 2 * np.pi, m).astype(np.float32)
        t = ((np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy) / size + 1) / 2
        t = t[:, None]
        img = np.multiply(c0, 1 - t)
        img += np.multiply(c1, t, out=np.empty_like(img))
        # the object: a disk near the centre (inside the eval center crop)
        cx, cy = rng.uniform(0.38, 0.62, (2, m)).astype(np.float32) * size
        rad = rng.uniform(0.20, 0.30, m).astype(np.float32) * size
        disk = ((xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2) <= rad[:, None, None] ** 2
        colour = np.empty((m, 3), dtype=np.float32)
        texture = np.zeros((m, size, size), dtype=np.float32)
        coarse = lab < n_coarse
        hue_jitter = rng.normal(0, 0.08, (m, 3))
        colour[coarse] = COARSE_HUES[lab[coarse] % len(COARSE_HUES)] + hue_jitter[coarse]
        grey = rng.uniform(0.4, 0.6, m)
        colour[~coarse] = grey[~coarse, None] + hue_jitter[~coarse] * 0.5
        period = rng.uniform(3.0, 5.0, m).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, m).astype(np.float32)
        contrast = rng.uniform(0.06, 0.35, m).astype(np.float32)
        for k in range(num_classes - n_coarse):
            sel = lab == n_coarse + k
            if sel.any():
                texture[sel] = _pattern(FINE_PATTERNS[k], xx, yy, period[sel], phase[sel]) * contrast[sel, None, None]
        # coarse disks get an uninformative fine texture too, so texture alone does not say "fine class"
        if coarse.any():
            kinds = rng.integers(0, len(FINE_PATTERNS), m)
            for k in np.unique(kinds[coarse]):
                sel = coarse & (kinds == k)
                texture[sel] = _pattern(FINE_PATTERNS[k], xx, yy, period[sel], phase[sel]) * contrast[sel, None, None] * 0.5
        obj = np.add(colour[:, :, None, None], texture[:, None])
        np.copyto(img, obj, where=disk[:, None])
        img += rng.normal(0, 1, (m, 1, 1, 1)).astype(np.float32) * 0.02
        noise = rng.standard_normal((m, size, size, 3), dtype=np.float32)  # drawn channels last, as always
        noise *= np.float32(0.04)
        img += noise.transpose(0, 3, 1, 2)
        img *= 255
        img += 0.5
        np.clip(img, 0, 255, out=img)
        images[start:start + m] = img
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
