import json
import math
import shutil

import numpy as np
import pytest

from rescascade.build import run_build
from rescascade.cli import main
from rescascade.config import read_config
from rescascade.costs import CostModel
from rescascade.evaluate import run_eval
from rescascade.optimizer import Cascade, Stage, StageViews, simulate
from rescascade.predictions import load_predictions
from rescascade.runtime import CascadeRunner
from rescascade.serve.errors import ArtifactError, RescascadeError
from rescascade.training.data import load_data

QUIET = dict(log=lambda s: None)


def test_build_writes_a_complete_config(built):
    fam, out, config = built
    cfg = read_config(out)
    assert cfg.family_dir == fam.resolve()
    for split in ("calib", "test"):
        e = config["expected"][split]
        assert 0 <= e["accuracy"] <= 1 and e["cost_vs_reference"] > 0 and abs(sum(e["exit_fractions"]) - 1) < 1e-9
    assert out.with_name("cascade_pareto.png").stat().st_size > 1000
    assert out.with_name("cascade_exits.png").stat().st_size > 1000


def test_runner_matches_the_optimizers_simulation(built):
    """On the test images, the runtime's exits and answers agree with simulate() on the stored predictions
    (torch backend, same preprocessing); results come back in input order."""
    fam, out, config = built
    cfg = read_config(out)
    preds = load_predictions(fam / "predictions" / "test.npz")
    views = StageViews(preds, cfg.measure, cfg.temperatures, cfg.combined)
    two_stage = Cascade([Stage(32, float(np.median(views.view((), 32)[0]))), Stage(48, -math.inf)])  # half exit
    runner = CascadeRunner(cfg, backend="torch", stages=two_stage)
    splits = load_data("synthetic:384", seed=0, heldout_per_class=20)
    images = [splits.test.read(i) for i in range(len(splits.test))]
    res = runner(images)
    sim = simulate(two_stage, views, CostModel("t", "fp32", 1, False, {32: {1: 1.0}, 48: {1: 2.0}}))
    assert np.mean(res.exit_stage == sim.exit_stage) > 0.97
    assert 0 < (res.exit_stage == 0).mean() < 1
    sim_labels = np.where(sim.exit_stage == 0, preds.column(32).argmax(-1), preds.column(48).argmax(-1))
    assert np.mean(res.labels == sim_labels) > 0.97
    # input order: a reversed batch gives reversed answers
    rev = runner(images[::-1])
    assert np.array_equal(rev.labels, res.labels[::-1]) and np.array_equal(rev.exit_stage, res.exit_stage[::-1])
    assert [t.rows for t in res.stage_timings] == [len(images), int((res.exit_stage == 1).sum())]


def test_runner_onnxruntime_and_corrupt_input(built, tmp_path):
    fam, out, _ = built
    runner = CascadeRunner(out, backend="onnxruntime")
    splits = load_data("synthetic:384", seed=0, heldout_per_class=20)
    good = splits.test.read(0)
    from torchvision.io import encode_png
    (tmp_path / "ok.png").write_bytes(encode_png(good).numpy().tobytes())
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 broken")
    res = runner([tmp_path / "ok.png", tmp_path / "bad.jpg", good, tmp_path / "missing.png"])
    assert list(res.errors) == [1, 3] and res.labels[1] == -1 and res.exit_stage[3] == -1
    assert res.labels[0] == res.labels[2] >= 0 and np.isclose(np.nansum(res.probs[0]), 1, atol=1e-4)


def test_runner_mixed_image_sizes_answer_as_one_by_one(built):
    """A batch of differently sized images (preprocessed one by one) gets the answers each image gets alone."""
    _, out, _ = built
    runner = CascadeRunner(out, backend="torch")
    splits = load_data("synthetic:384", seed=0, heldout_per_class=20)
    import torchvision.transforms.v2.functional as TF
    images = [splits.test.read(i) for i in range(6)]
    images = [TF.resize(im, [40 + 4 * i], antialias=True) if i % 2 else im for i, im in enumerate(images)]
    res = runner(images)
    alone = [runner([im]) for im in images]
    assert np.array_equal(res.labels, [a.labels[0] for a in alone])
    assert np.array_equal(res.exit_stage, [a.exit_stage[0] for a in alone])


def test_runner_refuses_a_changed_family(built, tmp_path):
    fam, out, _ = built
    copy = tmp_path / "fam"
    shutil.copytree(fam, copy)
    cfg = json.loads(out.read_text())
    cfg["family"]["path"] = str(copy)
    (tmp_path / "cascade.json").write_text(json.dumps(cfg))
    doc = json.loads((copy / "family.json").read_text())
    doc["class_names"][0] = "renamed"
    (copy / "family.json").write_text(json.dumps(doc))
    with pytest.raises(RescascadeError, match="changed since"):
        CascadeRunner(tmp_path / "cascade.json")


def test_eval_measures_cascade_against_reference(built, tmp_path):
    fam, out, _ = built
    report = run_eval(out, batch_size=4, repeats=1, out=tmp_path / "eval.json", **QUIET)
    assert report["images"] > 0 and report["cascade"]["ms_per_image"] > 0 and report["reference"]["ms_per_image"] > 0
    assert 0 <= report["cascade"]["accuracy"] <= 1 and report["measured_cost_ratio"] > 0
    assert json.loads((tmp_path / "eval.json").read_text())["batch_size"] == 4
    assert (tmp_path / "eval.png").stat().st_size > 1000


# ---- build: bad input, one clear error each ----------------------------------------------------------------
def test_build_errors(tiny_family, tmp_path):
    with pytest.raises(RescascadeError, match="unreachable"):
        run_build(tiny_family, batch_size=1, target="0.999", out=tmp_path / "c.json", **QUIET)
    with pytest.raises(RescascadeError, match="no batch-size-64 row"):
        run_build(tiny_family, batch_size=64, out=tmp_path / "c.json", **QUIET)
    with pytest.raises(RescascadeError, match="no cascade fits `budget`"):
        run_build(tiny_family, batch_size=1, budget=1e-6, out=tmp_path / "c.json", **QUIET)
    with pytest.raises(RescascadeError, match="`target`"):
        run_build(tiny_family, batch_size=1, target="fast", out=tmp_path / "c.json", **QUIET)


def _copy_family(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_build_rejects_damaged_or_foreign_inputs(tiny_family, tmp_path):
    fam = _copy_family(tiny_family, tmp_path / "fam")
    calib = dict(np.load(fam / "predictions/calib.npz"))
    bad = dict(calib, logits=calib["logits"].copy())
    bad["logits"][3, 1, 0] = np.nan
    np.savez(fam / "predictions/calib.npz", **bad)
    with pytest.raises(RescascadeError, match="NaN or inf logits"):
        run_build(fam, out=tmp_path / "c.json", **QUIET)
    np.savez(fam / "predictions/calib.npz", **dict(calib, labels=calib["labels"] + 100))
    with pytest.raises(RescascadeError, match="labels range"):
        run_build(fam, out=tmp_path / "c.json", **QUIET)
    np.savez(fam / "predictions/calib.npz", **dict(calib, weights_sha256=np.array("f" * 64)))
    with pytest.raises(RescascadeError, match="predicted by another family"):
        run_build(fam, out=tmp_path / "c.json", **QUIET)
    np.savez(fam / "predictions/calib.npz", **calib)
    meta = json.loads((fam / "profile.json").read_text())
    (fam / "profile.json").write_text(json.dumps(dict(meta, weights_sha256="0" * 64)))
    with pytest.raises(RescascadeError, match="profile measured another family"):
        run_build(fam, out=tmp_path / "c.json", **QUIET)
    (fam / "profile.json").write_text(json.dumps(meta))
    import pandas as pd
    df = pd.read_csv(fam / "profile.csv")
    df[df.resolution != 32].to_csv(fam / "profile.csv", index=False)
    with pytest.raises(RescascadeError, match="resolution 32 is missing"):
        run_build(fam, out=tmp_path / "c.json", **QUIET)


def test_guarantee_is_written(tiny_family, tmp_path):
    config = run_build(tiny_family, batch_size=1, guarantee=(0.2, 0.1), out=tmp_path / "g.json", **QUIET)
    g = config["guarantee"]
    assert g["epsilon"] == 0.2 and g["delta"] == 0.1 and g["n_certify"] > 0 and g["path"]
    assert config["confidence"]["temperature_fitted_on"] == "the select part of calib"


def test_build_summary_says_what_was_done(tiny_family, tmp_path):
    logs = []
    config = run_build(tiny_family, batch_size=1, temperature=False, out=tmp_path / "c.json", plots=False,
                       log=logs.append)
    assert set(config["confidence"]["temperatures"].values()) == {1.0}
    assert "no temperature scaling" in logs[-1] and "temperature-scaled" not in logs[-1]
    logs.clear()
    config = run_build(tiny_family, batch_size=1, out=tmp_path / "c.json", plots=False, log=logs.append)
    assert "temperature-scaled (fitted on calib)" in logs[-1]
    # the distance from the limit, on both splits: the oracle's cost and the share of its saving captured
    for split in ("calib", "test"):
        o, e = config["expected"][split]["oracle"], config["expected"][split]
        assert o["cost_vs_reference"] <= 1 and sorted(o["stages"]) == sorted(config["family"]["resolutions"])
        assert sum(o["exit_fractions"]) == pytest.approx(1)
        if o["captured"] is not None:
            assert o["captured"] == pytest.approx((1 - e["cost_vs_reference"]) / (1 - o["cost_vs_reference"]))
    assert "oracle, each image at the cheapest stage giving the reference's answer: calib " in logs[-1]
    assert read_config(tmp_path / "c.json").doc["expected"] == json.loads(json.dumps(config["expected"]))


def test_cli_pipeline_end_to_end(tmp_path, capsys):
    fam = tmp_path / "fam"
    common = ["--resolutions", "32,48", "--width-mult", "0.35", "--weights", "none", "--epochs", "1",
              "--batch-size", "16", "--optimizer", "adamw", "--lr", "0.003", "--workers", "0",
              "--heldout-per-class", "10"]
    assert main(["train", "--data", "synthetic:64", "--out", str(fam)] + common) == 0
    assert main(["info", str(fam)]) == 0
    assert main(["profile", str(fam), "--batch-sizes", "1,4", "--quick", "--threads", "1"]) == 0
    assert main(["build", str(fam), "--batch-size", "4", "--target", "0.05", "--confidence", "auto"]) == 0
    assert main(["eval", str(fam / "cascade.json"), "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "family / one model" in out and "| cascade" in out and "cost vs reference" in out
    assert "| cascade mobilenet_v2_x0.35/r" in out and "| reference mobilenet_v2_x0.35/r" in out  # stage names
    assert main(["build", str(fam), "--target", "150"]) == 2
    assert "is ambiguous" in capsys.readouterr().err


def _images(n: int) -> list:
    held = load_data("synthetic:384", seed=0, heldout_per_class=20).test
    return [held.read(i) for i in range(n)]


def test_a_weight_file_changed_after_the_build_is_refused(built, tmp_path):
    """The ONNX Runtime runner opens its sessions from the family's checked export without loading the weights,
    yet a weight file changed since the build (the shared weights or a patch, one bit) is refused on every backend."""
    family, cascade_json, _ = built
    copy = tmp_path / "family"
    shutil.copytree(family, copy)
    config = read_config(cascade_json)
    config.doc["family"]["path"] = str(copy)
    config.save(tmp_path / "cascade.json")
    assert (copy / "onnx" / "shared.fp32.json").is_file()  # the export the runner reuses
    want = CascadeRunner(tmp_path / "cascade.json", warmup=False)(_images(4)).labels
    for damaged in ("not json {", "[1, 2]"):  # a damaged export record: exported again, not a traceback
        (copy / "onnx" / "shared.fp32.json").write_text(damaged)
        assert np.array_equal(CascadeRunner(tmp_path / "cascade.json", warmup=False)(_images(4)).labels, want)
    for name in ("shared.safetensors", "patches/r032.safetensors"):
        data = (copy / name).read_bytes()
        (copy / name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        for backend in ("onnxruntime", "torch"):
            with pytest.raises(ArtifactError, match=f"{name} does not match the sha256 recorded in family.json"):
                CascadeRunner(tmp_path / "cascade.json", backend=backend, warmup=False)
        (copy / name).write_bytes(data)
