"""Every artifact knows what it belongs to: exit counts carry the plan that served them (drift refuses others and
counts given twice), cascade.json and bundle.json are validated whole on load (expected figures, temperatures),
eval leaves out the calib images the thresholds were fitted on wherever they now lie, a profile holds one
source size per row set, and weights given as a file are checked against the input normalization fed."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image

from rescascade.cli import main
from rescascade.config import read_config
from rescascade.costs import CostModel
from rescascade.evaluate import run_eval
from rescascade.export import export_bundle
from rescascade.monitor import drift_report, format_drift
from rescascade.profiling.measure import QUICK
from rescascade.profiling.profile import Profile, run_profile
from rescascade.runtime import CascadeRunner, decision_step
from rescascade.scoring import images_to_score
from rescascade.serve.bundle import Bundle
from rescascade.serve.counts import ExitCounts, continue_counts, plan_identity
from rescascade.serve.errors import ArtifactError, ConfigError, RescascadeError
from rescascade.training.run import run_train
from rescascade.training.synthetic import make_synthetic
from rescascade.training.trainer import TrainConfig

QUIET = dict(log=lambda s: None)


def counts_of(config, fractions, n, plan=None):
    """Counts of n inputs served by `config`'s plan whose stages exit these fractions of all inputs."""
    stages = [int(s["resolution"]) for s in config.doc["stages"]]
    counts = ExitCounts.for_cascade(stages, config.measure, config.doc["family"]["num_classes"],
                                    plan or plan_identity(config.doc))
    left = n
    for k in range(len(stages)):
        leave = left if k == len(stages) - 1 else int(round(n * fractions[k]))
        counts.add_stage(k, np.linspace(0.1, 0.9, left), np.arange(left) < leave)
        left -= leave
    counts.inputs = n
    return counts


def test_counts_of_another_plan_or_given_twice_are_refused(split_cascade, tmp_path, capsys):
    config = read_config(split_cascade)
    runner = CascadeRunner(config, warmup=False)
    assert runner.counts.plan == plan_identity(config.doc)  # the runtime counts under its config's identity
    other = json.loads(Path(split_cascade).read_text())
    other["stages"][0]["threshold"] = other["stages"][0]["threshold"] / 2  # same stages, other threshold
    other["confidence"]["temperatures"] = {r: 1.7 * t for r, t in other["confidence"]["temperatures"].items()}
    (tmp_path / "other.json").write_text(json.dumps(other))
    served_elsewhere = counts_of(read_config(tmp_path / "other.json"), [0.5, 0.5], 400)
    with pytest.raises(ConfigError, match="the same stages with other thresholds"):
        drift_report(config, served_elsewhere)
    served = counts_of(config, [0.5, 0.5], 400)
    served.save(tmp_path / "c.json")
    served_elsewhere.save(tmp_path / "e.json")
    for files, code, said in ((["c.json"], 0, "no stage's exit fraction differs"), (["c.json"] * 3, 2, "given twice"),
                              (["c.json", "e.json"], 2, "cannot be added")):
        capsys.readouterr()
        assert main(["drift", str(split_cascade), *(str(tmp_path / f) for f in files)]) == code, files
        out = capsys.readouterr()
        assert said in out.out + out.err and "Traceback" not in out.err
    two = served + counts_of(config, [0.5, 0.5], 100)  # two runtimes of the same plan add up
    assert two.inputs == 500 and len(two.ids) == 2
    (tmp_path / "v1.json").write_text(json.dumps({**json.loads((tmp_path / "c.json").read_text()),
                                                  "schema_version": 1}))
    with pytest.raises(ArtifactError, match="without the identity"):
        ExitCounts.load(tmp_path / "v1.json")
    with pytest.raises(ConfigError, match="CascadeConfig"):
        drift_report(str(split_cascade), served)


def test_edited_expected_figures_stop_at_load_in_one_line(split_cascade, tmp_path, capsys):
    good = json.loads(Path(split_cascade).read_text())
    bundle = tmp_path / "bundle"
    export_bundle(split_cascade, bundle, **QUIET)
    bundle_doc = json.loads((bundle / "bundle.json").read_text())
    ExitCounts.for_cascade([32, 48], "max_prob", 8, plan_identity(good)).save(tmp_path / "c.json")
    edits = [("exit_fractions of the wrong length", lambda e: e["test"].update(exit_fractions=[1.0])),
             ("fractions over 1", lambda e: e["test"].update(exit_fractions=[0.9, 0.9])),
             ("n missing", lambda e: e["test"].pop("n")), ("n not a number", lambda e: e["calib"].update(n="24")),
             ("no test split", lambda e: e.pop("test"))]
    for what, edit in edits:
        doc = json.loads(json.dumps(good))
        edit(doc["expected"])
        (tmp_path / "edited.json").write_text(json.dumps(doc))
        with pytest.raises(ArtifactError, match="expected"):
            read_config(tmp_path / "edited.json")
        capsys.readouterr()
        assert main(["drift", str(tmp_path / "edited.json"), str(tmp_path / "c.json")]) == 2, what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "expected" in err[0], (what, err)
        bdoc = json.loads(json.dumps(bundle_doc))
        edit(bdoc["expected"])
        (bundle / "bundle.json").write_text(json.dumps(bdoc))
        with pytest.raises(ArtifactError, match="expected"):
            Bundle(bundle)
    (bundle / "bundle.json").write_text(json.dumps(bundle_doc))
    Bundle(bundle)


def test_a_plan_without_its_temperatures_is_refused(split_cascade, tmp_path):
    bundle = tmp_path / "bundle"
    export_bundle(split_cascade, bundle, **QUIET)
    doc = json.loads((bundle / "bundle.json").read_text())
    for temperatures in ({}, {str(doc["stages"][0]["resolution"]): 1.0}):
        (bundle / "bundle.json").write_text(json.dumps({**doc, "confidence": {**doc["confidence"],
                                                                              "temperatures": temperatures}}))
        with pytest.raises(ArtifactError, match="temperatures lacks"):
            Bundle(bundle)
    cfg = json.loads(Path(split_cascade).read_text())
    del cfg["confidence"]["temperatures"]
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="temperatures lacks"):
        read_config(tmp_path / "c.json")


def test_drift_says_what_difference_it_could_see(split_cascade):
    config = read_config(split_cascade)
    config.doc["expected"]["test"]["n"] = 24
    foreign = counts_of(config, [0.3, 0.7], 60)  # 0.5 expected from 24 test images: a small sample on each side
    report = drift_report(config, foreign)
    row = report["stages"][0]
    assert not report["drifted"] and row["detectable"] > 0.3  # 20 points of drift: more than it can see
    text = format_drift(report)
    assert "only differences of +-" in text and "a smaller drift may go unseen" in text
    config.doc["expected"]["test"]["n"] = 20000
    big = drift_report(config, counts_of(config, [0.3, 0.7], 20000))
    assert big["drifted"] and big["stages"][0]["detectable"] < 0.05


def test_restarted_runtimes_continue_their_counts_and_never_overwrite_others(tmp_path):
    path = tmp_path / "exit_counts.i0.json"
    first = ExitCounts.for_cascade([32, 48], "max_prob", 8, "plan-a")
    first.inputs = 22
    first.save(path)
    fresh = ExitCounts.for_cascade([32, 48], "max_prob", 8, "plan-a")
    counts, where = continue_counts(path, fresh)
    assert where == path and counts.inputs == 22 and counts.ids == first.ids  # a reload goes on counting
    other_plan = ExitCounts.for_cascade([32, 48], "max_prob", 8, "plan-b")
    counts, where = continue_counts(path, other_plan)
    assert counts is other_plan and where == tmp_path / "exit_counts.i0.1.json"
    counts.save(where)
    (tmp_path / "damaged.json").write_text("{")
    counts, where = continue_counts(tmp_path / "damaged.json", fresh)
    assert where == tmp_path / "damaged.1.json"
    assert ExitCounts.load(path).inputs == 22


def test_eval_on_other_data_leaves_out_the_calib_images(jpeg_family, tmp_path):
    """The family's own photos, moved and re-encoded as PNG, mixed with new photos: the calib images (same
    pixels) are left out and said so."""
    fam = jpeg_family / "fam"
    config = read_config(_cascade(fam))
    calib = images_to_score(config, None, "calib", None, lambda s: None).images
    test = images_to_score(config, None, "test", None, lambda s: None).images
    moved = tmp_path / "moved"
    for images, count in ((calib, 6), (test, 4)):
        for k in range(count):
            i = k * len(images) // count
            folder = moved / images.class_names[images.labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = images.read(i).permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(folder / f"{Path(images.ids[i]).stem}_{count}.png")
    lines = []
    report = run_eval(config.path, data=f"imagefolder:{moved}", repeats=1, plot=False, log=lines.append,
                      out=tmp_path / "r.json")
    assert report["images"] == 4
    assert any("left out 6 of the 10 images" in line and "calib" in line for line in lines), lines


def _cascade(fam: Path) -> Path:
    path = fam / "identity_cascade.json"
    if not path.is_file():
        main(["build", str(fam), "--target", "0.05", "--exact", "off", "--refine", "0", "--out", str(path)])
    return path


def test_eval_from_bytes_on_calib_names_each_prediction(jpeg_family, tmp_path):
    fam = jpeg_family / "fam"
    config = read_config(_cascade(fam))
    assert "decode" in config.doc["profile"] and "decoded_inputs" in config.doc["expected"]["calib"]
    lines = []
    report = run_eval(config.path, split="calib", from_bytes=True, repeats=1, limit=8, plot=False, log=lines.append,
                      out=tmp_path / "r.json")
    exp = config.doc["expected"]["calib"]
    assert report["predicted_cost_ratio"] == exp["decoded_inputs"]["cost_vs_reference"]
    assert report["from_bytes"]["predicted_cost_ratio"] == exp["cost_vs_reference"]
    assert "counted no decode" not in "\n".join(lines)


def test_a_profile_holds_one_source_size_per_row_set(tiny_family, tmp_path):
    fam = tmp_path / "fam"
    shutil.copytree(tiny_family, fam)
    for p in ("profile.csv", "profile.json", "profile_decode.csv"):
        (fam / p).unlink(missing_ok=True)
    run_profile(fam, "onnxruntime", "fp32", (1, 4), protocol=QUICK, threads=1, decision_step=decision_step,
                source_size="64x64", **QUIET)
    before = (fam / "profile.csv").read_text()
    with pytest.raises(ConfigError, match="profile every one of them again"):
        run_profile(fam, "onnxruntime", "fp32", (4,), protocol=QUICK, threads=1, decision_step=decision_step,
                    source_size="320x240", **QUIET)
    assert (fam / "profile.csv").read_text() == before
    run_profile(fam, "onnxruntime", "fp32", (1, 4), protocol=QUICK, threads=1, decision_step=decision_step,
                source_size="320x240", **QUIET)  # every row again: the file moves to the new size whole
    assert set(pd.read_csv(fam / "profile.csv").served_size) == {"320x240"}
    mixed = pd.read_csv(fam / "profile.csv")
    mixed.loc[mixed.batch_size == 1, "served_size"] = "64x64"  # as an earlier rescascade could leave it
    mixed.to_csv(fam / "profile.csv", index=False)
    with pytest.raises(RescascadeError, match="several sizes"):
        CostModel.from_profile(Profile.load(fam / "profile.csv"), batch_size=4, source_size="auto")


def _checkpoint(path: Path, normalize) -> None:
    """A MobileNetV2 x0.35 whose BatchNorm statistics were estimated on synthetic images normalized by
    `normalize` (uint8 [N, 3, H, W] -> float), saved as a state dict: weights 'trained' with that normalization."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=8)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the batches below
    images, _ = make_synthetic(64, num_classes=8, size=48, seed=1)
    model.train()
    with torch.no_grad():
        model(normalize(images))
    torch.save(model.eval().state_dict(), path)


def test_weights_from_a_file_are_checked_against_the_normalization_fed(tmp_path):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    cfg = TrainConfig((32, 48), epochs=0, batch_size=16, workers=0)
    for name, normalize, ok in (("imagenet", lambda x: (x / 255 - mean) / std, True),
                                ("mean0std1", lambda x: x / 255, False), ("half", lambda x: (x / 255 - 0.5) / 0.5, False)):
        _checkpoint(tmp_path / f"{name}.pt", normalize)
        out = tmp_path / f"fam_{name}"
        train = lambda: run_train("synthetic:64", out, cfg, width_mult=0.35, weights=str(tmp_path / f"{name}.pt"),
                                  data_options={"heldout_per_class": 4}, **QUIET)  # noqa: E731
        if ok:
            train()
            assert (out / "family.json").is_file()
        else:
            with pytest.raises(ConfigError, match="another input normalization"):
                train()
            assert not out.exists() or not any(out.iterdir())
