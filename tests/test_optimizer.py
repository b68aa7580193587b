import itertools
import math

import numpy as np
import pytest

from rescascade.costs import CostModel
from rescascade.guarantee import binomial_p_value, certify, certify_settings, split_calib
from rescascade.optimizer import (Cascade, Stage, StageViews, captured_share, exact_search, greedy, oracle,
                                  pareto_front, reference_resolution, simulate, stage_order, tolerance_sweep)
from rescascade.predictions import Predictions
from rescascade.serve.confidence import combine, confidence
from rescascade.temperature import fit_temperature
from rescascade.synthetic_predictions import synthetic_predictions

RES = [96, 128, 160, 192, 224]


def flops_costs(batch=1, batch_aware=False):
    """Per-image costs proportional to r^2 (a MAC-like model) at one batch size."""
    return CostModel("test", "fp32", batch, batch_aware, {r: {batch: (r / 224) ** 2} for r in RES})


@pytest.fixture(scope="module")
def preds():
    return synthetic_predictions(6000, RES, num_classes=10, seed=1)


def test_confidence_measures_on_hand_examples():
    lp = np.log(np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    assert np.allclose(confidence(lp, "max_prob"), [0.7, 0.4])
    assert np.allclose(confidence(lp, "margin"), [0.5, 0.05])
    ent = -(np.array([0.7, 0.2, 0.1]) * np.log([0.7, 0.2, 0.1])).sum()
    assert np.isclose(confidence(lp, "entropy")[0], -ent)
    both = combine([np.log([[0.9, 0.1]]), np.log([[0.5, 0.5]])])
    assert np.allclose(np.exp(both).sum(-1), 1) and np.exp(both)[0, 0] > 0.5


def test_temperature_fit_recovers_overconfidence():
    rng = np.random.default_rng(0)
    n, c, t_true = 20000, 5, 3.0
    base = rng.normal(0, 2, (n, c))
    p = np.exp(base - np.logaddexp.reduce(base, 1, keepdims=True))
    labels = np.array([rng.choice(c, p=row) for row in p])  # labels drawn from the calibrated model
    t = fit_temperature(base * t_true, labels)               # the model is t_true x over-confident
    assert abs(t - t_true) / t_true < 0.05


def test_greedy_at_zero_tolerance_keeps_reference_accuracy_and_saves_cost(preds):
    views, costs = StageViews(preds), flops_costs()
    ref = reference_resolution(views, RES)
    assert ref == 224
    casc = greedy(views, costs, ref, RES, tolerance=0.0)
    out = simulate(casc, views, costs)
    ref_out = simulate(Cascade([Stage(ref, -math.inf)]), views, costs)
    assert out.accuracy >= ref_out.accuracy
    assert out.mean_cost < 0.9 * ref_out.mean_cost
    assert casc.stages[-1] == Stage(ref, -math.inf) and len(casc.stages) >= 2
    # every early stage is admissible: on what it answers it is at least as accurate as the reference there
    _, ref_correct = views.view((), ref)
    for k in range(len(casc.stages) - 1):
        exits = out.exit_stage == k
        assert out.correct_mask[exits].sum() >= ref_correct[exits].sum()


def test_greedy_tolerance_trades_accuracy_for_cost(preds):
    views, costs = StageViews(preds), flops_costs()
    outs = [simulate(greedy(views, costs, 224, RES, tol), views, costs) for tol in (0.0, 0.05, 0.2)]
    assert outs[0].mean_cost >= outs[1].mean_cost >= outs[2].mean_cost
    assert outs[2].mean_cost < outs[0].mean_cost
    ref_acc = simulate(Cascade([Stage(224, -math.inf)]), views, costs).accuracy
    for tol, out in zip((0.0, 0.05, 0.2), outs):
        assert out.accuracy >= ref_acc - tol - 1e-9  # the per-stage deficit bounds the total


def brute_force(views, costs, min_correct, thresholds, order=RES):
    """Every chain in `order` x every threshold combination, evaluated by simulate()."""
    best = (math.inf, None)
    for k in range(1, len(order) + 1):
        for chain in itertools.combinations(order, k):
            for ts in itertools.product(*[thresholds[r] for r in chain[:-1]]):
                c = Cascade([Stage(r, t) for r, t in zip(chain[:-1], ts)] + [Stage(chain[-1], -math.inf)])
                out = simulate(c, views, costs)
                if out.correct >= min_correct and out.mean_cost < best[0]:
                    best = (out.mean_cost, c)
    return best


# measured costs need not grow with the resolution: here r96 costs more than r128 and r160
UNORDERED = {96: 0.6, 128: 0.33, 160: 0.51, 192: 0.73, 224: 1.0}


@pytest.mark.parametrize("unit", [{r: (r / 224) ** 2 for r in RES}, UNORDERED], ids=["flops", "non-monotone"])
def test_exact_search_matches_brute_force_on_a_small_instance(unit):
    """Over chains in order of cost (`stage_order`), not of resolution."""
    small = synthetic_predictions(300, RES, num_classes=4, seed=3)
    views, costs = StageViews(small), CostModel("test", "fp32", 1, False, {r: {1: c} for r, c in unit.items()})
    order = stage_order(costs, RES)
    assert order == sorted(RES, key=unit.get)
    ref_correct = int(views.view((), 224)[1].sum())
    grid = 3
    cascade, nodes, cut = exact_search(views, costs, RES, ref_correct, grid=grid)
    thresholds = {r: np.unique(np.quantile(views.view((), r)[0], np.linspace(0, 1, grid + 1)[1:-1])) for r in RES}
    best_cost, _ = brute_force(views, costs, ref_correct, thresholds, order)
    assert not cut and cascade is not None
    assert simulate(cascade, views, costs).mean_cost == pytest.approx(best_cost)
    assert cascade.resolutions == sorted(cascade.resolutions, key=order.index)


def test_stages_run_in_order_of_cost_not_of_resolution():
    """Three stages, resolution 1 the reference (4 ms), 2 at 1.5 ms and 3 at 1 ms: 3 is sure and right on images
    0-1, 2 on images 2-3, only the reference on 4-5. The cheapest cascade at the reference's accuracy runs them
    by cost, 3 -> 2 -> 1: by resolution, the reference would have had to come first."""
    labels = np.array([0, 1, 0, 1, 0, 1])

    def stage(sure):  # logits [6, 2]: right with margin 6 on `sure`, wrong with margin 0.2 elsewhere
        right = np.isin(np.arange(6), sure)
        margin = np.where(right, 6.0, -0.2)
        return np.stack([np.where(labels == 0, margin, 0), np.where(labels == 1, margin, 0)], -1)
    logits = np.stack([stage(range(6)), stage([2, 3]), stage([0, 1])], axis=1).astype(np.float32)
    views = StageViews(Predictions(logits, labels, [1, 2, 3], np.arange(6).astype(str), "w" * 64))
    costs = CostModel("test", "fp32", 1, False, {1: {1: 4.0}, 2: {1: 1.5}, 3: {1: 1.0}})
    assert stage_order(costs, [1, 2, 3]) == [3, 2, 1]
    casc = greedy(views, costs, 1, [1, 2, 3], tolerance=0.0)
    assert casc.resolutions == [3, 2, 1]
    out = simulate(casc, views, costs)
    assert out.correct == 6 and out.mean_cost == pytest.approx(1 + 4 / 6 * 1.5 + 2 / 6 * 4)
    exact, _, _ = exact_search(views, costs, [1, 2, 3], 6, grid=4)
    assert exact.resolutions == [3, 2, 1] and simulate(exact, views, costs).mean_cost == pytest.approx(out.mean_cost)


def test_exact_is_never_worse_than_greedy_when_given_its_thresholds(preds):
    views, costs = StageViews(preds), flops_costs()
    casc = greedy(views, costs, 224, RES)
    g = simulate(casc, views, costs)
    extra = {s.resolution: [s.threshold] for s in casc.stages[:-1]}
    ex, _, _ = exact_search(views, costs, RES, g.correct, grid=6, extra_thresholds=extra)
    assert simulate(ex, views, costs).mean_cost <= g.mean_cost + 1e-12


def test_batch_aware_costs_use_the_shrunken_batch():
    table = {96: {1: 1.0, 32: 0.2}, 224: {1: 4.0, 32: 1.0}}
    plain = CostModel("t", "fp32", 32, False, table)
    aware = CostModel("t", "fp32", 32, True, table)
    # half the batch reaches r224: 16 images, batch latency interpolated between the b1 (4 ms) and b32 (32 ms) rows
    lat16 = 4.0 + (32.0 - 4.0) * (16 - 1) / (32 - 1)
    assert aware.expected([96, 224], [1.0, 0.5]) == pytest.approx(0.2 + 0.5 * lat16 / 16)
    assert plain.expected([96, 224], [1.0, 0.5]) == pytest.approx(0.2 + 0.5 * 1.0)
    # 1/32 of the batch: one image runs at batch-1 cost
    assert aware.expected([96, 224], [1.0, 1 / 32]) == pytest.approx(0.2 + 4.0 / 32)
    assert plain.expected([96, 224], [1.0, 1 / 32]) == pytest.approx(0.2 + 1.0 / 32)
    assert aware.per_image(224, 32) == 1.0 and aware.per_image(224, 64) == 1.0 and aware.per_image(224, 0.5) == 4.0


def test_the_upload_is_paid_once_and_later_stages_pay_the_gather():
    """The runtime stacks a batch on the device once (in the first stage's preprocessing); later stages gather rows
    from it. A single model pays its full row; a cascade's later stages pay the gather instead of the upload."""
    import pandas as pd
    rows = [dict(backend="t", precision="fp32", resolution=r, batch_size=32, median_ms=m, preprocess_ms=p,
                 overhead_ms=0.32, upload_ms=6.4, gather_ms=0.64) for r, m, p in ((96, 6.4, 7.0), (224, 32.0, 9.6))]
    costs = CostModel.from_profile(pd.DataFrame(rows), [96, 224], None, None, 32)
    full = {96: (6.4 + 7.0 + 0.32) / 32, 224: (32.0 + 9.6 + 0.32) / 32}
    assert costs.expected([224], [1.0]) == pytest.approx(full[224])
    assert costs.expected([96, 224], [1.0, 0.5]) == pytest.approx(full[96] + 0.5 * (full[224] - (6.4 - 0.64) / 32))
    # a profile without the two columns (older) charges every stage its full row, as before
    old = CostModel.from_profile(pd.DataFrame(rows).drop(columns=["upload_ms", "gather_ms"]), [96, 224], None, None, 32)
    assert old.expected([96, 224], [1.0, 0.5]) == pytest.approx(full[96] + 0.5 * full[224])


def test_the_oracle_exits_each_image_at_the_cheapest_stage_agreeing_with_the_reference():
    """Six images, three stages costing 1, 2 and 4 ms (the reference, r3): the oracle answers each image at the
    cheapest stage whose top-1 is the reference's, right or wrong, and pays that stage alone."""
    top1 = {1: [0, 1, 1, 0, 2, 2], 2: [0, 0, 1, 1, 2, 0], 3: [0, 0, 1, 1, 1, 1]}  # the reference: resolution 3
    logits = np.stack([np.eye(3, dtype=np.float32)[top1[r]] for r in (1, 2, 3)], axis=1)  # [6, 3, 3]
    preds = Predictions(logits, np.array([0, 0, 1, 1, 1, 2]), [1, 2, 3], np.arange(6).astype(str), "w" * 64)
    costs = CostModel("test", "fp32", 1, False, {1: {1: 1.0}, 2: {1: 2.0}, 3: {1: 4.0}})
    o = oracle(preds, costs, [1, 2, 3], 3)
    # r1 agrees on images 0 and 2; r2 on 1 and 3 of the rest; the reference answers 4 and 5 itself
    assert o.stages == [1, 2, 3] and o.exit_fractions == [2 / 6, 2 / 6, 2 / 6]
    assert o.mean_cost == pytest.approx((2 * 1 + 2 * 2 + 2 * 4) / 6)
    # ordered by cost, not by resolution: r3 as the cheapest stage answers every image before the others
    dear = CostModel("test", "fp32", 1, False, {1: {1: 5.0}, 2: {1: 6.0}, 3: {1: 4.0}})
    assert oracle(preds, dear, [1, 2, 3], 3).exit_fractions == [1.0, 0.0, 0.0]
    s = o.summary(reference_cost=4.0, cascade_cost=3.5)
    assert s["cost_vs_reference"] == pytest.approx(14 / 24)
    assert s["captured"] == pytest.approx((1 - 3.5 / 4) / (1 - 14 / 24))
    assert captured_share(0.9, 1.0) is None and captured_share(1.1, 0.5) < 0


def test_a_cascade_never_beats_the_oracle_at_the_references_answers(preds):
    """On synthetic ImageNet-like logits, no greedy cascade matching the reference's answers on every image exits
    cheaper than the oracle, and the chosen one captures a share in (0, 1]."""
    views, costs = StageViews(preds), flops_costs()
    o = oracle(preds, costs, RES, 224)
    ref_cost = simulate(Cascade([Stage(224, -math.inf)]), views, costs).mean_cost
    assert 0 < o.mean_cost < ref_cost and sum(o.exit_fractions) == pytest.approx(1)
    out = simulate(greedy(views, costs, 224, RES, 0.0), views, costs)
    share = captured_share(out.mean_cost / ref_cost, o.mean_cost / ref_cost)
    assert out.mean_cost > o.mean_cost and 0 < share < 1


def test_pareto_front_is_monotone(preds):
    views = StageViews(preds)
    front = pareto_front(tolerance_sweep(views, flops_costs(), RES, finishers=[192, 224], tolerances=(0, 0.02, 0.1)))
    costs = [c.outcome.mean_cost for c in front]
    accs = [c.outcome.accuracy for c in front]
    assert costs == sorted(costs) and accs == sorted(accs) and len(front) >= 3


def test_margin_and_combined_views_build_valid_cascades(preds):
    for views in (StageViews(preds, "margin"), StageViews(preds, "entropy"), StageViews(preds, combined=True)):
        casc = greedy(views, flops_costs(), 224, RES)
        out = simulate(casc, views, flops_costs())
        assert 0 < out.mean_cost <= 1.0 + 1e-9 and abs(sum(out.exit_fractions) - 1) < 1e-9


def test_binomial_p_value():
    assert binomial_p_value(0, 600, 0.005) == pytest.approx(0.995 ** 600)
    assert binomial_p_value(3, 100, 0.01) > 0.9  # 3 losses in 100 are no evidence that the risk is below 1 %


def test_guarantee_holds_in_simulation():
    """Many random calib draws from one population: the certified cascade's true risk exceeds epsilon in at
    most ~delta of them, while picking the cheapest cascade with empirical risk <= epsilon (no test) violates
    far more often. The second assertion shows the simulation can detect violations at all."""
    population = synthetic_predictions(120_000, RES, num_classes=10, seed=7)
    pop_views, costs = StageViews(population), flops_costs()
    _, ref_pop = pop_views.view((), 224)
    eps, delta, n_calib, trials = 0.02, 0.1, 1200, 60
    rng = np.random.default_rng(0)
    tol = tuple(np.linspace(0, 0.2, 41))

    def true_risk(c):
        out = simulate(c, pop_views, costs)
        return float(((~out.correct_mask) & ref_pop).mean())

    ltt_violations = naive_violations = 0
    for trial in range(trials):
        idx = rng.choice(population.n, n_calib, replace=False)
        calib = population.subset(idx)
        sel, cert = split_calib(calib.n, 0.5, trial)
        result = certify(StageViews(calib.subset(sel)), StageViews(calib.subset(cert)), costs, 224, RES, eps, delta,
                         tol)
        ltt_violations += true_risk(result.cascade) > eps
        views = StageViews(calib)
        _, ref_c = views.view((), 224)
        naive = [greedy(views, costs, 224, RES, t) for t in tol]
        ok = [c for c in naive if ((~simulate(c, views, costs).correct_mask) & ref_c).mean() <= eps]
        cheapest = min(ok, key=lambda c: simulate(c, views, costs).mean_cost)
        naive_violations += true_risk(cheapest) > eps
    # binomial slack: with rate delta over 60 trials, P(count > 12) < 1 %
    assert ltt_violations <= 12, ltt_violations
    assert naive_violations > 2 * ltt_violations and naive_violations >= 15, (naive_violations, ltt_violations)


def test_the_guarantee_tests_the_cascades_with_fewest_losses_first():
    """r32 is more accurate than r96 but errs on other images: the greedy at r96's accuracy (tolerance 0) exits
    every image at r32 and is wrong where r96 is right on 10 % (each a loss), so a path opening with it certifies
    nothing at 2 %. The greedy on r96's answers exits only where r32 agrees with r96 (loss 0): tested first, it is
    certified."""
    from rescascade.predictions import Predictions
    rng = np.random.default_rng(0)
    n, c = 4000, 4
    labels = rng.integers(0, c, n)
    group = rng.choice(3, n, p=[0.75, 0.1, 0.15])  # 0: both right, 1: r96 right / r32 wrong, 2: r32 right / r96 wrong
    logits = np.zeros((n, 2, c), dtype=np.float32)
    rows = np.arange(n)
    logits[rows, 0, np.where(group == 1, (labels + 1) % c, labels)] = np.choose(group, [8.0, 3.0, 3.5])
    logits[rows, 1, np.where(group == 2, (labels + 1) % c, labels)] = 8.0
    calib = Predictions(logits, labels, [32, 96], rows.astype(str), "w" * 64)
    costs = CostModel("test", "fp32", 1, False, {32: {1: 0.2}, 96: {1: 1.0}})
    cs = certify_settings(calib, costs, [32, 96], 0.02, 0.1, reference=96)
    path = cs.certified.tested
    assert path[0]["k"] == 0 and path[0]["certified"] and path[0]["method"] == "greedy-answers", path
    assert [t["k"] for t in path] == sorted(t["k"] for t in path)
    assert cs.certified.cascade.resolutions == [32, 96]
    views = StageViews(calib, cs.measure, cs.temperatures)
    first = simulate(greedy(views, costs, 96, [32, 96], 0.0), views, costs)  # what the path used to open with
    assert ((~first.correct_mask) & views.view((), 96)[1]).mean() > 0.09
    out = simulate(cs.certified.cascade, views, costs)
    assert out.mean_cost < 0.5 and out.accuracy >= 0.89


@pytest.mark.slow
def test_guarantee_over_auto_settings_holds_in_simulation():
    """--guarantee with --confidence auto --combine auto (6 settings) and fitted temperatures: over 200 random calib
    draws from one population, the certified cascade's true risk exceeds epsilon in at most ~delta of them, since
    the setting and the temperatures are chosen on the select half and one path is tested. Picking, over the same
    settings, the cheapest cascade with empirical risk <= epsilon on all of calib violates far more often (the
    simulation can detect violations)."""
    res3 = [96, 160, 224]
    costs = CostModel("test", "fp32", 1, False, {r: {1: (r / 224) ** 2} for r in res3})
    population = synthetic_predictions(60_000, res3, num_classes=10, seed=7)
    eps, delta, n_calib, trials = 0.02, 0.1, 1000, 200
    measures, combines = ("max_prob", "margin", "entropy"), (False, True)
    tol = tuple(np.linspace(0, 0.2, 11))
    rng = np.random.default_rng(0)

    def true_risk(cascade, measure, temps, combined):
        views = StageViews(population, measure, temps, combined)
        _, ref = views.view((), 224)
        return float(((~simulate(cascade, views, costs).correct_mask) & ref).mean())

    ltt_violations = naive_violations = 0
    for trial in range(trials):
        calib = population.subset(rng.choice(population.n, n_calib, replace=False))
        cs = certify_settings(calib, costs, res3, eps, delta, measures, combines, True, None, 0.5, trial, tol)
        assert cs.reference == 224
        ltt_violations += true_risk(cs.certified.cascade, cs.measure, cs.temperatures, cs.combined) > eps
        temps = {r: fit_temperature(calib.column(r), calib.labels) for r in res3}
        naive = []
        for m in measures:
            for comb in combines:
                views = StageViews(calib, m, temps, comb)
                _, ref_c = views.view((), 224)
                for t in tol:
                    c = greedy(views, costs, 224, res3, t)
                    out = simulate(c, views, costs)
                    if ((~out.correct_mask) & ref_c).mean() <= eps:
                        naive.append((out.mean_cost, c, m, comb))
        _, c, m, comb = min(naive, key=lambda x: x[0])
        naive_violations += true_risk(c, m, temps, comb) > eps
    # binomial slack: at rate delta over 200 trials, P(count > 30) is about 1 %
    assert ltt_violations <= 30, ltt_violations
    assert naive_violations > 30 and naive_violations > 2 * ltt_violations, (naive_violations, ltt_violations)
