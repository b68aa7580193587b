"""ONNX Runtime threads for every session this package creates.

A cascade holds one session per resolution. With a thread pool each (ONNX Runtime's default), some processes ran
the small stages 35-40 % slower (2-5 of 6 processes with torch loaded, 2 cores); with one process-wide pool shared
by all sessions, none of 10 did, and the stages ran up to 13 % faster. So the first session creates ONNX Runtime's
global intra-op pool (once per process, as wide as the CPUs this process may use, or `threads`), and every later
session uses it: ONNX Runtime then refuses per-session pools in this process, so other ONNX Runtime sessions in the
same process must also set `use_per_session_threads = False`. RESCASCADE_ORT_POOL=session keeps a pool per session
(an explicit thread count, no core pinning, no idle spinning) instead.
"""
from __future__ import annotations

import os

from .measure import default_threads

_GLOBAL_THREADS: int | None = None  # width of the process-wide pool; 0: this process uses per-session pools


def uses_global_pool(threads: int) -> bool:
    global _GLOBAL_THREADS
    if _GLOBAL_THREADS is None:
        _GLOBAL_THREADS = 0
        if os.environ.get("RESCASCADE_ORT_POOL", "global") != "session":
            import onnxruntime as ort
            try:
                ort.set_global_thread_pool_sizes(threads, 1)
                _GLOBAL_THREADS = threads
            except Exception:  # an older ONNX Runtime whose environment already exists: per-session pools
                pass
    return _GLOBAL_THREADS > 0


def session_options(threads: int | None = None):
    """SessionOptions with the threads set as above (graph optimizations on, sequential execution)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    threads = threads or default_threads()
    if uses_global_pool(threads):
        opts.use_per_session_threads = False
    else:
        # Left at 0, ONNX Runtime pins its workers to cores and some processes ran 40 % slower; idle pools must
        # not spin, or they steal the cores the running stage needs (measured: a stage pair 41 vs 18 ms, batch 32).
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts
