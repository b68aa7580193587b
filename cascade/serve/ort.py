"""ONNX Runtime session settings shared by the profiler's backend and the deployed runtime (`rescascade.serve.bundle`),
so a bundle runs its models as they were timed, and the patch files that make a family's shared model each
resolution's model. No torch import."""
from __future__ import annotations

import lzma
import struct

import numpy as np
import onnxruntime as ort

from .errors import ArtifactError, BackendUnavailable
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
# stage supplies its own patch's unpacked bytes under it.
PATCH_LOCATION = "patch.bin"
# A patch file: the bytes the shared model reads, packed (`pack_patch`), then a trailer naming what it is the patch
# of: magic, resolution, unpacked length, element size (uint32, uint32, uint8, little-endian) and the family's weights
# id (64 hex digits, last). The shared model records the same id in its metadata (WEIGHTS_KEY).
_PATCH_MAGIC = b"rescascade-patch"
_PATCH_FIELDS = struct.Struct("<IIB")
PATCH_TRAILER_BYTES = len(_PATCH_MAGIC) + _PATCH_FIELDS.size + 64
WEIGHTS_KEY = "rescascade.weights_sha256"


def _xz_filters(size: int) -> list[dict]:
    # the strongest preset, no literal context (shuffled planes have none), a dictionary no larger than the data
    # (the reader allocates what the header names; preset 9's is 64 MiB)
    return [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 0,
             "dict_size": max(4096, 1 << max(size - 1, 1).bit_length())}]


def pack_patch(data: bytes, itemsize: int, resolution: int, weights_id: str) -> bytes:
    """A patch file from `data`, the bytes the shared model reads (tensors of `itemsize`-byte elements; 1: no
    shuffle), and what it is the patch of. Lossless: the elements' bytes are shuffled into planes (all first bytes,
    then all second bytes, ...: trained BatchNorm values share their sign and exponent bytes; HDF5's and Blosc's
    shuffle filter) and compressed with xz (CRC32-checked): 0.82x the bytes for trained BatchNorms (the demo's and
    EfficientNet-Lite0's), against 0.93x unshuffled. ValueError when len(data) is not a multiple of itemsize."""
    if itemsize < 1 or len(data) % itemsize:
        raise ValueError(f"{len(data)} bytes are not a whole number of {itemsize}-byte elements")
    planes = np.frombuffer(data, np.uint8).reshape(-1, itemsize).T.tobytes()
    packed = lzma.compress(planes, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=_xz_filters(len(data)))
    return packed + _PATCH_MAGIC + _PATCH_FIELDS.pack(int(resolution), len(data), itemsize) + \
        weights_id.encode("ascii").ljust(64)[:64]


def patch_identity(patch: bytes) -> tuple[int, str] | None:
    """(resolution, weights id) a patch file's trailer names; None for bytes without one."""
    tail = patch[-PATCH_TRAILER_BYTES:]
    if len(tail) < PATCH_TRAILER_BYTES or not tail.startswith(_PATCH_MAGIC):
        return None
    resolution = _PATCH_FIELDS.unpack_from(tail, len(_PATCH_MAGIC))[0]
    return resolution, tail[-64:].decode("ascii", "replace").strip()


def unpack_patch(patch: bytes, what: str = "the patch") -> bytes:
    """The bytes the shared model reads, from a patch file's (`pack_patch`). ArtifactError naming `what` for
    bytes that are not a patch (no trailer) or are damaged (xz's check, or a length other than the trailer's)."""
    tail = patch[-PATCH_TRAILER_BYTES:]
    if len(tail) < PATCH_TRAILER_BYTES or not tail.startswith(_PATCH_MAGIC):
        raise ArtifactError(f"{what} is not a rescascade patch (it does not end in one's trailer); export again")
    _, size, itemsize = _PATCH_FIELDS.unpack_from(tail, len(_PATCH_MAGIC))
    try:
        planes = lzma.decompress(patch[:-PATCH_TRAILER_BYTES], format=lzma.FORMAT_XZ)
    except lzma.LZMAError as e:
        raise ArtifactError(f"{what} is damaged ({e}); export again") from None
    if len(planes) != size or itemsize < 1 or size % itemsize:
        raise ArtifactError(f"{what} unpacks to {len(planes)} bytes where its trailer says {size} of "
                            f"{itemsize}-byte elements; it is damaged: export again")
    return np.frombuffer(planes, np.uint8).reshape(itemsize, -1).T.tobytes()


def stage_session(model: str, patch: bytes, resolution: int, options, providers, weights: dict | None = None):
    """One stage's onnxruntime.InferenceSession: the shared model (its file's path; from bytes in memory a
    MobileNetV2 session held 66 MiB instead of 53 here) with this resolution's unpacked patch bytes
    (`unpack_patch`) as its external data
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
