"""Stage outputs and their confidence: temperature scaling (the temperatures are fitted by
`rescascade.temperature`), max-prob / margin / negative entropy, and the optional free ensemble (a stage averages its log-probabilities with those of the stages already run).

The optimizer (on stored logits) and the runtime (on live logits) call the same functions, so a threshold
means the same thing in both.
"""
from __future__ import annotations

import numpy as np

MEASURES = ("max_prob", "margin", "entropy")


def log_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Temperature-scaled log-softmax over the last axis, in float32 (50k x 1000 stays small). Plain numpy:
    the runtime calls this per stage, where scipy's wrapper cost more than the arithmetic at batch 1."""
    x = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def combine(logp_stages: list[np.ndarray]) -> np.ndarray:
    """The free ensemble: mean log-probability of the stages run so far, renormalised."""
    return log_probs(np.mean(logp_stages, axis=0, dtype=np.float32))


def confidence(logp: np.ndarray, measure: str) -> np.ndarray:
    """Higher = more confident. max_prob: top probability; margin: top-1 minus top-2 probability;
    entropy: negative entropy (in nats) of the predictive distribution."""
    if measure == "max_prob":
        return np.exp(logp.max(-1))
    if measure == "margin":
        top2 = np.partition(logp, -2, axis=-1)[..., -2:]
        return np.exp(top2[..., 1]) - np.exp(top2[..., 0])
    if measure == "entropy":
        p = np.exp(logp)
        return (p * logp).sum(-1)
    raise ValueError(f"unknown confidence measure {measure!r}; choose one of {', '.join(MEASURES)}")
