"""`rescascade build`: predictions + profile -> cascade.json, a Pareto plot and an exit histogram.

Every figure written into cascade.json is computed on calib (where thresholds are fitted) and re-evaluated
on test (never seen by the optimizer).
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import time
from pathlib import Path

import numpy as np

from profiling.profile import read_profile
from training.fileio import UserError, sha256_file
from training.store import read_family_json, verify_files, weights_id

from .config import stages_json, write_config
from .confidence import MEASURES, fit_temperature
from .costs import CostModel
from .guarantee import certify_settings
from .optimizer import (DEFAULT_TOLERANCES, Candidate, Cascade, Stage, StageViews, best_under_budget,
                        cheapest_meeting, exact_search, pareto_front, reference_resolution, simulate,
                        tolerance_sweep)
from .predictions import Predictions, load_predictions
from .target import Target


CALIB_HALF_WIDTH = 0.01  # warn when calib pins the reference's accuracy down to less than +-1 point (95 %)


def paired_difference(casc_correct: np.ndarray, ref_correct: np.ndarray) -> dict:
    """Mean of (cascade correct - reference correct) with a 95 % normal interval (paired, same examples)."""
    d = casc_correct.astype(np.float64) - ref_correct.astype(np.float64)
    n = len(d)
    se = d.std(ddof=1) / math.sqrt(n) if n > 1 else 0.0
    return {"difference": float(d.mean()), "ci95": [float(d.mean() - 1.96 * se), float(d.mean() + 1.96 * se)],
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}


def build_warnings(calib: Predictions, profile, costs: CostModel, resolutions, guarantee) -> list[str]:
    """What makes the chosen cascade's figures less trustworthy than they look: smoke-test costs, and (without a
    guarantee, which accounts for it) a calib set too small to pin the reference's accuracy down: thresholds
    matched to it there move on new images."""
    out = []
    used = profile.batch_size <= costs.batch_size if costs.batch_aware else profile.batch_size == costs.batch_size
    rows = profile[(profile.backend == costs.backend) & (profile.precision == costs.precision) &
                   profile.resolution.isin(resolutions) & used]
    if rows.smoke.any():
        out.append("the costs come from a --quick profile (smoke figures of a few iterations); profile without "
                   "--quick before relying on them")
    accuracy = max(float((calib.column(r).argmax(-1) == calib.labels).mean()) for r in resolutions)
    half_width = 1.96 * math.sqrt(max(accuracy * (1 - accuracy), 1 / calib.n) / calib.n)
    if half_width > CALIB_HALF_WIDTH and guarantee is None:
        out.append(f"calib has {calib.n} images: the best model's calib accuracy ({100 * accuracy:.1f} %) is known to "
                   f"+-{100 * half_width:.1f} points (95 %), and a cascade matched to it there can lose about that much "
                   "on new images; use more calibration images (more held-out data, --calib-fraction) or --guarantee")
    return out


def _check_same_family(calib: Predictions, test: Predictions, wid: str, profile_meta: dict, run_dir) -> None:
    for p in (calib, test):
        if p.weights_sha256 != wid:
            raise UserError(f"{p.path} was predicted by another family (weights {p.weights_sha256[:12]}, "
                            f"{run_dir} has {wid[:12]}); re-run prediction for this family")
    if profile_meta["weights_sha256"] != wid:
        raise UserError(f"the profile measured another family (weights {profile_meta['weights_sha256'][:12]}, "
                        f"{run_dir} has {wid[:12]}); profile this family: `rescascade profile {run_dir}`")
    if calib.resolutions != test.resolutions:
        raise UserError(f"calib and test predictions cover different resolutions ({calib.resolutions} vs "
                        f"{test.resolutions}); re-run prediction")
    if calib.logits.shape[2] != test.logits.shape[2]:
        raise UserError("calib and test predictions have different class counts; re-run prediction")


def _select(cands: list[Candidate], target: Target, reference_acc: float, reachable_msg: str) -> Candidate:
    if target.kind == "budget":
        chosen = best_under_budget(cands, target.value)
        if chosen is None:
            cheapest = min(c.outcome.mean_cost for c in cands)
            raise UserError(f"no cascade fits --budget {target.value:g} ms: the cheapest option costs "
                            f"{cheapest:.4g} ms per image on this profile; raise the budget")
        return chosen
    need = target.min_accuracy(reference_acc)
    chosen = cheapest_meeting(cands, need)
    if chosen is None:
        best = max(c.outcome.accuracy for c in cands)
        raise UserError(f"target accuracy {need:.4f} is unreachable: the best cascade or model reaches {best:.4f} "
                        f"on calib ({reachable_msg}); lower --target or use --target best")
    return chosen


def run_build(run_dir, profile=None, backend: str | None = None, precision: str | None = None, batch_size: int = 1,
              target: str | None = None, max_drop: float | None = None, budget: float | None = None,
              guarantee: tuple[float, float] | None = None, measure: str = "max_prob", temperature: bool = True,
              combine: str = "off", batch_aware: bool = False, exact: str = "auto", reference: int | None = None,
              resolutions=None, out=None, plots: bool = True, seed: int = 0, guarantee_fraction: float = 0.5,
              tolerances=DEFAULT_TOLERANCES, log=print) -> dict:
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size {batch_size!r} must be an integer >= 1")
    doc = read_family_json(run_dir)
    verify_files(run_dir, doc)  # cascade.json vouches for these weights
    wid = weights_id(doc)
    calib = load_predictions(run_dir / "predictions" / "calib.npz")
    test = load_predictions(run_dir / "predictions" / "test.npz")
    profile_path = Path(profile) if profile else run_dir / "profile.csv"
    df, profile_meta = read_profile(profile_path)
    _check_same_family(calib, test, wid, profile_meta, run_dir)
    resolutions = sorted(resolutions or calib.resolutions)
    missing = [r for r in resolutions if r not in calib.resolutions]
    if missing:
        raise UserError(f"resolution(s) {missing} have no predictions (predictions cover {calib.resolutions})")
    calib, test = calib.restrict(resolutions), test.restrict(resolutions)
    tgt = Target.parse(target, max_drop, budget)
    if guarantee is not None:
        eps, delta = guarantee
        if not (0 < eps < 1 and 0 < delta < 1):
            raise UserError(f"--guarantee EPS,DELTA needs both in (0, 1), got {eps},{delta}")
        if tgt.kind != "best":
            raise UserError("--guarantee certifies an accuracy drop of at most EPS against the reference; "
                            "use it without --target/--max-drop/--budget")
    if measure != "auto" and measure not in MEASURES:
        raise UserError(f"--confidence {measure!r} is not one of {', '.join(MEASURES)}, auto")
    costs = CostModel.from_profile(df, resolutions, backend, precision, batch_size, batch_aware, str(profile_path))
    warnings = build_warnings(calib, df, costs, resolutions, guarantee)  # printed with the summary, recorded in cascade.json
    if reference is not None and reference not in resolutions:
        raise UserError(f"--reference {reference} is not among the resolutions {resolutions}")
    measures = list(MEASURES) if measure == "auto" else [measure]
    combines = {"off": [False], "on": [True], "auto": [False, True]}[combine]

    if guarantee is not None:  # everything chosen on one part of calib, one path certified on the other
        cs = certify_settings(calib, costs, resolutions, eps, delta, measures, combines, temperature, reference,
                              guarantee_fraction, seed, tolerances)
        measure, comb, temps, ref = cs.measure, cs.combined, cs.temperatures, cs.reference
        views = StageViews(calib, measure, temps, comb)
        ref_out = simulate(Cascade([Stage(ref, -math.inf)]), views, costs)
        chosen = Candidate(cs.certified.cascade, simulate(cs.certified.cascade, views, costs), ref)
        cands, extra = [chosen], {"certified": cs.certified}
    else:  # per setting, sweep and pick by the target; then the cheapest setting
        temps = {r: fit_temperature(calib.column(r), calib.labels) if temperature else 1.0 for r in resolutions}
        best_pick = None
        for m in measures:
            for comb in combines:
                views = StageViews(calib, m, temps, comb)
                ref = reference if reference is not None else reference_resolution(views, resolutions)
                ref_out = simulate(Cascade([Stage(ref, -math.inf)]), views, costs)
                finishers = [ref] if tgt.kind == "best" else resolutions
                cands = tolerance_sweep(views, costs, resolutions, finishers, tolerances)
                pick = _select(cands, tgt, ref_out.accuracy, f"{m}, combine {'on' if comb else 'off'}")
                key = (pick.outcome.mean_cost, -pick.outcome.accuracy)
                if best_pick is None or key < best_pick[0]:
                    best_pick = (key, m, comb, views, ref, ref_out, pick, cands)
        _, measure, comb, views, ref, ref_out, chosen, cands = best_pick
        extra = {}
    front = pareto_front(cands)

    # --- exact search for small pools: the greedy's gap -------------------------------------------------------
    exact_info = None
    if exact == "on" or (exact == "auto" and len(resolutions) <= 6 and tgt.kind != "budget" and guarantee is None):
        need = tgt.min_accuracy(ref_out.accuracy)
        greedy_thresholds = {}
        for c in cands:
            for s in c.cascade.stages[:-1]:
                greedy_thresholds.setdefault(s.resolution, []).append(s.threshold)
        t0 = time.perf_counter()
        ex, nodes, cut = exact_search(views, costs, resolutions, int(math.ceil(need * calib.n - 1e-9)),
                                      extra_thresholds=greedy_thresholds)
        secs = time.perf_counter() - t0
        if ex is not None:
            ex_out = simulate(ex, views, costs)
            exact_info = {"cascade": ex.describe(), "stages": stages_json(ex), "calib_accuracy": ex_out.accuracy,
                          "calib_cost_ms": ex_out.mean_cost,
                          "greedy_gap": chosen.outcome.mean_cost / ex_out.mean_cost - 1, "nodes": nodes,
                          "truncated": cut, "seconds": round(secs, 3)}

    # --- figures on calib and test -----------------------------------------------------------------------------
    cascade = chosen.cascade
    test_views = StageViews(test, measure, temps, comb)
    casc_test = simulate(cascade, test_views, costs)
    ref_test = simulate(Cascade([Stage(ref, -math.inf)]), test_views, costs)
    ref_cost = ref_out.mean_cost
    expected = {
        "calib": {**chosen.outcome.summary(ref_cost), "reference_accuracy": ref_out.accuracy},
        "test": {**casc_test.summary(ref_test.mean_cost), "reference_accuracy": ref_test.accuracy,
                 "paired_difference": paired_difference(casc_test.correct_mask, ref_test.correct_mask)},
    }
    out = Path(out) if out else run_dir / "cascade.json"
    if out.is_dir():
        out = out / "cascade.json"
    # relative to cascade.json: the pair stays deployable when copied together
    family_path = os.path.relpath(run_dir.resolve(), out.parent.resolve())
    config = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "family": {"path": str(family_path), "family_json_sha256": sha256_file(run_dir / "family.json"),
                   "weights_sha256": wid, "resolutions": doc["resolutions"], "num_classes": doc["num_classes"]},
        "profile": {"path": str(profile_path.resolve()), **costs.describe(), "device": profile_meta["device"]},
        "confidence": {"measure": measure, "temperatures": {str(r): temps[r] for r in resolutions},
                       "temperature_fitted_on": (None if not temperature else
                                                 "calib" if guarantee is None else "the select part of calib"),
                       "combine": comb},
        "stages": stages_json(cascade),
        "reference": {"resolution": ref, "accuracy_calib": ref_out.accuracy, "accuracy_test": ref_test.accuracy,
                      "cost_ms": ref_cost},
        "target": {"kind": tgt.kind, "value": tgt.value, "description": tgt.describe()},
        "expected": expected,
        "optimizer": {"method": "streeter-greedy" if cascade.method == "greedy" else cascade.method,
                      "tolerance": cascade.tolerance, "tolerances": list(tolerances), "candidates": len(cands),
                      "pareto_front": [{"cascade": c.cascade.describe(), "accuracy": c.outcome.accuracy,
                                        "cost_ms": c.outcome.mean_cost} for c in front],
                      "exact": exact_info, "seconds": round(time.perf_counter() - t_start, 3)},
        "single_model_wins": len(cascade.stages) == 1,
        "warnings": warnings,
    }
    if "certified" in extra:
        config["guarantee"] = extra["certified"].describe()
    if plots:  # before cascade.json: an interrupt leaves the old config with its own plots
        from .plots import exit_histogram, pareto_plot
        title = f"{doc['arch']} family, {costs.backend} {costs.precision} batch {costs.batch_size}"
        pareto_plot(out.with_name(out.stem + "_pareto.png"), cands, front, chosen, ref_cost, ref_out.accuracy, title)
        exit_histogram(out.with_name(out.stem + "_exits.png"), [f"r{r}" for r in cascade.resolutions],
                       chosen.outcome.exit_fractions, casc_test.exit_fractions)
    write_config(out, config)
    log(format_build_summary(config, out))
    return config


def _temperature_words(confidence: dict) -> str:
    fitted = confidence.get("temperature_fitted_on")
    return f"temperature-scaled (fitted on {fitted})" if fitted else "no temperature scaling"


def format_build_summary(config: dict, out) -> str:
    e, ref = config["expected"], config["reference"]
    prof = config["profile"]
    stages = [f"r{s['resolution']}" + (f" (conf >= {s['threshold']:.4g})" if s["threshold"] is not None else "")
              for s in config["stages"]]
    lines = [f"cascade: {' -> '.join(stages)}",
             f"confidence: {config['confidence']['measure']}, {_temperature_words(config['confidence'])}, "
             f"combine {'on' if config['confidence']['combine'] else 'off'}; costs: {prof['backend']} "
             f"{prof['precision']} batch {prof['batch_size']}{' (batch-aware)' if prof['batch_aware'] else ''}",
             "",
             "| split | cascade top-1 | reference r%d top-1 | cascade ms/img | reference ms/img | cost vs reference | exits per stage |" % ref["resolution"],
             "|---|---|---|---|---|---|---|"]
    for split in ("calib", "test"):
        x = e[split]
        ref_ms = x["mean_cost_ms"] / x["cost_vs_reference"]
        lines.append(f"| {split} | {100 * x['accuracy']:.2f}% | {100 * x['reference_accuracy']:.2f}% | "
                     f"{x['mean_cost_ms']:.3f} | {ref_ms:.3f} | {x['cost_vs_reference']:.3f}x | "
                     f"{' / '.join(f'{100 * f:.0f}%' for f in x['exit_fractions'])} |")
    pd_ = e["test"]["paired_difference"]
    lines.append(f"\ntest: cascade - reference = {100 * pd_['difference']:+.2f} points "
                 f"(95% CI {100 * pd_['ci95'][0]:+.2f} .. {100 * pd_['ci95'][1]:+.2f})")
    ex = config["optimizer"].get("exact")
    if ex:
        lines.append(f"exact search ({ex['nodes']} nodes, {ex['seconds']} s): {ex['cascade']} at "
                     f"{ex['calib_cost_ms']:.3f} ms; greedy gap {100 * ex['greedy_gap']:+.1f}%")
    if "guarantee" in config:
        g = config["guarantee"]
        p = f"p = {g['p_value']:.3g}" if g["p_value"] is not None else "nothing certified: the reference alone"
        lines.append(f"guarantee: {g['statement']} (Learn-then-Test on {g['n_certify']} held-out calib images, {p})")
    lines += [f"warning: {w}" for w in config.get("warnings", [])]
    if config["single_model_wins"]:
        lines.append(f"no cascade beats the single model r{config['stages'][0]['resolution']} here "
                     f"({prof['backend']}, batch {prof['batch_size']}): the config is the single model")
    lines.append(f"wrote {out}")
    return "\n".join(lines)
