"""The plan: what a served cascade decides, in one schema that cascade.json and bundle.json share.

Both files hold the same plan fields (PLAN_FIELDS), checked by one function (`plan_problem`) and read by one
(`Plan.from_doc`):

    "stages":     [{"resolution": R, "threshold": t, "model": NAME}, ..., {"resolution": R, "threshold": null, ...}]
    "reference":  {"resolution": R, "model": NAME, ...its figures}
    "confidence": {"measure": "max_prob" | "margin" | "entropy", "temperatures": {"R": T, ...}, "combine": bool}
    "decode":     {"plan": "once", "resolution": R}     (absent: each stage decodes a JPEG at its own scale)
    "expected":   {"calib": {"n": N, "exit_fractions": [...]}, "test": {...}}   (what `drift` tests traffic against)

A cascade.json is the plan plus what it was built from (family, profile, optimizer record); a bundle.json is the
plan plus its model files (shared model, one patch per resolution), the preprocessing and the class names
(`rescascade export` copies the plan fields unchanged). The thresholds are on the tempered confidence
(`confidence.py`); a stage's name is its model and resolution (`names.py`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

from .confidence import MEASURES
from .names import stage_name, stage_names

PLAN_FIELDS = ("stages", "reference", "confidence", "decode", "expected")


def plan_fields(doc: dict) -> dict:
    """The plan's fields of a cascade.json's or bundle.json's content (those it has: "decode" is optional)."""
    return {key: doc[key] for key in PLAN_FIELDS if key in doc}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plan_problem(doc: dict, resolutions, num_classes: int) -> str | None:
    """What is wrong with the plan a cascade.json's or bundle.json's content `doc` holds, None if nothing.

    resolutions: the ones it may use (the family's, or those the bundle has patches for); num_classes: sets the
    range of an entropy threshold ([-ln C, 0]; max_prob and margin lie in [0, 1]). Checks the confidence setting
    (a temperature for every stage and the reference), the stages (resolution, threshold: null for the last one
    alone, model name), the reference, the decode plan (which needs schema_version >= 2: a version-1 reader would
    decode per stage) and the expected figures (`expected_problem`)."""
    conf, stages, ref = doc.get("confidence"), doc.get("stages"), doc.get("reference")
    resolutions = {int(r) for r in resolutions}
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
    if "decode" in doc:
        plan = doc["decode"]
        version = doc.get("schema_version", 2)
        if _is_int(version) and version < 2:
            return "a decode plan needs schema_version 2 (a version-1 reader would decode per stage)"
        if not (isinstance(plan, dict) and plan.get("plan") == "once" and _is_int(plan.get("resolution")) and
                plan["resolution"] in resolutions and all(s["resolution"] <= plan["resolution"] for s in stages)):
            return 'decode must be {"plan": "once", "resolution": R}, R one of its resolutions and no stage above it'
    return expected_problem(doc.get("expected"), len(stages))


def expected_problem(expected, n_stages: int) -> str | None:
    """What is wrong with a plan's "expected" figures (per split calib and test: the images n and the fraction
    exiting at each of the n_stages stages), None if nothing. `rescascade drift` tests served traffic against
    them."""
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


def plan_stages(doc: dict) -> list[tuple[int, float]]:
    """A (checked) plan's stages [(resolution, threshold)] in order; the last one's threshold is -inf (it answers
    everything)."""
    return [(int(s["resolution"]), -math.inf if s.get("threshold") is None else float(s["threshold"]))
            for s in doc["stages"]]


def plan_decode_at(doc: dict) -> int | None:
    """The resolution whose JPEG scale every stage decodes at (the cascade is decoded once), or None (each stage
    at its own scale)."""
    return int(doc["decode"]["resolution"]) if "decode" in doc else None


def plan_temperatures(doc: dict) -> dict[int, float]:
    """resolution -> its temperature (the logits are divided by it before the confidence is taken)."""
    return {int(r): float(t) for r, t in doc["confidence"].get("temperatures", {}).items()}


@dataclass(frozen=True)
class Plan:
    """What a runtime runs: stages [(resolution, threshold)] in order (the last one answers everything, whatever
    its threshold), the confidence setting (per-resolution temperatures, measure, free ensemble), the decode plan
    (decode_at: None, each stage decodes a JPEG at its own scale; R, every stage from one decode at R's scale), the
    preprocessing (crop_fraction, decode_scale "stage" | "full", mean and std or None for ImageNet's), the class
    names (index -> name) and the stages' names (resolution -> "MODEL/rR", `names.stage_names`)."""
    stages: tuple[tuple[int, float], ...]
    temperatures: dict[int, float]
    measure: str
    combined: bool
    decode_at: int | None
    crop_fraction: float
    decode_scale: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    class_names: tuple[str, ...]
    names: dict[int, str] = dataclasses.field(default_factory=dict)  # resolution -> stage name (`names.stage_name`)

    @classmethod
    def from_doc(cls, doc: dict, class_names: Sequence[str], crop_fraction: float, decode_scale: str,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> "Plan":
        """The plan of a checked cascade.json's or bundle.json's content (`plan_problem`), with the
        preprocessing and class names of its family or bundle."""
        conf = doc["confidence"]
        return cls(stages=tuple(plan_stages(doc)), temperatures=plan_temperatures(doc), measure=conf["measure"],
                   combined=bool(conf.get("combine", False)), decode_at=plan_decode_at(doc),
                   crop_fraction=float(crop_fraction), decode_scale=decode_scale,
                   mean=None if mean is None else tuple(mean), std=None if std is None else tuple(std),
                   class_names=tuple(class_names), names=stage_names(doc))

    @property
    def resolutions(self) -> list[int]:
        return [r for r, _ in self.stages]

    @property
    def stage_names(self) -> list[str]:
        """The stages' names, in order: the model each runs and its resolution ("rR" where not recorded)."""
        return [self.names.get(r) or stage_name(None, r) for r in self.resolutions]

    def running(self, stages: Sequence[tuple[int, float]], decode_at: int | None) -> "Plan":
        """The same plan with other stages and decode plan (the reference alone, a warm-up, a cascade compared)."""
        return dataclasses.replace(self, stages=tuple((int(r), float(t)) for r, t in stages), decode_at=decode_at)
