"""Loading code on the real shared data (../shared/data): Imagenette tars + manifests, ImageNet samples,
ImageNet MobileNetV2 weights. Skipped, with the reason, where ../shared is absent."""
import numpy as np
import pytest
import torch

import benchmarks._shared_data  # noqa: F401  (registers shared-imagenette, shared-imagenet-samples)
from rescascade.training.data import load_data
from rescascade.training.family import ResolutionFamily
from rescascade.training.predict import predict_logits, top1
from rescascade.training.weights import resolve_weights

from .conftest import IMAGENETTE, SAMPLE_IMAGES, need

pytestmark = pytest.mark.slow


def test_shared_imagenette_10_and_1000_way():
    d = need(IMAGENETTE)
    s = load_data(f"shared-imagenette:{d}", seed=0)
    assert len(s.train) == 5000 and len(s.calib) + len(s.test) == 3925 and len(s.class_names) == 10
    assert abs(len(s.calib) - len(s.test)) <= 10
    img = s.test.read(0)
    assert img.dtype == torch.uint8 and img.shape == (3, 224, 224)
    assert np.bincount(s.train.labels).tolist() == [500] * 10
    wide = load_data(f"shared-imagenette:{d}", seed=0, label_space="imagenet", train_per_class=5,
                     heldout_per_class=5)
    assert len(wide.class_names) == 1000 and set(np.unique(wide.train.labels)) == {0, 217, 482, 491, 497, 566,
                                                                                    569, 571, 574, 701}
    assert len(wide.train) == 50


def test_pretrained_family_on_imagenet_samples(imagenet_weights_path):
    d = need(SAMPLE_IMAGES)
    s = load_data(f"shared-imagenet-samples:{d}", seed=0)
    assert s.train is None and len(s.calib) + len(s.test) == 1000 and len(s.class_names) == 1000
    sd, _ = resolve_weights(str(imagenet_weights_path))
    fam = ResolutionFamily((96, 224))
    fam.load_plain_state_dict(sd)
    images = s.test.subset(np.arange(80))
    pred = predict_logits({r: fam.plain_model(r) for r in fam.resolutions}, images, batch_size=40)
    acc = top1(pred)
    # the shared README: 827 / 482 of 1000 at 224 / 96 (these files); 80 images leave room for noise
    assert acc[224] > 0.65 and acc[96] < acc[224]


def test_cascade_realdata_benchmark_quick(tmp_path, imagenet_weights_path):
    """The real-data benchmark's pipeline end to end on a few images per class (its figures mean nothing)."""
    import subprocess
    import sys
    from pathlib import Path
    need(IMAGENETTE)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cascade_realdata.py"
    res = subprocess.run([sys.executable, str(script), "--quick", "--task", "both", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    for task in ("10way", "1000way"):
        assert f"## {task}: per-resolution top-1" in res.stdout
        assert f"## {task}: the chosen family (" in res.stdout
        assert f"## {task}: the optimizer's levers" in res.stdout
        assert f"## {task}: the chosen family's cascade with its thresholds set on more images" in res.stdout
    assert "sample images r64..r128" in res.stdout and "cost ratio measured" in res.stdout
    assert "| oracle cost ratio | oracle's saving captured |" in res.stdout


@pytest.fixture(scope="module")
def costs_out(tmp_path_factory):
    """One output folder for the cost and deploy benchmarks: deploy_bundle.py reuses cost_prediction.py's family."""
    return tmp_path_factory.mktemp("costs")


def test_cost_prediction_benchmark_quick(costs_out, imagenet_weights_path):
    """The cost benchmark end to end on a few images (its figures mean nothing): refined build, eval from bytes,
    the bytes-in table at three source sizes."""
    import subprocess
    import sys
    from pathlib import Path
    need(IMAGENETTE)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cost_prediction.py"
    res = subprocess.run([sys.executable, str(script), "--quick", "--out", str(costs_out)], capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "## Cost ratio vs the reference on the test half" in res.stdout
    assert all(f"| {w}x{h} | {b} |" in res.stdout for w, h in ((500, 375), (1600, 1200), (4000, 3000)) for b in (1, 32))


def test_deploy_benchmarks_quick(costs_out, imagenet_weights_path):
    """The exported bundle on real photos (its answers must equal the runtime's: the script fails otherwise) and
    the Triton load test with its crash and restart, on a few images (their timings mean nothing)."""
    import subprocess
    import sys
    from pathlib import Path
    need(IMAGENETTE)
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    res = subprocess.run([sys.executable, str(bench / "deploy_bundle.py"), "--quick", "--runs", "1", "--out",
                          str(costs_out)], capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| yes |" in res.stdout and "## Cost ratio vs the reference" in res.stdout
    res = subprocess.run([sys.executable, str(bench / "triton_load.py"), "--quick", "--out", str(costs_out)],
                         capture_output=True, text=True, timeout=1200)
    if "TritonUnavailable" in res.stderr:
        pytest.skip("Triton cannot run here: " + res.stderr.strip().splitlines()[-1])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]  # the table says which check failed
    assert "killed (SIGKILL) during a load" in res.stdout and "0 wrong answers" in res.stdout
