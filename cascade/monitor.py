"""Watching a deployed cascade: how many inputs reach and leave each stage, with the confidence histogram at
each stage, and a test of whether the traffic still exits as cascade.json expects.

The thresholds were fitted on calib and the cost was predicted from the exit fractions they give there. When the
served images change (a new camera, a new season, other classes), the fraction of the inputs reaching a stage
that exit there moves, and with it the cost and the accuracy. Per stage, a two-proportion test (Pearson's
chi-squared on the 2x2 table of exited / went on, served vs the held-out test split) says whether the served
fraction differs from the expected one; with a Bonferroni correction over the stages, any rejection means: re-fit
the thresholds on recent labelled traffic (`rescascade build`). The report also says how large a difference each
stage's test could see (80 % power): with few expected images or little traffic, only a large one.

Counts (`rescascade.serve.counts`, what the runtimes record) carry the identity of the plan that served them
(`plan_identity`: weights, stages, thresholds, temperatures, measure, ensemble, decode plan) and one id per runtime,
so counts of another plan, or the same counts given twice, are refused rather than compared.
"""
from __future__ import annotations

import math

import numpy as np

from rescascade.serve.counts import ExitCounts, plan_identity
from rescascade.serve.errors import ConfigError, check_number
from rescascade.serve.names import key_resolution, stage_name, stage_names
from rescascade.serve.plan import plan_keys

POWER = 0.8        # the power at which the report states the difference each stage's test can detect


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
    tested stages). -> {"stages": [{resolution, stage (its name), expected, served, n_expected, n_served, p_value, detectable,
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
    stages, names = plan_keys(doc), stage_names(doc)
    measure, plan = doc["confidence"]["measure"], plan_identity(doc)
    if counts.plan != plan:
        same_stages = counts.stages == stages and counts.measure == measure
        raise ConfigError(f"the counts were served by another plan ({counts.plan}: {counts.stages} {counts.measure}"
                          f"{', the same stages with other thresholds, temperatures or weights' if same_stages else ''})"
                          f"; {config.path} is plan {plan} ({stages} {measure}): compare counts with the cascade.json "
                          "(or bundle) that served them")
    if counts.names and counts.names != [names[r] for r in stages]:
        raise ConfigError(f"the counts name their stages {' -> '.join(counts.names)}, {config.path} names them "
                          f"{' -> '.join(names[r] for r in stages)}: compare counts with the cascade.json (or bundle) "
                          "that served them")
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
        rows.append({"resolution": key_resolution(stages[k]), "stage": names[stages[k]], "expected": p_e, "served": p_s,
                     "n_expected": round(reach_e),
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
        stage = r.get("stage") or stage_name(None, r["resolution"])
        lines.append(f"| {stage} | {expected} | {served} | {r['n_expected']} / {r['n_served']} | {p} | "
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
