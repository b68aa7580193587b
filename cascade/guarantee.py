"""A finite-sample accuracy guarantee with Learn-then-Test (Angelopoulos et al., 2021).

Loss of a cascade on an example: 1[cascade wrong and reference right]. Since
    acc(reference) - acc(cascade) = P(ref right, casc wrong) - P(ref wrong, casc right) <= E[loss],
certifying E[loss] <= epsilon certifies "accuracy drop <= epsilon" with probability >= 1 - delta.

Procedure: split calib in two. On the *select* part alone, fit the per-resolution temperatures, choose the
reference, and, for every optimizer setting asked for (confidence measure, free ensemble), build the path of
greedy cascades (`tolerance_path`: fewest losses on the select part first); keep the one setting whose path
reaches the lowest cost among the cascades that pass the same test on the select part. All of it is fixed
before the *certify* part is looked at, and only that one path is tested there: H_j: risk > epsilon with the
exact binomial tail p_j = P(Binom(n, epsilon) <= k_j) (valid for 0/1 losses), in fixed sequence at level delta,
stopping at the first non-rejection (family-wise error <= delta without a multiplicity penalty). Emit the
cheapest of the certified cascades and the reference alone (loss 0; also the fallback when nothing is
certified). (Testing each setting's path on the certify part and keeping the cheapest certified one would
spend delta once per setting.)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.stats import binom

from .temperature import fit_temperature
from .costs import CostModel
from .optimizer import DEFAULT_TOLERANCES, Cascade, Stage, StageViews, greedy, reference_resolution, simulate
from .predictions import Predictions


@dataclass
class Certified:
    cascade: Cascade
    tested: list[dict]     # the path, in test order, with k, n, p-value, rejected
    n_select: int
    n_certify: int
    epsilon: float
    delta: float

    def describe(self) -> dict:
        chosen = next((t for t in self.tested if t["cascade"] == self.cascade.describe() and t["certified"]), None)
        return {"epsilon": self.epsilon, "delta": self.delta,
                "method": "learn-then-test, fixed-sequence, exact binomial p-values",
                "loss": "1[cascade wrong and reference right]",
                "statement": f"with probability >= {1 - self.delta:g}, the cascade's accuracy is at most "
                             f"{100 * self.epsilon:g} percentage point(s) below the reference's",
                "n_select": self.n_select, "n_certify": self.n_certify, "n": self.n_certify,
                "p_value": chosen["p_value"] if chosen else None,
                "certify_loss": chosen["loss"] if chosen else 0.0, "path": self.tested}


def binomial_p_value(k: int, n: int, epsilon: float) -> float:
    """P(Binom(n, epsilon) <= k): small when the observed loss count is implausibly low for risk > epsilon."""
    return float(binom.cdf(k, n, epsilon))


def split_calib(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(fraction * n))
    return np.sort(perm[:k]), np.sort(perm[k:])


def losses(cascade: Cascade, views: StageViews, costs: CostModel, reference: int):
    """(the count of examples where `cascade` is wrong and the reference right: the test's statistic, the
    cascade's Outcome on `views`)."""
    out = simulate(cascade, views, costs)
    _, ref_correct = views.view((), reference)
    return int(((~out.correct_mask) & ref_correct).sum()), out


def tolerance_path(select: StageViews, costs: CostModel, reference: int, resolutions,
                   tolerances=DEFAULT_TOLERANCES, quantiles: int = 100) -> list[Cascade]:
    """Distinct greedy cascades built on `select` only, in the order the certify part tests them: fewest losses
    on select first (the statistic the test counts), the dearer first among equals. Two greedy paths over the
    tolerances: one holds the reference's accuracy on the images each stage exits, one the reference's answers
    there (the reference's predictions as labels). The second is the conservative end: a cascade at the
    reference's accuracy can still be wrong where the reference is right on many images, right where it is
    wrong on as many, and every such image is a loss; a path opening with it stops the test at once."""
    ref_logits = select.preds.column(reference)
    agree = StageViews(replace(select.preds, labels=ref_logits.argmax(-1)), select.measure, select.temperatures,
                       select.combined)
    found = {}
    for views, method in ((select, "greedy"), (agree, "greedy-answers")):
        for tol in sorted(tolerances):
            c = replace(greedy(views, costs, reference, resolutions, tol, quantiles), method=method)
            if c.key() not in found:
                k, out = losses(c, select, costs, reference)
                found[c.key()] = (k, -out.mean_cost, c)
    return [c for _, _, c in sorted(found.values(), key=lambda t: t[:2])]


def fixed_sequence_test(path: list[Cascade], views: StageViews, select: StageViews, costs: CostModel,
                        reference: int, epsilon: float, delta: float) -> tuple[list[dict], list[Cascade]]:
    """Test H_j: risk > epsilon on `views` along the path, stopping at the first non-rejection.
    -> (the tested steps with k, n, p-value, and the cascades certified, in path order)."""
    n = views.preds.n
    tested, certified = [], []
    for c in path:
        k, _ = losses(c, views, costs, reference)
        p = binomial_p_value(k, n, epsilon)
        rejected = p <= delta
        tested.append({"cascade": c.describe(), "method": c.method, "tolerance": c.tolerance, "k": k, "n": n,
                       "loss": k / n, "p_value": p, "certified": bool(rejected),
                       "select_cost_ms": simulate(c, select, costs).mean_cost})
        if not rejected:
            break
        certified.append(c)
    return tested, certified


def certify(select: StageViews, certify_views: StageViews, costs: CostModel, reference: int, resolutions,
            epsilon: float, delta: float, tolerances=DEFAULT_TOLERANCES, quantiles: int = 100) -> Certified:
    """Learn the path on `select`, test it on `certify_views`, return the cheapest certified cascade."""
    path = tolerance_path(select, costs, reference, resolutions, tolerances, quantiles)
    tested, certified = fixed_sequence_test(path, certify_views, select, costs, reference, epsilon, delta)
    return Certified(_cheapest(certified, select, costs, reference), tested, select.preds.n, certify_views.preds.n,
                     epsilon, delta)


def _cheapest(certified: list[Cascade], select: StageViews, costs: CostModel, reference: int) -> Cascade:
    """The cheapest certified cascade on the select part, or the reference alone (loss 0) when it is cheaper."""
    alone = Cascade([Stage(reference, -np.inf)], method="single")
    return min([alone] + certified, key=lambda c: simulate(c, select, costs).mean_cost)


@dataclass
class CertifiedSetting:
    """The outcome of `certify_settings`: the certificate and the setting it was found with."""
    certified: Certified
    measure: str
    combined: bool
    temperatures: dict[int, float]
    reference: int
    settings_tried: list[dict]   # per setting: the cost on select of its cheapest cascade passing there


def certify_settings(calib: Predictions, costs: CostModel, resolutions, epsilon: float, delta: float,
                     measures=("max_prob",), combines=(False,), temperature: bool = True,
                     reference: int | None = None, fraction: float = 0.5, seed: int = 0,
                     tolerances=DEFAULT_TOLERANCES, quantiles: int = 100) -> CertifiedSetting:
    """Learn-then-Test over several optimizer settings with one test at level delta (module docstring).

    calib: predictions [N, R, C]; costs: per-image ms per resolution. measures x combines are the settings;
    temperatures (if asked), the reference (if None: the most accurate resolution) and the setting are all chosen
    on the select part (`fraction` of calib, drawn with `seed`), and only the chosen setting's path is tested on
    the rest. Source: Angelopoulos et al., "Learn then Test" (2021), fixed-sequence testing, section 3."""
    sel_idx, cert_idx = split_calib(calib.n, fraction, seed)
    select, certify_part = calib.subset(sel_idx), calib.subset(cert_idx)
    temps = {r: fit_temperature(select.column(r), select.labels) if temperature else 1.0 for r in resolutions}
    if reference is None:
        reference = reference_resolution(StageViews(select), resolutions)
    ref_cost = costs.expected([reference], [1.0])
    best, tried = None, []
    for m in measures:
        for comb in combines:
            sel_views = StageViews(select, m, temps, comb)
            path = tolerance_path(sel_views, costs, reference, resolutions, tolerances, quantiles)
            _, passing = fixed_sequence_test(path, sel_views, sel_views, costs, reference, epsilon, delta)
            cost = min([simulate(c, sel_views, costs).mean_cost for c in passing], default=ref_cost)
            tried.append({"measure": m, "combine": comb, "select_cost_ms": cost})
            if best is None or cost < best[0]:
                best = (cost, m, comb, sel_views, path)
    _, m, comb, sel_views, path = best
    cert_views = StageViews(certify_part, m, temps, comb)
    tested, certified = fixed_sequence_test(path, cert_views, sel_views, costs, reference, epsilon, delta)
    chosen = _cheapest(certified, sel_views, costs, reference)
    return CertifiedSetting(Certified(chosen, tested, select.n, certify_part.n, epsilon, delta), m, comb, temps,
                            reference, tried)
