"""ONNX Runtime backends: CPUExecutionProvider, CUDAExecutionProvider, TensorrtExecutionProvider.

A family's stages run as a bundle deploys them: the family's shared ONNX model (exported once,
`profiling.export.export_shared`) made each resolution's model by that resolution's patch bytes
(`serve.ort.stage_session`), so what is profiled is what is deployed, and K resolutions cost one export.
Under the TensorRT provider, which builds an engine per input shape anyway, each resolution is its own ONNX file:
that path is written to TensorRT's documented provider options and has not run here (no TensorRT on these
machines)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from rescascade.serve.errors import BackendUnavailable, ConfigError

from ..export import export_resolution, export_shared
from ..measure import cpu_timer, cuda_timer
from rescascade.serve.ort import session_options, stage_session, unpack_patch

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class OnnxRuntimeEngine:
    """One resolution's model on ONNX Runtime: onnx_path, a model of that resolution, or a family's shared model
    with `patch`, the resolution's unpacked patch bytes (`export_shared`, `serve.ort.unpack_patch`). Sessions are made on first use."""

    def __init__(self, onnx_path: Path, resolution: int, provider: str, precision: str, threads: int | None,
                 cache_dir: Path, patch: bytes | None = None):
        self.resolution, self.precision, self.provider = resolution, precision, provider
        self.device = "cpu" if provider == "cpu" else "cuda"
        self.preprocess_threads = 1 if provider == "cpu" else None  # see measure.torch_threads
        self.np_dtype = np.float16 if precision == "fp16" and provider == "cuda" else np.float32
        self.onnx_path, self.patch, self.threads, self.cache_dir = onnx_path, patch, threads, cache_dir
        self._sessions: dict[int | None, object] = {}
        self.build_seconds = 0.0

    def _providers(self, batch: int | None):
        if self.provider == "cpu":
            return ["CPUExecutionProvider"]
        cuda = ("CUDAExecutionProvider", {"device_id": 0, "cudnn_conv_algo_search": "EXHAUSTIVE"})
        if self.provider == "cuda":
            return [cuda, "CPUExecutionProvider"]
        shape = f"input:{batch}x3x{self.resolution}x{self.resolution}"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        trt = {"device_id": 0, "trt_fp16_enable": self.precision == "fp16", "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(self.cache_dir), "trt_timing_cache_enable": True,
               "trt_timing_cache_path": str(self.cache_dir),
               "trt_profile_min_shapes": shape, "trt_profile_opt_shapes": shape, "trt_profile_max_shapes": shape}
        return [("TensorrtExecutionProvider", trt), cuda, "CPUExecutionProvider"]

    def session(self, batch: int):
        """One session serves every batch size, except under TensorRT (a static engine per batch size)."""
        import onnxruntime as ort
        key = batch if self.provider == "tensorrt" else None
        if key not in self._sessions:
            t0 = time.perf_counter()
            opts, providers = session_options(self.threads), self._providers(batch)
            sess = ort.InferenceSession(str(self.onnx_path), opts, providers=providers) if self.patch is None else \
                stage_session(str(self.onnx_path), self.patch, self.resolution, opts, providers)
            want = PROVIDERS[self.provider]
            if want not in sess.get_providers():
                raise BackendUnavailable(f"ONNX Runtime could not start {want} (it fell back to {sess.get_providers()}); "
                                         "check the GPU driver, CUDA/cuDNN libraries and `pip install rescascade[gpu]`")
            self.build_seconds += time.perf_counter() - t0
            self._sessions[key] = sess
        return self._sessions[key]

    def _bound(self, x: torch.Tensor) -> "_BoundRun":
        """GPU providers: device-resident input/output bound once (no host copies), as a server would."""
        sess = self.session(x.shape[0])
        dtype = torch.float16 if self.np_dtype == np.float16 else torch.float32
        out = torch.empty(x.shape[0], sess.get_outputs()[0].shape[1], device="cuda", dtype=dtype)
        return _BoundRun(sess, x.to("cuda", dtype).contiguous(), out, self.np_dtype)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.device == "cuda":
            return self._bound(x)().float()
        feed = x.detach().cpu().numpy().astype(self.np_dtype, copy=False)
        return torch.from_numpy(self.session(x.shape[0]).run(None, {"input": feed})[0]).float()

    def warm(self, batch: int) -> None:
        self.run(torch.zeros(batch, 3, self.resolution, self.resolution))

    def timer(self, batch_size: int):
        x = torch.randn(batch_size, 3, self.resolution, self.resolution)
        if self.device == "cuda":
            return cuda_timer(self._bound(x))
        sess, feed = self.session(batch_size), {"input": x.numpy().astype(self.np_dtype)}
        return cpu_timer(lambda: sess.run(None, feed))


class _BoundRun:
    """A session with its input and output buffers bound; calling it runs once. Holds the buffers alive."""

    def __init__(self, sess, x: torch.Tensor, out: torch.Tensor, np_dtype):
        self.sess, self.x, self.out = sess, x, out
        self.binding = sess.io_binding()
        self.binding.bind_input("input", "cuda", 0, np_dtype, tuple(x.shape), x.data_ptr())
        self.binding.bind_output("logits", "cuda", 0, np_dtype, tuple(out.shape), out.data_ptr())

    def __call__(self) -> torch.Tensor:
        self.sess.run_with_iobinding(self.binding)
        return self.out


class OnnxRuntimeBackend:
    def __init__(self, provider: str):
        self.provider = provider
        self.name = "onnxruntime" if provider == "cpu" else f"onnxruntime-{provider}"
        self.device = "cpu" if provider == "cpu" else "cuda"
        # on the CPU a cascade's stages run as its bundle runs them (`serve.ort_engine.OrtEngine`): numpy inputs
        self.numpy_inputs = provider == "cpu"

    def check(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("backend onnxruntime needs ONNX Runtime: pip install onnxruntime "
                                     "(or rescascade[gpu] for the CUDA/TensorRT providers)") from None
        want = PROVIDERS[self.provider]
        if want not in ort.get_available_providers():
            raise BackendUnavailable(f"backend {self.name} needs ONNX Runtime's {want}, which this ONNX Runtime build lacks "
                                     f"(has {', '.join(ort.get_available_providers())}); on a machine with an NVIDIA GPU: "
                                     "pip uninstall onnxruntime && pip install 'rescascade[gpu]'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(f"backend {self.name} needs an NVIDIA GPU; none is visible here")

    def check_precision(self, precision: str) -> None:
        """ConfigError / BackendUnavailable for a precision this provider does not run."""
        if precision not in ("fp32", "fp16"):
            raise ConfigError(f"precision {precision!r}: ONNX Runtime takes fp32 or fp16")
        if precision == "fp16" and self.provider == "cpu":
            raise BackendUnavailable("fp16 on ONNX Runtime's CPU provider is slower than fp32, not a deployment option; "
                                     "use --precision fp32")

    def open(self, family, run_dir, weights_id: str, resolution: int, precision: str = "fp32",
             threads: int | None = None) -> OnnxRuntimeEngine:
        self.check_precision(precision)
        # CUDA EP has no fp16 switch: it needs an fp16 model. The TensorRT EP takes fp32 + trt_fp16_enable.
        onnx_precision = "fp16" if precision == "fp16" and self.provider == "cuda" else "fp32"
        cache = Path(run_dir) / "engines" / "ort-tensorrt"
        if self.provider == "tensorrt":
            path, _ = export_resolution(family, run_dir, resolution, weights_id, onnx_precision)
            return OnnxRuntimeEngine(path, resolution, self.provider, precision, threads, cache)
        shared, patches, _ = export_shared(family, run_dir, weights_id, onnx_precision)
        return OnnxRuntimeEngine(shared, resolution, self.provider, precision, threads, cache,
                                 patch=unpack_patch(patches[resolution].read_bytes(), str(patches[resolution])))
