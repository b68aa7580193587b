"""The exported bundle and its torch-free runtime: same pixels, labels, exit stages and probabilities as
`CascadeRunner`; runs where torch cannot be imported; refuses damaged bundles and bad inputs clearly."""
import hashlib
import json
import math
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rescascade.cli import main as cli_main
from rescascade.config import read_config
from rescascade.export import export_bundle
from rescascade.optimizer import Cascade, Stage
from rescascade.runtime import CascadeRunner
from rescascade.serve.bundle import Bundle, BundleRunner
from rescascade.serve.bundle import main as deploy_main
from rescascade.serve.counts import ExitCounts
from rescascade.serve.errors import ArtifactError, BackendUnavailable, ConfigError, RescascadeError
from rescascade.serve.ort import PATCH_TRAILER_BYTES, pack_patch, unpack_patch
from rescascade.serve.plan import Plan, plan_fields
from rescascade.serve.preprocess_np import preprocess_pixels, resize_center_crop_pixels
from rescascade.training.preprocess import preprocess, resize_center_crop

from .conftest import encode, photo

QUIET = dict(log=lambda s: None)


@pytest.mark.parametrize("seed", range(4))
def test_numpy_preprocessing_equals_torch(seed):
    """preprocess_np gives torch's pixels bit for bit: downscales and upscales, crops of odd sizes, aspect
    ratios beyond 4:1 (cut first), 1-pixel sides, large factors (float64 sums), batches."""
    rng = np.random.default_rng(seed)
    sizes = [(1, 1), (1, 700), (3000, 20), (2100, 1500), (110, 110), (256, 256), (97, 401)] if seed == 0 else \
        [tuple(int(v) for v in rng.integers(8, 900, 2)) for _ in range(12)]
    for h, w in sizes:
        r = int(rng.choice([32, 48, 96, 160, 224]))
        images = rng.integers(0, 256, (int(rng.choice([1, 3, 9])), h, w, 3), dtype=np.uint8)  # 9: three chunks
        tensors = torch.from_numpy(images).permute(0, 3, 1, 2)
        assert np.array_equal(resize_center_crop_pixels(images, r), resize_center_crop(tensors, r).permute(0, 2, 3, 1).numpy()), (h, w, r)
        assert np.array_equal(preprocess_pixels(images, r, 0.8), preprocess(tensors, r, 0.8).numpy()), (h, w, r)


def test_numpy_preprocessing_refuses_other_arguments():
    for bad in (np.zeros((2, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8), np.zeros((1, 0, 8, 3), np.uint8),
                [[[[0, 0, 0]]]], None):
        with pytest.raises(ValueError, match="uint8"):
            preprocess_pixels(bad, 32)
    image = np.zeros((1, 20, 30, 3), np.uint8)
    for resolution in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="resolution must be an integer >= 1"):
            preprocess_pixels(image, resolution)
    for crop_fraction in (0, -0.5, 1.2, "0.8"):  # above 1 torch pads the crop: not reproduced, so refused
        with pytest.raises(ValueError, match=r"crop_fraction must be a number in \(0, 1\]"):
            resize_center_crop_pixels(image, 32, crop_fraction)
    for out in (np.zeros((1, 3, 32, 32), np.float64), np.zeros((2, 3, 32, 32), np.float32), [0.0]):
        with pytest.raises(ValueError, match="out must be a float32 array"):
            preprocess_pixels(image, 32, out=out)
    assert preprocess_pixels(image, np.int64(32), 1).shape == (1, 3, 32, 32)


@pytest.fixture(scope="module")
def bundle(split_cascade, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    export_bundle(split_cascade, out, **QUIET)
    return out


def _inputs(tmp_path: Path) -> tuple[list, list]:
    """The same images for both runtimes: (CascadeRunner inputs, BundleRunner inputs)."""
    photos = [photo(40 + 23 * i, 300 - 17 * i, 100 + i) for i in range(12)]
    files = [encode(p, "JPEG" if i % 4 else "PNG") for i, p in enumerate(photos)]
    big = encode(photo(300, 420, 7), "JPEG")  # decoded at 1/8 for r32, at 1/4 for r48
    path = tmp_path / "photo.jpg"
    path.write_bytes(files[1])
    truncated = files[2][: len(files[2]) // 2]
    pil = Image.fromarray(photos[3])
    torch_side = files + [big, str(path), torch.from_numpy(photos[5]).permute(2, 0, 1), pil, truncated,
                          b"not an image", str(tmp_path / "missing.jpg")]
    bundle_side = files + [big, str(path), photos[5], pil, truncated, b"not an image", str(tmp_path / "missing.jpg")]
    return torch_side, bundle_side


def test_bundle_gives_the_runtimes_answers(split_cascade, bundle, tmp_path):
    """Same labels, exit stages, probabilities (bit for bit: one loop, the same ONNX Runtime sessions, the same
    pixels) and per-input errors as CascadeRunner on ONNX Runtime, with rows on both stages; the exit counts agree
    too."""
    torch_side, bundle_side = _inputs(tmp_path)
    want = CascadeRunner(split_cascade, threads=1)(torch_side)
    runner = BundleRunner(bundle, threads=1)
    got = runner(bundle_side)
    assert set(got.errors) == set(want.errors) == {16, 17, 18}
    ok = want.labels >= 0
    assert np.array_equal(got.labels, want.labels) and np.array_equal(got.exit_stage, want.exit_stage)
    assert set(want.exit_stage[ok]) == {0, 1}, "the test needs rows answered by each stage"
    # the same sessions (the shared model and the stage's patch) on the same pixels: the very same numbers
    assert np.array_equal(got.probs[ok], want.probs[ok]) and np.array_equal(got.confidence[ok], want.confidence[ok])
    assert got.names == want.names
    assert runner.counts.reached[0] == 16 and runner.counts.exited == [int((want.exit_stage == k).sum()) for k in (0, 1)]
    assert [t.decoded for t in got.stage_timings] == [t.decoded for t in want.stage_timings]
    # one copy of the weights for every stage (BatchNorms not folded): the same answers, to float rounding
    shared = BundleRunner(bundle, threads=1, weights="shared")(bundle_side)
    assert np.array_equal(shared.labels, got.labels) and np.array_equal(shared.exit_stage, got.exit_stage)
    assert np.abs(shared.probs[ok] - got.probs[ok]).max() <= 1e-5
    # one uint8 array [N, H, W, 3] is a batch, as a uint8 tensor [N, 3, H, W] is to CascadeRunner
    batch = np.stack([photo(64, 80, s) for s in range(5)])
    a = BundleRunner(bundle, threads=1, warmup=False)(batch)
    b = CascadeRunner(split_cascade, threads=1, warmup=False)(torch.from_numpy(batch).permute(0, 3, 1, 2))
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.probs, b.probs)


def test_bundle_reference_and_drift(split_cascade, bundle, tmp_path):
    """reference=True runs the reference model alone; the counts of the bundle's runtime feed `rescascade drift`
    given the bundle."""
    images = [encode(photo(50 + i, 70, i), "JPEG") for i in range(6)]
    config = read_config(split_cascade)
    ref = BundleRunner(bundle, reference=True, warmup=False)(images)
    want = CascadeRunner(config, warmup=False, stages=Cascade([Stage(config.reference, -math.inf)]))(images)
    assert np.array_equal(ref.labels, want.labels) and set(ref.exit_stage) == {0}
    runner = BundleRunner(bundle, warmup=[2])
    runner(images)
    assert runner.counts.inputs == 6  # the warm-up is not counted
    counts = tmp_path / "counts.json"
    runner.counts.save(counts)
    assert ExitCounts.load(counts).reached[0] == 6
    assert cli_main(["drift", str(bundle), str(counts)]) == 0
    assert cli_main(["drift", str(bundle / "bundle.json"), str(counts)]) == 0


def test_one_plan_schema_for_cascade_and_bundle(split_cascade, bundle, tmp_path):
    """cascade.json and bundle.json hold the plan in one schema: the bundle's plan fields are the cascade's, both
    read into the same Plan, and the same edit of the plan is refused by both with the same message."""
    config, exported = read_config(split_cascade), Bundle(bundle)
    assert plan_fields(exported.doc) == plan_fields(config.doc)
    prep = exported.doc["preprocessing"]
    args = (exported.doc["class_names"], prep["crop_fraction"], prep["decode_scale"], prep["mean"], prep["std"])
    assert Plan.from_doc(config.doc, *args) == Plan.from_doc(exported.doc, *args)
    assert BundleRunner(bundle, warmup=False).plan == Plan.from_doc(config.doc, *args)
    high = config.doc["stages"][-1]["resolution"]
    edits = {"threshold 2": lambda d: d["stages"][0].update(threshold=2.0),
             "no temperature": lambda d: d["confidence"]["temperatures"].pop(str(high)),
             "decode below a stage": lambda d: d.update(schema_version=max(2, d["schema_version"]), decode={
                 "plan": "once", "resolution": d["stages"][0]["resolution"]}),
             "a model with /": lambda d: d["reference"].update(model="a/b"),
             "exit fractions": lambda d: d["expected"]["test"].update(exit_fractions=[1.0])}
    for what, edit in edits.items():
        messages = []
        for source, load in ((split_cascade, read_config), (bundle / "bundle.json", Bundle)):
            doc = json.loads(Path(source).read_text())
            edit(doc)
            edited = tmp_path / f"{what}, {load.__name__}" / Path(source).name
            shutil.copytree(Path(source).parent, edited.parent)
            edited.write_text(json.dumps(doc))
            with pytest.raises(ArtifactError) as caught:
                load(edited)
            messages.append(str(caught.value).split(": ", 1)[1].split(";")[0])
        assert messages[0] == messages[1], what


def test_warmup_meanwhile_changes_no_answer_and_no_count(split_cascade, bundle):
    """Either runtime's warmup() (every stage, not counted) while another thread serves: the served answers and
    counts are those of a run alone."""
    images = [encode(photo(50 + 3 * i, 90 - 2 * i, 40 + i), "JPEG") for i in range(16)]
    for runner in (BundleRunner(bundle, threads=1, warmup=False), CascadeRunner(split_cascade, threads=1, warmup=False)):
        alone = runner(images)
        assert set(alone.exit_stage) == {0, 1}, "the test needs rows answered by each stage"
        stop = threading.Event()
        warming = threading.Thread(target=lambda: [runner.warmup(4) for _ in iter(stop.is_set, True)])
        warming.start()
        try:
            served = [runner(images) for _ in range(8)]
        finally:
            stop.set()
            warming.join()
        for res in served:
            assert np.array_equal(res.exit_stage, alone.exit_stage) and np.array_equal(res.probs, alone.probs)
        assert runner.counts.inputs == 9 * len(images)


_BLOCK_TORCH = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "scipy", "pandas", "matplotlib"):
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
import importlib, pkgutil, rescascade, rescascade.serve
kernel = sorted(m.name for m in pkgutil.iter_modules(rescascade.serve.__path__) if m.name != "__main__")
for name in kernel:  # every module of the kernel imports here
    importlib.import_module("rescascade.serve." + name)
from rescascade.serve.bundle import BundleRunner
r = BundleRunner(sys.argv[1], threads=1)([open(p, "rb").read() for p in sys.argv[2:]])
print(json.dumps({"module": rescascade.__file__, "labels": r.labels.tolist(), "exits": r.exit_stage.tolist(),
                  "probs": r.probs.tolist(), "kernel": kernel,
                  "heavy": [m for m in sys.modules if m.split(".")[0] in ("torch", "scipy")]}))
"""


def test_bundle_runs_without_torch(bundle, tmp_path, capsys):
    """The bundle's own copy of the runtime runs where torch (and scipy, pandas, matplotlib) cannot be imported,
    and answers as the installed runtime does."""
    files = []
    for i in range(6):
        files.append(tmp_path / f"{i}.jpg")
        files[-1].write_bytes(encode(photo(90 + 9 * i, 120, 40 + i), "JPEG"))
    res = subprocess.run([sys.executable, "-c", _BLOCK_TORCH, str(bundle), *map(str, files)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(got["module"]).resolve().is_relative_to(bundle.resolve()) and got["heavy"] == []
    import pkgutil

    import rescascade.serve
    assert got["kernel"] == sorted(m.name for m in pkgutil.iter_modules(rescascade.serve.__path__)
                                   if m.name != "__main__")  # the whole folder, each module importing without torch
    want = BundleRunner(bundle, threads=1, warmup=False)([f.read_bytes() for f in files])
    assert got["labels"] == want.labels.tolist() and got["exits"] == want.exit_stage.tolist()
    assert np.abs(np.array(got["probs"]) - want.probs).max() <= 1e-6
    cli = subprocess.run([sys.executable, "-m", "rescascade.serve", str(bundle), str(files[0]), "nothing.jpg"],
                         cwd=tmp_path, env={"PYTHONPATH": str(bundle), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    lines = cli.stdout.strip().splitlines()
    assert cli.returncode == 1 and len(lines) == 2 and lines[0].split("\t")[-1] in want.stage_names, cli
    assert lines[1].endswith("error: cannot read nothing.jpg: No such file or directory"), cli
    odd = tmp_path / "tab\there\nnewline.jpg"  # one line per image, whatever the file is called
    odd.write_bytes(files[0].read_bytes())
    capsys.readouterr()
    assert deploy_main([str(bundle), str(odd)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].split("\t")[0] == str(odd).replace("\t", "\\t").replace("\n", "\\n")
    part = tmp_path / "part"  # a bundle copied without one of its runtime's modules: one line, exit 2
    shutil.copytree(bundle, part)
    (part / "rescascade" / "serve" / "ort.py").unlink()
    cli = subprocess.run([sys.executable, "-m", "rescascade.serve", str(part), str(files[0])], cwd=tmp_path,
                         env={"PYTHONPATH": str(part), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 2 and cli.stderr.strip().splitlines() == [
        "error: the bundle's runtime cannot load: rescascade.serve.ort is missing; copy the whole bundle directory, "
        "or export it again (`rescascade export CASCADE_JSON --out DIR`)"], cli.stderr
    assert deploy_main([str(bundle), str(files[0]), "--max-image-pixels", "100"]) == 1
    assert "exceeds the limit of 100 " in capsys.readouterr().out


def test_the_shared_weights_are_stored_once(tmp_path):
    """MobileNetV2 at all five ImageNet resolutions (1000 classes, each resolution's BatchNorms made to differ):
    the shared model and the five patches weigh <= 1.06x one resolution's ONNX file, and each resolution's session
    (shared model + its patch) computes that resolution's PyTorch model (export_shared checks every one)."""
    from rescascade.profiling.export import export_resolution, export_shared
    from rescascade.training.family import PatchedBatchNorm2d, ResolutionFamily
    resolutions = (96, 128, 160, 192, 224)
    family = ResolutionFamily(resolutions, 1000)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (m for m in family.modules() if isinstance(m, PatchedBatchNorm2d)):
            for key in module.keys:
                module.weight[key].mul_(1 + 0.1 * torch.randn(module.weight[key].shape, generator=g))
                module.bias[key].add_(0.1 * torch.randn(module.bias[key].shape, generator=g))
                getattr(module, f"running_mean_{key}").add_(0.1 * torch.randn(module.num_features, generator=g))
    shared, patches, meta = export_shared(family, tmp_path, "test-weights")
    one = export_resolution(family, tmp_path, 224, "test-weights")[0].stat().st_size
    total = shared.stat().st_size + sum(p.stat().st_size for p in patches.values())
    assert total <= 1.06 * one, total / one
    assert len({p.read_bytes() for p in patches.values()}) == 5
    assert set(meta["max_abs_diff"]) == {str(r) for r in resolutions}
    assert export_shared(family, tmp_path, "test-weights")[2] == meta  # cached: not exported again


def test_a_stage_more_is_a_patch_more(split_cascade, bundle, tmp_path):
    """The same family's bundle without the first stage holds the same shared model and patches, bit for bit, less
    that stage's patch: adding a stage to a deployed bundle adds its patch file (and bundle.json changes)."""
    doc = json.loads(split_cascade.read_text())
    low, high = doc["stages"][0]["resolution"], doc["stages"][1]["resolution"]
    doc["stages"] = doc["stages"][1:]
    doc["reference"] = {**doc["reference"], "resolution": high}
    for split in ("calib", "test"):
        doc["expected"][split]["exit_fractions"] = [1.0]
    (tmp_path / "one.json").write_text(json.dumps(doc))
    one = export_bundle(tmp_path / "one.json", tmp_path / "one", **QUIET).parent

    def files(root: Path) -> dict:
        return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in root.rglob("*")
                if f.is_file() and f.name not in ("bundle.json", "README.txt") and "__pycache__" not in f.parts}
    small, big = files(one), files(bundle)
    assert set(big) - set(small) == {f"patches/r{low:03d}.fp32.patch"}
    assert all(big[name] == sha for name, sha in small.items())


def test_patches_pack_losslessly(tiny_family, tmp_path):
    """pack_patch / unpack_patch give back every byte for every element size; an fp16 shared model's patches
    (2-byte elements) check against PyTorch at every resolution and pack smaller than they unpack."""
    from rescascade.profiling.export import export_shared
    from rescascade.training.store import load_family, weights_id
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float16, np.uint8):
        data = rng.normal(1, 0.2, 999).astype(dtype).tobytes()
        packed = pack_patch(data, np.dtype(dtype).itemsize, 96, "a" * 64)
        assert unpack_patch(packed) == data and len(packed) < len(data) + PATCH_TRAILER_BYTES + 100
    with pytest.raises(ValueError, match="not a whole number of 4-byte elements"):
        pack_patch(b"abcdef", 4, 96, "a" * 64)
    family, doc = load_family(tiny_family)
    shared, patches, meta = export_shared(family, tmp_path, weights_id(doc), "fp16")
    assert set(meta["max_abs_diff"]) == {str(r) for r in family.resolutions}
    for r, path in patches.items():
        data = path.read_bytes()
        assert len(unpack_patch(data)) > len(data) - PATCH_TRAILER_BYTES


def test_bundle_refuses_damage_and_bad_arguments(split_cascade, bundle, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    first, second = sorted((copy / "patches").glob("r*.patch"))
    for file in (copy / "model.fp32.onnx", first):  # the shared model or a patch: cut short, then gone
        original = file.read_bytes()
        file.write_bytes(original[:-10])
        with pytest.raises(ArtifactError, match="is not the file exported with this bundle.json"):
            Bundle(copy)
        file.unlink()
        with pytest.raises(ArtifactError, match="missing from the bundle"):
            Bundle(copy)
        file.write_bytes(original)
    original = first.read_bytes()
    first.write_bytes(second.read_bytes())  # another resolution's patch in its place
    with pytest.raises(ArtifactError, match="resolution 32's patch"):
        Bundle(copy)
    first.write_bytes(original)
    doc = json.loads((bundle / "bundle.json").read_text())

    def replace_patch(data: bytes, **shared) -> None:  # with bundle.json edited to match
        first.write_bytes(data)
        edited = json.loads(json.dumps(doc))
        edited["models"]["32"]["sha256"] = hashlib.sha256(data).hexdigest()
        edited["shared"].update(shared)
        (copy / "bundle.json").write_text(json.dumps(edited))

    tail = original[-PATCH_TRAILER_BYTES:]
    for damaged, message in ((original[:-PATCH_TRAILER_BYTES - 40] + tail, "is damaged"),  # packed bytes cut short
                             (original[:-PATCH_TRAILER_BYTES], "is not a rescascade patch"),  # the trailer gone
                             (original[:-1], "is not a rescascade patch")):
        replace_patch(damaged)
        with pytest.raises(ArtifactError, match=message):
            Bundle(copy)
    # a well-formed patch of the wrong length: refused by the size the model reads, or, where bundle.json does not
    # record the size, by ONNX Runtime, as one typed line either way
    unpacked = unpack_patch(original)
    short = pack_patch(unpacked[:-200], 4, 32, doc["source"]["weights_sha256"])
    replace_patch(short)
    with pytest.raises(ArtifactError, match=f"holds {len(unpacked) - 200} bytes where the shared model reads"):
        Bundle(copy)
    replace_patch(short, patch_bytes=None)
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load them"):
        BundleRunner(copy, warmup=False)
    first.write_bytes(original)
    cut = json.loads(json.dumps(doc))
    # the two patches swapped, bundle.json edited to match; a patch of another family (same size): each named
    swapped = json.loads(json.dumps(doc))
    swapped["models"]["32"]["file"], swapped["models"]["48"]["file"] = doc["models"]["48"]["file"], \
        doc["models"]["32"]["file"]
    swapped["models"]["32"]["sha256"], swapped["models"]["48"]["sha256"] = doc["models"]["48"]["sha256"], \
        doc["models"]["32"]["sha256"]
    (copy / "bundle.json").write_text(json.dumps(swapped))
    with pytest.raises(ArtifactError, match="is the patch of resolution 48 .* not of resolution 32"):
        Bundle(copy)
    foreign = original[:-64] + b"f" * 64  # the trailer's weights id: another family's
    first.write_bytes(foreign)
    cut["models"]["32"]["sha256"] = hashlib.sha256(foreign).hexdigest()
    (copy / "bundle.json").write_text(json.dumps(cut))
    with pytest.raises(ArtifactError, match="of the family with weights ffffffffffff"):
        Bundle(copy)
    first.write_bytes(original)
    import onnx  # a shared model of another family (its metadata), bundle.json edited to match
    shared = onnx.load(str(copy / "model.fp32.onnx"), load_external_data=False)
    onnx.helper.set_model_props(shared, {"rescascade.weights_sha256": "f" * 64})
    model_bytes = (copy / "model.fp32.onnx").read_bytes()
    onnx.save(shared, str(copy / "model.fp32.onnx"))
    other = json.loads(json.dumps(doc))
    other["shared"]["sha256"] = hashlib.sha256((copy / "model.fp32.onnx").read_bytes()).hexdigest()
    (copy / "bundle.json").write_text(json.dumps(other))
    with pytest.raises(ArtifactError, match="holds the weights of another family"):
        BundleRunner(copy, warmup=False)
    (copy / "model.fp32.onnx").write_bytes(model_bytes)
    for edit, message in ((lambda d: d["shared"].update(file="../model.fp32.onnx"), "inside the bundle"),
                          (lambda d: d["models"]["32"].update(file=str(first)), "inside the bundle"),
                          (lambda d: d["models"]["32"].update(file="patches"), "is a directory where bundle.json"),
                          (lambda d: d["shared"].update(input="pixels"), 'input "input"'),
                          (lambda d: d["shared"].update(precision="int8"), "precision"),
                          (lambda d: d["shared"].update(patch_bytes="many"), "patch_bytes"),
                          # a plan naming a model the bundle lacks: its stage's, or the shared weights' name
                          (lambda d: d["stages"][0].update(model="resnet50"), "runs model 'resnet50', but the "
                           "bundle's shared weights are 'mobilenet_v2_x0.35'"),
                          (lambda d: d["shared"].update(model="resnet50"), "shared weights are 'resnet50'"),
                          (lambda d: d.update(schema_version="3"), "must be a whole number, got '3'"),
                          (lambda d: d.update(schema_version=True), "must be a whole number, got True")):
        changed = json.loads(json.dumps(doc))
        edit(changed)
        (copy / "bundle.json").write_text(json.dumps(changed))
        with pytest.raises(ArtifactError, match=message):
            Bundle(copy)
    (copy / "bundle.json").write_text(json.dumps({**doc, "schema_version": 99}))
    with pytest.raises(ArtifactError, match="schema_version"):
        Bundle(copy)
    (copy / "bundle.json").write_text(json.dumps({**doc, "schema_version": 3}))  # older exports: one line, its fix
    with pytest.raises(ArtifactError, match=r"unpacked patches \(bundle schema 3\), .* `rescascade export \S+ --out "):
        Bundle(copy)
    (copy / "bundle.json").write_text(json.dumps({**doc, "schema_version": 2}))
    with pytest.raises(ArtifactError, match=r"one model per stage .* export it again: `rescascade export \S+ --out "):
        Bundle(copy)
    capsys.readouterr()
    assert deploy_main([str(copy), "x.jpg"]) == 2  # the CLI prints the command as it is typed
    err = capsys.readouterr().err
    assert "`rescascade export" in err and " --out " in err, err
    with pytest.raises(ArtifactError, match="not found"):
        Bundle(tmp_path / "nowhere")
    (copy / "bundle.json").write_text("null")
    with pytest.raises(ArtifactError, match="holds a JSON null, not an object"):
        Bundle(copy)
    for edit, message in ((lambda d: d["stages"][-1].update(resolution=999), "resolution"),
                          (lambda d: d["stages"][0].update(threshold=2.0), "threshold"),
                          (lambda d: d["confidence"].update(combine="no"), "combine"),
                          (lambda d: d["preprocessing"].update(std=[0, 0, 0]), "std"),
                          (lambda d: d["preprocessing"].update(decode_scale="weird"), "decode_scale"),
                          (lambda d: d.update(class_names=["one"]), "class_names")):
        changed = json.loads((bundle / "bundle.json").read_text())
        edit(changed)
        (copy / "bundle.json").write_text(json.dumps(changed))
        with pytest.raises(ArtifactError, match=message):
            Bundle(copy)
    with pytest.raises(BackendUnavailable, match="NoSuchExecutionProvider"):
        BundleRunner(bundle, providers=["NoSuchExecutionProvider"])
    runner = BundleRunner(bundle, warmup=False)
    with pytest.raises(ConfigError, match="threads"):
        BundleRunner(bundle, threads=0)
    for bad in (dict(warmup="yes"), dict(providers="CPUExecutionProvider"), dict(reference="no"), dict(weights="one")):
        with pytest.raises(ConfigError):
            BundleRunner(bundle, **bad)
    with pytest.raises(ConfigError):
        BundleRunner(None)
    names = tmp_path / "names"  # more class names than the models have logits
    shutil.copytree(bundle, names)
    doc["class_names"] = doc["class_names"] + ["one more"]
    (names / "bundle.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="logits"):
        BundleRunner(names)
    with pytest.raises(ConfigError):
        runner(42)
    with pytest.raises(RescascadeError, match=r"uint8 \[N, H, W, 3\]"):
        runner(np.zeros((2, 8, 8, 4), np.uint8))
    res = runner([np.zeros((8, 8), np.uint8), np.zeros((0, 5, 3), np.uint8), np.zeros((6, 6, 3), np.uint8), "", 7])
    assert set(res.errors) == {0, 1, 3, 4} and res.labels[2] >= 0
    assert res.errors[3] == "an empty path: give the image file's path" and "got int;" in res.errors[4]
    assert not any(e.startswith(("ImageError", "ConfigError", "ValueError")) for e in res.errors.values())
    # export: into a directory that holds something else, refused; over an earlier bundle, replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a bundle"):
        export_bundle(split_cascade, other, **QUIET)
    assert (other / "notes.txt").read_text() == "mine"
    (tmp_path / "link").symlink_to(other)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        export_bundle(split_cascade, tmp_path / "link", **QUIET)
    with pytest.raises(ConfigError, match="precision"):
        export_bundle(split_cascade, tmp_path / "b", precision="int4", **QUIET)
    fake = tmp_path / "fake"  # a bundle.json that is not a bundle's: never taken for an earlier export
    fake.mkdir()
    (fake / "bundle.json").write_text('{"name": "mine"}')
    (fake / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a bundle"):
        export_bundle(split_cascade, fake, **QUIET)
    extra = tmp_path / "extra"  # an earlier bundle with a file of the user's in it: refused, the file kept
    shutil.copytree(bundle, extra)
    (extra / "counts.json").write_text("{}")
    with pytest.raises(ConfigError, match="counts.json"):
        export_bundle(split_cascade, extra, **QUIET)
    assert (extra / "counts.json").is_file() and (fake / "keep.txt").is_file()
    monkeypatch.chdir(extra)  # the directory the shell is in, or one above it: refused, not renamed away
    for here in (".", "..", str(extra)):
        with pytest.raises(ConfigError, match="current directory"):
            export_bundle(split_cascade, here, **QUIET)
    monkeypatch.chdir(tmp_path)
    before = (bundle / "bundle.json").read_text()
    assert cli_main(["export", str(split_cascade), "--out", str(bundle)]) == 0
    assert Bundle(bundle).doc["models"] == json.loads(before)["models"]
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert cli_main(["export", str(tmp_path / "none.json"), "--out", str(tmp_path / "x")]) == 2
