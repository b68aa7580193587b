"""Costs from encoded bytes: each stage decodes a JPEG at its own DCT scale, the family's predictions come from
that very decode, the profile times it per (source size, resolution), the cost model and build count it (a
later stage pays again only where it needs a larger scale), and `eval --from-bytes` measures it end to end."""
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from rescascade.build import run_build
from rescascade.builder import CascadeBuilder
from rescascade.config import read_config
from rescascade.costs import CostModel
from rescascade.evaluate import run_eval
from rescascade.export import export_bundle
from rescascade.optimizer import Cascade, Stage
from rescascade.predictions import Predictions, load_predictions
from rescascade.profiling.measure import QUICK
from rescascade.profiling.profile import Profile, decode_path, run_profile
from rescascade.refine import refined_costs
from rescascade.runtime import CascadeRunner, decision_step
from rescascade.serve.bundle import BundleRunner
from rescascade.serve.errors import ConfigError, RescascadeError
from rescascade.serve.errors import ArtifactError
from rescascade.serve.images import jpeg_scale
from rescascade.target import Target
from rescascade.training.data import EvalDataset, load_data
from rescascade.training.predict import write_predictions
from rescascade.training.run import run_train
from rescascade.training.trainer import TrainConfig

from .conftest import JPEG_SIZE as SIZE  # r32 (resize 37) decodes at 1/4, r48 (resize 55) at 1/2

QUIET = dict(log=lambda s: None)


def test_the_scales_differ_between_the_two_stages():
    assert (jpeg_scale(*SIZE, 37), jpeg_scale(*SIZE, 55)) == (4, 2)


def test_predictions_come_from_each_stages_own_decode(jpeg_family):
    fam = jpeg_family / "fam"
    doc = json.loads((fam / "family.json").read_text())
    assert doc["preprocessing"]["decode_scale"] == "stage"
    splits = load_data(f"imagefolder:{jpeg_family / 'photos'}", val_fraction=0.4, **QUIET)
    staged = EvalDataset(splits.test, [32, 48], 0.875, "stage")[0][0]
    full = EvalDataset(splits.test, [32, 48], 0.875, "full")[0][0]
    assert not torch.equal(staged[0], full[0])  # the reduced decode gives other pixels, so which one matters
    pred = np.load(fam / "predictions" / "test.npz")
    files = [jpeg_family / "photos" / i for i in pred["ids"]]
    for k, r in enumerate((32, 48)):  # the runtime, given the files, sees what the predictions saw
        runner = CascadeRunner(fam / "cascade.json" if (fam / "cascade.json").exists() else _build(fam),
                               stages=Cascade([Stage(r, -np.inf)]), warmup=False)
        got = runner(files)
        assert not got.errors
        logits = pred["logits"][:, k]
        temperature = runner.temperatures.get(r, 1.0)
        want = torch.softmax(torch.from_numpy(logits) / temperature, -1).numpy()
        assert np.abs(got.probs - want).max() < 1e-4


def _build(fam):
    run_build(fam, batch_size=1, target="0.05", out=fam / "cascade.json", exact="off", plots=False, **QUIET)
    return fam / "cascade.json"


def test_runtime_decodes_again_only_the_rows_that_need_a_larger_scale(jpeg_family):
    fam = jpeg_family / "fam"
    cascade_json = fam / "cascade.json" if (fam / "cascade.json").exists() else _build(fam)
    runner = CascadeRunner(cascade_json, stages=Cascade([Stage(32, 0.5), Stage(48, -np.inf)]), warmup=False)
    files = sorted((jpeg_family / "photos").rglob("*.jpg"))[:24]
    res = runner(files + [b"\xff\xd8\xff\xe0" + b"\0" * 40])  # the last: a JPEG header with nothing behind
    first, second = res.stage_timings
    assert first.decoded == first.rows == 24 and second.decoded == second.rows == int((res.exit_stage == 1).sum())
    assert 24 in res.errors and res.labels[24] == -1 and (res.labels[:24] >= 0).all()
    same = CascadeRunner(cascade_json, stages=Cascade([Stage(48, 0.5), Stage(48, -np.inf)]), warmup=False)
    assert same(files).stage_timings[1].decoded == 0  # the same scale: the first decode is reused


def test_profile_times_each_stages_decode_and_build_counts_it(jpeg_family):
    fam = jpeg_family / "fam"
    profile = Profile.load(fam)
    dec = profile.decode.set_index(["source_width", "source_height", "resolution", "decoded_for"])
    assert dec.loc[(200, 150, 32, 32), "scale"] == 4 and dec.loc[(200, 150, 48, 48), "scale"] == 2
    assert dec.loc[(800, 600, 32, 32), "decoded_width"] == 100  # 1/8
    assert dec.loc[(200, 150, 32, 48), "scale"] == 2  # r32 from r48's decode: a cascade decoded once
    assert dec.loc[(200, 150, 32, 48), "median_ms"] == dec.loc[(200, 150, 48, 48), "median_ms"]
    assert profile.meta["source_size"] == [200, 150]  # the held-out images' size: the default bucket
    costs = CostModel.from_profile(profile, batch_size=1, source_size="auto")
    assert costs.source_size == (200, 150) and costs.decode_scale == {32: 4, 48: 2}
    assert costs.preprocess_delta == {32: 0.0, 48: 0.0}  # the profile's own source size
    assert costs.decode_plans() == [48] and set(costs.preprocess_delta_at) == {(32, 48)}
    big = CostModel.from_profile(profile, batch_size=1, source_size=(800, 600))
    assert set(big.preprocess_delta) == {32, 48} and big.decode_scale == {32: 8, 48: 8}
    assert big.stage_cost(48) == pytest.approx(max(0.0, big.per_image(48) + big.preprocess_delta[48])
                                               + big.decode_ms[48])
    with pytest.raises(RescascadeError, match="no decode rows for 640x480"):
        CostModel.from_profile(profile, batch_size=1, source_size="640x480")
    cascade_json = _build(fam)
    doc = json.loads(cascade_json.read_text())
    assert doc["profile"]["decode"]["source_size"] == [200, 150]
    assert "decoded_inputs" in doc["expected"]["test"]
    big = run_build(fam, batch_size=1, target="0.05", out=fam / "big.json", exact="off", plots=False,
                    source_size=(800, 600), **QUIET)
    assert big["profile"]["decode"]["source_size"] == [800, 600]
    plain = run_build(fam, batch_size=1, target="0.05", out=fam / "plain.json", exact="off", plots=False,
                      source_size=None, **QUIET)
    assert "decode" not in plain["profile"] and "decoded_inputs" not in plain["expected"]["test"]


def test_cost_model_charges_a_decode_where_the_scale_grows():
    costs = CostModel("onnxruntime", "fp32", 1, False, {32: {1: 1.0}, 48: {1: 2.0}}, {},
                      {32: 0.5, 48: 0.8}, {32: 4, 48: 2}, (200, 150))
    assert costs.expected([32, 48], [1.0, 0.3]) == pytest.approx(1.5 + 0.3 * 2.8)
    costs.decode_scale[48] = 4
    assert costs.expected([32, 48], [1.0, 0.3]) == pytest.approx(1.5 + 0.3 * 2.0)
    assert costs.expected([48], [1.0]) == pytest.approx(2.8)
    assert costs.without_decode().expected([32, 48], [1.0, 0.3]) == pytest.approx(1.0 + 0.3 * 2.0)


def test_cost_model_prices_a_cascade_decoded_once():
    costs = CostModel("onnxruntime", "fp32", 1, False, {32: {1: 1.0}, 48: {1: 2.0}}, {},
                      {32: 0.5, 48: 0.8}, {32: 4, 48: 2}, (200, 150), {32: 0.0, 48: 0.1}, {(32, 48): 0.2})
    assert costs.decode_plans() == [48]
    # r48's decode at the first stage, r32's preprocessing from that larger decode, nothing decoded again
    assert costs.expected([32, 48], [1.0, 0.3], decode_at=48) == pytest.approx(1.0 + 0.2 + 0.8 + 0.3 * 2.1)
    assert costs.expected([32, 48], [1.0, 0.3]) == pytest.approx(1.5 + 0.3 * 2.9)
    assert costs.without_decode().expected([32, 48], [1.0, 0.3], decode_at=48) == pytest.approx(1.0 + 0.3 * 2.0)
    with pytest.raises(RescascadeError, match="do not price r32 decoded once at r100's scale"):
        costs.stage_cost(32, None, decode_at=100)
    assert CostModel("onnxruntime", "fp32", 1, False, {32: {1: 1.0}, 48: {1: 2.0}}, {},
                     {32: 0.5, 48: 0.8}, {32: 4, 48: 2}, (200, 150)).decode_plans() == []  # not profiled


def _two_stage_predictions(n: int = 400, seed: int = 0) -> Predictions:
    """r48 always right; r32 right and confident on 70 %, wrong and unsure on the rest, as from either decode."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    easy = rng.random(n) < 0.7
    big = np.full((n, 5), -2.0, dtype=np.float32)
    big[np.arange(n), labels] = 4.0
    small = np.zeros((n, 5), dtype=np.float32)
    small[np.arange(n), np.where(easy, labels, (labels + 1) % 5)] = np.where(easy, 5.0, 0.3)
    small += rng.normal(0, 0.05, small.shape).astype(np.float32)
    once = small + rng.normal(0, 0.05, small.shape).astype(np.float32)
    return Predictions(np.stack([small, big], 1), labels, [32, 48], np.arange(n).astype(str), "w" * 64,
                       decoded_at={(32, 48): once})


@pytest.mark.parametrize("decode_48, plan", [(1.2, 48), (3.0, None)])
def test_build_decodes_once_where_that_is_cheaper(decode_48, plan):
    # per stage: r32's decode, then r48's for the 30 % that go on; once: r48's decode for every image
    costs = CostModel("onnxruntime", "fp32", 1, False, {32: {1: 1.0}, 48: {1: 2.0}}, {},
                      {32: 1.0, 48: decode_48}, {32: 4, 48: 2}, (200, 150), {32: 0.0, 48: 0.0}, {(32, 48): 0.0})
    calib = _two_stage_predictions()
    builder = CascadeBuilder(Target.best(), temperature=False, exact="on").fit(calib, costs)
    assert builder.decode_plans_ == [None, 48] and builder.cascade_.decode_at == plan
    assert builder.cascade_.resolutions == [32, 48] and builder.chosen_.outcome.accuracy == 1.0
    reach = builder.chosen_.outcome.reach_fractions
    assert builder.chosen_.outcome.mean_cost == pytest.approx(costs.expected([32, 48], reach, plan))
    assert builder.exact_ is not None and builder.exact_["greedy_gap"] >= -1e-9  # searched within the same plan
    other = builder.plan_choices_[48 if plan is None else None]
    assert other.outcome.mean_cost > builder.chosen_.outcome.mean_cost
    assert builder.plan_choices_[plan] is builder.chosen_
    per_stage = CascadeBuilder(Target.best(), temperature=False, decode_plan="stage").fit(calib, costs)
    assert per_stage.decode_plans_ == [None]
    for bad in ("once", ["stage"]):
        with pytest.raises(ConfigError, match="decode_plan. .*: use auto or stage"):
            CascadeBuilder(decode_plan=bad)
    casc, ref = builder.simulate(_two_stage_predictions(seed=1), costs)
    assert casc.mean_cost < ref.mean_cost
    decoded = CascadeBuilder(Target.best(), temperature=False).fit(calib, costs.without_decode())
    assert decoded.decode_plans_ == [None]  # decoded inputs: nothing to decode once
    bare = Predictions(calib.logits, calib.labels, calib.resolutions, calib.ids, calib.weights_sha256)
    assert CascadeBuilder(Target.best(), temperature=False).fit(bare, costs).decode_plans_ == [None]
    with pytest.raises(ArtifactError, match="no logits of r32 decoded at r48's scale"):
        bare.column(32, 48)


def test_decode_once_logits_that_do_not_fit_are_refused(tmp_path):
    good = _two_stage_predictions(n=20)
    pred = {"logits": good.logits, "labels": good.labels, "resolutions": np.array([32, 48]), "ids": good.ids,
            "decoded_at_pairs": np.array([[32, 48]]), "decoded_at_logits": good.column(32, 48)[:, None]}
    write_predictions(tmp_path / "ok.npz", pred, "w" * 64)
    assert load_predictions(tmp_path / "ok.npz").decode_plans() == [48]
    with pytest.raises(ConfigError, match="resolution 100 is not predicted"):
        load_predictions(tmp_path / "ok.npz").column(32, 100)
    for name, bad in (("reversed", {"decoded_at_pairs": np.array([[48, 32]])}),
                      ("short", {"decoded_at_logits": good.column(32, 48)[:10, None]}),
                      ("flat", {"decoded_at_pairs": np.array([32, 48])}),
                      ("float", {"decoded_at_pairs": np.array([[32.7, 48]])})):
        write_predictions(tmp_path / f"{name}.npz", {**pred, **bad}, "w" * 64)
        with pytest.raises(ArtifactError, match="decoded_at_"):
            load_predictions(tmp_path / f"{name}.npz")


def test_a_decode_plan_below_the_reference_has_no_cascade():
    two = _two_stage_predictions()
    wrong_once = two.logits[:, 1].copy()
    wrong_once[0] = np.roll(wrong_once[0], 1)  # r48 misses one image that r64 gets: r64 is the reference
    calib = Predictions(np.stack([two.logits[:, 0], wrong_once, two.logits[:, 1]], 1), two.labels, [32, 48, 64],
                        two.ids, two.weights_sha256,
                        decoded_at={(32, 48): two.column(32), (32, 64): two.column(32), (48, 64): wrong_once})
    costs = CostModel("onnxruntime", "fp32", 1, False, {32: {1: 1.0}, 48: {1: 2.0}, 64: {1: 3.0}}, {},
                      {32: 1.0, 48: 1.2, 64: 1.4}, {32: 4, 48: 2, 64: 1}, (200, 150), {},
                      {(32, 48): 0.0, (32, 64): 0.0, (48, 64): 0.0})
    builder = CascadeBuilder(Target.best(), temperature=False, exact="off").fit(calib, costs)
    assert builder.reference_ == 64 and builder.decode_plans_ == [None, 48, 64]
    assert builder.plan_choices_[48] is None and builder.plan_choices_[64] is not None


def test_a_cascade_decoded_once_runs_as_its_predictions_say(jpeg_family, tmp_path):
    fam = jpeg_family / "fam"
    test = load_predictions(fam / "predictions" / "test.npz")
    assert test.decode_plans() == [48]
    splits = load_data(f"imagefolder:{jpeg_family / 'photos'}", val_fraction=0.4, **QUIET)
    own, bigger, once = EvalDataset(splits.test, [32, 48], 0.875, "stage", [(32, 48)])[0][0]
    assert once.shape == own.shape and not torch.equal(once, own)  # r32 from r48's decode: other pixels
    config = read_config(fam / "cascade.json" if (fam / "cascade.json").exists() else _build(fam))
    assert [p["plan"] for p in config.doc["optimizer"]["decode_plans"]] == ["per stage", "once at r48"]
    files = [jpeg_family / "photos" / i for i in test.ids]
    alone = CascadeRunner(config, stages=Cascade([Stage(32, -np.inf)], decode_at=48), warmup=False)(files)
    want = torch.softmax(torch.from_numpy(test.column(32, 48)) / config.temperatures.get(32, 1.0), -1).numpy()
    assert not alone.errors and np.abs(alone.probs - want).max() < 1e-4  # r32 from r48's decode, as predicted
    # every image goes on to r48 (a 1-epoch model is equally unsure of all): does r48 decode again?
    doc = {**config.doc, "stages": [{"resolution": 32, "threshold": 1.0}, {"resolution": 48, "threshold": None}],
           "decode": {"plan": "once", "resolution": 48},
           "expected": {split: {**config.doc["expected"][split], "exit_fractions": [0.0, 1.0]}
                        for split in ("calib", "test")}}
    path = type(config)(doc, config.path).save(tmp_path / "once.json")
    assert json.loads(path.read_text())["schema_version"] == 2  # a reader that predates the plan refuses it
    (tmp_path / "v1.json").write_text(path.read_text().replace('"schema_version": 2', '"schema_version": 1'))
    with pytest.raises(ArtifactError, match="a decode plan needs schema_version 2"):
        read_config(tmp_path / "v1.json")
    assert read_config(path).cascade.decode_at == 48
    res = CascadeRunner(path, warmup=False)(files)
    first, second = res.stage_timings
    assert first.decoded == second.rows == len(files) and second.decoded == 0  # decoded once
    bundle = BundleRunner(export_bundle(path, tmp_path / "bundle", log=lambda *a: None).parent, warmup=False)
    assert bundle.plan.decode_at == 48
    got = bundle(files)
    assert (got.labels == res.labels).all() and (got.exit_stage == res.exit_stage).all()
    assert got.stage_timings[1].decoded == 0
    manifest = tmp_path / "bundle" / "bundle.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "decode": {"plan": "once", "resolution": 32}}))
    with pytest.raises(ArtifactError, match="no stage above it"):
        BundleRunner(tmp_path / "bundle", warmup=False)  # r48 resized up from r32's decode: refused
    bad = {**doc, "decode": {"plan": "once", "resolution": 32}}  # a stage above the decode's resolution
    (tmp_path / "bad.json").write_text(json.dumps({**bad, "schema_version": 2, "family": {
        **bad["family"], "path": str(fam)}}))
    with pytest.raises(ArtifactError, match="no stage above it"):
        read_config(tmp_path / "bad.json")


def test_eval_from_bytes_reports_the_end_to_end_ratio(jpeg_family, tmp_path):
    fam = jpeg_family / "fam"
    cascade_json = fam / "cascade.json" if (fam / "cascade.json").exists() else _build(fam)
    report = run_eval(cascade_json, batch_size=4, repeats=1, plot=False, out=tmp_path / "e.json", from_bytes=True,
                      **QUIET)
    fb = report["from_bytes"]
    assert fb["cascade"]["decode_ms_per_image"] > 0 and fb["measured_cost_ratio"] > 0
    assert fb["predicted_cost_ratio"] == read_config(cascade_json).doc["expected"]["test"]["cost_vs_reference"]
    assert report["predicted_cost_ratio"] == \
        read_config(cascade_json).doc["expected"]["test"]["decoded_inputs"]["cost_vs_reference"]
    pred = np.load(fam / "predictions" / "test.npz")
    exp = read_config(cascade_json).doc["expected"]["test"]
    assert fb["cascade"]["accuracy"] == pytest.approx(exp["accuracy"], abs=1.5 / len(pred["labels"]))


def test_bad_decode_options_are_one_line(jpeg_family, tmp_path):
    with pytest.raises(ConfigError, match="decode_scale.*stage, full"):
        run_train("synthetic:64", tmp_path / "x", TrainConfig((32,), epochs=0), weights="none", decode_scale="half",
                  **QUIET)
    with pytest.raises(ConfigError, match="WIDTHxHEIGHT"):
        run_profile(jpeg_family / "fam", "onnxruntime", "fp32", (1,), protocol=QUICK, threads=1,
                    decision_step=decision_step, decode_sizes=["big"], out=tmp_path / "p.csv", **QUIET)
    for sizes, message in ((["20000x20000"], "more than the runtime decodes"), (["70000x10"], "65500 pixels on a side"),
                           ([(224.5, 224)], "decode_sizes"), ([(224, 224, 3)], "WIDTHxHEIGHT")):
        with pytest.raises(ConfigError, match=message):
            run_profile(jpeg_family / "fam", "onnxruntime", "fp32", (1,), protocol=QUICK, threads=1,
                        decision_step=decision_step, decode_sizes=sizes, out=tmp_path / "p.csv", **QUIET)
    with pytest.raises(ConfigError, match="source_size"):
        run_build(jpeg_family / "fam", batch_size=1, source_size=5, out=tmp_path / "b.json", **QUIET)
    for size, message in ((5, r"source.size`? 5"), ("0x5", "at least 1 pixel"), ("5", "WIDTHxHEIGHT"),
                          ("20000x20000", "more than the runtime decodes")):  # WxH, as build's source size
        with pytest.raises(ConfigError, match=message):
            run_profile(jpeg_family / "fam", "onnxruntime", "fp32", (1,), protocol=QUICK, threads=1,
                        decision_step=decision_step, source_size=size, out=tmp_path / "p.csv", **QUIET)
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "p.csv")


def test_profile_source_size_is_width_by_height(jpeg_family, tmp_path):
    out = tmp_path / "p.csv"
    run_profile(jpeg_family / "fam", "onnxruntime", "fp32", (1,), resolutions=[32], protocol=QUICK, threads=1,
                decision_step=decision_step, source_size="300x200", out=out, **QUIET)
    assert json.loads(out.with_suffix(".json").read_text())["source_size"] == [300, 200]
    decode = pd.read_csv(decode_path(out))
    assert set(zip(decode.source_width, decode.source_height)) == {(300, 200)}
    w, h = (int(v) for v in pd.read_csv(out).source_size.iloc[0].split("x"))
    assert w > h  # the decode preprocessing started from, width first too


def test_a_profile_from_before_decode_once_rows_prices_the_per_stage_plan_only(jpeg_family, tmp_path):
    for name in ("profile.csv", "profile.json", "profile_decode.csv"):
        (tmp_path / name).write_bytes((jpeg_family / "fam" / name).read_bytes())
    rows = pd.read_csv(tmp_path / "profile_decode.csv")
    for old in (rows[rows.decoded_for == rows.resolution].drop(columns="decoded_for"),  # before decoded_for
                rows.drop(columns="preprocess_ms")):  # nothing timed from a larger decode
        old.to_csv(tmp_path / "profile_decode.csv", index=False)
        profile = Profile.load(tmp_path / "profile.csv")
        costs = CostModel.from_profile(profile, batch_size=1, source_size="auto")
        assert costs.decode_plans() == [] and costs.decode_ms
        config = run_build(jpeg_family / "fam", profile=tmp_path / "profile.csv", batch_size=1, target="0.05",
                           out=tmp_path / "c.json", exact="off", plots=False, **QUIET)
        assert [p["plan"] for p in config["optimizer"]["decode_plans"]] == ["per stage"] and "decode" not in config
        assert any("decoding each JPEG once was not weighed" in w for w in config["warnings"])
    assert (profile.decode.decoded_for >= profile.decode.resolution).all()
    certified = run_build(jpeg_family / "fam", batch_size=1, guarantee=(0.2, 0.2), out=tmp_path / "g.json",
                          plots=False, **QUIET)
    assert any(w.startswith("--guarantee certifies per-stage decoding only") for w in certified["warnings"])


def test_refined_costs_scale_each_stage_by_what_the_runtime_measured():
    costs = CostModel("onnxruntime", "fp32", 1, False, {32: {1: 1.0, 4: 0.5}, 48: {1: 2.0}, 64: {1: 4.0}}, {1: 0.1},
                      {32: 0.5, 48: 0.8, 64: 1.0}, {32: 4, 48: 2, 64: 1}, (200, 150))
    runs = [{"stages": {32: {"rows": 10, "work_s": 0.015}, 48: {"rows": 4, "work_s": 0.012}},
             "decode": {32: {"decoded": 10, "decode_s": 0.010}, 48: {"decoded": 4, "decode_s": 0.004}},
             "outside_s": 0.002, "images": 10}]
    refined = refined_costs(costs, runs)
    assert refined.table[32] == {1: pytest.approx(1.5), 4: pytest.approx(0.75)}  # 1.5 ms measured vs 1.0 profiled
    assert refined.table[48][1] == pytest.approx(3.0)
    assert refined.table[64][1] == pytest.approx(4.0 * 1.5)  # never run: the median factor
    assert refined.decode_ms[32] == pytest.approx(1.0) and refined.decode_ms[48] == pytest.approx(1.0)
    assert refined.decode_ms[64] == pytest.approx(1.0 * 1.625)  # the median of the measured decode factors 2, 1.25
    assert refined.once_per_image() == pytest.approx(0.2) and costs.table[32][1] == 1.0  # the original is kept


def test_build_refine_checks_the_costs_with_the_runtime(jpeg_family):
    fam = jpeg_family / "fam"
    doc = run_build(fam, batch_size=1, target="0.05", out=fam / "refined.json", exact="off", plots=False, refine=8,
                    **QUIET)
    check = doc["cost_check"]
    assert check["images"] == 8 and check["inputs"] == "encoded" and doc["profile"]["refined"]
    for c in check["cascades"]:
        assert all(math.isfinite(c[k]) and c[k] > 0 for k in ("predicted_ratio", "refined_ratio", "measured_ratio"))
    assert check["chosen"] == read_config(fam / "refined.json").cascade.describe()
    with pytest.raises(ConfigError, match="refine"):
        run_build(fam, batch_size=1, refine=-1, out=fam / "x.json", **QUIET)


def test_the_greedy_sees_that_a_shared_decode_moves_to_the_first_stage():
    """Every stage decodes at one scale (a large photo): r32 first pays the decode the reference then does not
    pay, so r32 -> r48 is cheaper than r48 alone when most rows exit at r32."""
    from rescascade.builder import CascadeBuilder
    from rescascade.predictions import Predictions
    rng = np.random.default_rng(0)
    n, c = 400, 4
    labels = rng.integers(0, c, n)
    logits = np.zeros((n, 2, c), dtype=np.float32)
    logits[np.arange(n), 1, labels] = 8.0                  # r48 is always right and sure
    easy = rng.random(n) < 0.8
    logits[np.arange(n), 0, labels] = np.where(easy, 8.0, 0.0)  # r32: sure and right on the easy 80 %,
    logits[np.arange(n), 0, (labels + 1) % c] = np.where(easy, 0.0, 0.3)  # unsure and wrong elsewhere
    calib = Predictions(logits, labels, [32, 48], np.arange(n).astype(str), "w" * 64)
    costs = CostModel("onnxruntime", "fp32", 1, False, {32: {1: 1.0}, 48: {1: 2.0}}, {},
                      {32: 10.0, 48: 10.0}, {32: 8, 48: 8}, (4000, 3000))
    builder = CascadeBuilder("best", exact="off").fit(calib, costs)
    assert builder.cascade_.resolutions == [32, 48]
    assert builder.chosen_.outcome.mean_cost == pytest.approx(11.0 + 0.2 * 2.0, rel=0.05)


def test_build_reads_only_decode_rows_timed_the_way_the_family_decodes(jpeg_family, tmp_path):
    import shutil
    fam = jpeg_family / "fam"
    for name in ("profile.csv", "profile.json", "profile_decode.csv"):
        shutil.copy(fam / name, tmp_path / name)
    rows = (tmp_path / "profile_decode.csv").read_text().replace(",stage,", ",full,")
    (tmp_path / "profile_decode.csv").write_text(rows)
    with pytest.raises(RescascadeError, match="profile_decode.csv has no decode rows for this family's decode.*"
                                              "decoded.inputs"):
        run_build(fam, profile=tmp_path / "profile.csv", batch_size=1, out=tmp_path / "c.json", **QUIET)
    (tmp_path / "profile_decode.csv").write_text(rows.replace(",4,", ",3,", 1))
    with pytest.raises(RescascadeError, match="scale 3"):
        Profile.load(tmp_path)


def test_refine_prices_only_full_batch_calls_when_the_costs_ignore_shrinking_batches():
    costs = CostModel("onnxruntime", "fp32", 8, False, {32: {8: 1.0}, 48: {8: 2.0}}, {})
    runs = [{"stages": {32: {"rows": 16, "work_s": 0.024, "calls": [(8, 8, 0.012), (8, 8, 0.012)]},
                        48: {"rows": 2, "work_s": 0.010, "calls": [(1, 8, 0.005), (1, 8, 0.005)]}},
             "decode": {}, "outside_s": 0.0, "images": 16},
            {"stages": {48: {"rows": 16, "work_s": 0.032, "calls": [(8, 8, 0.016), (8, 8, 0.016)]}},
             "decode": {}, "outside_s": 0.0, "images": 16}]
    refined = refined_costs(costs, runs)
    assert refined.table[32][8] == pytest.approx(1.5) and refined.table[48][8] == pytest.approx(2.0)
    aware = refined_costs(CostModel("onnxruntime", "fp32", 8, True, {32: {8: 1.0}, 48: {1: 5.0, 8: 2.0}}, {}), runs)
    assert aware.table[48][1] == pytest.approx(5.0 * (0.010 + 0.032) * 1000 / (2 * 5.0 + 16 * 2.0))


def test_refine_scales_the_serving_batch_row_by_full_calls_and_the_smaller_rows_by_the_smaller_calls():
    """A profile row can be off on its own: r48's batch-8 row is right (full calls measured 2.0 ms), its batch-1
    row half what the runtime does (the few rows r48 gets after r32): each row keeps its own factor."""
    costs = CostModel("onnxruntime", "fp32", 8, True, {32: {1: 2.0, 8: 1.0}, 48: {1: 5.0, 8: 2.0}}, {})
    runs = [{"stages": {32: {"rows": 16, "work_s": 0.016, "calls": [(8, 8, 0.008), (8, 8, 0.008)]},
                        48: {"rows": 2, "work_s": 0.020, "calls": [(1, 8, 0.010), (1, 8, 0.010)]}},
             "decode": {}, "outside_s": 0.0, "images": 16},
            {"stages": {48: {"rows": 16, "work_s": 0.032, "calls": [(8, 8, 0.016), (8, 8, 0.016)]}},
             "decode": {}, "outside_s": 0.0, "images": 16}]
    refined = refined_costs(costs, runs)
    assert refined.table[48] == {1: pytest.approx(10.0), 8: pytest.approx(2.0)}
    assert refined.table[32] == {1: pytest.approx(2.0), 8: pytest.approx(1.0)}  # no small call: the full calls' factor


def test_a_family_given_decoded_images_times_the_decode_of_a_given_source_size(tiny_family, tmp_path):
    """No decode is timed by default where the held-out images came decoded (synthetic), but --source-size says
    what will be served: its decode is timed, and build can count it."""
    out = tmp_path / "p.csv"
    run_profile(tiny_family, "onnxruntime", "fp32", (1,), protocol=QUICK, threads=1, decision_step=decision_step,
                out=out, **QUIET)
    assert not decode_path(out).exists()
    run_profile(tiny_family, "onnxruntime", "fp32", (1,), protocol=QUICK, threads=1, decision_step=decision_step,
                source_size="120x90", out=out, **QUIET)
    decode = pd.read_csv(decode_path(out))
    assert set(zip(decode.source_width, decode.source_height)) == {(120, 90)}
    costs = CostModel.from_profile(Profile.load(out), batch_size=1, source_size="120x90")
    assert costs.decode_ms and set(costs.decode_ms) == set(decode.resolution)
