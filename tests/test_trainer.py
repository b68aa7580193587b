import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rescascade.profiling.engines import independent_ids, onnx_predictors, onnxruntime_predictors
from rescascade.serve.errors import RescascadeError
from rescascade.training.data import FileReader, ImageSet, load_data
from rescascade.training.family import ResolutionFamily
from rescascade.training.predict import predict_logits
from rescascade.training.preprocess import resize_center_crop
from rescascade.training.run import run_train
from rescascade.training.store import load_family
from rescascade.training.synthetic import make_synthetic
from rescascade.training.trainer import MultiResolutionForward, TrainConfig, _inputs, train

from .test_family import random_torchvision

RES = (32, 48)
QUIET = dict(log=lambda s: None)


def tiny_cfg(**kw):
    base = dict(resolutions=RES, epochs=1, batch_size=16, optimizer="adamw", lr=0.003, workers=0)
    base.update(kw)
    return TrainConfig(**base)


def test_multitask_step_shared_learns_from_all_each_patch_from_its_own():
    fam = ResolutionFamily(RES, num_classes=4, width_mult=0.35)
    fam.load_plain_state_dict(random_torchvision(num_classes=4).state_dict())
    fam.train()
    wrapper = MultiResolutionForward(fam, RES, ensemble=False)
    x = torch.randint(0, 255, (4, 3, 48, 48), dtype=torch.uint8)
    xs = _inputs([x], RES, "cpu", channels_last=True)
    assert [t.shape[-1] for t in xs] == [32, 48]
    logits = wrapper(xs)
    conv = fam.model.features[0][0].weight
    # loss of r32 alone: the shared conv and r32's patch get gradients, r48's patch none
    logits[0].sum().backward(retain_graph=True)
    assert conv.grad is not None and conv.grad.abs().sum() > 0
    assert all(p.grad is not None for p in fam.patch_parameters(32))
    assert all(p.grad is None for p in fam.patch_parameters(48))
    g32 = conv.grad.clone()
    logits[1].sum().backward()
    assert not torch.equal(conv.grad, g32)  # r48 added its own gradient to the shared weights


@pytest.mark.parametrize("shared, classifier", [("frozen", "train"), ("frozen", "frozen"), ("train", "frozen")])
def test_frozen_parts_do_not_change(shared, classifier, tmp_path):
    splits = load_data("synthetic:64", seed=0, heldout_per_class=4)
    cfg = tiny_cfg(shared=shared, classifier=classifier)
    fam = ResolutionFamily(RES, num_classes=8, width_mult=0.35)
    before = {k: v.clone() for k, v in fam.state_dict_for(32).items()}
    from rescascade.training.trainer import train
    train(fam, splits.train, cfg, tmp_path, **QUIET)
    after = fam.state_dict_for(32)
    conv_same = torch.equal(before["features.1.conv.0.0.weight"], after["features.1.conv.0.0.weight"])
    head_same = torch.equal(before["classifier.1.weight"], after["classifier.1.weight"])
    bn_same = torch.equal(before["features.0.1.weight"], after["features.0.1.weight"])
    assert conv_same == (shared == "frozen")
    assert head_same == (classifier == "frozen")
    assert not bn_same  # the patches always learn
    assert not torch.equal(before["features.0.1.running_mean"], after["features.0.1.running_mean"])


@pytest.mark.parametrize("patches", ["frozen", "stats", "affine"])
def test_frozen_affine_or_statistics_only_patches(patches, tmp_path):
    splits = load_data("synthetic:64", seed=0, heldout_per_class=4)
    fam = ResolutionFamily(RES, num_classes=8, width_mult=0.35)
    fam.load_plain_state_dict(random_torchvision(num_classes=8).state_dict())
    before = {k: v.clone() for k, v in fam.state_dict_for(32).items()}
    from rescascade.training.trainer import train
    train(fam, splits.train, tiny_cfg(shared="frozen", patches=patches), tmp_path, **QUIET)
    after = fam.state_dict_for(32)
    assert torch.equal(before["features.0.1.weight"], after["features.0.1.weight"]) == (patches != "affine")
    assert torch.equal(before["features.0.1.running_mean"], after["features.0.1.running_mean"]) == \
        (patches in ("frozen", "affine"))
    assert not torch.equal(before["classifier.1.weight"], after["classifier.1.weight"])
    fam2 = ResolutionFamily(RES, num_classes=8, width_mult=0.35)
    train(fam2, splits.train, tiny_cfg(shared="frozen", classifier="frozen", patches="stats"), tmp_path / "s", **QUIET)


@pytest.mark.parametrize("distill", ["top", "ensemble", "teacher"])
def test_distillation_modes_train(distill, tmp_path):
    doc = run_train("synthetic:64", tmp_path / "f", tiny_cfg(distill=distill, distill_temperature=2.0),
                    width_mult=0.35, weights="none", data_options={"heldout_per_class": 4}, **QUIET)
    rows = list(csv_rows(tmp_path / "f" / "metrics.csv"))
    assert len(rows) == 2 and float(rows[0]["distill_loss"]) > 0
    assert set(doc["top1"]["test"]) == {"32", "48"}


def test_frozen_top_is_the_teacher_and_lower_resolutions_learn_on_the_eval_crop(tmp_path):
    """freeze_top keeps the top resolution's patch and own head exactly (the teacher, the cascade's reference);
    crop "center" trains on the eval crop (+ flip) resized to every resolution."""
    from rescascade.training.trainer import _TrainCrops, train
    splits = load_data("synthetic:64", seed=0, heldout_per_class=4)
    fam = ResolutionFamily(RES, num_classes=8, width_mult=0.35, classifier="per_resolution")
    fam.load_plain_state_dict(random_torchvision(num_classes=8).state_dict())
    before = {r: {k: v.clone() for k, v in fam.state_dict_for(r).items()} for r in RES}
    cfg = tiny_cfg(shared="frozen", patches="train", distill="teacher", freeze_top=True, crop="center",
                   weight_decay=0.1)
    train(fam, splits.train, cfg, tmp_path, **QUIET)
    after = {r: fam.state_dict_for(r) for r in RES}
    assert all(torch.equal(before[48][k], after[48][k]) for k in before[48])  # statistics included
    for k in ("features.0.1.weight", "features.0.1.running_mean", "classifier.1.weight"):
        assert not torch.equal(before[32][k], after[32][k])
    with pytest.raises(RescascadeError, match="`freeze_top` needs"):  # a shared head would change the top anyway
        train(ResolutionFamily(RES, num_classes=8, width_mult=0.35), splits.train, cfg, tmp_path / "s", **QUIET)
    img = torch.randint(0, 255, (3, 60, 70), dtype=torch.uint8)
    center = resize_center_crop(img, 48)
    crops = [_TrainCrops(RES, "center", (0.25, 1.0))(img) for _ in range(20)]
    assert all(len(c) == 1 and (torch.equal(c[0], center) or torch.equal(c[0], center.flip(-1))) for c in crops)
    assert any(torch.equal(c[0], center.flip(-1)) for c in crops)


def csv_rows(path):
    import csv
    with open(path) as f:
        yield from csv.DictReader(f)


def test_train_writes_family_predictions_and_metrics(tmp_path):
    out = tmp_path / "fam"
    run_train("synthetic:64", out, tiny_cfg(), width_mult=0.35, weights="none",
              classifier_kind="per_resolution", data_options={"heldout_per_class": 6}, **QUIET)
    fam, loaded = load_family(out)
    assert loaded["top1"]["calib"].keys() == {"32", "48"} and loaded["classifier"] == "per_resolution"
    assert not (out / "checkpoints").exists()
    for split in ("calib", "test"):
        z = np.load(out / "predictions" / f"{split}.npz")
        n = len(z["labels"])
        assert z["logits"].shape == (n, 2, 8) and z["logits"].dtype == np.float32
        assert list(z["resolutions"]) == [32, 48] and len(set(z["ids"])) == n
        assert str(z["weights_sha256"]) and int(z["schema_version"]) == 1
    calib_ids = set(np.load(out / "predictions/calib.npz")["ids"])
    test_ids = set(np.load(out / "predictions/test.npz")["ids"])
    assert not calib_ids & test_ids
    header = (out / "metrics.csv").read_text().splitlines()[0]
    for col in ("epoch", "resolution", "loss", "top1", "lr", "images_per_s"):
        assert col in header
    with pytest.raises(RescascadeError, match="already holds a finished family"):
        run_train("synthetic:64", out, tiny_cfg(), width_mult=0.35, weights="none", **QUIET)


def test_independent_baseline_predicts_with_onnxruntime_as_torch_does(tmp_path):
    from safetensors.torch import load_file
    from torchvision.models import mobilenet_v2

    from rescascade.training.predict import predict_logits
    cfg = tiny_cfg(independent=True)
    doc = run_train("synthetic:64", tmp_path / "ind", cfg, width_mult=0.35, weights="none",
                    data_options={"heldout_per_class": 4}, predictors=onnxruntime_predictors, **QUIET)
    assert doc["kind"] == "independent" and doc["parameters"]["k_independent"] == 2 * doc["parameters"]["one_model"]
    saved = np.load(tmp_path / "ind/predictions/test.npz")
    assert saved["logits"].shape[1] == 2
    models = {}
    for r in RES:  # the saved torchvision models, run by torch, give the logits ONNX Runtime wrote
        models[r] = mobilenet_v2(num_classes=len(doc["class_names"]), width_mult=0.35)
        models[r].load_state_dict(load_file(tmp_path / f"ind/models/r{r:03d}.safetensors"))
    test = load_data("synthetic:64", seed=cfg.seed, heldout_per_class=4).test
    want = predict_logits(models, test)
    assert list(want["ids"]) == list(saved["ids"])
    np.testing.assert_allclose(saved["logits"], want["logits"], atol=1e-3, rtol=1e-3)
    # the exports are cached by each model file's sha256: predicting again does not export again; other weights do
    onnx = {r: tmp_path / f"ind/onnx/r{r:03d}.fp32.onnx" for r in RES}
    stamps = {r: p.stat().st_mtime_ns for r, p in onnx.items()}
    ids = independent_ids(doc)
    onnx_predictors(models, tmp_path / "ind", ids)
    assert {r: p.stat().st_mtime_ns for r, p in onnx.items()} == stamps
    onnx_predictors(models, tmp_path / "ind", {**ids, RES[0]: "other weights"})
    assert onnx[RES[0]].stat().st_mtime_ns != stamps[RES[0]] and onnx[RES[1]].stat().st_mtime_ns == stamps[RES[1]]


def test_synthetic_is_deterministic_and_resolution_sensitive():
    a, la = make_synthetic(64, seed=3)
    b, lb = make_synthetic(64, seed=3)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, make_synthetic(64, seed=4)[0])
    from rescascade.training.preprocess import resize_center_crop
    imgs, labels = make_synthetic(400, num_classes=8, seed=0)
    fine = imgs[labels >= 4].float()

    def texture_energy(x, r):  # high-frequency energy left after the eval resize to r
        y = resize_center_crop(x, r)
        return (y[..., 1:, :] - y[..., :-1, :]).abs().mean() + (y[..., :, 1:] - y[..., :, :-1]).abs().mean()
    assert texture_energy(fine, 96) > 2 * texture_energy(fine, 32)


def write_image_folder(root: Path, classes=("a", "b"), per_class=10, corrupt=0, size=40, truncated=0):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    for i in range(corrupt):
        (root / classes[0] / f"broken{i}.jpg").write_bytes(b"\xff\xd8not a jpeg at all")
    for i in range(truncated):  # a header that reads, data cut short (PNG's checksums find it before decoding)
        data = (root / classes[1] / "0.png").read_bytes()
        (root / classes[1] / f"truncated{i}.png").write_bytes(data[:len(data) // 2])


def test_corrupt_images_are_skipped_counted_and_named(tmp_path):
    write_image_folder(tmp_path / "imgs", per_class=24, corrupt=5, truncated=3)
    logs = []
    cfg = tiny_cfg(batch_size=8)
    run_train(f"imagefolder:{tmp_path / 'imgs'}", tmp_path / "fam", cfg, width_mult=0.35, weights="none",
              log=logs.append, data_options={"val_fraction": 0.3})
    doc = json.loads((tmp_path / "fam/family.json").read_text())
    data = doc["provenance"]["data"]
    named = [b for split in data["unreadable"].values() for b in split]
    assert sorted(b["id"].split("/")[-1] for b in named) == [f"broken{i}.jpg" for i in range(5)] + \
        [f"truncated{i}.png" for i in range(3)]
    assert all("not an image" in b["error"] for b in named if "broken" in b["id"])
    assert all("damaged" in b["error"] for b in named if "truncated" in b["id"])
    # the counts are the images actually trained on and scored
    for split in ("calib", "test"):
        assert data[f"{split}_images"] == len(np.load(tmp_path / f"fam/predictions/{split}.npz")["labels"])
    assert data["train_images"] + data["calib_images"] + data["test_images"] == 48
    assert any("unreadable" in line and "broken" in line for line in logs)


def test_images_that_fail_to_decode_are_named_where_they_are_read(tmp_path):
    """A truncated JPEG passes the header check and fails in the middle of its data: prediction and training leave
    it out and name it; the batch goes on."""
    import io
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
        data = buf.getvalue()
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(data[:len(data) // 2] if i in (2, 5) else data)
    images = ImageSet(["a", "b"], [i % 2 for i in range(8)], [p.name for p in paths], FileReader([str(p) for p in paths]))
    assert len(images.readable("test")[0]) == 8  # the headers read
    fam = ResolutionFamily(RES, num_classes=2, width_mult=0.35).eval()
    pred = predict_logits({r: fam.plain_model(r) for r in RES}, images, batch_size=4)
    assert [b["id"] for b in pred["unreadable"]] == ["2.jpg", "5.jpg"] and len(pred["labels"]) == 6
    assert all("does not decode" in b["error"] for b in pred["unreadable"])
    result = train(ResolutionFamily(RES, num_classes=2, width_mult=0.35), images, tiny_cfg(batch_size=2), tmp_path,
                   log=lambda s: None)
    assert sorted(result.unreadable) == ["2.jpg", "5.jpg"]


def test_data_errors_up_front(tmp_path):
    write_image_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(RescascadeError, match="at least 2"):
        load_data(f"imagefolder:{tmp_path / 'one'}")
    write_image_folder(tmp_path / "two", classes=("a", "b"))
    (tmp_path / "two" / "empty").mkdir()
    with pytest.raises(RescascadeError, match="empty have no readable images"):
        load_data(f"imagefolder:{tmp_path / 'two'}")
    with pytest.raises(RescascadeError, match="unknown `data`"):
        load_data("mnist")
    with pytest.raises(RescascadeError, match="not found"):
        load_data(f"imagefolder:{tmp_path / 'nope'}")


def test_bad_train_config():
    with pytest.raises(RescascadeError, match="`loss_weights` has 1 values"):
        TrainConfig(RES, loss_weights=(1.0,))
    with pytest.raises(RescascadeError, match="`optimizer`"):
        TrainConfig(RES, optimizer="lbfgs")


def _train_cmd(out, epochs=3):
    return [sys.executable, "-m", "rescascade.cli", "train", "--data", "synthetic:96", "--out", str(out),
            "--resolutions", "32,48", "--width-mult", "0.35", "--weights", "none", "--epochs", str(epochs),
            "--batch-size", "16", "--optimizer", "adamw", "--lr", "0.003", "--workers", "0", "--heldout-per-class", "3",
            # the teacher is a copy of the probed start: a resumed run must rebuild the same one
            "--classifier", "per-resolution", "--head-init", "probe", "--distill", "teacher"]


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    full = subprocess.run(_train_cmd(tmp_path / "full"), env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    proc = subprocess.Popen(_train_cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and ckpt.is_file()
    epoch = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= epoch < 3 and not (tmp_path / "killed" / "family.json").exists()
    resumed = subprocess.run(_train_cmd(tmp_path / "killed") + ["--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, _ = load_family(tmp_path / "full")
    b, _ = load_family(tmp_path / "killed")
    for r in (32, 48):
        for (k, va), (_, vb) in zip(sorted(a.state_dict_for(r).items()), sorted(b.state_dict_for(r).items())):
            assert torch.equal(va, vb), k
    assert np.array_equal(np.load(tmp_path / "full/predictions/test.npz")["logits"],
                          np.load(tmp_path / "killed/predictions/test.npz")["logits"])


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "rescascade.cli"] + _train_cmd(tmp_path / "ddp", epochs=1)[3:]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "ddp/family.json").read_text())
    assert doc["provenance"]["world_size"] == 2
    fam, _ = load_family(tmp_path / "ddp")
    assert set(doc["top1"]["test"]) == {"32", "48"}


@pytest.mark.slow
def test_torchrun_with_a_truncated_jpeg_skips_it_in_step_and_counts_it(tmp_path):
    """Two processes of two images each: the one whose batch loses the truncated JPEG skips the step, and so must
    the other (a lone all-reduce waits forever); the skipped image is counted once, whichever process read it."""
    from PIL import Image

    from .conftest import photo
    root = tmp_path / "photos"
    for c in range(2):
        (root / "train" / f"c{c}").mkdir(parents=True)
        (root / "val" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(photo(40, 40, 10 * c + i)).save(root / "train" / f"c{c}" / f"{i}.jpg")
            Image.fromarray(photo(40, 40, 100 + 10 * c + i)).save(root / "val" / f"c{c}" / f"{i}.jpg")
    Image.fromarray(photo(160, 160, 0)).save(root / "train" / "c0" / "0.jpg")
    whole = (root / "train" / "c0" / "0.jpg").read_bytes()
    (root / "train" / "c0" / "0.jpg").write_bytes(whole[:len(whole) * 3 // 4])  # its header reads, its data not
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29518",
           "-m", "rescascade.cli", "train", "--data", f"imagefolder:{root}", "--out", str(tmp_path / "ddp"),
           "--resolutions", "32,48", "--width-mult", "0.35", "--weights", "none", "--epochs", "2",
           "--batch-size", "4", "--workers", "0", "--optimizer", "adamw"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "ddp/family.json").read_text())
    assert doc["provenance"]["skipped_train_images"] == 2  # one per epoch
    assert [u["id"] for u in doc["provenance"]["data"]["unreadable"]["train"]] == ["train/c0/0.jpg"]


def test_linear_probe_fits_separable_features():
    from rescascade.training.probe import fit_linear
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(200) % 4
    x = centers[y] + torch.randn(200, 16, generator=g) + 5.0  # offset: the standardisation must fold back
    w, b = fit_linear(x, y, 4)
    assert ((x @ w.T + b).argmax(1) == y).float().mean() > 0.97


def test_probe_penalty_is_cross_validated():
    """Few noisy images want a strong penalty, many clean ones a weak one."""
    from rescascade.training.probe import L2_GRID, choose_l2
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g)
    y_few, y_many = torch.arange(80) % 4, torch.arange(800) % 4
    noisy = torch.cat([centers[y_few] + 2 * torch.randn(80, 8, generator=g), torch.randn(80, 300, generator=g)], 1)
    clean = centers[y_many] * 4 + torch.randn(800, 8, generator=g)
    strong, weak = choose_l2(noisy, y_few, 4), choose_l2(clean, y_many, 4)
    assert strong in L2_GRID and weak in L2_GRID and strong > weak


@pytest.mark.parametrize("classifier_kind", ["per_resolution", "shared"])
def test_probe_head_init_sets_the_heads(classifier_kind, tmp_path):
    from rescascade.training.probe import init_heads_by_probe
    splits = load_data("synthetic:64", seed=0, heldout_per_class=4)
    fam = ResolutionFamily(RES, num_classes=8, width_mult=0.35, classifier=classifier_kind)
    fam.load_plain_state_dict(random_torchvision(num_classes=8).state_dict())
    before = [p.clone() for p in fam.classifier_parameters()]
    logs = []
    init_heads_by_probe(fam, splits.train, "cpu", log=logs.append)
    assert all(not torch.equal(a, b) for a, b in zip(before, fam.classifier_parameters()))
    assert len(logs) == (2 if classifier_kind == "per_resolution" else 0)
    run_train("synthetic:64", tmp_path / "f", tiny_cfg(head_init="probe", shared="frozen"), width_mult=0.35,
              weights="none", classifier_kind=classifier_kind, data_options={"heldout_per_class": 4}, **QUIET)


def test_probe_of_the_same_start_on_the_same_images_is_fitted_once():
    """Variants trained from one start in one process share its probe; any change in what the features depend on
    (a patch, the image set) probes again."""
    from torchvision.models import mobilenet_v2

    from rescascade.training.probe import ProbeCache, init_heads_by_probe
    from rescascade.training.trainer import IndependentModels
    splits = load_data("synthetic:64", seed=0, heldout_per_class=4)
    cache = ProbeCache()
    start = random_torchvision(num_classes=8).state_dict()

    def family():
        fam = ResolutionFamily(RES, num_classes=8, width_mult=0.35, classifier="per_resolution")
        fam.load_plain_state_dict(start)
        return fam

    def probe(model, images):
        logs = []
        init_heads_by_probe(model, images, "cpu", log=logs.append, cache=cache)
        return sum("cross-validated" in line for line in logs)  # resolutions fitted anew

    first, second = family(), family()
    assert probe(first, splits.train) == 2 and probe(second, splits.train) == 0
    for r in RES:
        assert torch.equal(first.state_dict_for(r)["classifier.1.weight"], second.state_dict_for(r)["classifier.1.weight"])

    def plain():  # the independent baseline: plain torchvision models with the same weights see the same features
        m = mobilenet_v2(num_classes=8, width_mult=0.35)
        m.load_state_dict(start)
        return m
    independent = IndependentModels(RES, plain, "mobilenet_v2", "classifier", "classifier.1")
    assert probe(independent, splits.train) == 0
    assert torch.equal(independent.models["r048"].classifier[1].weight, first.state_dict_for(48)["classifier.1.weight"])

    changed = family()
    with torch.no_grad():
        changed.model.features[1].conv[0][1].weight["r048"].mul_(2)  # one patch's γ
    assert probe(changed, splits.train) == 1
    same_pixels = load_data("synthetic:64", seed=0, heldout_per_class=4).train  # another ImageSet object
    assert probe(family(), same_pixels) == 2
    cache = None  # no cache: every call fits
    assert probe(family(), splits.train) == 2


def test_zero_epochs_with_probe_writes_the_probed_heads(tmp_path):
    """--epochs 0 --head-init probe is the linear-probe baseline: heads fitted, everything else as it started."""
    from rescascade.training.store import load_family
    w = tmp_path / "w.pt"
    start = random_torchvision(num_classes=1000)
    start.features[0][1].reset_running_stats()  # random statistics of no input normalization: the file check refuses them
    torch.save(start.state_dict(), w)
    kw = dict(width_mult=0.35, weights=str(w), classifier_kind="per_resolution",
              data_options={"heldout_per_class": 4}, **QUIET)
    for head_init in ("none", "probe"):
        run_train("synthetic:64", tmp_path / head_init, tiny_cfg(epochs=0, head_init=head_init, shared="frozen"),
                  **kw)
    start, probed = load_family(tmp_path / "none")[0], load_family(tmp_path / "probe")[0]
    for r in RES:
        assert not torch.equal(start.state_dict_for(r)["classifier.1.weight"],
                               probed.state_dict_for(r)["classifier.1.weight"])
        assert torch.equal(start.state_dict_for(r)["features.3.conv.1.1.weight"],
                           probed.state_dict_for(r)["features.3.conv.1.1.weight"])


def test_preprocess_matches_torchvision_in_any_memory_layout():
    """The fused preprocessing gives torchvision's to_dtype + normalize pixels, from channels-first or channels-last
    uint8 (as decode_image returns), one image or a batch; the model input comes out contiguous."""
    import torchvision.transforms.v2.functional as TF

    from rescascade.training.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess, resize_center_crop
    hwc = torch.randint(0, 256, (3, 57, 71, 3), dtype=torch.uint8)
    channels_last, channels_first = hwc.permute(0, 3, 1, 2), hwc.permute(0, 3, 1, 2).contiguous()
    for r in (32, 48):
        expected = TF.normalize(TF.to_dtype(resize_center_crop(channels_first, r), torch.float32, scale=True),
                                list(IMAGENET_MEAN), list(IMAGENET_STD))
        for x in (channels_last, channels_first):
            out = preprocess(x, r)
            assert out.is_contiguous() and out.shape == (3, 3, r, r)
            assert torch.allclose(out, expected, atol=1e-5)
        assert torch.allclose(preprocess(channels_last[1], r), expected[1], atol=1e-5)
