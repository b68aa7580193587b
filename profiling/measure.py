"""The timing protocol every backend shares (after trtexec's): warm up by count *and* time, then measure at
least N iterations *and* T seconds, and summarise with median, mean, std, p90, p99 and CV.

`step()` runs one timed execution and returns its duration in milliseconds; CUDA backends time it with CUDA
events after synchronising, CPU backends with perf_counter.
"""
from __future__ import annotations

import os
import platform
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from rescascade.serve.errors import check_bool, check_int, check_number


@dataclass
class Protocol:
    """How each configuration is timed: warmup_iters and warmup_seconds (s) untimed first, then at least min_iters
    iterations and min_seconds (s) (at most max_iters and max_seconds), spread over `rounds` round-robin passes
    over all configurations. smoke: a few iterations to check that things run; its figures never replace
    measured ones. ConfigError for negative or non-finite values, min_iters or rounds below 1."""
    warmup_iters: int = 10
    warmup_seconds: float = 0.5
    min_iters: int = 30
    min_seconds: float = 2.0
    max_iters: int = 100_000
    max_seconds: float = 60.0
    rounds: int = 5  # the minimums are spread over this many round-robin passes over all configurations
    smoke: bool = False  # a few iterations to check that things run: its figures never replace measurements

    def __post_init__(self):
        for name, low in (("warmup_iters", 0), ("min_iters", 1), ("max_iters", 1), ("rounds", 1)):
            check_int(name, getattr(self, name), low)
        for name in ("warmup_seconds", "min_seconds", "max_seconds"):
            check_number(name, getattr(self, name), 0)
        check_bool("smoke", self.smoke)

    def round(self, k: int) -> "Protocol":
        """The share of round k: the full warm-up first, a short re-warm (caches) later; 1/rounds of the rest."""
        return Protocol(warmup_iters=self.warmup_iters if k == 0 else min(2, self.warmup_iters),
                        warmup_seconds=self.warmup_seconds if k == 0 else 0.0,
                        min_iters=max(1, -(-self.min_iters // self.rounds)), min_seconds=self.min_seconds / self.rounds,
                        max_iters=max(1, self.max_iters // self.rounds), max_seconds=self.max_seconds / self.rounds,
                        rounds=1, smoke=self.smoke)


QUICK = Protocol(warmup_iters=2, warmup_seconds=0.0, min_iters=5, min_seconds=0.0, rounds=1, smoke=True)


def run_protocol(step: Callable[[], float], protocol: Protocol) -> np.ndarray:
    """Warm up, then collect per-iteration milliseconds until both minimums are met (or a maximum hit)."""
    t0, n = time.perf_counter(), 0
    while n < protocol.warmup_iters or time.perf_counter() - t0 < protocol.warmup_seconds:
        step()
        n += 1
    times = []
    t0 = time.perf_counter()
    while True:
        times.append(step())
        elapsed = time.perf_counter() - t0
        enough = len(times) >= protocol.min_iters and elapsed >= protocol.min_seconds
        if enough or len(times) >= protocol.max_iters or elapsed >= protocol.max_seconds:
            break
    return np.asarray(times, dtype=np.float64)


def summarize(times_ms: np.ndarray) -> dict:
    mean = float(times_ms.mean())
    std = float(times_ms.std(ddof=1)) if len(times_ms) > 1 else 0.0
    return {"median_ms": float(np.median(times_ms)), "mean_ms": mean, "std_ms": std,
            "p90_ms": float(np.percentile(times_ms, 90)), "p99_ms": float(np.percentile(times_ms, 99)),
            "min_ms": float(times_ms.min()), "cv": std / mean if mean > 0 else 0.0, "n_iters": int(len(times_ms))}


def cpu_timer(fn: Callable[[], object]) -> Callable[[], float]:
    def step() -> float:
        t = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t)
    return step


def after(untimed: Callable[[], object] | None, step: Callable[[], float]) -> Callable[[], float]:
    """A protocol step that first runs `untimed` (when given), then returns `step()`'s milliseconds: to time work
    in the state the runtime meets it in (e.g. right after an inference)."""
    if untimed is None:
        return step

    def both() -> float:
        untimed()
        return step()
    return both


def cuda_timer(fn: Callable[[], object]) -> Callable[[], float]:
    """Time fn on the current stream with CUDA events, synchronising before and after (no async lies)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def step() -> float:
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    return step


@contextmanager
def torch_threads(n: int | None):
    """Run torch ops with n intra-op threads (None: leave as is). ONNX Runtime CPU backends preprocess with one
    torch thread: torch's idle OpenMP threads spin-wait and starve ORT's pool otherwise (measured 2x slower)."""
    if n is None:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint(threads: int | None = None) -> dict:
    """What the numbers were measured on: CPU, threads, GPU, driver, CUDA and library versions."""
    fp = {"hostname": platform.node(), "platform": platform.platform(), "cpu": cpu_model(),
          "logical_cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
          "torch": torch.__version__}
    try:
        import onnxruntime
        fp["onnxruntime"] = onnxruntime.__version__
        fp["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    try:
        import tensorrt
        fp["tensorrt"] = tensorrt.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        fp.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                   "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "driver": _nvidia_driver()})
    return fp


def _nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as f:
            return driver_version(f.readline())
    except OSError:
        return None


def driver_version(line: str) -> str | None:
    """The version number in /proc/driver/nvidia/version's first line. The words before it vary:
    "... x86_64 Kernel Module  535.104.05  ..." or "... Open Kernel Module for x86_64  570.86.15  ..."."""
    m = re.search(r"\b\d+\.\d+(?:\.\d+)?\b", line)
    return m.group(0) if m else None


def device_key(fp: dict) -> str:
    """The part of a fingerprint that must match for two profile rows to be comparable."""
    return "|".join(str(fp.get(k)) for k in ("cpu", "logical_cores", "gpu"))
