"""PyTorch backends: eager (CPU/CUDA, channels_last, fp16 on CUDA), CUDA graphs, torch.compile."""
from __future__ import annotations

import time

import torch

from rescascade.serve.errors import BackendUnavailable, ConfigError

from ..measure import cpu_timer, cuda_timer
from . import bucket


class TorchEngine:
    def __init__(self, model: torch.nn.Module, resolution: int, device: str, precision: str, graphs: bool,
                 compile: bool, threads: int | None = None):
        self.resolution, self.device, self.precision = resolution, device, precision
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.model = model.to(device=device, dtype=self.dtype, memory_format=torch.channels_last).eval()
        self.graphs, self.compile = graphs, compile
        self.preprocess_threads = threads  # torch preprocesses with the same pool it infers with
        self._graphs: dict[int, tuple] = {}
        self.build_seconds = 0.0
        if compile:
            self.model = torch.compile(self.model, mode="max-autotune" if device == "cuda" else "default",
                                       dynamic=False)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype, non_blocking=True).contiguous(memory_format=torch.channels_last)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x)

    def _graph(self, batch: int):
        """Capture (once per batch size) the forward pass into a CUDA graph with static buffers."""
        if batch not in self._graphs:
            t0 = time.perf_counter()
            static_in = torch.zeros(batch, 3, self.resolution, self.resolution, device=self.device,
                                    dtype=self.dtype).contiguous(memory_format=torch.channels_last)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(3):  # warm up cuDNN autotuning outside the capture
                    self.model(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                static_out = self.model(static_in)
            torch.cuda.synchronize()
            self.build_seconds += time.perf_counter() - t0
            self._graphs[batch] = (graph, static_in, static_out)
        return self._graphs[batch]

    def warm(self, batch: int) -> None:
        """Build what this batch size needs (graph capture, compilation) and record how long it took."""
        x = torch.zeros(batch, 3, self.resolution, self.resolution)
        t0 = time.perf_counter()
        self.run(x)
        if self.device == "cuda":
            torch.cuda.synchronize()
        if not self.graphs:
            self.build_seconds += time.perf_counter() - t0

    def run(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x)
        if self.graphs:  # one graph per bucket: a shrunken batch is padded to the smallest captured size
            n = x.shape[0]
            graph, static_in, static_out = self._graph(bucket(n, self._graphs))
            static_in[:n].copy_(x)
            graph.replay()
            return static_out[:n].float().clone()
        return self._forward(x).float()

    def timer(self, batch_size: int):
        x = self._prepare(torch.randn(batch_size, 3, self.resolution, self.resolution))
        if self.graphs:
            graph, static_in, _ = self._graph(batch_size)
            static_in.copy_(x)
            fn = graph.replay
        else:
            def fn():
                return self._forward(x)
        return cuda_timer(fn) if self.device == "cuda" else cpu_timer(fn)


class TorchBackend:
    numpy_inputs = False  # torch inputs on the backend's device (`runtime.TorchStages`)

    def __init__(self, device: str, graphs: bool = False, compile: bool = False):
        self.device, self.graphs, self.compile = device, graphs, compile
        self.name = "torch" + ("-cuda" if device == "cuda" else "") + ("-graphs" if graphs else "") + \
                    ("-compile" if compile else "")

    def check(self) -> None:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(f"backend {self.name} needs an NVIDIA GPU and a CUDA build of torch; torch sees no GPU "
                                     "here (use --backend onnxruntime or torch on CPU)")

    def open(self, family, run_dir, weights_id: str, resolution: int, precision: str = "fp32",
             threads: int | None = None) -> TorchEngine:
        if precision not in ("fp32", "fp16"):
            raise ConfigError(f"precision {precision!r}: the torch backends take fp32 or fp16")
        if precision == "fp16" and self.device == "cpu":
            raise ConfigError("fp16 on the torch CPU backend is not a deployment option; use --precision fp32 "
                              "(or a CUDA backend for fp16)")
        return TorchEngine(family.plain_model(resolution), resolution, self.device, precision, self.graphs,
                           self.compile, threads if self.device == "cpu" else None)
