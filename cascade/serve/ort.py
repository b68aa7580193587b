"""ONNX Runtime session settings shared by the profiler's backend and the deployed runtime (`rescascade.serve.bundle`),
so a bundle runs its models as they were timed. No torch import."""
from __future__ import annotations

import onnxruntime as ort

from .errors import BackendUnavailable
from .limits import default_threads


def session_options(threads: int | None = None):
    """onnxruntime.SessionOptions for one of a cascade's sessions: all graph optimizations, sequential execution,
    `threads` intra-op threads (default: the CPUs this process may use), workers that sleep when idle."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Always an explicit count: left at 0, ONNX Runtime pins its workers to cores, and in some processes the
    # main thread then shares a pinned worker's core (measured here: r128 at 1.8 instead of 1.27 ms/image in
    # 2 of 4 processes); the profile and the runtime must also run with the same threads.
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    # A cascade holds one session per resolution, each with its own thread pool; spinning idle pools steal
    # the cores the running stage needs (measured: a stage pair 41 ms spinning vs 18 ms not, batch 32).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


# A shared model (profiling.export.export_shared) reads every tensor a resolution owns from this file name; each
# stage supplies its own patch file's bytes under it.
PATCH_LOCATION = "patch.bin"
# What a patch is the patch of, after the tensors the model reads (ONNX Runtime reads only their offsets): magic,
# resolution (uint32, little-endian), the family's weights id (64 hex digits). The shared model records the same id
# in its metadata (WEIGHTS_KEY).
_PATCH_MAGIC = b"rescascade-patch"
PATCH_TRAILER_BYTES = len(_PATCH_MAGIC) + 4 + 64
WEIGHTS_KEY = "rescascade.weights_sha256"


def patch_trailer(resolution: int, weights_id: str) -> bytes:
    """The last PATCH_TRAILER_BYTES of resolution's patch of the family with weights id `weights_id`."""
    return _PATCH_MAGIC + int(resolution).to_bytes(4, "little") + weights_id.encode("ascii").ljust(64)[:64]


def patch_identity(patch: bytes) -> tuple[int, str] | None:
    """(resolution, weights id) a patch's trailer names; None for bytes without one."""
    tail = patch[-PATCH_TRAILER_BYTES:]
    if len(tail) < PATCH_TRAILER_BYTES or not tail.startswith(_PATCH_MAGIC):
        return None
    rest = tail[len(_PATCH_MAGIC):]
    return int.from_bytes(rest[:4], "little"), rest[4:].decode("ascii", "replace").strip()


def stage_session(model: str, patch: bytes, resolution: int, options, providers, weights: dict | None = None):
    """One stage's onnxruntime.InferenceSession: the shared model (its file's path; from bytes in memory a
    MobileNetV2 session held 66 MiB instead of 53 here) with this resolution's patch bytes as its external data
    (read before graph optimization, so BatchNorm folds into the convolutions as in a model exported per
    resolution; SessionOptions.add_initializer would not: the optimizer folds the file's values), and the spatial
    size fixed to resolution x resolution. Keep `patch` alive as long as the session. `options`: a fresh
    SessionOptions (`session_options`) per session.

    weights (`shared_weights`): the shared model's tensors, handed to every stage's session as the same memory.
    Such a session keeps each BatchNorm apart (folding it would make a copy of the weights) and skips the blocked
    layouts and prepacking that copy them too: one copy of the weights for all stages, but 2-4x slower per image
    on CPU (benchmarks/bundle_storage.py)."""
    options.add_external_initializers_from_files_in_memory([PATCH_LOCATION], [patch], [len(patch)])
    options.add_free_dimension_override_by_name("height", resolution)
    options.add_free_dimension_override_by_name("width", resolution)
    if weights is None:
        return ort.InferenceSession(model, options, providers=providers)
    for name, value in weights.items():
        options.add_initializer(name, value)
    options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(model, options, providers=providers,
                                disabled_optimizers=["ConvBNFusion", "NchwcTransformer"])


def shared_weights(model: str) -> dict:
    """The shared model's weight tensors (every initializer of 2 or more dimensions it stores itself, not its
    patches') as OrtValues, for `stage_session(weights=...)`. Reads the model with the onnx package (not needed
    otherwise): BackendUnavailable where it is not installed."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise BackendUnavailable("one copy of the weights for all stages reads the model with the onnx package: "
                                 "pip install onnx, or keep the default (a session per stage)") from None
    graph = onnx.load(model, load_external_data=False).graph
    return {t.name: ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(t)) for t in graph.initializer
            if t.data_location != onnx.TensorProto.EXTERNAL and len(t.dims) >= 2}
