"""CascadeBuilder: choose a cascade from predictions and costs, the way a scikit-learn estimator fits.

    builder = CascadeBuilder(Target.best()).fit(calib, costs)
    builder.cascade_, builder.front_, builder.exact_, builder.certificate_

The choice: per confidence setting (measure x combine), a cost-aware greedy swept over tolerances (Streeter,
"Approximation Algorithms for Cascading Prediction Models", ICML 2018, §3) gives a cloud of cascades and every
single model; the target picks one; the cheapest setting wins. For encoded inputs whose decode the costs
count, cascades decoded once at a larger stage's scale (`Cascade.decode_at`, priced and judged on the logits that
decode gives) join the cloud, so the cheaper decode plan wins. With a guarantee, everything is chosen on one
part of calib and one path is certified on the other (Learn-then-Test, Angelopoulos et al. 2021;
`rescascade.guarantee`; per-stage decoding only). For few resolutions an exact search measures the greedy's gap.
"""
from __future__ import annotations

import math
import time

from rescascade.serve.errors import ConfigError, RescascadeError, check_bool, check_int, check_number
from rescascade.training.config import check_resolutions

from .serve.confidence import MEASURES
from .serve.names import is_stage_name
from .temperature import fit_temperature
from .config import stages_json
from .costs import CostModel
from .guarantee import certify_settings
from .optimizer import (DEFAULT_TOLERANCES, Candidate, Cascade, Oracle, Outcome, Stage, StageViews, best_under_budget,
                        cheapest_meeting, exact_search, oracle, pareto_front, reference_resolution, simulate,
                        tolerance_sweep)
from .predictions import Predictions
from .target import Target

COMBINES = {"off": [False], "on": [True], "auto": [False, True]}
MAX_EXACT_RESOLUTIONS = 6  # exact="auto" searches exactly up to this many resolutions (it grows exponentially)


class CascadeBuilder:
    """Choose which resolutions run in which order, and each one's confidence threshold.

    Parameters (checked at construction; ConfigError, a ValueError, names the bad one):
      target: a Target (Target.best(): the reference's accuracy on calib; .accuracy(a); .max_drop(points);
        .budget_ms(ms)), or its text form ("best", "0.712", "71.2%").
      guarantee: (epsilon, delta) or None: certify that, with probability >= 1 - delta over calib, the cascade's
        top-1 is at most epsilon below the reference's on new images (needs target best).
      measure: a confidence measure (max_prob, margin, neg_entropy) or "auto" (each, the cheapest wins).
      temperature: fit a temperature per resolution on calib (log-loss).
      combine: "off", "on" (a stage decides on the mean log-probability of the stages so far) or "auto".
      exact: "auto" (an exact search up to MAX_EXACT_RESOLUTIONS resolutions, no budget, no guarantee), "on", "off".
      reference: the single model to match (None: the most accurate on calib): a resolution, or a pool's stage name.
      resolutions: the pool (None: every resolution predicted): resolutions of one family, or the stage names
        (MODEL/rR) of a `rescascade.pool.Pool`'s predictions and costs.
      seed, guarantee_fraction: the guarantee's split of calib (select part, certify part).
      tolerances: the greedy's tolerance sweep.
      decode_plan: "auto" (compare decoding a JPEG at each stage's own scale with decoding it once at a larger
        stage's, where the costs count the decode and the predictions cover it) or "stage" (per stage only).

    Learned attributes (after fit): weights_sha256_ (the family whose predictions it was fitted on), cascade_
    (Cascade), chosen_ (Candidate: cascade, calib Outcome, finisher),
    candidates_ (the cloud), front_ (its Pareto front), reference_ (resolution), reference_outcome_ (Outcome on
    calib), measure_, combine_ (bool), temperatures_ ({resolution: T}), resolutions_, exact_ (dict or None),
    certificate_ (guarantee.Certified or None), decode_plans_ (the `Cascade.decode_at` plans compared: None, each
    stage at its own scale; R, decoded once at R's scale), plan_choices_ ({plan: the Candidate the target picks
    within that plan, None where none meets it}), oracle_ (Oracle on calib: each image at the cheapest stage
    agreeing with the reference, the limit of the saving; `captured_share` of it is the cascade's).
    """

    def __init__(self, target: Target | str | None = None, *, guarantee: tuple[float, float] | None = None,
                 measure: str = "max_prob", temperature: bool = True, combine: str = "off", exact: str = "auto",
                 reference: int | None = None, resolutions=None, seed: int = 0, guarantee_fraction: float = 0.5,
                 tolerances=DEFAULT_TOLERANCES, decode_plan: str = "auto"):
        self.target = target if isinstance(target, Target) else Target.parse(target, None, None)
        if guarantee is not None:
            try:
                eps, delta = (float(v) for v in guarantee)
            except (TypeError, ValueError):
                raise ConfigError(f"--guarantee {guarantee!r}: give (epsilon, delta), e.g. (0.01, 0.05)") from None
            if not (0 < eps < 1 and 0 < delta < 1):
                raise ConfigError(f"--guarantee EPS,DELTA needs both in (0, 1), got {eps},{delta}")
            if self.target.kind != "best":
                raise ConfigError("--guarantee certifies an accuracy drop of at most EPS against the reference; "
                                  "use it without --target/--max-drop/--budget")
            guarantee = (eps, delta)
        if measure != "auto" and measure not in MEASURES:
            raise ConfigError(f"--confidence {measure!r} is not one of {', '.join(MEASURES)}, auto")
        if combine not in COMBINES:
            raise ConfigError(f"--combine {combine!r}: use off, on or auto")
        if exact not in ("auto", "on", "off"):
            raise ConfigError(f"--exact {exact!r}: use auto, on or off")
        if not isinstance(decode_plan, str) or decode_plan not in ("auto", "stage"):
            raise ConfigError(f"--decode-plan {decode_plan!r}: use auto or stage")
        check_bool("temperature", temperature)
        check_int("seed", seed, 0)
        check_number("guarantee_fraction", guarantee_fraction, 0, 1)
        if not 0 < guarantee_fraction < 1:
            raise ConfigError(f"--guarantee-fraction {guarantee_fraction} must be in (0, 1)")
        if reference is not None:
            if isinstance(reference, str) and not is_stage_name(reference):
                raise ConfigError(f"--reference {reference!r}: give a resolution (e.g. 224) or a pool's stage name "
                                  "(MODEL/rR, Pool.stages)")
            reference = reference if is_stage_name(reference) else check_int("reference", reference, 1)
        if resolutions is not None:
            resolutions = _check_stages(resolutions)
        try:
            tolerances = tuple(check_number("tolerances", float(t), 0) for t in tolerances)
        except (TypeError, ValueError):
            raise ConfigError(f"--tolerances {tolerances!r}: give finite numbers >= 0, e.g. (0, 0.005, 0.01)") from None
        if not tolerances:
            raise ConfigError("--tolerances is empty: give at least one, e.g. (0,)")
        self.guarantee, self.measure, self.temperature, self.combine = guarantee, measure, temperature, combine
        self.exact, self.reference, self.resolutions = exact, reference, resolutions
        self.seed, self.guarantee_fraction, self.tolerances = seed, guarantee_fraction, tolerances
        self.decode_plan = decode_plan

    # ---- fitting ------------------------------------------------------------------------------------------
    def fit(self, calib: Predictions, costs: CostModel) -> "CascadeBuilder":
        """Choose on calib (logits [N, K, C] of the pool's resolutions, or of a `Pool`'s stages: `Pool.predictions`)
        with per-stage costs in ms (`CostModel.from_profile`, `Pool.costs`). Returns self.
        Raises ConfigError for arguments of the wrong kind, costs missing a resolution or a reference outside
        the pool, RescascadeError when the target is unreachable or no cascade fits the budget."""
        if not isinstance(calib, Predictions):
            raise ConfigError(f"fit(calib, costs): calib must be Predictions (rescascade.load_predictions(path)), "
                              f"got {type(calib).__name__}")
        if not isinstance(costs, CostModel):
            raise ConfigError(f"fit(calib, costs): costs must be a CostModel (CostModel.from_profile(profile)), "
                              f"got {type(costs).__name__}")
        resolutions = self.pool(calib)
        unpriced = [r for r in resolutions if r not in costs.table]
        if unpriced:
            raise ConfigError(f"the costs lack resolution(s) {unpriced} (they cover {sorted(costs.table)}); build "
                              "them from a profile of every resolution, or pass resolutions= without these")
        if self.reference is not None and self.reference not in resolutions:
            raise ConfigError(f"--reference {self.reference} is not among the resolutions {resolutions}")
        calib = calib.restrict(resolutions)
        self.resolutions_ = resolutions
        self.weights_sha256_ = calib.weights_sha256
        if self.guarantee is not None:
            self._fit_certified(calib, costs)
        else:
            self._fit_by_target(calib, costs)
        self.cascade_ = self.chosen_.cascade
        self.front_ = pareto_front(self.candidates_)
        self.exact_ = self._exact(calib, costs) if self._wants_exact() else None
        self.oracle_ = self.oracle(costs)
        return self

    def pool(self, calib: Predictions) -> list[int]:
        """The resolutions to choose from, sorted: `resolutions`, else every one predicted. Raises
        RescascadeError for one without predictions."""
        resolutions = sorted(self.resolutions or calib.resolutions)
        missing = [r for r in resolutions if r not in calib.resolutions]
        if missing:
            raise RescascadeError(f"resolution(s) {missing} have no predictions (predictions cover "
                                  f"{calib.resolutions})")
        return resolutions

    def _settings(self):
        measures = list(MEASURES) if self.measure == "auto" else [self.measure]
        return [(m, c) for m in measures for c in COMBINES[self.combine]]

    def _fit_certified(self, calib: Predictions, costs: CostModel) -> None:
        """Everything chosen on one part of calib, one path certified on the other."""
        eps, delta = self.guarantee
        measures = list(MEASURES) if self.measure == "auto" else [self.measure]
        cs = certify_settings(calib, costs, self.resolutions_, eps, delta, measures, COMBINES[self.combine],
                              self.temperature, self.reference, self.guarantee_fraction, self.seed, self.tolerances)
        self.measure_, self.combine_, self.temperatures_, self.reference_ = (cs.measure, cs.combined,
                                                                            cs.temperatures, cs.reference)
        self._views = StageViews(calib, self.measure_, self.temperatures_, self.combine_)
        self.reference_outcome_ = simulate(Cascade([Stage(self.reference_, -math.inf)]), self._views, costs)
        self.decode_plans_ = [None]
        cascade = cs.certified.cascade
        self.chosen_ = Candidate(cascade, simulate(cascade, self._views, costs), self.reference_)
        self.candidates_ = [self.chosen_]
        self.plan_choices_ = {None: self.chosen_}
        self.certificate_ = cs.certified

    def decode_plans(self, calib: Predictions, costs: CostModel) -> list[int | None]:
        """The decode plans (`Cascade.decode_at`) the choice compares: None (each stage decodes at its own scale)
        and, where the costs count the JPEG decode and both the predictions and the profile cover it, every
        resolution R of the pool at which a cascade decodes once. A guarantee certifies the per-stage plan only."""
        if self.guarantee is not None or self.decode_plan == "stage":
            return [None]
        pool = self.pool(calib)
        covered = set(calib.restrict(pool).decode_plans()) & set(costs.decode_plans())
        return [None] + [R for R in pool if R in covered]

    def _fit_by_target(self, calib: Predictions, costs: CostModel) -> None:
        """Per setting, sweep every decode plan and pick by the target; then the cheapest setting."""
        temps = {r: fit_temperature(calib.column(r), calib.labels) if self.temperature else 1.0
                 for r in self.resolutions_}
        plans = self.decode_plans_ = self.decode_plans(calib, costs)
        best = None
        for m, comb in self._settings():
            views = StageViews(calib, m, temps, comb)
            ref = self.reference if self.reference is not None else reference_resolution(views, self.resolutions_)
            ref_out = simulate(Cascade([Stage(ref, -math.inf)]), views, costs)
            cands = []
            for at in plans:  # a plan R chooses among the resolutions up to R, whose decode serves them all
                pool = [r for r in self.resolutions_ if at is None or r <= at]
                finishers = [ref] if self.target.kind == "best" else pool
                if set(finishers) <= set(pool):
                    cands += tolerance_sweep(views, costs, pool, finishers, self.tolerances, decode_at=at)
            pick = _select(cands, self.target, ref_out.accuracy, f"{m}, combine {'on' if comb else 'off'}")
            key = (pick.outcome.mean_cost, -pick.outcome.accuracy)
            if best is None or key < best[0]:
                best = (key, m, comb, views, ref, ref_out, pick, cands)
        _, self.measure_, self.combine_, self._views, self.reference_, self.reference_outcome_, self.chosen_, \
            self.candidates_ = best
        self.temperatures_ = temps
        self.plan_choices_ = {}
        for at in plans:  # what each plan would have cost: what the plan chosen saves
            within = [c for c in self.candidates_ if c.cascade.decode_at == at]
            try:
                self.plan_choices_[at] = _select(within, self.target, self.reference_outcome_.accuracy, "") \
                    if within else None
            except RescascadeError:  # the target is out of this plan's reach
                self.plan_choices_[at] = None
        self.certificate_ = None

    def _wants_exact(self) -> bool:
        return self.exact == "on" or (self.exact == "auto" and len(self.resolutions_) <= MAX_EXACT_RESOLUTIONS
                                      and self.target.kind != "budget" and self.guarantee is None)

    def _exact(self, calib: Predictions, costs: CostModel) -> dict | None:
        """The exact search at the chosen accuracy, seeded with the greedy's thresholds: the greedy's cost gap."""
        need = self.target.min_accuracy(self.reference_outcome_.accuracy)
        greedy_thresholds = {}
        for c in self.candidates_:
            if c.cascade.decode_at != self.cascade_.decode_at:
                continue
            for s in c.cascade.stages[:-1]:
                greedy_thresholds.setdefault(s.resolution, []).append(s.threshold)
        at = self.cascade_.decode_at  # searched within the chosen decode plan
        t0 = time.perf_counter()
        ex, nodes, cut = exact_search(self._views, costs, [r for r in self.resolutions_ if at is None or r <= at],
                                      int(math.ceil(need * calib.n - 1e-9)), extra_thresholds=greedy_thresholds,
                                      decode_at=at)
        if ex is None:
            return None
        ex_out = simulate(ex, self._views, costs)
        return {"cascade": ex.describe(), "stages": stages_json(ex), "calib_accuracy": ex_out.accuracy,
                "calib_cost_ms": ex_out.mean_cost, "greedy_gap": self.chosen_.outcome.mean_cost / ex_out.mean_cost - 1,
                "nodes": nodes, "truncated": cut, "seconds": round(time.perf_counter() - t0, 3)}

    # ---- using the fit ------------------------------------------------------------------------------------
    def check_fitted(self) -> None:
        """RescascadeError unless fit has run."""
        if not hasattr(self, "cascade_"):
            raise RescascadeError("this CascadeBuilder is not fitted yet: call fit(calib, costs) first")

    def simulate_calib(self, costs: CostModel) -> tuple[Outcome, Outcome]:
        """The chosen cascade and the reference on the calib predictions the choice was made on, priced by other
        `costs` (e.g. without the decode): -> (cascade Outcome, reference Outcome)."""
        self.check_fitted()
        return (simulate(self.cascade_, self._views, costs),
                simulate(Cascade([Stage(self.reference_, -math.inf)]), self._views, costs))

    def oracle(self, costs: CostModel, predictions: Predictions | None = None) -> Oracle:
        """The pool's oracle (`optimizer.oracle`) against the fitted reference, priced by `costs`, on
        `predictions` (None: the calib ones the choice was made on)."""
        self.check_fitted()
        preds = self._views.preds if predictions is None else predictions.restrict(self.resolutions_)
        return oracle(preds, costs, self.resolutions_, self.reference_)

    def simulate(self, predictions: Predictions, costs: CostModel) -> tuple[Outcome, Outcome]:
        """The chosen cascade and the reference on other predictions (e.g. test), with the fitted confidence
        setting: -> (cascade Outcome, reference Outcome), each with accuracy, mean cost (ms) and exits."""
        self.check_fitted()
        views = StageViews(predictions.restrict(self.resolutions_), self.measure_, self.temperatures_, self.combine_)
        return (simulate(self.cascade_, views, costs),
                simulate(Cascade([Stage(self.reference_, -math.inf)]), views, costs))


def _check_stages(stages) -> tuple:
    """The pool to choose from: resolutions (one family: `check_resolutions`) or a pool's stage names."""
    stages = [stages] if isinstance(stages, (int, str)) else list(stages)
    if any(isinstance(s, str) for s in stages) and not all(is_stage_name(s) for s in stages):
        raise ConfigError(f"resolutions= {stages!r}: give resolutions (e.g. 96, 128) or a pool's stage names "
                          "(MODEL/rR, Pool.stages), not a mix")
    if stages and all(is_stage_name(s) for s in stages):
        if len(set(stages)) != len(stages):
            raise ConfigError(f"resolutions= {stages} repeats a stage; give each once")
        return tuple(stages)
    return check_resolutions(stages)


def _select(cands: list[Candidate], target: Target, reference_acc: float, reachable_msg: str) -> Candidate:
    if target.kind == "budget":
        chosen = best_under_budget(cands, target.value)
        if chosen is None:
            cheapest = min(c.outcome.mean_cost for c in cands)
            raise RescascadeError(f"no cascade fits --budget {target.value:g} ms: the cheapest option costs "
                                  f"{cheapest:.4g} ms per image on this profile; raise the budget")
        return chosen
    need = target.min_accuracy(reference_acc)
    chosen = cheapest_meeting(cands, need)
    if chosen is None:
        best = max(c.outcome.accuracy for c in cands)
        raise RescascadeError(f"target accuracy {need:.4f} is unreachable: the best cascade or model reaches "
                              f"{best:.4f} on calib ({reachable_msg}); lower --target or use --target best")
    return chosen
