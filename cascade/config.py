"""cascade.json (DESIGN.md §3): the deployable cascade config, versioned.

Anyone can deploy from this file and the family directory alone: it names the family (and its hashes), the
backend and batch size its costs were measured at, the confidence measure and per-stage temperatures, the
ordered stages, the reference model, and the expected figures on calib and test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

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


def read_config(path) -> CascadeConfig:
    path = Path(path)
    if path.is_dir():
        path = path / "cascade.json"
    doc = read_json(path, "a cascade.json written by `rescascade build`")
    check_schema(doc, path, "cascade config", SCHEMA_VERSION, REQUIRED)
    stages = doc["stages"]
    if not isinstance(stages, list) or not stages:
        raise UserError(f"{path}: stages must be a non-empty list of {{resolution, threshold}}")
    for k, s in enumerate(stages):
        if "resolution" not in s:
            raise UserError(f"{path}: stage {k + 1} has no resolution")
        last = k == len(stages) - 1
        if last != (s.get("threshold") is None):
            raise UserError(f"{path}: only the last stage may (and must) have threshold null; stage {k + 1} "
                            f"{'has none' if not last else 'has one'}")
    if doc["confidence"].get("measure") not in MEASURES:
        raise UserError(f"{path}: confidence measure {doc['confidence'].get('measure')!r} is not one of "
                        f"{', '.join(MEASURES)}")
    return CascadeConfig(doc, path)
