"""What a served cascade saw, counted as it runs: inputs that reached and left each stage, with each stage's
confidence histogram (`ExitCounts`), under the identity of the plan that served them (`plan_identity`: weights,
stages, thresholds, temperatures, measure, ensemble, decode plan) and one id per runtime, so counts of another
plan, or the same counts given twice, are refused rather than added. `rescascade.monitor` tests them for drift."""
from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import ArtifactError, ConfigError
from .fileio import read_json, write_json
from .names import is_pool_doc, key_model
from .plan import plan_keys, plan_reference, pool_weights_id

BINS = 20
COUNTS_SCHEMA = 2  # 2: the plan's identity and the runtimes' ids


def plan_identity(doc: dict, stages=None, decode_at=None) -> str:
    """A short fingerprint (16 hex digits) of what decides a served cascade's exits, from a cascade.json or
    bundle.json `doc` (validated): the weights, the stages with their thresholds, their temperatures, the measure,
    the free ensemble and the decode plan. stages: [(stage key, threshold)] a runtime runs instead of the doc's
    (the last stage's threshold is ignored: it answers everything), with decode_at its decode plan."""
    conf = doc["confidence"]
    if stages is None:
        stages = [(key, s["threshold"]) for key, s in zip(plan_keys(doc), doc["stages"])]
        decode_at = doc.get("decode", {}).get("resolution")
    stages = [(r if isinstance(r, str) else int(r),
               None if k == len(stages) - 1 or t is None or not math.isfinite(t) else float(t))
              for k, (r, t) in enumerate(stages)]
    if is_pool_doc(doc):  # the members the plan runs (a bundle holds those alone)
        used = {key_model(key) for key in plan_keys(doc) + [plan_reference(doc)]}
        weights = pool_weights_id([m["weights_sha256"] for m in doc["members"] if m["model"] in used])
    else:
        weights = (doc.get("family") or doc.get("source") or {}).get("weights_sha256")
    plan = {"weights": weights, "stages": stages, "measure": conf["measure"],
            "temperatures": [float(conf.get("temperatures", {}).get(str(r), 1.0)) for r, _ in stages],
            "combine": bool(conf.get("combine", False)), "decode_at": decode_at}
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ExitCounts:
    """Running counts of a served cascade. stages: the stages' keys (`names.stage_key`; names: their names); edges: the confidence histogram's bin
    edges (the measure's range); plan: the `plan_identity` of the cascade served; ids: one per runtime whose
    counts these are (added counts hold each); reached[k] / exited[k]: inputs that reached / left at stage k;
    histograms[k]: confidences at stage k of every input that reached it; inputs, errors: inputs seen, inputs
    that failed."""
    stages: list[int | str]
    measure: str
    edges: list[float]
    plan: str
    ids: list[str] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)
    exited: list[int] = field(default_factory=list)
    histograms: list[list[int]] = field(default_factory=list)
    inputs: int = 0
    errors: int = 0
    names: list[str] = field(default_factory=list)  # the stages' names ("MODEL/rR"; empty in counts saved before)

    @classmethod
    def for_cascade(cls, keys: list[int | str], measure: str, num_classes: int, plan: str,
                    names: list[str] | None = None) -> "ExitCounts":
        """Empty counts of a new runtime serving the stages keyed `keys` (named `names`, `serve.names`) with
        `measure` over num_classes classes, the plan `plan` (`plan_identity`)."""
        low, high = (-math.log(num_classes), 0.0) if measure == "entropy" else (0.0, 1.0)
        k = len(keys)
        return cls(list(keys), measure, list(np.linspace(low, high, BINS + 1)), plan, [uuid.uuid4().hex],
                   [0] * k, [0] * k, [[0] * BINS for _ in range(k)], names=list(names or []))

    def add_stage(self, k: int, confidence: np.ndarray, exits: np.ndarray) -> None:
        """Stage k saw these confidences [n] (float) and let the rows where exits [n] (bool) is True go."""
        self.reached[k] += len(confidence)
        self.exited[k] += int(np.count_nonzero(exits))
        inside = np.clip(confidence[np.isfinite(confidence)], self.edges[0], self.edges[-1])
        hist, _ = np.histogram(inside, bins=self.edges)
        self.histograms[k] = [a + int(b) for a, b in zip(self.histograms[k], hist)]

    def save(self, path) -> None:
        """Write as JSON (atomically; a link is written through). ConfigError for a path that is not one, or names
        a directory or device."""
        write_json(path, {"schema_version": COUNTS_SCHEMA, **asdict(self)}, "path")

    @classmethod
    def load(cls, path) -> "ExitCounts":
        """Read counts written by `save`; ArtifactError when missing, damaged or of an earlier version."""
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"path {path!r}: give the counts file's path")
        doc = read_json(path, "exit counts saved by a cascade runtime (runner.counts.save(path))")
        version = doc.pop("schema_version", None)
        if version == 1:
            raise ArtifactError(f"{path} was saved by an earlier rescascade, without the identity of the cascade "
                                "that served it, so drift cannot tell which cascade it counts; count anew with this "
                                "version")
        try:
            if version != COUNTS_SCHEMA:
                raise ValueError(f"schema_version {version!r}")
            counts = cls(**doc)
            problem = counts._problem()
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"{path} is not a counts file of this version ({e}); save it again with "
                                "runner.counts.save(path)") from None
        if problem:
            raise ArtifactError(f"{path}: {problem}; the file was edited or damaged")
        return counts

    def _problem(self) -> str | None:
        """What is wrong with counts read from a file (they must be what a runtime can have counted), None if
        nothing. TypeError for fields of the wrong kind."""
        k = len(self.stages)
        if not (k and len(self.reached) == len(self.exited) == len(self.histograms) == k):
            return f"reached/exited/histograms do not fit its {k} stages"
        if not (isinstance(self.plan, str) and isinstance(self.ids, list) and self.ids and
                all(isinstance(i, str) for i in self.ids)):
            return "it has no plan identity or runtime ids"
        if not (isinstance(self.names, list) and len(self.names) in (0, k) and
                all(isinstance(n, str) and n and n.isprintable() for n in self.names)):
            return f"names must be its {k} stages' names (one line each), or absent"
        numbers = [self.inputs, self.errors, *self.reached, *self.exited, *(c for h in self.histograms for c in h)]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in numbers):
            raise TypeError("counts must be whole numbers >= 0")
        if any(e > r for e, r in zip(self.exited, self.reached)):
            return "a stage has more exits than arrivals"
        if any(sum(h) > r for h, r in zip(self.histograms, self.reached)):
            return "a stage's confidence histogram holds more inputs than reached it"
        if any(self.reached[j + 1] > self.reached[j] - self.exited[j] for j in range(k - 1)):
            return "more inputs reached a stage than went on from the stage before"
        if self.reached[0] > self.inputs or self.errors > self.inputs:
            return f"more inputs reached the first stage or failed than the {self.inputs} that came in"
        return None

    def __add__(self, other: "ExitCounts") -> "ExitCounts":
        """The counts of two runtimes serving the same plan (e.g. Triton instances). ConfigError for counts of
        another plan, or counts of one runtime given twice."""
        if (self.stages, self.measure, self.edges, self.plan) != (other.stages, other.measure, other.edges,
                                                                   other.plan):
            raise ConfigError(f"counts of different cascades (plan {self.plan}: {self.stages} {self.measure} vs plan "
                              f"{other.plan}: {other.stages} {other.measure}) cannot be added")
        twice = set(self.ids) & set(other.ids)
        if twice:
            raise ConfigError(f"the same runtime's counts were given twice (runtime {sorted(twice)[0]}): give each "
                              "counts file once")
        return ExitCounts(self.stages, self.measure, self.edges, self.plan, self.ids + other.ids,
                          [a + b for a, b in zip(self.reached, other.reached)],
                          [a + b for a, b in zip(self.exited, other.exited)],
                          [[a + b for a, b in zip(h, g)] for h, g in zip(self.histograms, other.histograms)],
                          self.inputs + other.inputs, self.errors + other.errors, self.names or other.names)


def continue_counts(path, fresh: ExitCounts) -> tuple[ExitCounts, Path]:
    """What a (re)started runtime counts into and where it saves: the counts saved at `path` when they are of
    `fresh`'s plan (a reload or restart goes on counting them), else `fresh` at `path`, or, where `path` holds
    other counts (another plan, an earlier version, damaged), at the first free PATH.1.json, PATH.2.json, ...:
    counts are never overwritten."""
    path = Path(path)
    candidates = [path] + [path.with_name(f"{path.stem}.{k}{path.suffix}") for k in range(1, 1000)]
    for candidate in candidates:
        if not candidate.exists():
            return fresh, candidate
        try:
            earlier = ExitCounts.load(candidate)
        except ArtifactError:
            continue
        if (earlier.plan, earlier.stages, earlier.edges) == (fresh.plan, fresh.stages, fresh.edges):
            return earlier, candidate
    raise ConfigError(f"{path} and 999 more counts files beside it hold other counts; move them elsewhere")
