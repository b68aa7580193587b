"""The bounds of a run that every part checks its arguments against, and the threads a process may use."""
from __future__ import annotations

import os

MAX_BATCH = 65536      # larger batch sizes are typos: their activations would need terabytes
MAX_THREADS = 256      # more threads than any machine's cores only slow things down (and each costs memory)


def default_threads() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
