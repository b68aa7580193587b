"""cascade.json (DESIGN.md §3): the deployable cascade config, versioned.

Anyone can deploy from this file and the family directory alone: it names the family (and its hashes), the
backend and batch size its costs were measured at, the confidence measure and per-stage temperatures, the
ordered stages, the reference model, and the expected figures on calib and test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from training.config import MAX_BATCH
from training.fileio import UserError, check_schema, read_json, write_json

from .confidence import MEASURES
from .optimizer import Cascade, Stage

SCHEMA_VERSION = 1
REQUIRED = ("family", "profile", "confidence", "stages", "reference", "expected")


@dataclass
class CascadeConfig:
    doc: dict
    path: Path

    @property
    def cascade(self) -> Cascade:
        return Cascade([Stage(int(s["resolution"]), -math.inf if s.get("threshold") is None else float(s["threshold"]))
                        for s in self.doc["stages"]], method=self.doc.get("optimizer", {}).get("method", "greedy"))

    @property
    def measure(self) -> str:
        return self.doc["confidence"]["measure"]

    @property
    def temperatures(self) -> dict[int, float]:
        return {int(r): float(t) for r, t in self.doc["confidence"].get("temperatures", {}).items()}

    @property
    def combined(self) -> bool:
        return bool(self.doc["confidence"].get("combine", False))

    @property
    def family_dir(self) -> Path:
        """The family directory: as recorded, or relative to cascade.json when it was moved with it."""
        recorded = Path(self.doc["family"]["path"])
        return recorded if recorded.is_absolute() else (self.path.parent / recorded).resolve()

    @property
    def reference(self) -> int:
        return int(self.doc["reference"]["resolution"])


def stages_json(cascade: Cascade) -> list[dict]:
    """Stages as JSON: the last one's threshold is null (it answers everything)."""
    return [{"resolution": s.resolution, "threshold": None if not math.isfinite(s.threshold) else s.threshold}
            for s in cascade.stages]


def write_config(path, doc: dict) -> None:
    write_json(path, {"schema_version": SCHEMA_VERSION, **doc})


def _measure_range(measure: str, num_classes: int) -> tuple[float, float]:
    """The values a confidence measure takes (cascade/confidence.py): probabilities, or negative entropy."""
    return (-math.log(num_classes), 0.0) if measure == "entropy" else (0.0, 1.0)


def _check(ok: bool, path, what: str) -> None:
    if not ok:
        raise UserError(f"{path}: {what}; the file was edited or damaged: restore it or re-run `rescascade build`")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(doc: dict, path) -> None:
    """Every field the runtime and eval use, with the values it may take; raises UserError naming the field."""
    for key in REQUIRED:
        _check(isinstance(doc[key], (dict, list)), path, f"{key} must be an object")
    fam, prof, conf = doc["family"], doc["profile"], doc["confidence"]
    _check(isinstance(fam.get("path"), str) and fam["path"] != "", path, "family.path must name the family directory")
    for key in ("family_json_sha256", "weights_sha256"):
        _check(isinstance(fam.get(key), str) and len(fam[key]) == 64, path, f"family.{key} must be a sha256")
    resolutions = fam.get("resolutions")
    _check(isinstance(resolutions, list) and resolutions and all(_is_int(r) and r > 0 for r in resolutions), path,
           "family.resolutions must be a list of positive integers")
    _check(_is_int(fam.get("num_classes")) and fam["num_classes"] >= 2, path, "family.num_classes must be >= 2")
    _check(isinstance(prof.get("backend"), str) and isinstance(prof.get("precision"), str), path,
           "profile.backend and profile.precision must be names")
    _check(_is_int(prof.get("batch_size")) and 1 <= prof["batch_size"] <= MAX_BATCH, path,
           f"profile.batch_size must be 1..{MAX_BATCH}")
    measure = conf.get("measure")
    _check(measure in MEASURES, path, f"confidence.measure {measure!r} is not one of {', '.join(MEASURES)}")
    temps = conf.get("temperatures", {})
    _check(isinstance(temps, dict) and all(str(k).isdigit() and _is_number(t) and t > 0 for k, t in temps.items()),
           path, "confidence.temperatures must map resolutions to positive numbers")
    _check(isinstance(conf.get("combine", False), bool), path, "confidence.combine must be true or false")
    stages = doc["stages"]
    _check(isinstance(stages, list) and len(stages) > 0, path, "stages must be a non-empty list of "
                                                               "{resolution, threshold}")
    low, high = _measure_range(measure, fam["num_classes"])
    for k, s in enumerate(stages, 1):
        _check(isinstance(s, dict) and s.get("resolution") in resolutions and _is_int(s.get("resolution")), path,
               f"stage {k}'s resolution must be one of the family's {resolutions}")
        last = k == len(stages)
        threshold = s.get("threshold")
        _check(last == (threshold is None), path, f"only the last stage may (and must) have threshold null; stage "
                                                  f"{k} {'has none' if not last else 'has one'}")
        if not last:
            _check(_is_number(threshold) and low <= threshold <= high, path,
                   f"stage {k}'s threshold {threshold!r} is not a {measure} confidence (a number in "
                   f"[{low:.4g}, {high:g}])")
    ref = doc["reference"].get("resolution")
    _check(_is_int(ref) and ref in resolutions, path, f"reference.resolution must be one of the family's "
                                                      f"{resolutions}")


def read_config(path) -> CascadeConfig:
    path = Path(path)
    if path.is_dir():
        path = path / "cascade.json"
    doc = read_json(path, "a cascade.json written by `rescascade build`")
    check_schema(doc, path, "cascade config", SCHEMA_VERSION, REQUIRED)
    validate(doc, path)
    return CascadeConfig(doc, path)
