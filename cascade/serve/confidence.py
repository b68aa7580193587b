"""Stage outputs and their confidence: temperature scaling (the temperatures are fitted by
`rescascade.temperature`), max-prob / margin / negative entropy, and the optional free ensemble (a stage averages its log-probabilities with those of the stages already run).

The optimizer (on stored logits) and the runtime (on live logits) call the same functions, so a threshold
means the same thing in both.
"""
from __future__ import annotations

import math

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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def exit_problem(doc: dict, resolutions, num_classes: int) -> str | None:
    """What is wrong with the exit decision a cascade.json or a bundle.json describes (confidence: measure,
    temperatures, one for every stage and the reference, combine; stages: resolution, threshold and model name;
    reference;
    the expected exit figures, `expected_problem`), None if nothing: `resolutions` are the ones it may use,
    thresholds must lie in the measure's range for `num_classes` classes."""
    conf, stages, ref = doc.get("confidence"), doc.get("stages"), doc.get("reference")
    if not isinstance(conf, dict) or conf.get("measure") not in MEASURES:
        return f"confidence.measure must be one of {', '.join(MEASURES)}"
    measure, temps = conf["measure"], conf.get("temperatures", {})
    if not (isinstance(temps, dict) and all(str(k).isdigit() and _is_number(t) and t > 0 for k, t in temps.items())):
        return "confidence.temperatures must map resolutions to positive numbers"
    if not isinstance(conf.get("combine", False), bool):
        return "confidence.combine must be true or false"
    if not (isinstance(stages, list) and stages):
        return "stages must be a non-empty list of {resolution, threshold}"
    low, high = (-math.log(num_classes), 0.0) if measure == "entropy" else (0.0, 1.0)
    seen = set()
    for k, s in enumerate(stages, 1):
        if not (isinstance(s, dict) and _is_int(s.get("resolution")) and s["resolution"] in resolutions):
            return f"stage {k}'s resolution must be one of {sorted(resolutions)}"
        if s["resolution"] in seen:
            return f"stage {k} repeats resolution {s['resolution']}"
        seen.add(s["resolution"])
        last, threshold = k == len(stages), s.get("threshold")
        if last != (threshold is None):
            return f"only the last stage may (and must) have threshold null; stage {k} " + \
                ("has none" if not last else "has one")
        if not last and not (_is_number(threshold) and low <= threshold <= high):
            return f"stage {k}'s threshold {threshold!r} is not a {measure} confidence (a number in " \
                f"[{low:.4g}, {high:g}])"
    if not (isinstance(ref, dict) and _is_int(ref.get("resolution")) and ref["resolution"] in resolutions):
        return f"reference.resolution must be one of {sorted(resolutions)}"
    models = [e.get("model", "-") for e in [*stages, ref]]
    if not all(isinstance(m, str) and m and m.isprintable() and "/" not in m for m in models):
        return "a stage's or the reference's model must be a name (one line of text, no /)"
    untempered = [r for r in [s["resolution"] for s in stages] + [ref["resolution"]] if str(r) not in temps]
    if untempered:  # a threshold cuts the tempered probability: without its temperature it cuts another one
        return f"confidence.temperatures lacks r{untempered[0]}'s temperature (every stage's and the reference's)"
    return expected_problem(doc.get("expected"), len(stages))


def expected_problem(expected, n_stages: int) -> str | None:
    """What is wrong with the "expected" figures of a cascade.json or bundle.json (per split calib and test: the
    images n and the fraction exiting at each of the n_stages stages), None if nothing. `rescascade drift` tests
    served traffic against them."""
    if not isinstance(expected, dict):
        return "expected must hold the calib and test figures"
    for split in ("calib", "test"):
        e = expected.get(split)
        if not (isinstance(e, dict) and _is_int(e.get("n")) and e["n"] > 0):
            return f"expected.{split}.n must be the number of {split} images (an integer > 0)"
        fractions = e.get("exit_fractions")
        if not (isinstance(fractions, list) and len(fractions) == n_stages and
                all(_is_number(f) and 0 <= f <= 1 for f in fractions) and abs(sum(fractions) - 1) < 1e-6):
            return f"expected.{split}.exit_fractions must be {n_stages} fractions (one per stage) that sum to 1"
    return None
