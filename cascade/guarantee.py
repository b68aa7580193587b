"""A finite-sample accuracy guarantee with Learn-then-Test (Angelopoulos et al., 2021).

Loss of a cascade on an example: 1[cascade wrong and reference right]. Since
    acc(reference) - acc(cascade) = P(ref right, casc wrong) - P(ref wrong, casc right) <= E[loss],
certifying E[loss] <= epsilon certifies "accuracy drop <= epsilon" with probability >= 1 - delta.

Procedure: split calib in two. On the *select* part, build the tolerance path of greedy cascades (most
conservative first); it is fixed before the *certify* part is looked at. On the certify part, test
H_j: risk > epsilon with the exact binomial tail p_j = P(Binom(n, epsilon) <= k_j) (valid for 0/1 losses),
in fixed sequence at level delta, stopping at the first non-rejection (family-wise error <= delta without a
multiplicity penalty). Emit the cheapest certified cascade; the reference alone (loss 0) is the fallback.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

from .costs import CostModel
from .optimizer import DEFAULT_TOLERANCES, Cascade, Stage, StageViews, greedy, simulate


@dataclass
class Certified:
    cascade: Cascade
    tested: list[dict]     # the path, in test order, with k, n, p-value, rejected
    n_select: int
    n_certify: int
    epsilon: float
    delta: float

    def describe(self) -> dict:
        chosen = next((t for t in self.tested if t["cascade"] == self.cascade.describe()), None)
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


def certify(select: StageViews, certify_views: StageViews, costs: CostModel, reference: int, resolutions,
            epsilon: float, delta: float, tolerances=DEFAULT_TOLERANCES, quantiles: int = 100) -> Certified:
    """Learn the path on `select`, test it on `certify_views`, return the cheapest certified cascade."""
    path, seen = [], set()
    for tol in sorted(tolerances):  # most conservative first: fixed before the certify split is seen
        c = greedy(select, costs, reference, resolutions, tol, quantiles)
        if c.key() not in seen:
            seen.add(c.key())
            path.append(c)
    _, ref_correct = certify_views.view((), reference)
    n = certify_views.preds.n
    tested, certified = [], []
    for c in path:
        out = simulate(c, certify_views, costs)
        loss = (~out.correct_mask) & ref_correct
        k = int(loss.sum())
        p = binomial_p_value(k, n, epsilon)
        rejected = p <= delta
        tested.append({"cascade": c.describe(), "tolerance": c.tolerance, "k": k, "n": n, "loss": k / n,
                       "p_value": p, "certified": bool(rejected),
                       "select_cost_ms": simulate(c, select, costs).mean_cost})
        if not rejected:
            break
        certified.append(c)
    if certified:
        chosen = min(certified, key=lambda c: simulate(c, select, costs).mean_cost)
    else:
        chosen = Cascade([Stage(reference, -np.inf)], method="single")
    return Certified(chosen, tested, select.preds.n, n, epsilon, delta)
