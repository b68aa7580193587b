"""cascade.json: the deployable cascade config, versioned.

Anyone can deploy from this file and the family directory alone: it names the family (and its hashes), the
backend and batch size its costs were measured at, and the plan (`serve.plan`, the schema bundle.json shares):
the confidence measure and per-stage temperatures, the ordered stages, the decode plan, the reference model, and
the expected figures on calib and test.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
from dataclasses import dataclass
from pathlib import Path

from rescascade.serve.errors import ArtifactError, ConfigError
from rescascade.serve.fileio import check_schema, output_file, read_json, sha256_file, write_json
from rescascade.serve.limits import MAX_BATCH

from .optimizer import Cascade, Stage, paired_difference
from .predictions import Predictions, load_predictions
from .serve.plan import plan_decode_at, plan_problem, plan_stages, plan_temperatures

SCHEMA_VERSION = 2  # 2: the "decode" plan; a config without one (the per-stage plan) is written as version 1
# the optimizer methods' names in cascade.json (greedy-answers: the guarantee's conservative path, guarantee.py)
METHODS = {"greedy": "streeter-greedy", "greedy-answers": "streeter-greedy on the reference's answers"}
REQUIRED = ("family", "profile", "confidence", "stages", "reference", "expected")


@dataclass
class CascadeConfig:
    """cascade.json's content (`doc`) and where it lives (`path`; None until saved). `load` reads and validates
    one, `from_builder` makes one from a fitted CascadeBuilder, `save` writes it atomically."""
    doc: dict
    path: Path | None = None

    @classmethod
    def load(cls, path) -> "CascadeConfig":
        """Read and validate cascade.json (or a directory holding one); ArtifactError when missing or invalid."""
        return read_config(path)

    def save(self, path) -> Path:
        """Write atomically to `path` (a directory: PATH/cascade.json), the family path recorded relative to it
        (the pair stays deployable when copied together). Returns the path written."""
        path = config_path(path)
        family = self.family_dir
        # relative to where the file really lands (a link is written through)
        doc = versioned({**self.doc, "family": {**self.doc["family"], "path": os.path.relpath(
            family.resolve(), output_file(path, "path").parent)}})
        validate(doc, path)
        write_config(path, doc)
        self.doc, self.path = doc, path
        return path

    @classmethod
    def from_builder(cls, builder, family_dir, profile, costs, test: Predictions | None = None,
                     warnings=()) -> "CascadeConfig":
        """The config of a fitted CascadeBuilder: its stages and confidence setting, the family (family_dir, its
        family.json hashes) and profile (a `Profile`) it was built on, the costs (CostModel) it was chosen with,
        and the expected figures on calib and on `test` (default: the family's predictions/test.npz, never seen
        by the choice). Not written until `save`."""
        from rescascade.training.store import model_name, read_family_json, weights_id  # here: it imports torch,
        # which reading a cascade.json (`rescascade drift`, eval's checks) does not need
        builder.check_fitted()
        if any(isinstance(r, str) for r in builder.resolutions_):
            raise ConfigError("this CascadeBuilder chose among a pool's stages (MODEL/rR): cascade.json holds one "
                              "family's cascade so far; read the pool's choice from the builder (cascade_, "
                              "oracle_, simulate)")
        b, family_dir = builder, Path(family_dir).resolve()
        doc = read_family_json(family_dir)
        test = test if test is not None else load_predictions(family_dir / "predictions" / "test.npz")
        for what, wid in (("the builder was fitted on predictions", b.weights_sha256_),
                          ("the test predictions are", test.weights_sha256),
                          ("the profile measured", profile.meta.get("weights_sha256"))):
            if wid != weights_id(doc):
                raise ArtifactError(f"{what} of another family (weights {str(wid)[:12]}, {family_dir} has "
                                    f"{weights_id(doc)[:12]}): fit on this family's predictions and profile")
        cascade, ref_out = b.cascade_, b.reference_outcome_
        casc_test, ref_test = b.simulate(test, costs)
        expected = {
            "calib": {**b.chosen_.outcome.summary(ref_out.mean_cost), "reference_accuracy": ref_out.accuracy,
                      "oracle": b.oracle(costs).summary(ref_out.mean_cost, b.chosen_.outcome.mean_cost)},
            "test": {**casc_test.summary(ref_test.mean_cost), "reference_accuracy": ref_test.accuracy,
                     "paired_difference": paired_difference(casc_test.correct_mask, ref_test.correct_mask),
                     "oracle": b.oracle(costs, test).summary(ref_test.mean_cost, casc_test.mean_cost)},
        }
        if costs.decode_ms:  # the costs include the JPEG decode: what the same cascade costs on decoded inputs
            decoded = costs.without_decode()
            for split, (casc_dec, ref_dec) in (("calib", b.simulate_calib(decoded)), ("test", b.simulate(test, decoded))):
                expected[split]["decoded_inputs"] = {"mean_cost_ms": casc_dec.mean_cost,
                                                     "cost_vs_reference": casc_dec.mean_cost / ref_dec.mean_cost}
        config = {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "family": {"path": str(family_dir), "family_json_sha256": sha256_file(family_dir / "family.json"),
                       "weights_sha256": weights_id(doc), "resolutions": doc["resolutions"],
                       "num_classes": doc["num_classes"]},
            "profile": {"path": str(Path(profile.path).resolve()), **costs.describe(), "device": profile.meta["device"]},
            "confidence": {"measure": b.measure_, "temperatures": {str(r): b.temperatures_[r] for r in b.resolutions_},
                           "temperature_fitted_on": (None if not b.temperature else
                                                     "calib" if b.guarantee is None else "the select part of calib"),
                           "combine": b.combine_},
            "stages": stages_json(cascade, model_name(doc)),
            **decode_json(cascade),
            "reference": {"resolution": b.reference_, "model": model_name(doc), "accuracy_calib": ref_out.accuracy,
                          "accuracy_test": ref_test.accuracy, "cost_ms": ref_out.mean_cost},
            "target": {"kind": b.target.kind, "value": b.target.value, "description": b.target.describe()},
            "expected": expected,
            "optimizer": {"method": METHODS.get(cascade.method, cascade.method),
                          "tolerance": cascade.tolerance, "tolerances": list(b.tolerances),
                          "candidates": len(b.candidates_),
                          "pareto_front": [{"cascade": c.cascade.describe(), "accuracy": c.outcome.accuracy,
                                            "cost_ms": c.outcome.mean_cost} for c in b.front_],
                          "exact": b.exact_, "seconds": None,
                          "decode_plans": [{"plan": "per stage" if at is None else f"once at r{at}",
                                            **({"cascade": c.cascade.describe(), "calib_accuracy": c.outcome.accuracy,
                                                "calib_cost_ms": c.outcome.mean_cost} if c else {"cascade": None})}
                                           for at, c in b.plan_choices_.items()]},
            "single_model_wins": len(cascade.stages) == 1,
            "warnings": list(warnings),
        }
        if b.certificate_ is not None:
            config["guarantee"] = b.certificate_.describe()
        return cls(config)

    @property
    def cascade(self) -> Cascade:
        return Cascade([Stage(r, t) for r, t in plan_stages(self.doc)],
                       method=self.doc.get("optimizer", {}).get("method", "greedy"), decode_at=plan_decode_at(self.doc))

    @property
    def measure(self) -> str:
        return self.doc["confidence"]["measure"]

    @property
    def temperatures(self) -> dict[int, float]:
        return plan_temperatures(self.doc)

    @property
    def combined(self) -> bool:
        return bool(self.doc["confidence"].get("combine", False))

    @property
    def family_dir(self) -> Path:
        """The family directory: as recorded, or relative to cascade.json when it was moved with it."""
        recorded = Path(self.doc["family"]["path"])
        if recorded.is_absolute() or self.path is None:
            return recorded
        return (self.path.resolve().parent / recorded).resolve()  # next to the file itself, not to a link to it

    @property
    def reference(self) -> int:
        return int(self.doc["reference"]["resolution"])


def config_path(path, what: str = "path") -> Path:
    """The cascade.json a `path` names: the path, or PATH/cascade.json for a directory. ConfigError (naming
    `what`) for a path that is not a str or os.PathLike."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigError(f"{what} {path!r}: give the path of a cascade.json (e.g. 'runs/x/cascade.json') or its "
                          "directory")
    path = Path(path)
    return path / "cascade.json" if path.is_dir() else path


def stages_json(cascade: Cascade, model: str | None = None) -> list[dict]:
    """Stages as JSON: the last one's threshold is null (it answers everything); each names the model it runs
    (`serve.names`) where `model` is given."""
    return [{"resolution": s.resolution, "threshold": None if not math.isfinite(s.threshold) else s.threshold,
             **({"model": model} if model else {})} for s in cascade.stages]


def decode_json(cascade: Cascade) -> dict:
    """cascade.json's "decode" plan for encoded inputs: {"plan": "once", "resolution": R} for a cascade decoded
    once at R's scale; nothing for the per-stage plan (each stage at its own scale, what version-1 readers do)."""
    return {} if cascade.decode_at is None else {"decode": {"plan": "once", "resolution": cascade.decode_at}}


def versioned(doc: dict) -> dict:
    """The doc with the schema_version it is written at: 1 unless it needs version 2's "decode" plan, so that a
    reader that would ignore the plan refuses the file instead (a loaded doc's own version is replaced)."""
    body = {k: v for k, v in doc.items() if k != "schema_version"}
    return {"schema_version": SCHEMA_VERSION if "decode" in body else 1, **body}


def write_config(path, doc: dict) -> None:
    """Write atomically, versioned (`versioned`)."""
    write_json(path, versioned(doc))


def _check(ok: bool, path, what: str) -> None:
    if not ok:
        raise ArtifactError(f"{path}: {what}; the file was edited or damaged: restore it or re-run `rescascade build`")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(doc: dict, path) -> None:
    """Every field the runtime and eval use, with the values it may take; raises RescascadeError naming the field."""
    for key in REQUIRED:
        _check(isinstance(doc[key], list if key == "stages" else dict), path,
               f"{key} must be {'a list' if key == 'stages' else 'an object'}")
    fam, prof = doc["family"], doc["profile"]
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
    problem = plan_problem(doc, resolutions, fam["num_classes"])
    _check(problem is None, path, problem)


def read_config(path) -> CascadeConfig:
    """Read and validate cascade.json (or DIR/cascade.json); ArtifactError when missing or invalid."""
    path = config_path(path)
    doc = read_json(path, "a cascade.json written by `rescascade build`")
    check_schema(doc, path, "cascade config", SCHEMA_VERSION, REQUIRED)
    validate(doc, path)
    return CascadeConfig(doc, path)
