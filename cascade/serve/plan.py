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
(`confidence.py`); a stage's name is its model and resolution (`names.py`). A pool's plan (a cascade.json with
"members") keys its stages and temperatures by stage name MODEL/rR instead of by resolution (`names.stage_key`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

from .confidence import MEASURES
from .names import is_pool_doc, is_stage_name, key_resolution, stage_key, stage_label, stage_name, stage_names

PLAN_FIELDS = ("stages", "reference", "confidence", "decode", "expected")


def plan_fields(doc: dict) -> dict:
    """The plan's fields of a cascade.json's or bundle.json's content (those it has: "decode" is optional)."""
    return {key: doc[key] for key in PLAN_FIELDS if key in doc}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plan_problem(doc: dict, stages_allowed, num_classes: int) -> str | None:
    """What is wrong with the plan a cascade.json's or bundle.json's content `doc` holds, None if nothing.

    stages_allowed: the stage keys (`names.stage_key`) it may use: a family's plan, the resolutions (the family's,
    or those the bundle has patches for); a pool's plan (`names.is_pool_doc`), the pool's stage names MODEL/rR.
    num_classes: sets the range of an entropy threshold ([-ln C, 0]; max_prob and margin lie in [0, 1]). Checks
    the confidence setting (a temperature for every stage and the reference), the stages (key, threshold: null
    for the last one alone, model name), the reference, the decode plan (which needs schema_version >= 2: a
    version-1 reader would decode per stage) and the expected figures (`expected_problem`)."""
    conf, stages, ref = doc.get("confidence"), doc.get("stages"), doc.get("reference")
    pooled = is_pool_doc(doc)
    allowed = {k if pooled else int(k) for k in stages_allowed}
    choices = ", ".join(map(str, sorted(allowed, key=str))) if pooled else str(sorted(allowed))
    what = "stage (model and resolution)" if pooled else "resolution"
    if not isinstance(conf, dict) or conf.get("measure") not in MEASURES:
        return f"confidence.measure must be one of {', '.join(MEASURES)}"
    measure, temps = conf["measure"], conf.get("temperatures", {})
    key_ok = is_stage_name if pooled else str.isdigit
    if not (isinstance(temps, dict) and all(key_ok(str(k)) and _is_number(t) and t > 0 for k, t in temps.items())):
        return "confidence.temperatures must map " + ("stage names (MODEL/rR)" if pooled else "resolutions") + \
            " to positive numbers"
    if not isinstance(conf.get("combine", False), bool):
        return "confidence.combine must be true or false"
    if not (isinstance(stages, list) and stages):
        return "stages must be a non-empty list of {resolution, threshold}"
    low, high = (-math.log(num_classes), 0.0) if measure == "entropy" else (0.0, 1.0)
    entries = [*stages, ref]
    if not all(isinstance(e, dict) for e in entries):
        return "every stage and the reference must be an object {resolution, threshold, model}"
    models = [e.get("model", "-") for e in entries]
    if not all(isinstance(m, str) and m and m.isprintable() and "/" not in m for m in models):
        return "a stage's or the reference's model must be a name (one line of text, no /)"
    keys = [stage_key(e, pooled) if _is_int(e.get("resolution")) else None for e in entries]
    seen = set()
    for k, (s, key) in enumerate(zip(stages, keys), 1):
        if key is None or key not in allowed:
            return f"stage {k}'s {what} must be one of {choices}"
        if key in seen:
            return f"stage {k} repeats {what} {key}"
        seen.add(key)
        last, threshold = k == len(stages), s.get("threshold")
        if last != (threshold is None):
            return f"only the last stage may (and must) have threshold null; stage {k} " + \
                ("has none" if not last else "has one")
        if not last and not (_is_number(threshold) and low <= threshold <= high):
            return f"stage {k}'s threshold {threshold!r} is not a {measure} confidence (a number in " \
                f"[{low:.4g}, {high:g}])"
    if keys[-1] is None or keys[-1] not in allowed:
        return f"reference.{'model and reference.' if pooled else ''}resolution must be one of {choices}"
    untempered = [key for key in keys if str(key) not in temps]
    if untempered:  # a threshold cuts the tempered probability: without its temperature it cuts another one
        return f"confidence.temperatures lacks {stage_label(untempered[0])}'s temperature (every stage's and the " \
            "reference's)"
    if "decode" in doc:
        plan = doc["decode"]
        version = doc.get("schema_version", 2)
        if _is_int(version) and version < 2:
            return "a decode plan needs schema_version 2 (a version-1 reader would decode per stage)"
        if not (isinstance(plan, dict) and plan.get("plan") == "once" and _is_int(plan.get("resolution")) and
                plan["resolution"] in {key_resolution(k) for k in allowed} and
                all(s["resolution"] <= plan["resolution"] for s in stages)):
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


def plan_stages(doc: dict) -> list[tuple[int | str, float]]:
    """A (checked) plan's stages [(stage key, threshold)] in order (`names.stage_key`: the resolution in a family's
    plan, MODEL/rR in a pool's); the last one's threshold is -inf (it answers everything)."""
    return [(key, -math.inf if s.get("threshold") is None else float(s["threshold"]))
            for key, s in zip(plan_keys(doc), doc["stages"])]


def plan_keys(doc: dict) -> list[int | str]:
    """A (checked) plan's stage keys in order."""
    pooled = is_pool_doc(doc)
    return [stage_key(s, pooled) for s in doc["stages"]]


def pool_weights_id(weight_ids) -> str:
    """A pool's identity: a sha256 over its members' weights ids (each a sha256), in order."""
    return hashlib.sha256("\n".join(weight_ids).encode()).hexdigest()


def plan_reference(doc: dict) -> int | str:
    """A (checked) plan's reference model's stage key."""
    return stage_key(doc["reference"], is_pool_doc(doc))


def plan_decode_at(doc: dict) -> int | None:
    """The resolution whose JPEG scale every stage decodes at (the cascade is decoded once), or None (each stage
    at its own scale)."""
    return int(doc["decode"]["resolution"]) if "decode" in doc else None


def plan_temperatures(doc: dict) -> dict[int | str, float]:
    """stage key -> its temperature (the logits are divided by it before the confidence is taken)."""
    pooled = is_pool_doc(doc)
    return {(k if pooled else int(k)): float(t) for k, t in doc["confidence"].get("temperatures", {}).items()}


@dataclass(frozen=True)
class Plan:
    """What a runtime runs: stages [(stage key, threshold)] in order (the last one answers everything, whatever
    its threshold; a stage key is the resolution in a family's plan, MODEL/rR in a pool's: `names.stage_key`), the
    confidence setting (per-stage temperatures, measure, free ensemble), the decode plan (decode_at: None, each
    stage decodes a JPEG at its own scale; R, every stage from one decode at R's scale), the preprocessing
    (crop_fraction, decode_scale "stage" | "full", mean and std or None for ImageNet's), the class names (index ->
    name) and the stages' names (stage key -> "MODEL/rR", `names.stage_names`)."""
    stages: tuple[tuple[int | str, float], ...]
    temperatures: dict[int | str, float]
    measure: str
    combined: bool
    decode_at: int | None
    crop_fraction: float
    decode_scale: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    class_names: tuple[str, ...]
    names: dict[int | str, str] = dataclasses.field(default_factory=dict)  # stage key -> name (`names.stage_name`)

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
    def keys(self) -> list[int | str]:
        """The stages' keys, in order."""
        return [key for key, _ in self.stages]

    @property
    def stage_names(self) -> list[str]:
        """The stages' names, in order: the model each runs and its resolution ("rR" where not recorded)."""
        return [self.names.get(key) or (key if isinstance(key, str) else stage_name(None, key)) for key in self.keys]

    def running(self, stages: Sequence[tuple[int | str, float]], decode_at: int | None) -> "Plan":
        """The same plan with other stages and decode plan (the reference alone, a warm-up, a cascade compared)."""
        return dataclasses.replace(self, stages=tuple((key if isinstance(key, str) else int(key), float(t))
                                                      for key, t in stages), decode_at=decode_at)
