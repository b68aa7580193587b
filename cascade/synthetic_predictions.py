"""Synthetic predictions with the structure of a real resolution family, for tests and benchmarks.

Every example has a latent difficulty; each resolution has a skill that grows with resolution. The true
class's logit margin is skill - difficulty plus noise, with noise partly shared across resolutions (the
models are one family), so higher resolutions are more accurate and confidence tracks correctness.
"""
from __future__ import annotations

import numpy as np

from .predictions import Predictions


def synthetic_predictions(n: int, resolutions=(96, 128, 160, 192, 224), num_classes: int = 10, seed: int = 0,
                          skills=None, scale: float = 5.0, correlation: float = 0.6) -> Predictions:
    rng = np.random.default_rng(seed)
    r = len(resolutions)
    skills = np.asarray(skills if skills is not None else np.linspace(0.1, 0.8, r))
    labels = rng.integers(0, num_classes, n)
    difficulty = rng.uniform(-2.0, 1.0, n)
    shared = rng.normal(0, 1, (n, num_classes)).astype(np.float32)
    logits = np.empty((n, r, num_classes), dtype=np.float32)
    rows = np.arange(n)
    for k in range(r):
        own = rng.normal(0, 1, (n, num_classes)).astype(np.float32)
        z = correlation * shared + np.sqrt(1 - correlation ** 2) * own
        z[rows, labels] += scale * (skills[k] - difficulty) + rng.normal(0, 0.3, n)
        logits[:, k] = z
    return Predictions(logits, labels.astype(np.int64), list(resolutions), np.arange(n).astype(str), "synthetic")
