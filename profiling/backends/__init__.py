"""Inference backends, one registry (like timm's): a name -> a backend that opens one resolution as an Engine.

An Engine runs preprocessed float32 input on its device and returns logits; `timer(batch)` gives the
profiler a step function on a device-resident input. A backend's `numpy_inputs` says how a cascade's stage inputs
are made on it, and so how the profiler times them: numpy on the CPU (`serve.preprocess_np`, the bundle's way: ONNX
Runtime's CPU provider) or torch on the backend's device. The profiler and the cascade runtime both use these, so a
cascade runs on exactly what was measured.

  onnxruntime            ONNX Runtime, CPUExecutionProvider (threads pinned)
  onnxruntime-cuda       ONNX Runtime, CUDAExecutionProvider (needs the `gpu` extra and a GPU)
  onnxruntime-tensorrt   ONNX Runtime, TensorrtExecutionProvider (engine cache, fp16)
  torch                  eager PyTorch on CPU, channels_last
  torch-compile          torch.compile (inductor) on CPU
  torch-cuda             eager PyTorch on CUDA (fp16/fp32, channels_last)
  torch-cuda-graphs      the same, one captured CUDA graph per batch size
  torch-cuda-compile     torch.compile on CUDA
  tensorrt               TensorRT Python API: static-shape engines per (resolution, batch), cached
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from rescascade.serve.errors import ConfigError, RescascadeError

if TYPE_CHECKING:  # the CLI reads BACKEND_NAMES for --help: no torch import for that
    import torch


class Engine(Protocol):
    device: str
    resolution: int
    precision: str
    build_seconds: float
    preprocess_threads: int | None  # torch threads for preprocessing next to this engine (None: as is)

    def run(self, x: torch.Tensor) -> torch.Tensor: ...

    def timer(self, batch_size: int) -> Callable[[], float]: ...


def bucket(n: int, built) -> int:
    """Static-shape engines (TensorRT plans, CUDA graphs): the batch size to run n inputs at, padding them: the
    smallest size already built that fits, else the next power of two (a shrinking cascade batch would
    otherwise build an engine for every size it passes through)."""
    fits = [b for b in built if b >= n]
    return min(fits) if fits else 1 << max(0, (n - 1).bit_length())


def _registry() -> dict:
    from .onnxruntime_backend import OnnxRuntimeBackend
    from .tensorrt_backend import TensorRTBackend
    from .torch_backend import TorchBackend
    return {
        "onnxruntime": OnnxRuntimeBackend("cpu"),
        "onnxruntime-cuda": OnnxRuntimeBackend("cuda"),
        "onnxruntime-tensorrt": OnnxRuntimeBackend("tensorrt"),
        "torch": TorchBackend("cpu"),
        "torch-compile": TorchBackend("cpu", compile=True),
        "torch-cuda": TorchBackend("cuda"),
        "torch-cuda-graphs": TorchBackend("cuda", graphs=True),
        "torch-cuda-compile": TorchBackend("cuda", compile=True),
        "tensorrt": TensorRTBackend(),
    }


BACKEND_NAMES = ("onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt", "torch", "torch-compile", "torch-cuda",
                 "torch-cuda-graphs", "torch-cuda-compile", "tensorrt")


def get_backend(name: str):
    """The backend called `name`, checked usable here (else one line naming what to install)."""
    if name not in BACKEND_NAMES:
        raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    backend = _registry()[name]
    backend.check()
    return backend


def available_backends() -> dict[str, str | None]:
    """name -> None if usable here, else the reason."""
    out = {}
    for name, backend in _registry().items():
        try:
            backend.check()
            out[name] = None
        except RescascadeError as e:
            out[name] = str(e)
    return out
