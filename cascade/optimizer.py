"""Choosing a cascade: Streeter-style cost-aware greedy, exact search for small pools, and the Pareto sweep.

A cascade is an ordered list of stages (resolution, threshold); an input exits at the first stage whose
confidence reaches its threshold, and the last stage answers everything. In a pool of several families
(`pool.Pool`) a stage is keyed by its name, MODEL/rR, where one family keys it by its resolution.

Greedy (after Streeter, "Approximation Algorithms for Cascading Prediction Models", ICML 2018): candidates are
(resolution, threshold) with thresholds at confidence quantiles of the still-unresolved calib examples. A
candidate is *admissible* when, on the examples it would answer, it is at least as accurate as the reference
model on those same examples (minus a tolerance). Repeatedly add the admissible candidate that resolves the
most examples per unit of added cost, while it lowers the expected cost; finish with the reference. Stages run
in increasing measured cost (`stage_order`: in one family, as a rule, increasing resolution), the same chains the
exact search enumerates. With tolerance 0 the cascade is at least as accurate as the reference on calib, by
construction.

Exact search enumerates every chain in that order over a threshold grid (branch and bound on packed bitsets),
under the global accuracy constraint, to measure the greedy's gap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .serve.confidence import combine, confidence, log_probs
from .serve.names import stage_label
from .costs import CostModel
from .predictions import Predictions

DEFAULT_TOLERANCES = (0.0, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


@dataclass(frozen=True)
class Stage:
    resolution: int | str  # a family's resolution, or a pool's stage name (MODEL/rR, `pool.Pool`)
    threshold: float  # -inf for the last stage


@dataclass
class Cascade:
    stages: list[Stage]
    tolerance: float | None = None  # the greedy tolerance that produced it (None: exact / single model)
    method: str = "greedy"
    # the decode plan for encoded inputs: None, each stage decodes a JPEG at its own DCT scale; a resolution R,
    # every stage uses one decode at the scale R's stage needs (decoded once, at the cascade's first stage)
    decode_at: int | None = None

    @property
    def resolutions(self) -> list[int]:
        return [s.resolution for s in self.stages]

    def key(self) -> tuple:
        return tuple((s.resolution, round(s.threshold, 9)) for s in self.stages) + (self.decode_at,)

    def describe(self) -> str:
        parts = [stage_label(s.resolution) + (f"@{s.threshold:.4g}" if math.isfinite(s.threshold) else "")
                 for s in self.stages]
        return " -> ".join(parts) + (f" (decoded once at r{self.decode_at}'s scale)" if self.decode_at else "")


@dataclass
class StageViews:
    """What each stage sees on a set of examples: its prediction, confidence and correctness.

    measure: max_prob | margin | entropy; temperatures: per resolution; combined: the free ensemble, where a
    stage's output is the mean log-probability of every stage run so far (so it depends on the prefix).
    at: a cascade's decode_at (None: each stage's own decode; R: the logits of every stage decoded at R's scale,
    `Predictions.column(r, at)`).
    """
    preds: Predictions
    measure: str = "max_prob"
    temperatures: dict[int, float] = field(default_factory=dict)
    combined: bool = False

    def __post_init__(self):
        self._cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._logp: dict[tuple[int, int | None], np.ndarray] = {}  # (resolution, decode) -> log-probabilities

    def logp(self, r: int, at: int | None = None) -> np.ndarray:
        key = (r, self.preds.decode_key(r, at))
        if key not in self._logp:
            self._logp[key] = log_probs(self.preds.column(r, at), self.temperatures.get(r, 1.0))
        return self._logp[key]

    def ranked(self, prefix: tuple[int, ...], r: int, reference: int, at: int | None = None):
        """Every example ranked by stage r's confidence after `prefix`, most confident first (stable): (confidence
        ascending [N] float64, cumulative count of stage r correct [N] int64, of the reference correct [N] int64,
        both in the descending order). What the greedy's first step ranks for every tolerance of a path."""
        key = ("ranked", tuple(prefix) if self.combined else (), r, reference, self.preds.decode_key(r, at))
        if key not in self._cache:
            conf, corr = self.view(prefix, r, at)
            order = np.argsort(-conf, kind="stable")
            self._cache[key] = (np.ascontiguousarray(conf[order][::-1]), np.cumsum(corr[order]),
                                np.cumsum(self.view((), reference, at)[1][order]))
        return self._cache[key]

    def view(self, prefix: tuple[int, ...], r: int, at: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(confidence [N] float64, correct [N] bool) of stage r after the stages in prefix, decoded per `at`."""
        key = (tuple(prefix) if self.combined else (), r, self.preds.decode_key(r, at))
        if key not in self._cache:
            if self.combined and prefix:
                lp = combine([self.logp(p, at) for p in prefix] + [self.logp(r, at)])
            else:
                lp = self.logp(r, at)
            conf = confidence(lp, self.measure).astype(np.float64)
            correct = lp.argmax(-1) == self.preds.labels
            if not self.combined:  # the full log-probs are no longer needed
                self._logp.pop((r, self.preds.decode_key(r, at)), None)
            self._cache[key] = (conf, correct)
        return self._cache[key]


@dataclass
class Outcome:
    accuracy: float
    correct: int
    n: int
    mean_cost: float
    exit_fractions: list[float]
    reach_fractions: list[float]
    exit_stage: np.ndarray
    correct_mask: np.ndarray

    def summary(self, reference_cost: float | None = None) -> dict:
        d = {"accuracy": self.accuracy, "n": self.n, "mean_cost_ms": self.mean_cost,
             "exit_fractions": self.exit_fractions}
        if reference_cost:
            d["cost_vs_reference"] = self.mean_cost / reference_cost
        return d


def paired_difference(casc_correct: np.ndarray, ref_correct: np.ndarray) -> dict:
    """Mean of (cascade correct - reference correct) with a 95 % normal interval (paired, same examples)."""
    d = casc_correct.astype(np.float64) - ref_correct.astype(np.float64)
    n = len(d)
    se = d.std(ddof=1) / math.sqrt(n) if n > 1 else 0.0
    return {"difference": float(d.mean()), "ci95": [float(d.mean() - 1.96 * se), float(d.mean() + 1.96 * se)],
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}


def simulate(cascade: Cascade, views: StageViews, costs: CostModel) -> Outcome:
    """Run the cascade over stored logits: who exits where, accuracy, expected cost."""
    n = views.preds.n
    remaining = np.ones(n, dtype=bool)
    exit_stage = np.full(n, -1, dtype=np.int64)
    correct = np.zeros(n, dtype=bool)
    reach, exits, prefix = [], [], ()
    for k, stage in enumerate(cascade.stages):
        reach.append(np.count_nonzero(remaining) / n)  # = remaining.mean(), without its overhead
        conf, corr = views.view(prefix, stage.resolution, cascade.decode_at)
        last = k == len(cascade.stages) - 1
        out = remaining if last else remaining & (conf >= stage.threshold)
        exit_stage[out] = k
        correct[out] = corr[out]
        exits.append(np.count_nonzero(out) / n)
        remaining &= ~out
        prefix = prefix + (stage.resolution,)
    n_correct = int(np.count_nonzero(correct))
    return Outcome(n_correct / n, n_correct, n,
                   costs.expected(cascade.resolutions, reach, cascade.decode_at),
                   [float(e) for e in exits], [float(r) for r in reach], exit_stage, correct)


@dataclass
class Oracle:
    """The limit of a pool's cascades on a set of examples: each example answered by the cheapest single stage
    whose top-1 equals the reference's (`oracle`). mean_cost: ms per image; exit_fractions: the share of examples
    each stage answers, per stage of `stages` (cheapest first)."""
    stages: list[int | str]
    exit_fractions: list[float]
    mean_cost: float
    n: int

    def summary(self, reference_cost: float, cascade_cost: float) -> dict:
        """As cascade.json records it: its cost, its cost vs the reference, the share of the saving it shows
        possible that a cascade costing `cascade_cost` captures (`captured_share`), and where it exits."""
        return {"mean_cost_ms": self.mean_cost, "cost_vs_reference": self.mean_cost / reference_cost,
                "captured": captured_share(cascade_cost / reference_cost, self.mean_cost / reference_cost),
                "stages": self.stages, "exit_fractions": self.exit_fractions}


def oracle(preds: Predictions, costs: CostModel, resolutions, reference: int | str) -> Oracle:
    """The oracle that exits each example at the cheapest stage of the pool agreeing with the reference (same
    top-1; the reference always does), paying that stage alone as a single model would (its inference,
    preprocessing and decode). No cascade of these stages that keeps the reference's answers costs less (but for a
    decode one stage leaves the next): it also pays the stages it runs before the exit, and knows no labels.
    preds: logits [N, R, C]; costs: per-stage ms; resolutions: the pool (with the reference). Its ratio to the
    reference's cost is the saving possible with these stages; `captured_share` says how much of it a cascade
    takes."""
    single = {r: costs.expected([r], [1.0]) for r in resolutions}
    order = stage_order(costs, resolutions)
    answer = preds.column(reference).argmax(-1)
    left = np.ones(preds.n, dtype=bool)
    fractions, total = [], 0.0
    for r in order:
        takes = left & (preds.column(r).argmax(-1) == answer) if r != reference else left.copy()
        left &= ~takes
        fractions.append(np.count_nonzero(takes) / preds.n)
        total += fractions[-1] * single[r]
    return Oracle(order, [float(f) for f in fractions], float(total), preds.n)


def captured_share(cascade_ratio: float, oracle_ratio: float) -> float | None:
    """(1 - cascade cost ratio) / (1 - oracle cost ratio), both vs the reference: the share of the oracle's saving
    a cascade captures (1: all of it; 0: none; negative: it costs more than the reference; above 1 only where it
    answers images otherwise than the reference, right where the reference is wrong and wrong where it is right,
    which the oracle does not). None where the
    oracle saves nothing (the reference is the pool's cheapest stage agreeing with itself everywhere)."""
    return (1 - cascade_ratio) / (1 - oracle_ratio) if oracle_ratio < 1 - 1e-12 else None


def stage_order(costs: CostModel, resolutions) -> list[int]:
    """The order a cascade runs the pool's stages in: by per-image cost as a single model (inference,
    preprocessing, decode, at the costs' batch size), ties by resolution. Measured costs need not grow with the
    resolution (a kernel tuned for one input size), and a pool's stages of several models have no resolution
    order at all; a cheap stage first is what lets a cascade save."""
    return sorted(resolutions, key=lambda r: (costs.expected([r], [1.0]), r))


def reference_resolution(views: StageViews, resolutions) -> int:
    """The most accurate single resolution on these examples (ties: the cheaper, i.e. lower, one)."""
    accs = {r: views.view((), r)[1].mean() for r in resolutions}
    best = max(accs.values())
    return min(r for r in resolutions if accs[r] >= best - 1e-12)


def sorted_quantiles(ascending: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """np.quantile(a, qs) (its default "linear" method) of a 1-D array already sorted ascending [n], to the bit,
    without the partition np.quantile runs on every call (the greedy calls it per stage and candidate: half of a
    guarantee's time went there). qs: float64 [k] in [0, 1]. -> float64 [k] (float32 input too, as np.quantile)."""
    return _quantiles_by_plan(ascending, _quantile_plan(len(ascending), qs))


def _quantile_plan(n: int, qs: np.ndarray) -> tuple:
    """What np.quantile's linear method reads for quantiles qs of n sorted values: the two neighbours' indices,
    the weight of the upper one, and where it interpolates from the upper end (nearer)."""
    virtual = (n - 1) * qs
    below = np.floor(virtual)
    gamma = virtual - below
    below = np.minimum(below.astype(np.intp), n - 1)
    above = np.minimum(below + 1, n - 1)
    upper = gamma >= 0.5
    return below, above, gamma, 1 - gamma[upper], upper


def _quantiles_by_plan(ascending: np.ndarray, plan: tuple) -> np.ndarray:
    below, above, gamma, upper_weight, upper = plan
    a, b = ascending[below], ascending[above]
    diff = b - a
    out = a + diff * gamma
    out[upper] = b[upper] - diff[upper] * upper_weight  # np.quantile's lerp: from the upper end where nearer
    return out


def _unique_ascending(values: np.ndarray) -> np.ndarray:
    """np.unique(values) for values that are almost always sorted already (quantiles): a neighbour comparison
    instead of a sort, np.unique itself where they are not (rounding, NaN)."""
    step = values[1:] >= values[:-1]
    if not step.all():
        return np.unique(values)
    keep = np.empty(len(values), dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def greedy(views: StageViews, costs: CostModel, reference: int, candidates, tolerance: float = 0.0,
           quantiles: int = 100, min_exit: int = 1, decode_at: int | None = None) -> Cascade:
    """Streeter-style greedy; the reference closes the cascade. decode_at: the decode plan (`Cascade.decode_at`)
    the cascade is chosen, priced and returned with."""
    n = views.preds.n
    at = decode_at
    _, ref_correct = views.view((), reference, at)
    remaining = np.ones(n, dtype=bool)
    stages, prefix = [], ()
    rank = {r: k for k, r in enumerate(stage_order(costs, candidates))}
    pool = [r for r in candidates if r != reference]
    levels = np.linspace(0, 1, quantiles + 1)[:-1]
    while pool:
        idx = np.flatnonzero(remaining)
        m = len(idx)
        if m == 0:
            break
        plan = _quantile_plan(m, levels)
        best = None  # (ratio, r, threshold, k)
        for r in pool:
            if m == n:  # every example still unresolved: the ranking is the same for every tolerance of a path
                ascending, cum_r, cum_ref = views.ranked(prefix, r, reference, at)
            else:
                conf, corr = views.view(prefix, r, at)
                c = conf[idx]
                order = np.argsort(-c, kind="stable")
                rows = idx[order]
                ascending = np.ascontiguousarray(c[order][::-1])
                cum_r = np.cumsum(corr[rows])
                cum_ref = np.cumsum(ref_correct[rows])
            # thresholds at quantiles of the unresolved examples' confidence; k = how many would exit
            ts = _unique_ascending(_quantiles_by_plan(ascending, plan))
            ks = m - np.searchsorted(ascending, ts, side="left")  # count of conf >= t
            ok = (ks >= min_exit)
            ks_i = np.minimum(np.maximum(ks, 1), m) - 1
            ok &= cum_r[ks_i] >= cum_ref[ks_i] - tolerance * ks - 1e-9
            # it must lower the expected cost: exits saved at the reference outweigh running r on all remaining
            # the added cost of r before the reference: its own, less the decode the reference then no longer pays
            prev = prefix[-1] if prefix else None
            ref_after_r = costs.stage_cost(reference, r, decode_at=at)
            cost_r = max(1e-12, costs.stage_cost(r, prev, decode_at=at)
                         - costs.stage_cost(reference, prev, decode_at=at) + ref_after_r)
            ok &= ks * ref_after_r > m * cost_r
            if not ok.any():
                continue
            ratio = np.where(ok, ks / (m * cost_r), -np.inf)
            j = int(np.argmax(ratio))
            if best is None or ratio[j] > best[0]:
                best = (ratio[j], r, float(ts[j]), int(ks[j]))
        if best is None:
            break
        _, r, t, _ = best
        conf, _ = views.view(prefix, r, at)
        remaining &= ~(conf >= t)
        stages.append(Stage(r, t))
        prefix = prefix + (r,)
        pool = [q for q in pool if rank[q] > rank[r]]  # stages run in increasing cost, as the exact search's chains
    stages.append(Stage(reference, -math.inf))
    return Cascade(stages, tolerance=tolerance, method="greedy", decode_at=at)


# ---- exact search --------------------------------------------------------------------------------------
def _pack(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask)


def _count(packed: np.ndarray) -> int:
    return int(np.bitwise_count(packed).sum()) if hasattr(np, "bitwise_count") else \
        int(np.unpackbits(packed).sum())


def exact_search(views: StageViews, costs: CostModel, resolutions, min_correct: int, grid: int = 16,
                 extra_thresholds: dict[int, list[float]] | None = None,
                 max_nodes: int = 5_000_000, decode_at: int | None = None) -> tuple[Cascade | None, int, bool]:
    """Cheapest cascade over chains in `stage_order` x threshold grid with at least min_correct correct answers.

    The grid per resolution is `grid` confidence quantiles plus `extra_thresholds` (pass the greedy's, so the
    greedy's own cascade is in the search space and the reported gap is >= 0). Branch and bound on expected
    cost (costs are non-negative, so a partial chain already costlier than the best is cut). Returns
    (cascade or None if no chain meets the constraint, nodes visited, whether max_nodes cut the search).
    A chain is also cut when even its best completion cannot reach min_correct: the rows left answered right by
    some later stage where any could (the union of the later stages' correct rows; without the free ensemble,
    whose correctness depends on the stages before) or, at most, all of them. decode_at: the decode plan searched
    within (`Cascade.decode_at`)."""
    resolutions = stage_order(costs, resolutions)
    n = views.preds.n
    def cost_of(r: int, frac: float, prev: int | None) -> float:
        return frac * costs.stage_cost(r, prev, max(1.0, frac * costs.batch_size) if costs.batch_aware else None,
                                       decode_at)
    packs: dict[tuple, tuple] = {}

    def stage_bits(prefix: tuple, r: int):
        key = (prefix if views.combined else (), r)
        if key not in packs:
            conf, corr = views.view(prefix, r, decode_at)
            ts = np.quantile(conf, np.linspace(0, 1, grid + 1)[1:-1])
            ts = np.unique(np.concatenate([ts, (extra_thresholds or {}).get(r, [])]))
            packs[key] = (ts, [_pack(conf >= t) for t in ts], _pack(corr))
        return packs[key]

    best = {"cost": math.inf, "stages": None}
    nodes = 0
    all_bits = _pack(np.ones(n, dtype=bool))
    # can_correct[j]: rows some stage from resolutions[j] on answers correctly (None with the free ensemble)
    can_correct = [None] * (len(resolutions) + 1)
    if not views.combined:
        can_correct[len(resolutions)] = np.zeros_like(all_bits)
        for j in range(len(resolutions) - 1, -1, -1):
            can_correct[j] = can_correct[j + 1] | stage_bits((), resolutions[j])[2]

    def reachable(j: int, remaining: np.ndarray, n_rem: int, correct: int) -> bool:
        """Whether stages from resolutions[j] on can still lift `correct` to min_correct."""
        upper = n_rem if can_correct[j] is None else _count(remaining & can_correct[j])
        return correct + upper >= min_correct

    def dfs(start: int, prefix: tuple, stages: list, remaining: np.ndarray, n_rem: int, cost: float, correct: int):
        nonlocal nodes
        nodes += 1
        if nodes > max_nodes:
            return
        frac = n_rem / n
        for j in range(start, len(resolutions)):
            r = resolutions[j]
            c_stage = cost_of(r, frac, prefix[-1] if prefix else None)
            if cost + c_stage >= best["cost"]:
                continue
            ts, exit_bits, corr_bits = stage_bits(prefix, r)
            # r as the last stage: it answers everything left
            total = correct + _count(remaining & corr_bits)
            if total >= min_correct:
                best["cost"], best["stages"] = cost + c_stage, stages + [Stage(r, -math.inf)]
            # r as an intermediate stage at each threshold
            for t, xb in zip(ts, exit_bits):
                out = remaining & xb
                n_out = _count(out)
                if n_out == 0 or n_out == n_rem:
                    continue
                left, now_correct = remaining & ~xb, correct + _count(out & corr_bits)
                if not reachable(j + 1, left, n_rem - n_out, now_correct):
                    continue
                dfs(j + 1, prefix + (r,), stages + [Stage(r, float(t))], left, n_rem - n_out, cost + c_stage,
                    now_correct)

    dfs(0, (), [], all_bits, n, 0.0, 0)
    cut = nodes > max_nodes
    if best["stages"] is None:
        return None, nodes, cut
    return Cascade(best["stages"], method="exact", decode_at=decode_at), nodes, cut


# ---- sweeps and selection ------------------------------------------------------------------------------
@dataclass
class Candidate:
    cascade: Cascade
    outcome: Outcome
    finisher: int


def tolerance_sweep(views: StageViews, costs: CostModel, resolutions, finishers=None,
                    tolerances=DEFAULT_TOLERANCES, quantiles: int = 100,
                    decode_at: int | None = None) -> list[Candidate]:
    """Greedy cascades over tolerances x finishing models, plus every single model: the raw Pareto cloud.
    decode_at: a decode plan (`Cascade.decode_at`): the cascades of that plan, without the single models (a single
    model decodes at its own scale)."""
    finishers = list(finishers or resolutions)
    seen, out = set(), []
    for r in resolutions if decode_at is None else ():  # single models
        c = Cascade([Stage(r, -math.inf)], tolerance=None, method="single")
        out.append(Candidate(c, simulate(c, views, costs), r))
        seen.add(c.key())
    for f in finishers:
        for tol in tolerances:
            c = greedy(views, costs, f, resolutions, tol, quantiles, decode_at=decode_at)
            if len(c.stages) == 1 and decode_at is not None:  # a single model: the per-stage plan's
                continue
            if c.key() in seen:
                continue
            seen.add(c.key())
            out.append(Candidate(c, simulate(c, views, costs), f))
    return out


def pareto_front(cands: list[Candidate]) -> list[Candidate]:
    """Candidates not beaten on both cost and accuracy, by increasing cost."""
    ordered = sorted(cands, key=lambda c: (c.outcome.mean_cost, -c.outcome.accuracy))
    front, best_acc = [], -1.0
    for c in ordered:
        if c.outcome.accuracy > best_acc + 1e-12:
            front.append(c)
            best_acc = c.outcome.accuracy
    return front


def cheapest_meeting(cands: list[Candidate], min_accuracy: float) -> Candidate | None:
    ok = [c for c in cands if c.outcome.accuracy >= min_accuracy - 1e-12]
    return min(ok, key=lambda c: (c.outcome.mean_cost, -c.outcome.accuracy)) if ok else None


def best_under_budget(cands: list[Candidate], budget_ms: float) -> Candidate | None:
    ok = [c for c in cands if c.outcome.mean_cost <= budget_ms + 1e-12]
    return max(ok, key=lambda c: (c.outcome.accuracy, -c.outcome.mean_cost)) if ok else None
