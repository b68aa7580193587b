"""cascade.json: the deployable cascade config, versioned.

Anyone can deploy from this file and the family directory alone: it names the family (and its hashes), the
backend and batch size its costs were measured at, and the plan (`serve.plan`, the schema bundle.json shares):
the confidence measure and per-stage temperatures, the ordered stages, the decode plan, the reference model, and
the expected figures on calib and test.

A pool's cascade (`pool.Pool`: stages of several families) names its families under "members" instead of
"family", each as "family" names one plus its model, and keys its stages, temperatures and reference by stage name
(MODEL/rR, `serve.names`): schema version 3, which earlier readers refuse. Its first member is the one whose data
provenance and held-out images eval reads (every member predicted the same images: the pool checks it).
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
from .serve.names import is_pool_doc, key_model, key_resolution, stage_name
from .serve.plan import plan_decode_at, plan_problem, plan_reference, plan_stages, plan_temperatures

SCHEMA_VERSION = 3  # 3: a pool's "members"; 2: the "decode" plan; a config with neither is written as version 1
# the optimizer methods' names in cascade.json (greedy-answers: the guarantee's conservative path, guarantee.py)
METHODS = {"greedy": "streeter-greedy", "greedy-answers": "streeter-greedy on the reference's answers"}
REQUIRED = ("profile", "confidence", "stages", "reference", "expected")  # and "family", or a pool's "members"


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
        """Write atomically to `path` (a directory: PATH/cascade.json), the family's path (each member's) recorded
        relative to it (they stay deployable when copied together). Returns the path written."""
        path = config_path(path)
        here = output_file(path, "path").parent  # relative to where the file really lands (a link is written through)
        entries = [{**e, "path": os.path.relpath(d.resolve(), here)} for e, d in zip(self.members, self.member_dirs)]
        doc = versioned({**self.doc, **({"members": entries} if self.pooled else {"family": entries[0]})})
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
        by the choice). For a builder fitted on a pool's stages, family_dir is the `pool.Pool` (its members'
        profiles are its own: profile is ignored; test default: the pool's test predictions). Not written until
        `save`. ConfigError for a pool's builder without its Pool or the reverse, ArtifactError for predictions or
        a profile of other weights."""
        from rescascade.training.store import model_name, read_family_json, weights_id  # here: it imports torch,
        # which reading a cascade.json (`rescascade drift`, eval's checks) does not need
        builder.check_fitted()
        b = builder
        pool = family_dir if hasattr(family_dir, "members") else None
        pooled_fit = any(isinstance(r, str) for r in b.resolutions_)
        if pooled_fit != (pool is not None):
            raise ConfigError("this CascadeBuilder chose among a pool's stages (MODEL/rR): give the Pool it was "
                              "fitted on, not a family directory" if pooled_fit else
                              "this CascadeBuilder chose among one family's resolutions: give its family directory, "
                              "not a Pool")
        if pool is not None:
            members = [(m.run_dir.resolve(), m.doc, m.profile) for m in pool.members]
            wid, where = pool.weights_sha256, "the pool"
            test = test if test is not None else pool.predictions("test")
        else:
            family_dir = Path(family_dir).resolve()
            members = [(family_dir, read_family_json(family_dir), profile)]
            wid, where = weights_id(members[0][1]), str(family_dir)
            test = test if test is not None else load_predictions(family_dir / "predictions" / "test.npz")
        for what, got in (("the builder was fitted on predictions", b.weights_sha256_),
                          ("the test predictions are", test.weights_sha256)):
            if got != wid:
                raise ArtifactError(f"{what} of another family (weights {str(got)[:12]}, {where} has {wid[:12]}): "
                                    "fit on this family's predictions and profile")
        for fam_dir, doc, prof in members:
            if prof.meta.get("weights_sha256") != weights_id(doc):
                raise ArtifactError(f"the profile measured another family (weights "
                                    f"{str(prof.meta.get('weights_sha256'))[:12]}, {fam_dir} has "
                                    f"{weights_id(doc)[:12]}): fit on this family's predictions and profile")
        entries = [{"path": str(fam_dir), "family_json_sha256": sha256_file(fam_dir / "family.json"),
                    "weights_sha256": weights_id(doc), "resolutions": doc["resolutions"],
                    "num_classes": doc["num_classes"], **({"model": model_name(doc)} if pool is not None else {})}
                   for fam_dir, doc, _ in members]
        model = None if pool is not None else model_name(members[0][1])
        first = members[0]
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
        profile_paths = [str(Path(prof.path).resolve()) for _, _, prof in members]
        config = {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **({"members": entries} if pool is not None else {"family": entries[0]}),
            "profile": {**({"paths": profile_paths} if pool is not None else {"path": profile_paths[0]}),
                        **costs.describe(), "device": first[2].meta["device"]},
            "confidence": {"measure": b.measure_, "temperatures": {str(r): b.temperatures_[r] for r in b.resolutions_},
                           "temperature_fitted_on": (None if not b.temperature else
                                                     "calib" if b.guarantee is None else "the select part of calib"),
                           "combine": b.combine_},
            "stages": stages_json(cascade, model),
            **decode_json(cascade),
            "reference": {"resolution": key_resolution(b.reference_), "model": key_model(b.reference_) or model,
                          "accuracy_calib": ref_out.accuracy,
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
    def pooled(self) -> bool:
        """Whether this is a pool's cascade (stages of several families, keyed MODEL/rR)."""
        return is_pool_doc(self.doc)

    @property
    def members(self) -> list[dict]:
        """The families it runs, as recorded (path, hashes, resolutions, num_classes; a pool's also model): a
        pool's members in order, or the one family."""
        return list(self.doc["members"]) if self.pooled else [self.doc["family"]]

    @property
    def stage_keys(self) -> list:
        """The stage keys it may run: its family's resolutions, or every pool member's MODEL/rR."""
        return stage_keys(self.doc)

    @property
    def member_dirs(self) -> list[Path]:
        """Each member's directory: as recorded, or relative to cascade.json when it was moved with it."""
        out = []
        for entry in self.members:
            recorded = Path(entry["path"])
            out.append(recorded if recorded.is_absolute() or self.path is None else
                       (self.path.resolve().parent / recorded).resolve())  # next to the file itself, not a link
        return out

    @property
    def family_dir(self) -> Path:
        """The family directory (a pool's first member's: its data provenance and held-out images are every
        member's): as recorded, or relative to cascade.json when it was moved with it."""
        return self.member_dirs[0]

    @property
    def reference(self) -> int | str:
        """The reference model's stage key: its resolution (a pool's: MODEL/rR)."""
        return plan_reference(self.doc)


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
    (`serve.names`): its key's (a pool's stage MODEL/rR), else `model` where given."""
    return [{"resolution": key_resolution(s.resolution),
             "threshold": None if not math.isfinite(s.threshold) else s.threshold,
             **({"model": key_model(s.resolution) or model} if key_model(s.resolution) or model else {})}
            for s in cascade.stages]


def decode_json(cascade: Cascade) -> dict:
    """cascade.json's "decode" plan for encoded inputs: {"plan": "once", "resolution": R} for a cascade decoded
    once at R's scale; nothing for the per-stage plan (each stage at its own scale, what version-1 readers do)."""
    return {} if cascade.decode_at is None else {"decode": {"plan": "once", "resolution": cascade.decode_at}}


def versioned(doc: dict) -> dict:
    """The doc with the schema_version it is written at: 3 for a pool's, 2 for version 2's "decode" plan, else 1,
    so that a reader that would ignore what it cannot read refuses the file instead (a loaded doc's own version is
    replaced)."""
    body = {k: v for k, v in doc.items() if k != "schema_version"}
    return {"schema_version": 3 if "members" in body else 2 if "decode" in body else 1, **body}


def write_config(path, doc: dict) -> None:
    """Write atomically, versioned (`versioned`)."""
    write_json(path, versioned(doc))


def _check(ok: bool, path, what: str) -> None:
    if not ok:
        raise ArtifactError(f"{path}: {what}; the file was edited or damaged: restore it or re-run `rescascade build`")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def stage_keys(doc: dict) -> list:
    """The stage keys a cascade.json's content may run (`serve.names.stage_key`): its family's resolutions, or
    every pool member's MODEL/rR."""
    if is_pool_doc(doc):
        return [stage_name(m["model"], r) for m in doc["members"] for r in m["resolutions"]]
    return list(doc["family"]["resolutions"])


def _family_entry_problem(fam, what: str) -> str | None:
    """What is wrong with cascade.json's record of a family ("family", or one of a pool's "members")."""
    if not isinstance(fam, dict):
        return f"{what} must be an object"
    if not (isinstance(fam.get("path"), str) and fam["path"] != ""):
        return f"{what}.path must name the family directory"
    for key in ("family_json_sha256", "weights_sha256"):
        if not (isinstance(fam.get(key), str) and len(fam[key]) == 64):
            return f"{what}.{key} must be a sha256"
    resolutions = fam.get("resolutions")
    if not (isinstance(resolutions, list) and resolutions and all(_is_int(r) and r > 0 for r in resolutions)):
        return f"{what}.resolutions must be a list of positive integers"
    if not (_is_int(fam.get("num_classes")) and fam["num_classes"] >= 2):
        return f"{what}.num_classes must be >= 2"
    return None


def validate(doc: dict, path) -> None:
    """Every field the runtime and eval use, with the values it may take; raises RescascadeError naming the field."""
    for key in REQUIRED:
        _check(isinstance(doc[key], list if key == "stages" else dict), path,
               f"{key} must be {'a list' if key == 'stages' else 'an object'}")
    if is_pool_doc(doc):
        members = doc["members"]
        _check(isinstance(members, list) and len(members) >= 2, path, "members must list the pool's families (2 or more)")
        for k, entry in enumerate(members):
            problem = _family_entry_problem(entry, f"members[{k}]")
            _check(problem is None, path, problem)
            model = entry.get("model")
            _check(isinstance(model, str) and model and model.isprintable() and "/" not in model, path,
                   f"members[{k}].model must name its model (one line of text, no /)")
        _check(len({m["model"] for m in members}) == len(members), path, "two members name the same model")
        _check(len({m["num_classes"] for m in members}) == 1, path, "the members must predict the same classes")
        num_classes = members[0]["num_classes"]
    else:
        _check("family" in doc, path, 'it names no family ("family") and no pool ("members")')
        problem = _family_entry_problem(doc["family"], "family")
        _check(problem is None, path, problem)
        num_classes = doc["family"]["num_classes"]
    allowed = stage_keys(doc)
    prof = doc["profile"]
    _check(isinstance(prof.get("backend"), str) and isinstance(prof.get("precision"), str), path,
           "profile.backend and profile.precision must be names")
    _check(_is_int(prof.get("batch_size")) and 1 <= prof["batch_size"] <= MAX_BATCH, path,
           f"profile.batch_size must be 1..{MAX_BATCH}")
    problem = plan_problem(doc, allowed, num_classes)
    _check(problem is None, path, problem)


def read_config(path) -> CascadeConfig:
    """Read and validate cascade.json (or DIR/cascade.json); ArtifactError when missing or invalid."""
    path = config_path(path)
    doc = read_json(path, "a cascade.json written by `rescascade build`")
    check_schema(doc, path, "cascade config", SCHEMA_VERSION, REQUIRED)
    validate(doc, path)
    return CascadeConfig(doc, path)
