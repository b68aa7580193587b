"""Watching a deployed cascade: how many inputs reach and leave each stage, with the confidence histogram at
each stage, and a test of whether the traffic still exits as cascade.json expects.

The thresholds were fitted on calib and the cost was predicted from the exit fractions they give there. When the
served images change (a new camera, a new season, other classes), the fraction of the inputs reaching a stage
that exit there moves, and with it the cost and the accuracy. Per stage, a two-proportion test (Pearson's
chi-squared on the 2x2 table of exited / went on, served vs the held-out test split) says whether the served
fraction differs from the expected one; with a Bonferroni correction over the stages, any rejection means: re-fit
the thresholds on recent labelled traffic (`rescascade build`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from rescascade.training.errors import ArtifactError, ConfigError, check_number
from rescascade.training.fileio import read_json, write_json

BINS = 20
COUNTS_SCHEMA = 1


@dataclass
class ExitCounts:
    """Running counts of a served cascade. stages: the stages' resolutions; edges: the confidence histogram's bin
    edges (the measure's range); reached[k] / exited[k]: inputs that reached / left at stage k; histograms[k]:
    confidences at stage k of every input that reached it; inputs, errors: inputs seen, inputs that failed."""
    stages: list[int]
    measure: str
    edges: list[float]
    reached: list[int] = field(default_factory=list)
    exited: list[int] = field(default_factory=list)
    histograms: list[list[int]] = field(default_factory=list)
    inputs: int = 0
    errors: int = 0

    @classmethod
    def for_cascade(cls, resolutions: list[int], measure: str, num_classes: int) -> "ExitCounts":
        low, high = (-math.log(num_classes), 0.0) if measure == "entropy" else (0.0, 1.0)
        k = len(resolutions)
        return cls(list(resolutions), measure, list(np.linspace(low, high, BINS + 1)), [0] * k, [0] * k,
                   [[0] * BINS for _ in range(k)])

    def add_stage(self, k: int, confidence: np.ndarray, exits: np.ndarray) -> None:
        """Stage k saw these confidences [n] (float) and let the rows where exits [n] (bool) is True go."""
        self.reached[k] += len(confidence)
        self.exited[k] += int(np.count_nonzero(exits))
        inside = np.clip(confidence[np.isfinite(confidence)], self.edges[0], self.edges[-1])
        hist, _ = np.histogram(inside, bins=self.edges)
        self.histograms[k] = [a + int(b) for a, b in zip(self.histograms[k], hist)]

    def save(self, path) -> None:
        """Write as JSON (atomically)."""
        write_json(path, {"schema_version": COUNTS_SCHEMA, **asdict(self)})

    @classmethod
    def load(cls, path) -> "ExitCounts":
        """Read counts written by `save`; ArtifactError when missing or damaged."""
        doc = read_json(path, "exit counts saved by a cascade runtime (runner.counts.save(path))")
        try:
            if doc.pop("schema_version", None) != COUNTS_SCHEMA:
                raise ValueError("schema_version")
            counts = cls(**doc)
            k = len(counts.stages)
            ok = k > 0 and len(counts.reached) == len(counts.exited) == len(counts.histograms) == k and all(
                0 <= e <= r for e, r in zip(counts.exited, counts.reached))
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"{path} is not a counts file of this version ({e}); save it again with "
                                "runner.counts.save(path)") from None
        if not ok:
            raise ArtifactError(f"{path}: reached/exited/histograms do not fit its {len(counts.stages)} stages "
                                "(or more exits than arrivals); the file was edited or damaged")
        return counts


    def __add__(self, other: "ExitCounts") -> "ExitCounts":
        """The counts of two runtimes serving the same cascade (e.g. Triton instances). ConfigError otherwise."""
        if (self.stages, self.measure, self.edges) != (other.stages, other.measure, other.edges):
            raise ConfigError(f"counts of different cascades ({self.stages} {self.measure} vs {other.stages} "
                              f"{other.measure}) cannot be added")
        return ExitCounts(self.stages, self.measure, self.edges,
                          [a + b for a, b in zip(self.reached, other.reached)],
                          [a + b for a, b in zip(self.exited, other.exited)],
                          [[a + b for a, b in zip(h, g)] for h, g in zip(self.histograms, other.histograms)],
                          self.inputs + other.inputs, self.errors + other.errors)


def drift_report(config, counts: ExitCounts, alpha: float = 0.01, split: str = "test") -> dict:
    """Compare served exit fractions with the ones cascade.json expects on `split`, stage by stage (the fraction
    of the inputs reaching stage k that exit there; the last stage answers everything and is not tested).
    alpha: the family-wise false-alarm rate (Bonferroni over the tested stages). -> {"stages": [{resolution,
    expected, served, n_expected, n_served, p_value, drifted}], "drifted": bool, "alpha": alpha}. Raises
    ConfigError when the counts belong to another cascade or alpha is not in (0, 1)."""
    from scipy.stats import chi2_contingency
    check_number("alpha", alpha, 0, 1)
    if not 0 < alpha < 1:
        raise ConfigError(f"--alpha {alpha}: give a false-alarm rate in (0, 1), e.g. 0.01")
    stages = [int(s["resolution"]) for s in config.doc["stages"]]
    if counts.stages != stages or counts.measure != config.measure:
        raise ConfigError(f"the counts are of a cascade {counts.stages} ({counts.measure}); {config.path} runs "
                          f"{stages} ({config.measure}): compare counts with the cascade.json that served them")
    exp = config.doc["expected"][split]
    n, fractions = int(exp["n"]), exp["exit_fractions"]
    tested = len(stages) - 1
    rows, left = [], 1.0
    for k in range(tested):
        reach_e, exit_e = n * left, n * fractions[k]
        left -= fractions[k]
        p_e = exit_e / reach_e if reach_e else float("nan")
        reach_s, exit_s = counts.reached[k], counts.exited[k]
        p_s = exit_s / reach_s if reach_s else float("nan")
        p_value = None
        if reach_s and reach_e:
            table = np.array([[exit_e, reach_e - exit_e], [exit_s, reach_s - exit_s]], dtype=float)
            if (table.sum(axis=0) > 0).all():
                p_value = float(chi2_contingency(np.round(table), correction=True)[1])
            else:
                p_value = 1.0  # nobody (or everybody) exits on either side: nothing differs
        rows.append({"resolution": stages[k], "expected": p_e, "served": p_s, "n_expected": round(reach_e),
                     "n_served": reach_s, "p_value": p_value,
                     "drifted": p_value is not None and p_value < alpha / max(1, tested)})
    return {"stages": rows, "drifted": any(r["drifted"] for r in rows), "alpha": alpha, "split": split,
            "inputs": counts.inputs, "errors": counts.errors}


def format_drift(report: dict) -> str:
    lines = [f"exits per stage: served ({report['inputs']} inputs, {report['errors']} failed) vs expected on "
             f"{report['split']}", "",
             "| stage | exits expected | exits served | reached (expected / served) | p-value | drifted |",
             "|---|---|---|---|---|---|"]
    for r in report["stages"]:
        p = "n/a (no traffic)" if r["p_value"] is None else f"{r['p_value']:.3g}"
        served = "" if math.isnan(r["served"]) else f"{100 * r['served']:.1f}%"
        lines.append(f"| r{r['resolution']} | {100 * r['expected']:.1f}% | {served} | "
                     f"{r['n_expected']} / {r['n_served']} | {p} | {'yes' if r['drifted'] else 'no'} |")
    lines.append("")
    lines.append("traffic has drifted: the exit fractions differ from calibration; re-fit the thresholds on recent "
                 "labelled images (`rescascade build`)" if report["drifted"] else
                 f"no stage's exit fraction differs from the expected one (family-wise alpha {report['alpha']:g})")
    return "\n".join(lines)
