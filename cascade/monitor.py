"""Watching a deployed cascade: how many inputs reach and leave each stage, with the confidence histogram at
each stage, and a test of whether the traffic still exits as cascade.json expects.

The thresholds were fitted on calib and the cost was predicted from the exit fractions they give there. When the
served images change (a new camera, a new season, other classes), the fraction of the inputs reaching a stage
that exit there moves, and with it the cost and the accuracy. Per stage, a two-proportion test (Pearson's
chi-squared on the 2x2 table of exited / went on, served vs the held-out test split) says whether the served
fraction differs from the expected one; with a Bonferroni correction over the stages, any rejection means: re-fit
the thresholds on recent labelled traffic (`rescascade build`). The report also says how large a difference each
stage's test could see (80 % power): with few expected images or little traffic, only a large one.

Counts carry the identity of the plan that served them (`plan_identity`: weights, stages, thresholds,
temperatures, measure, ensemble, decode plan) and one id per runtime, so counts of another plan, or the same
counts given twice, are refused rather than compared.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rescascade.training.errors import ArtifactError, ConfigError, check_number
from rescascade.training.fileio import read_json, write_json

BINS = 20
COUNTS_SCHEMA = 2  # 2: the plan's identity and the runtimes' ids
POWER = 0.8        # the power at which the report states the difference each stage's test can detect


def plan_identity(doc: dict, stages=None, decode_at=None) -> str:
    """A short fingerprint (16 hex digits) of what decides a served cascade's exits, from a cascade.json or
    bundle.json `doc` (validated): the weights, the stages with their thresholds, their temperatures, the measure,
    the free ensemble and the decode plan. stages: [(resolution, threshold)] a runtime runs instead of the doc's
    (the last stage's threshold is ignored: it answers everything), with decode_at its decode plan."""
    conf = doc["confidence"]
    if stages is None:
        stages = [(s["resolution"], s["threshold"]) for s in doc["stages"]]
        decode_at = doc.get("decode", {}).get("resolution")
    stages = [(int(r), None if k == len(stages) - 1 or t is None or not math.isfinite(t) else float(t))
              for k, (r, t) in enumerate(stages)]
    weights = (doc.get("family") or doc.get("source") or {}).get("weights_sha256")
    plan = {"weights": weights, "stages": stages, "measure": conf["measure"],
            "temperatures": [float(conf.get("temperatures", {}).get(str(r), 1.0)) for r, _ in stages],
            "combine": bool(conf.get("combine", False)), "decode_at": decode_at}
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ExitCounts:
    """Running counts of a served cascade. stages: the stages' resolutions; edges: the confidence histogram's bin
    edges (the measure's range); plan: the `plan_identity` of the cascade served; ids: one per runtime whose
    counts these are (added counts hold each); reached[k] / exited[k]: inputs that reached / left at stage k;
    histograms[k]: confidences at stage k of every input that reached it; inputs, errors: inputs seen, inputs
    that failed."""
    stages: list[int]
    measure: str
    edges: list[float]
    plan: str
    ids: list[str] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)
    exited: list[int] = field(default_factory=list)
    histograms: list[list[int]] = field(default_factory=list)
    inputs: int = 0
    errors: int = 0

    @classmethod
    def for_cascade(cls, resolutions: list[int], measure: str, num_classes: int, plan: str) -> "ExitCounts":
        """Empty counts of a new runtime serving stages `resolutions` with `measure` over num_classes classes,
        the plan `plan` (`plan_identity`)."""
        low, high = (-math.log(num_classes), 0.0) if measure == "entropy" else (0.0, 1.0)
        k = len(resolutions)
        return cls(list(resolutions), measure, list(np.linspace(low, high, BINS + 1)), plan, [uuid.uuid4().hex],
                   [0] * k, [0] * k, [[0] * BINS for _ in range(k)])

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
            k = len(counts.stages)
            ok = k > 0 and len(counts.reached) == len(counts.exited) == len(counts.histograms) == k and all(
                0 <= e <= r for e, r in zip(counts.exited, counts.reached)) and isinstance(counts.plan, str) and \
                isinstance(counts.ids, list) and counts.ids and all(isinstance(i, str) for i in counts.ids)
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"{path} is not a counts file of this version ({e}); save it again with "
                                "runner.counts.save(path)") from None
        if not ok:
            raise ArtifactError(f"{path}: reached/exited/histograms do not fit its {len(counts.stages)} stages "
                                "(or more exits than arrivals, or no plan identity); the file was edited or damaged")
        return counts

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
                          self.inputs + other.inputs, self.errors + other.errors)


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


def _detectable(p: float, n_expected: float, n_served: int, alpha: float) -> float | None:
    """The smallest difference in an exit fraction near p that a two-sided two-proportion test at level alpha
    detects with probability POWER, with n_expected and n_served inputs on the two sides (normal approximation);
    None without inputs on a side."""
    from scipy.stats import norm
    if n_expected < 1 or n_served < 1:
        return None
    p = (p * n_expected + 0.5) / (n_expected + 1)  # add-half: a fraction of 0 or 1 still has a spread
    z = norm.ppf(1 - alpha / 2) + norm.ppf(POWER)
    return float(z * math.sqrt(p * (1 - p) * (1 / n_expected + 1 / n_served)))


def drift_report(config, counts: ExitCounts, alpha: float = 0.01, split: str = "test") -> dict:
    """Compare served exit fractions with the ones cascade.json expects on `split`, stage by stage (the fraction
    of the inputs reaching stage k that exit there; the last stage answers everything and is not tested).

    config: a CascadeConfig or a deploy.Bundle (anything with the validated `doc` and its `path`). counts: the
    served ExitCounts (several runtimes' added up). alpha: the family-wise false-alarm rate (Bonferroni over the
    tested stages). -> {"stages": [{resolution, expected, served, n_expected, n_served, p_value, detectable,
    drifted}], "drifted": bool, "alpha", "split", "inputs", "errors"}; detectable: the difference in the exit
    fraction the stage's test sees with 80 % power (None without traffic). Raises ConfigError when the counts
    were served by another plan (`plan_identity`) or alpha is not in (0, 1)."""
    from scipy.stats import chi2_contingency
    if not (hasattr(config, "doc") and hasattr(config, "path")):
        raise ConfigError(f"config: give a CascadeConfig (CascadeConfig.load(path)) or a Bundle, got "
                          f"{type(config).__name__}")
    if not isinstance(counts, ExitCounts):
        raise ConfigError(f"counts: give ExitCounts (ExitCounts.load(path)), got {type(counts).__name__}")
    check_number("alpha", alpha, 0, 1)
    if not 0 < alpha < 1:
        raise ConfigError(f"--alpha {alpha}: give a false-alarm rate in (0, 1), e.g. 0.01")
    doc = config.doc
    stages = [int(s["resolution"]) for s in doc["stages"]]
    measure, plan = doc["confidence"]["measure"], plan_identity(doc)
    if counts.plan != plan:
        same_stages = counts.stages == stages and counts.measure == measure
        raise ConfigError(f"the counts were served by another plan ({counts.plan}: {counts.stages} {counts.measure}"
                          f"{', the same stages with other thresholds, temperatures or weights' if same_stages else ''})"
                          f"; {config.path} is plan {plan} ({stages} {measure}): compare counts with the cascade.json "
                          "(or bundle) that served them")
    exp = doc["expected"][split]
    n, fractions = int(exp["n"]), exp["exit_fractions"]
    tested = len(stages) - 1
    level = alpha / max(1, tested)
    rows, left = [], 1.0
    for k in range(tested):
        reach_e, exit_e = n * left, n * fractions[k]
        left -= fractions[k]
        p_e = exit_e / reach_e if reach_e > 1e-9 else float("nan")
        reach_s, exit_s = counts.reached[k], counts.exited[k]
        p_s = exit_s / reach_s if reach_s else float("nan")
        p_value = None
        if reach_s and reach_e > 1e-9:
            table = np.array([[exit_e, reach_e - exit_e], [exit_s, reach_s - exit_s]], dtype=float)
            if (np.round(table).sum(axis=0) > 0).all() and (np.round(table).sum(axis=1) > 0).all():
                p_value = float(chi2_contingency(np.round(table), correction=True)[1])
            else:
                p_value = 1.0  # nobody (or everybody) exits on either side: nothing differs
        rows.append({"resolution": stages[k], "expected": p_e, "served": p_s, "n_expected": round(reach_e),
                     "n_served": reach_s, "p_value": p_value,
                     "detectable": None if math.isnan(p_e) else _detectable(p_e, reach_e, reach_s, level),
                     "drifted": p_value is not None and p_value < level})
    return {"stages": rows, "drifted": any(r["drifted"] for r in rows), "alpha": alpha, "split": split,
            "inputs": counts.inputs, "errors": counts.errors}


def format_drift(report: dict) -> str:
    """The drift report as a table and a conclusion that says what the test could have seen."""
    lines = [f"exits per stage: served ({report['inputs']} inputs, {report['errors']} failed) vs expected on "
             f"{report['split']}", "",
             "| stage | exits expected | exits served | reached (expected / served) | p-value | detectable (80 % power) "
             "| drifted |", "|---|---|---|---|---|---|---|"]
    for r in report["stages"]:
        p = "n/a (no traffic)" if r["p_value"] is None else f"{r['p_value']:.3g}"
        served = "" if math.isnan(r["served"]) else f"{100 * r['served']:.1f}%"
        expected = "n/a" if math.isnan(r["expected"]) else f"{100 * r['expected']:.1f}%"
        seen = "n/a" if r["detectable"] is None else f"+-{100 * r['detectable']:.1f} points"
        lines.append(f"| r{r['resolution']} | {expected} | {served} | {r['n_expected']} / {r['n_served']} | {p} | "
                     f"{seen} | {'yes' if r['drifted'] else 'no'} |")
    lines.append("")
    if report["drifted"]:
        lines.append("traffic has drifted: the exit fractions differ from calibration; re-fit the thresholds on recent "
                     "labelled images (`rescascade build`)")
    elif not report["stages"]:
        lines.append("a single stage exits nothing early: there is no exit fraction to test")
    else:
        seen = [r["detectable"] for r in report["stages"] if r["detectable"] is not None]
        lines.append(f"no stage's exit fraction differs from the expected one (family-wise alpha {report['alpha']:g})" +
                     (f"; the test sees, with 80 % power, only differences of +-{100 * min(seen):.1f} points or more"
                      f"{' (' + str(len(seen)) + ' stages: up to +-' + format(100 * max(seen), '.1f') + ')' if len(seen) > 1 else ''}"
                      ": a smaller drift may go unseen (more traffic, or more test images, narrow it)" if seen else
                      "; no traffic reached a tested stage: nothing could be seen"))
    return "\n".join(lines)
