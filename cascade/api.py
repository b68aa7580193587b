"""The journey's steps that need more than one layer: profiling a family with the runtime's own decision step."""
from __future__ import annotations

from pathlib import Path

from rescascade.profiling.measure import Protocol
from rescascade.profiling.profile import Profile, run_profile

from .runtime import decision_step


def profile_family(run_dir, backend: str = "onnxruntime", precision: str = "fp32", batch_sizes=(1,),
                   resolutions=None, threads: int | None = None, protocol: Protocol | None = None, out=None,
                   source_size: int | None = None, log=print, decode_sizes=None) -> Profile:
    """Measure every (resolution, batch size) of the family in RUN_DIR on `backend` (see `run_profile`: the
    protocol, the columns, times in ms) with the cascade runtime's decision step timed as each stage's decision,
    write RUN_DIR/profile.csv (or `out`), with the JPEG decode of each stage for each of decode_sizes
    [(width, height)] (default: the source size) in profile_decode.csv, and return it as a Profile. Raises
    RescascadeError (see run_profile)."""
    run_profile(run_dir, backend, precision, batch_sizes, resolutions, threads, protocol, out, source_size, log,
                decision_step=decision_step, decode_sizes=decode_sizes)
    return Profile.load(out if out is not None else Path(run_dir) / "profile.csv")
