"""TensorRT through its Python API: one static-shape engine per (resolution, batch size, precision).

Build: parse the folded ONNX, one optimisation profile with min = opt = max = the batch's shape, serialize,
and cache the plan keyed by ONNX sha256 + TensorRT version + GPU name + precision + batch (plans are tied to
all of those). Run: execute_async_v3 on torch's current stream with torch tensors as I/O buffers (no
cuda-python needed), timed with CUDA events.

TensorRT 10 vs 11: 10 enables fp16 with BuilderFlag.FP16 on an fp32 network (weak typing); 11 removed the
flag and every network is strongly typed, so fp16 comes from an fp16 ONNX graph. We branch on the flag.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from rescascade.serve.errors import BackendUnavailable, ConfigError
from rescascade.serve.fileio import atomic_path

from ..export import export_resolution
from ..measure import cuda_timer
from . import bucket


def _trt():
    import tensorrt as trt
    return trt


def has_fp16_flag() -> bool:
    return hasattr(_trt().BuilderFlag, "FP16")


def _torch_dtype(trt_dtype):
    trt = _trt()
    return {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}[trt_dtype]


class TensorRTEngine:
    def __init__(self, onnx_path: Path, onnx_sha: str, resolution: int, precision: str, cache_dir: Path):
        trt = _trt()
        self.resolution, self.precision, self.device = resolution, precision, "cuda"
        self.preprocess_threads = None
        self.onnx_path, self.onnx_sha, self.cache_dir = onnx_path, onnx_sha, cache_dir
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self._engines: dict[int, tuple] = {}
        self.build_seconds = 0.0

    def cache_key(self, batch: int) -> str:
        trt = _trt()
        gpu = torch.cuda.get_device_name(0)
        text = f"{self.onnx_sha}|trt {trt.__version__}|{gpu}|{self.precision}|b{batch}|r{self.resolution}"
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def _build_plan(self, batch: int) -> bytes:
        trt = _trt()
        builder = trt.Builder(self.logger)
        network = builder.create_network()  # explicit batch is the only mode in TensorRT 10 and 11
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(self.onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {self.onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 4 << 30)
        if self.precision == "fp16" and has_fp16_flag():
            config.set_flag(trt.BuilderFlag.FP16)
        shape = (batch, 3, self.resolution, self.resolution)
        profile = builder.create_optimization_profile()
        profile.set_shape("input", shape, shape, shape)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build an engine for r{self.resolution} batch {batch}")
        return bytes(plan)

    def _engine(self, batch: int):
        if batch not in self._engines:
            path = self.cache_dir / f"{self.cache_key(batch)}.plan"
            if path.is_file():
                plan = path.read_bytes()
            else:
                t0 = time.perf_counter()
                plan = self._build_plan(batch)
                self.build_seconds += time.perf_counter() - t0
                with atomic_path(path) as tmp:
                    tmp.write_bytes(plan)
            engine = self.runtime.deserialize_cuda_engine(plan)
            context = engine.create_execution_context()
            shape = (batch, 3, self.resolution, self.resolution)
            context.set_input_shape("input", shape)
            x = torch.empty(shape, device="cuda", dtype=_torch_dtype(engine.get_tensor_dtype("input")))
            out = torch.empty(tuple(context.get_tensor_shape("logits")), device="cuda",
                              dtype=_torch_dtype(engine.get_tensor_dtype("logits")))
            context.set_tensor_address("input", x.data_ptr())
            context.set_tensor_address("logits", out.data_ptr())
            self._engines[batch] = (engine, context, x, out)
        return self._engines[batch]

    def _execute(self, batch: int) -> torch.Tensor:
        _, context, _, out = self._engines[batch]
        if not context.execute_async_v3(stream_handle=torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return out

    def warm(self, batch: int) -> None:
        self._engine(batch)
        self._execute(batch)
        torch.cuda.synchronize()

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Static engines: a shrunken batch is padded to the smallest engine that fits (built: power of two)."""
        n = x.shape[0]
        size = bucket(n, self._engines)
        _, _, buf, _ = self._engine(size)
        buf[:n].copy_(x.to("cuda", buf.dtype))
        return self._execute(size)[:n].float().clone()

    def timer(self, batch_size: int):
        _, _, buf, _ = self._engine(batch_size)
        buf.copy_(torch.randn(buf.shape, device="cuda"))
        return cuda_timer(lambda: self._execute(batch_size))


class TensorRTBackend:
    name = "tensorrt"
    device = "cuda"
    numpy_inputs = False  # torch inputs on the GPU (`runtime.TorchStages`)

    def check(self) -> None:
        try:
            _trt()
        except ImportError:
            raise BackendUnavailable("backend tensorrt needs TensorRT: pip install 'rescascade[tensorrt]' "
                                     "(on a machine with an NVIDIA GPU and driver)") from None
        if not torch.cuda.is_available():
            raise BackendUnavailable("backend tensorrt needs an NVIDIA GPU; torch sees none here")

    def open(self, family, run_dir, weights_id: str, resolution: int, precision: str = "fp16",
             threads: int | None = None) -> TensorRTEngine:
        if precision not in ("fp32", "fp16"):
            raise ConfigError(f"precision {precision!r}: the tensorrt backend takes fp32 or fp16")
        # TensorRT 11 is strongly typed: fp16 must be in the graph. TensorRT 10: fp32 graph + FP16 flag.
        onnx_precision = "fp16" if precision == "fp16" and not has_fp16_flag() else "fp32"
        path, meta = export_resolution(family, run_dir, resolution, weights_id, onnx_precision)
        return TensorRTEngine(path, meta["onnx_sha256"], resolution, precision,
                              Path(run_dir) / "engines" / "tensorrt")
