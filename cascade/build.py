"""`rescascade build`: predictions + profile -> cascade.json, a Pareto plot and an exit histogram.

Every figure written into cascade.json is computed on calib (where thresholds are fitted) and re-evaluated
on test (never seen by the optimizer).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

from rescascade.profiling.profile import Profile
from rescascade.serve.errors import ConfigError, RescascadeError, check_int
from rescascade.serve.fileio import not_an_input, output_file
from rescascade.serve.names import stage_label, stage_names
from rescascade.serve.plan import plan_keys, plan_reference
from rescascade.training.store import family_files, read_family_json, verify_files, weights_id

from .builder import CascadeBuilder
from .config import CascadeConfig, config_path
from .costs import CostModel
from .optimizer import DEFAULT_TOLERANCES
from .predictions import Predictions, load_predictions
from .refine import calibration_inputs, refine as refine_choice
from .target import Target

REFINE_FEW = 50  # calib images below which a cost check's ratios vary more than the differences it decides
REFINE_AUTO = 200  # calib images the default cost check runs on (where the calib images are at hand)
CALIB_HALF_WIDTH = 0.01  # warn when calib pins the reference's accuracy down to less than +-1 point (95 %)


def build_warnings(calib: Predictions, profiles, costs: CostModel, stages, guarantee) -> list[str]:
    """What makes the chosen cascade's figures less trustworthy than they look: smoke-test costs, and (without a
    guarantee, which accounts for it) a calib set too small to pin the reference's accuracy down: thresholds
    matched to it there move on new images. profiles: [(a profile's table, the resolutions it prices)], one per
    family (a pool's members); stages: the stage keys chosen among."""
    out = []
    smoke = False
    for df, resolutions in profiles:
        used = df.batch_size <= costs.batch_size if costs.batch_aware else df.batch_size == costs.batch_size
        rows = df[(df.backend == costs.backend) & (df.precision == costs.precision) &
                  df.resolution.isin(resolutions) & used]
        smoke = smoke or bool(rows.smoke.any())
    if smoke:
        out.append("the costs come from a --quick profile (smoke figures of a few iterations); profile without "
                   "--quick before relying on them")
    accuracy = max(float((calib.column(r).argmax(-1) == calib.labels).mean()) for r in stages)
    half_width = 1.96 * math.sqrt(max(accuracy * (1 - accuracy), 1 / calib.n) / calib.n)
    if half_width > CALIB_HALF_WIDTH and guarantee is None:
        out.append(f"calib has {calib.n} images: the best model's calib accuracy ({100 * accuracy:.1f} %) is known to "
                   f"+-{100 * half_width:.1f} points (95 %), and a cascade matched to it there can lose about that much "
                   "on new images; use more calibration images (more held-out data, --calib-fraction) or --guarantee")
    return out


def _unweighed_plans(builder: CascadeBuilder, calib: Predictions, costs: CostModel, pool, profile_path) -> list[str]:
    """Why a build that counts the decode did not weigh decoding once, where the predictions would allow it."""
    if not costs.decode_ms or builder.decode_plan != "auto" or len(builder.decode_plans_) > 1 or \
            not calib.restrict(pool).decode_plans():
        return []
    if builder.guarantee is not None:
        return ["--guarantee certifies per-stage decoding only: decoding each JPEG once was not weighed"]
    return [f"{profile_path} times no preprocessing from a larger stage's decode, so decoding each JPEG once was not "
            "weighed; re-run `rescascade profile` to time it"]


def _check_same_family(calib: Predictions, test: Predictions, wid: str, profile_meta: dict, run_dir) -> None:
    for p in (calib, test):
        if p.weights_sha256 != wid:
            raise RescascadeError(f"{p.path} was predicted by another family (weights {p.weights_sha256[:12]}, "
                                  f"{run_dir} has {wid[:12]}); re-run prediction for this family")
    if profile_meta["weights_sha256"] != wid:
        raise RescascadeError(f"the profile measured another family (weights {profile_meta['weights_sha256'][:12]}, "
                              f"{run_dir} has {wid[:12]}); profile this family: `rescascade profile {run_dir}`")
    if calib.resolutions != test.resolutions:
        raise RescascadeError(f"calib and test predictions cover different resolutions ({calib.resolutions} vs "
                              f"{test.resolutions}); re-run prediction")
    if calib.logits.shape[2] != test.logits.shape[2]:
        raise RescascadeError("calib and test predictions have different class counts; re-run prediction")


def run_build(run_dir, profile=None, backend: str | None = None, precision: str | None = None, batch_size: int = 1,
              target: str | None = None, max_drop: float | None = None, budget: float | None = None,
              guarantee: tuple[float, float] | None = None, measure: str = "max_prob", temperature: bool = True,
              combine: str = "off", batch_aware: bool = False, exact: str = "auto", reference: int | str | None = None,
              resolutions=None, out=None, plots: bool = True, seed: int = 0, guarantee_fraction: float = 0.5,
              tolerances=DEFAULT_TOLERANCES, source_size="auto", refine: int | str = "auto",
              decode_plan: str = "auto", log=print) -> dict:
    """`rescascade build` on a family directory: read its predictions and profile, fit a CascadeBuilder (see it
    for the choice's parameters), and write cascade.json (default RUN_DIR/cascade.json) with the figures on calib
    and test, the Pareto plot and the exit histogram. Returns the config written. source_size: (width, height)
    or "WxH" of the encoded images to be served, whose JPEG decode the profile timed (profile --decode-sizes);
    "auto": the profile's (none if it timed no decoding); None: count no decode (decoded inputs). refine: run
    the choice, its closest alternatives and the reference with the cascade runtime (the profile's backend, on
    this machine) on this many calib images, re-estimate the costs from its stage timings and choose again
    (cascade/refine.py); cascade.json's "cost_check" records predicted, refined and measured cost ratios. "auto"
    (the default): on REFINE_AUTO calib images where they are at hand as the runtime gets them, else not (a
    warning says why): the profile alone mispredicts the runtime by 10-50 % on small models and at batch 1 (per-call
    overheads, shrinking batches); 0: off.
    decode_plan: "auto" also weighs decoding each JPEG once at a larger stage's scale (CascadeBuilder), "stage"
    decodes per stage only.
    run_dir may also list several family directories: a pool (`pool.Pool`, its members checked alike), whose
    stages MODEL/rR of every member the cascade chooses among, each priced by its member's own profile.csv
    (`profile` must be None); `reference` and `resolutions` then name stages (MODEL/rR), and `out` is required
    (a pool's cascade.json belongs to no one member). Raises RescascadeError for files of another family,
    ConfigError for bad values."""
    run_dirs = _run_dirs(run_dir)
    pooled = len(run_dirs) > 1
    run_dir = run_dirs[0]
    t_start = time.perf_counter()
    check_int("batch_size", batch_size, 1)
    if refine != "auto":
        check_int("refine", refine, 0)
    if pooled and profile is not None:
        raise ConfigError("--profile names one family's profile: a pool's members are each priced by their own "
                          "RUN_DIR/profile.csv; leave --profile out")
    if pooled and out is None:
        raise ConfigError("a pool's cascade.json belongs to no one member: give --out (a file, or a directory for "
                          "DIR/cascade.json)")
    out = config_path(out if out is not None else run_dir, "--out")
    inputs = [f for d in run_dirs for f in family_files(d)]
    for path in (out, *([out.with_name(out.stem + "_pareto.png"), out.with_name(out.stem + "_exits.png")] if plots
                        else [])):
        output_file(path)  # before the work: an output that cannot be written fails now, not after the fit
        not_an_input(path, inputs)
    builder = CascadeBuilder(Target.parse(target, max_drop, budget), guarantee=guarantee, measure=measure,
                             temperature=temperature, combine=combine, exact=exact, reference=reference,
                             resolutions=resolutions, seed=seed, guarantee_fraction=guarantee_fraction,
                             tolerances=tolerances, decode_plan=decode_plan)
    if pooled:
        from .pool import Pool
        fitted_on = Pool.load(run_dirs)
        for m in fitted_on.members:
            verify_files(m.run_dir, m.doc)  # cascade.json vouches for these weights
        calib, test = fitted_on.predictions("calib"), fitted_on.predictions("test")
        stages = builder.pool(calib)
        profiles = [(m.profile, str(m.profile.path), m.predictions["calib"].resolutions) for m in fitted_on.members]
        no_decode = source_size == "auto" and any(m.profile.decode is None for m in fitted_on.members)
        costs = fitted_on.costs(backend, precision, batch_size, batch_aware,
                                None if no_decode else source_size)
        docs, profile = [m.doc for m in fitted_on.members], None
        arch = " + ".join(m.model for m in fitted_on.members) + " pool"
    else:
        fitted_on = run_dir
        doc = read_family_json(run_dir)
        verify_files(run_dir, doc)  # cascade.json vouches for these weights
        wid = weights_id(doc)
        calib = load_predictions(run_dir / "predictions" / "calib.npz")
        test = load_predictions(run_dir / "predictions" / "test.npz")
        profile_path = Path(profile) if profile else run_dir / "profile.csv"
        profile = Profile.load(profile_path)
        _check_same_family(calib, test, wid, profile.meta, run_dir)
        stages = builder.pool(calib)
        no_decode = source_size == "auto" and profile.decode is None
        costs = CostModel.from_profile(profile, stages, backend, precision, batch_size, batch_aware,
                                       str(profile_path), None if no_decode else source_size,
                                       doc.get("preprocessing", {}).get("decode_scale", "full"))
        profiles, docs, arch = [(profile, str(profile_path), stages)], [doc], f"{doc['arch']} family"
    # printed with the summary, in cascade.json
    warnings = build_warnings(calib, [(prof.table, res) for prof, _, res in profiles], costs, stages, guarantee)
    if no_decode and any(d.get("preprocessing", {}).get("held_out_files", True) for d in docs):
        warnings.append(f"{' and '.join(p for prof, p, _ in profiles if prof.decode is None)} times no JPEG decoding: "
                        "the costs are those of decoded inputs; re-run `rescascade profile` to count the decode "
                        "encoded images pay")
    inputs = None
    if refine == "auto":
        refine = min(REFINE_AUTO, calib.n)
        try:  # the calib images as the runtime gets them: where they are not at hand, no cost check
            inputs = calibration_inputs(SimpleNamespace(family_dir=run_dir), calib, refine, bool(costs.decode_ms),
                                        lambda s: None)
        except RescascadeError as e:
            warnings.append(f"the costs were not checked with the runtime ({e.cli_message}); its ratios can differ "
                            "from the profile's by 10-50 %: `rescascade eval` measures them")
            refine = 0
    if refine and costs.batch_size > 1 and not batch_aware:
        warnings.append(f"the cost check (--refine) at batch {costs.batch_size} without --batch-aware: the costs price "
                        "every stage at full batches, so the later stages' smaller batches stay unpriced; add "
                        "--batch-aware")
    if 0 < refine < REFINE_FEW:
        warnings.append(f"--refine {refine}: the cost check runs on {refine} images; its ratios are noisy below "
                        f"{REFINE_FEW}")
    builder.fit(calib, costs)
    if not pooled:
        warnings += _unweighed_plans(builder, calib, costs, stages, profile_path)
    check = None
    if refine:
        def make_runner(b, c):
            from .runtime import CascadeRunner
            # no warm-up at load: the refinement's first pass over the calib images is its warm-up
            return CascadeRunner(CascadeConfig.from_builder(b, fitted_on, profile, c, test), warmup=False)
        check = refine_choice(builder, calib, costs, make_runner, refine, log=log, inputs=inputs)
        profile_costs, costs = costs, check.pop("costs")
    cascade_config = CascadeConfig.from_builder(builder, fitted_on, profile, costs, test, warnings)
    config = cascade_config.doc
    if check is not None:  # on test too: the ratio the profile's costs give the final choice, and the refined one
        for suffix, (before, after) in {"": (profile_costs, costs), "_decoded_inputs": (
                profile_costs.without_decode(), costs.without_decode())}.items():
            if suffix and not costs.decode_ms:
                continue
            (c0, r0), (c1, r1) = builder.simulate(test, before), builder.simulate(test, after)
            check.setdefault("test", {}).update({f"predicted_ratio{suffix}": c0.mean_cost / r0.mean_cost,
                                                 f"refined_ratio{suffix}": c1.mean_cost / r1.mean_cost})
        config["cost_check"] = check
        config["profile"]["refined"] = True  # the per-image costs above are the refined ones
    config["optimizer"]["seconds"] = round(time.perf_counter() - t_start, 3)
    if plots:  # before cascade.json: an interrupt leaves the old config with its own plots
        from .plots import exit_histogram, pareto_plot
        title = f"{arch}, {costs.backend} {costs.precision} batch {costs.batch_size}"
        pareto_plot(out.with_name(out.stem + "_pareto.png"), builder.candidates_, builder.front_, builder.chosen_,
                    builder.reference_outcome_.mean_cost, builder.reference_outcome_.accuracy, title)
        exit_histogram(out.with_name(out.stem + "_exits.png"), plan_names(config),
                       builder.chosen_.outcome.exit_fractions, config["expected"]["test"]["exit_fractions"])
    cascade_config.save(out)
    log(format_build_summary(cascade_config.doc, out))
    return cascade_config.doc


def _run_dirs(run_dir) -> list[Path]:
    """The family directories `build` was given: one (a path), or a pool's (a list of 2 or more, each once)."""
    if isinstance(run_dir, (str, os.PathLike)):
        return [Path(run_dir)]
    if not isinstance(run_dir, (list, tuple)) or not run_dir or \
            not all(isinstance(d, (str, os.PathLike)) for d in run_dir):
        raise ConfigError(f"run_dir {run_dir!r}: give a family directory, or a list of them (a pool)")
    return [Path(d) for d in run_dir]


def plan_names(config: dict) -> list[str]:
    """The names of a cascade.json's stages, in order (MODEL/rR)."""
    names = stage_names(config)
    return [names[key] for key in plan_keys(config)]


def _temperature_words(confidence: dict) -> str:
    fitted = confidence.get("temperature_fitted_on")
    return f"temperature-scaled (fitted on {fitted})" if fitted else "no temperature scaling"


def oracle_lines(expected: dict) -> list[str]:
    """The distance from the limit: the oracle's cost (each image at the pool's cheapest stage giving the
    reference's answer) and the share of its saving the cascade captures, on calib and test (none for a config
    written before they were recorded). Above 100 % the cascade answers some images otherwise than the reference
    (at the reference's accuracy), which the oracle does not."""
    oracles = [(split, expected[split]["oracle"]) for split in ("calib", "test") if expected[split].get("oracle")]
    if not oracles:
        return []

    def share(o: dict) -> str:
        return "-, the oracle saves nothing" if o["captured"] is None else f"{100 * o['captured']:.0f} %"
    parts = [f"{split} {o['cost_vs_reference']:.3f}x (the cascade captures {share(o)} of that saving)"
             for split, o in oracles]
    over = any(o["captured"] is not None and o["captured"] > 1 for _, o in oracles)
    return ["oracle, each image at the cheapest stage giving the reference's answer: " + "; ".join(parts) +
            ("; above 100 %: the cascade answers some images otherwise than the reference, at its accuracy"
             if over else "")]


def format_build_summary(config: dict, out) -> str:
    e = config["expected"]
    prof = config["profile"]
    keys = plan_keys(config)
    stages = [stage_label(k) + (f" (conf >= {s['threshold']:.4g})" if s["threshold"] is not None else "")
              for k, s in zip(keys, config["stages"])]
    once = config.get("decode", {}).get("resolution")
    lines = [f"cascade: {' -> '.join(stages)}" + (f" (JPEGs decoded once, at r{once}'s scale)" if once else ""),
             f"confidence: {config['confidence']['measure']}, {_temperature_words(config['confidence'])}, "
             f"combine {'on' if config['confidence']['combine'] else 'off'}; costs: {prof['backend']} "
             f"{prof['precision']} batch {prof['batch_size']}{' (batch-aware)' if prof['batch_aware'] else ''}, "
             + (f"JPEG decode of {'x'.join(map(str, prof['decode']['source_size']))} included" if 'decode' in prof
                else "no decode counted (decoded inputs)"),
             "",
             f"| split | cascade top-1 | reference {stage_label(plan_reference(config))} top-1 | cascade ms/img | "
             "reference ms/img | cost vs reference | exits per stage |",
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
    lines += oracle_lines(e)
    ex = config["optimizer"].get("exact")
    if ex:
        lines.append(f"exact search ({ex['nodes']} nodes, {ex['seconds']} s): {ex['cascade']} at "
                     f"{ex['calib_cost_ms']:.3f} ms; greedy gap {100 * ex['greedy_gap']:+.1f}%")
    if "guarantee" in config:
        g = config["guarantee"]
        p = f"p = {g['p_value']:.3g}" if g["p_value"] is not None else "nothing certified: the reference alone"
        lines.append(f"guarantee: {g['statement']} (Learn-then-Test on {g['n_certify']} held-out calib images, {p})")
    if "cost_check" in config:
        c = config["cost_check"]
        lines.append(f"cost check on {c['images']} calib images ({c['inputs']} inputs, {c['repeats']} passes): cost vs "
                     f"reference predicted {c['predicted_ratio']:.3f}x by the profile, {c['refined_ratio']:.3f}x "
                     f"refined, {c['measured_ratio']:.3f}x measured" +
                     (f"; first choice {c['first_choice']}, chosen again" if c["first_choice"] != c["chosen"] else ""))
    plans = config["optimizer"].get("decode_plans", [])
    if len(plans) > 1:
        lines.append("decode plans, each one's cheapest cascade at the target (calib ms/image): " + "; ".join(
            f"{p['plan']}: " + (f"{p['cascade']} at {p['calib_cost_ms']:.3f}" if p["cascade"] else "none")
            for p in plans))
    lines += [f"warning: {w}" for w in config.get("warnings", [])]
    if config["single_model_wins"]:
        lines.append(f"no cascade beats the single model {stage_label(keys[0])} here "
                     f"({prof['backend']}, batch {prof['batch_size']}): the config is the single model")
    lines.append(f"wrote {out}")
    return "\n".join(lines)
