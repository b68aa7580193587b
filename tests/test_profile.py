
import numpy as np
import pytest
import torch

from rescascade.profiling.backends import available_backends, get_backend
from rescascade.profiling.export import check_onnx, export_resolution
from rescascade.profiling.measure import QUICK, Protocol, run_protocol, summarize
from rescascade.profiling.profile import KEY, format_profile, read_profile, run_profile
from rescascade.runtime import decision_step
from rescascade.serve.errors import RescascadeError
from rescascade.training.family import ResolutionFamily
from rescascade.training.store import load_family, save_family, weights_id

from .test_family import random_torchvision


@pytest.fixture(scope="module")
def fam_dir(tmp_path_factory):
    fam = ResolutionFamily((32, 48), num_classes=10, width_mult=0.35)
    fam.load_plain_state_dict(random_torchvision().state_dict())
    with torch.no_grad():  # make the patches differ, so each export must fold its own
        for p in fam.patch_parameters(48):
            p.mul_(1.2)
    out = tmp_path_factory.mktemp("prof") / "fam"
    save_family(fam, out)
    return out


def test_export_folds_each_patch_and_checks_against_pytorch(fam_dir):
    fam, doc = load_family(fam_dir)
    path32, meta32 = export_resolution(fam, fam_dir, 32, weights_id(doc))
    path48, meta48 = export_resolution(fam, fam_dir, 48, weights_id(doc))
    assert meta32["max_abs_diff"] < 1e-3 and meta48["max_abs_diff"] < 1e-3
    assert meta32["onnx_sha256"] != meta48["onnx_sha256"]
    import onnx  # the exporter folded every BatchNorm into its convolution: the runtime pays nothing for it
    assert not [n for n in onnx.load(str(path48)).graph.node if n.op_type == "BatchNormalization"]
    # the check fails loudly when the exported graph does not match the model it claims to be
    with pytest.raises(RescascadeError, match="differs from PyTorch"):
        check_onnx(path32, fam.plain_model(48), 32, "fp32")
    # cached: a second call does not export again
    again, _ = export_resolution(fam, fam_dir, 32, weights_id(doc))
    assert again.stat().st_mtime_ns == path32.stat().st_mtime_ns


def test_protocol_meets_both_minimums():
    calls = []

    def step():
        calls.append(1)
        return 1.0
    times = run_protocol(step, Protocol(warmup_iters=3, warmup_seconds=0, min_iters=7, min_seconds=0))
    assert len(times) == 7 and len(calls) == 10
    t = run_protocol(lambda: 0.5, Protocol(warmup_iters=0, warmup_seconds=0, min_iters=1, min_seconds=0.05))
    assert len(t) > 1  # kept going until 50 ms had passed
    s = summarize(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert s["median_ms"] == 3.0 and s["n_iters"] == 5 and s["p99_ms"] > s["p90_ms"] > s["median_ms"]
    assert s["cv"] == pytest.approx(s["std_ms"] / s["mean_ms"])


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_profile_writes_rows_and_rerun_replaces_them(fam_dir, backend, tmp_path):
    out = tmp_path / "profile.csv"
    df = run_profile(fam_dir, backend, "fp32", (1, 2), protocol=QUICK, threads=1, out=out, decision_step=decision_step)
    assert len(df) == 4 and set(df.resolution) == {32, 48} and set(df.batch_size) == {1, 2}
    assert (df.median_ms > 0).all() and (df.preprocess_ms > 0).all() and (df.n_iters >= QUICK.min_iters).all()
    assert np.allclose(df.per_image_ms, df.median_ms / df.batch_size)
    if backend == "torch":  # one batch copied to the device, the rows still running gathered from it
        assert (df.upload_ms > 0).all() and (df.gather_ms > 0).all()
        assert (df.groupby("batch_size").upload_ms.nunique() == 1).all()  # one figure per batch, every resolution
    else:  # ONNX Runtime's CPU engine makes each stage's input from the decoded arrays (`preprocess_np`)
        assert (df.upload_ms == 0).all() and (df.gather_ms == 0).all()
    df2 = run_profile(fam_dir, backend, "fp32", (2,), resolutions=[48], protocol=QUICK, threads=1, out=out,
                      decision_step=decision_step)
    assert len(df2) == 4 and not df2.duplicated(KEY).any()
    read, meta = read_profile(out)
    assert len(read) == 4 and meta["weights_sha256"] and meta["device"]["threads"] == 1
    assert "| 48 | 2 |" in format_profile(read)


def test_profile_refuses_another_familys_table(fam_dir, tmp_path):
    out = tmp_path / "profile.csv"
    run_profile(fam_dir, "onnxruntime", "fp32", (1,), resolutions=[32], protocol=QUICK, threads=1, out=out,
                decision_step=decision_step)
    other = tmp_path / "other"
    save_family(ResolutionFamily((32,), num_classes=10, width_mult=0.35), other)
    with pytest.raises(RescascadeError, match="profiles another family"):
        run_profile(other, "onnxruntime", "fp32", (1,), protocol=QUICK, threads=1, out=out, decision_step=decision_step)


@pytest.mark.parametrize("name, needs", [("onnxruntime-cuda", "gpu"), ("onnxruntime-tensorrt", "gpu"),
                                         ("torch-cuda", "GPU"), ("tensorrt", "tensorrt")])
def test_missing_backend_names_what_to_install(name, needs):
    reason = available_backends()[name]
    if reason is None:
        pytest.skip(f"{name} is usable on this machine")
    assert needs in reason
    with pytest.raises(RescascadeError, match=needs):
        get_backend(name)


def test_bad_profile_arguments(fam_dir):
    with pytest.raises(RescascadeError, match="unknown backend"):
        get_backend("tflite")
    with pytest.raises(RescascadeError, match="not in the family"):
        run_profile(fam_dir, "onnxruntime", "fp32", (1,), resolutions=[64], protocol=QUICK, decision_step=decision_step)
    with pytest.raises(RescascadeError, match="fp16 on ONNX Runtime's CPU"):
        run_profile(fam_dir, "onnxruntime", "fp16", (1,), protocol=QUICK, decision_step=decision_step)


def _gpu_and_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'rescascade[tensorrt]')"
    if not torch.cuda.is_available():
        return "no NVIDIA GPU visible"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_and_tensorrt() is not None, reason=str(_gpu_and_tensorrt()))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_matches_pytorch_and_caches(fam_dir, precision):
    fam, doc = load_family(fam_dir)
    engine = get_backend("tensorrt").open(fam, fam_dir, weights_id(doc), 48, precision)
    x = torch.randn(4, 3, 48, 48)
    want = fam.plain_model(48)(x).detach()
    got = engine.run(x.cuda()).cpu()
    assert torch.allclose(got, want, atol=0.05 * max(1.0, float(want.abs().max())))
    built = engine.build_seconds
    again = get_backend("tensorrt").open(fam, fam_dir, weights_id(doc), 48, precision)
    again.run(x.cuda())
    assert again.build_seconds == 0.0 and built > 0  # the serialized plan came from the cache
    df = run_profile(fam_dir, "tensorrt", precision, (1, 4), protocol=QUICK, decision_step=decision_step)
    assert (df.median_ms > 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no NVIDIA GPU visible")
@pytest.mark.parametrize("backend", ["torch-cuda", "torch-cuda-graphs"])
def test_torch_cuda_backends(fam_dir, backend):
    df = run_profile(fam_dir, backend, "fp16", (1, 4), protocol=QUICK, decision_step=decision_step)
    assert (df.median_ms > 0).all()


@pytest.mark.slow
def test_torch_compile_backend_reports_build_time(fam_dir, tmp_path):
    df = run_profile(fam_dir, "torch-compile", "fp32", (2,), resolutions=[32], protocol=QUICK, threads=1,
                     out=tmp_path / "p.csv", decision_step=decision_step)
    assert len(df) == 1 and df.median_ms.iloc[0] > 0 and df.build_s.iloc[0] > 0


def test_static_engine_buckets():
    from rescascade.profiling.backends import bucket
    assert bucket(5, {}) == 8 and bucket(1, {}) == 1 and bucket(32, {}) == 32
    assert bucket(5, {4: 0, 16: 0, 32: 0}) == 16 and bucket(40, {4: 0, 32: 0}) == 64


def test_preprocess_is_timed_cold_and_between_inferences():
    """The pool outgrows the caches, its images are laid out as decode_image returns them, and the stage's
    inference runs (untimed) before every timed preprocessing step, as in the runtime."""
    from rescascade.profiling.profile import SOURCE_POOL_BYTES, source_pool, time_preprocess
    pool = source_pool((64, 80))
    assert sum(im.numel() for im in pool) >= SOURCE_POOL_BYTES
    assert pool[0].shape == (3, 64, 80) and pool[0].stride() == (1, 80 * 3, 3)
    calls = []
    times = time_preprocess(32, 4, pool[:10], "cpu", QUICK, threads=1, between=lambda: calls.append(1))
    assert len(calls) == QUICK.warmup_iters + len(times) and (times > 0).all()


def test_driver_version_from_either_kernel_module_line():
    from rescascade.profiling.measure import driver_version
    assert driver_version("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023") \
        == "535.104.05"
    assert driver_version("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  "
                          "(dvs-builder@U16-I3-B14-4-3)  Thu Jan 23 23:17:37 UTC 2025") == "570.86.15"
    assert driver_version("no version here") is None
