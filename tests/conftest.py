import os
from pathlib import Path

import numpy as np
import pytest

# The suite exports with the legacy exporter, 0.5-1.8 s an export here against 5-24 s for torch.export's (the default;
# tests/test_archs.py::test_torch_export_* export with it): RESCASCADE_ONNX_EXPORTER=dynamo runs every test with it.
os.environ.setdefault("RESCASCADE_ONNX_EXPORTER", "legacy")

SHARED = Path(os.environ.get("RESCASCADE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SHARED_DATA = SHARED / "data"
IMAGENET_WEIGHTS = SHARED_DATA / "mobilenet_v2_imagenet" / "mobilenet_v2_tv_imagenet1k_qnnpack_dequant.pth"
IMAGENETTE = SHARED_DATA / "imagenette_224"
SAMPLE_IMAGES = SHARED_DATA / "imagenet_sample_images"


def need(path: Path):
    """Skip (with the reason) when a piece of ../shared/data is not beside the checkout."""
    if not path.exists():
        pytest.skip(f"needs {path} (the shared real data beside the checkout; absent here)")
    return path


@pytest.fixture
def imagenet_weights_path():
    return need(IMAGENET_WEIGHTS)


TINY_RES = (32, 48)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """A tiny trained family with predictions and a quick ONNX Runtime profile (~10 s on 2 cores)."""
    from rescascade.profiling.measure import QUICK
    from rescascade.profiling.profile import run_profile
    from rescascade.runtime import decision_step
    from rescascade.training.run import run_train
    from rescascade.training.trainer import TrainConfig

    # ~100 steps: fewer leave a from-scratch net degenerate in eval mode (every input gets the same logits)
    out = tmp_path_factory.mktemp("tiny") / "family"
    cfg = TrainConfig(TINY_RES, epochs=4, batch_size=16, optimizer="adamw", lr=0.003, workers=0, seed=0)
    run_train("synthetic:384", out, cfg, width_mult=0.35, weights="none", log=lambda s: None,
              data_options={"heldout_per_class": 20})
    run_profile(out, "onnxruntime", "fp32", (1, 4), protocol=QUICK, threads=1, log=lambda s: None,
                decision_step=decision_step)
    return out


@pytest.fixture(scope="session")
def built(tiny_family, tmp_path_factory):
    """(family dir, cascade.json, config) of a two-stage cascade on the tiny family, whatever its quality (a lenient
    target)."""
    from rescascade.build import run_build
    out = tmp_path_factory.mktemp("casc") / "cascade.json"
    config = run_build(tiny_family, batch_size=4, target="0.05", out=out, exact="off", log=lambda s: None)
    return tiny_family, out, config


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random uint8 image [H, W, 3] (JPEG keeps its detail, unlike white noise)."""
    rng = np.random.default_rng(seed)
    steps = rng.integers(-12, 13, (h, w, 3))
    return np.clip(np.cumsum(steps, axis=1) + np.cumsum(steps, axis=0) // 2 + 128, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    import io

    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


@pytest.fixture(scope="session")
def split_cascade(built, tmp_path_factory):
    """The tiny family's cascade with its first threshold at the median confidence, so that about half the
    images go on to the second stage."""
    import json
    import math

    from rescascade.config import read_config
    from rescascade.optimizer import Cascade, Stage
    from rescascade.runtime import CascadeRunner
    family, path, _ = built
    config = read_config(path)
    low, high = config.doc["family"]["resolutions"][:2]
    probe = [encode(photo(60 + 7 * i, 90 - 3 * i, i), "JPEG") for i in range(24)]
    first = CascadeRunner(config, threads=1, warmup=False, stages=Cascade([Stage(low, -math.inf)]))
    doc = json.loads(Path(path).read_text())
    model = doc["reference"]["model"]
    doc["stages"] = [{"resolution": low, "threshold": float(np.median(first(probe).confidence)), "model": model},
                     {"resolution": high, "threshold": None, "model": model}]
    for split in ("calib", "test"):
        doc["expected"][split]["exit_fractions"] = [0.5, 0.5]
    doc["family"]["path"] = str(family.resolve())
    out = tmp_path_factory.mktemp("split") / "cascade.json"
    out.write_text(json.dumps(doc))
    return out


JPEG_SIZE = (200, 150)  # width, height of jpeg_family's photos: r32 (resize 37) decodes at 1/4, r48 (resize 55) at 1/2


def write_jpeg_folder(root, n: int = 160, seed: int = 0) -> None:
    """n synthetic images of 8 classes as JPEG photos of JPEG_SIZE in class folders under root."""
    from PIL import Image

    from rescascade.training.synthetic import class_names, make_synthetic
    images, labels = make_synthetic(n, num_classes=8, size=64, seed=seed)
    names = class_names(8)
    for i, (img, y) in enumerate(zip(images, labels)):
        (root / names[y]).mkdir(parents=True, exist_ok=True)
        photo = Image.fromarray(img.permute(1, 2, 0).numpy()).resize(JPEG_SIZE, Image.BICUBIC)
        photo.save(root / names[y] / f"{i:03d}.jpg", "JPEG", quality=90)


@pytest.fixture(scope="session")
def jpeg_family(tmp_path_factory):
    """A tiny family trained on JPEG files (base/photos, 40 % held out), its held-out images predicted as the
    runtime decodes them, profiled with the decode at 200x150 and 800x600: base/fam."""
    from rescascade.profiling.measure import QUICK
    from rescascade.profiling.profile import run_profile
    from rescascade.runtime import decision_step
    from rescascade.training.run import run_train
    from rescascade.training.trainer import TrainConfig
    base = tmp_path_factory.mktemp("jpeg")
    write_jpeg_folder(base / "photos")
    cfg = TrainConfig((32, 48), epochs=1, batch_size=16, optimizer="adamw", lr=0.003, workers=0)
    run_train(f"imagefolder:{base / 'photos'}", base / "fam", cfg, width_mult=0.35, weights="none",
              data_options={"val_fraction": 0.4}, log=lambda s: None)
    run_profile(base / "fam", "onnxruntime", "fp32", (1, 4), protocol=QUICK, threads=1, decision_step=decision_step,
                decode_sizes=["200x150", (800, 600)], log=lambda s: None)
    return base
