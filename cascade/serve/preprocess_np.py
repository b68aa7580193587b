"""The eval preprocessing in numpy alone, pixel for pixel what `training.preprocess.preprocess` computes on CPU:
for runtimes without torch (`rescascade.serve.bundle`), and the geometry both share (resize size, center crop, aspect
bound, normalization constants).

Resize: torch's CPU kernel for uint8 antialiased bilinear resizing (aten/src/ATen/native/cpu/UpSampleKernel.cpp,
`HelperInterpBase::_compute_indices_min_size_weights_aa` and `_compute_index_ranges_int16_weights`; the AVX2 path
in UpSampleKernelAVXAntialias.h is a port of Pillow-SIMD's) computes each axis's weights in double with Pillow's
support and centering, rounds them to integers at the largest precision under which the largest weight still
fits in int16, and sums integer products plus half a unit, shifted down and clamped: width first, each pass
rounded to uint8. Here each pass is a few small matrix products over the band of that weight matrix, in float32
where every product and partial sum is an integer below 2^24 (exact in any order), else in float64: the same
integers, so the same pixels (tests/test_deploy.py checks random sizes against torch). Only the crop's outputs
and the input rows they read are computed, on channel-planar rows, in buffers each thread reuses. Other
formulations were measured slower (benchmarks/README, "Deploying without torch").
"""
from __future__ import annotations

import functools
import math
import threading

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875
MAX_ASPECT = 4  # longer images are cut to their central 4:1 part before resizing
_BLOCK = 16     # output pixels per matrix product: wider blocks multiply more zeros, narrower ones call more often
# Multiply-adds per matrix product: OpenBLAS runs products up to 2^18 on the calling thread, larger ones on its
# own pool, which was 1.2-2x slower for these thin products on 2 cores (benchmarks/README, "Deploying without
# torch"); the runtime spreads images over threads instead.
_SMALL_PRODUCT = 1 << 18


def eval_resize_size(resolution: int, crop_fraction: float = CROP_FRACTION) -> int:
    """The shorter side an image is resized to before the center crop of `resolution`."""
    return int(round(resolution / crop_fraction))


def stage_min_side(resolution: int, crop_fraction: float = CROP_FRACTION, decode_scale: str = "stage") -> int | None:
    """The shorter side a stage at `resolution` decodes a JPEG to at least under a family's decode_scale ("stage":
    its resize size; "full": None, a full decode)."""
    return None if decode_scale == "full" else eval_resize_size(resolution, crop_fraction)


def aspect_window(height: int, width: int, max_aspect: int = MAX_ASPECT) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the central max_aspect:1 part of an image longer than that, else the whole
    image: resizing the shorter side first makes the work grow with the aspect ratio, and the center crop keeps
    only the middle of the long side anyway."""
    if width > max_aspect * height:
        return 0, (width - max_aspect * height) // 2, height, max_aspect * height
    if height > max_aspect * width:
        return (height - max_aspect * width) // 2, 0, max_aspect * width, width
    return 0, 0, height, width


def resized_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to `side`, the longer one in proportion, truncated
    (torchvision's `resize` with one size)."""
    if width <= height:
        return int(side * height / width), side
    return side, int(side * width / height)


def crop_origin(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(top, left) of the centered resolution x resolution crop (torchvision's `center_crop` rounding)."""
    return int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))


def _bilinear(x: float) -> float:
    x = -x if x < 0 else x
    return 1.0 - x if x < 1.0 else 0.0


@functools.lru_cache(maxsize=512)
def _axis_weights(n_in: int, n_out: int) -> tuple[list[int], list[list[int]], int]:
    """torch's integer weights for one axis resized from n_in to n_out, in its order of operations (see the
    module): (first input index [n_out], weights [n_out][taps], precision bits). The precision comes from the
    largest weight of the whole axis, so it is computed for every output even when only a crop is needed."""
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0  # interp_size / 2 = 1 for bilinear
    taps = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    firsts, weights, wt_max = [], [], 0.0
    for i in range(n_out):
        center = scale * (i + 0.5)
        first = max(int(center - support + 0.5), 0)
        size = min(max(min(int(center + support + 0.5), n_in) - first, 0), taps)
        w = [_bilinear((j + first - center + 0.5) * invscale) for j in range(size)]
        total = 0.0
        for v in w:
            total += v
        if total != 0.0:
            w = [v / total for v in w]
            wt_max = max([wt_max, *w])
        firsts.append(first)
        weights.append(w)
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    return firsts, [[int(0.5 + v * (1 << precision)) for v in w] for w in weights], precision  # all w >= 0


@functools.lru_cache(maxsize=512)
def _axis_plan(n_in: int, n_out: int, start: int, count: int):
    """Outputs start..start+count of one axis resized from n_in to n_out as matrix products: ([(in_lo, in_hi,
    out_lo, out_hi, weights [in_hi - in_lo, out_hi - out_lo])], the float dtype that is exact, whether a sum can
    round above 255). The weights are torch's integers times 2^-precision, so a product plus 0.5 is (sum + half a
    unit) / 2^precision, exactly (an integer below 2^24, or 2^53, times a power of two), and its floor is torch's
    shifted sum; torch clamps it to 255, which only weights summing to more than 1 + 1/510 can exceed."""
    firsts, ints, precision = _axis_weights(n_in, n_out)
    firsts, ints = firsts[start:start + count], ints[start:start + count]
    largest = max(sum(w) for w in ints)
    dtype = np.float32 if 255 * largest + (1 << (precision - 1)) <= 1 << 24 else np.float64
    clamp = 255 * largest + (1 << (precision - 1)) >= 256 << precision
    blocks = []
    for lo in range(0, count, _BLOCK):
        hi = min(count, lo + _BLOCK)
        in_lo = min(firsts[lo:hi])
        in_hi = max(f + len(w) for f, w in zip(firsts[lo:hi], ints[lo:hi]))
        matrix = np.zeros((in_hi - in_lo, hi - lo), dtype=dtype)
        for j in range(lo, hi):
            matrix[firsts[j] - in_lo:firsts[j] - in_lo + len(ints[j]), j - lo] = np.ldexp(ints[j], -precision)
        blocks.append((in_lo, in_hi, lo, hi, matrix))
    return blocks, dtype, clamp


_WORKSPACE_BYTES = 1 << 24  # largest buffer a thread keeps between calls; larger ones are allocated each time
_workspace = threading.local()


def _buffer(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized array reused by this thread's next call of the same name: fresh multi-megabyte arrays
    cost their page faults on every call, more than the arithmetic (benchmarks/README, "Deploying without
    torch")."""
    size, dtype = math.prod(shape), np.dtype(dtype)
    if size * dtype.itemsize > _WORKSPACE_BYTES:
        return np.empty(shape, dtype)
    buffers = _workspace.__dict__.setdefault("buffers", {})
    flat = buffers.get(name)
    if flat is None or flat.dtype != dtype or flat.size < size:
        flat = buffers[name] = np.empty(size, dtype)
    return flat[:size].reshape(shape)


def _round(acc: np.ndarray, clamp: bool) -> np.ndarray:
    """floor(acc + 0.5), clamped to 255 if `clamp`, in place (the sums are >= 0: bilinear weights are)."""
    acc += acc.dtype.type(0.5)
    np.floor(acc, out=acc)
    return np.minimum(acc, acc.dtype.type(255), out=acc) if clamp else acc


def _span(n_in: int, n_out: int, start: int, count: int) -> tuple[int, int]:
    """The inputs [lo, hi) that outputs start..start+count of an axis resized from n_in to n_out read."""
    blocks = _axis_plan(n_in, n_out, start, count)[0]
    return blocks[0][0], max(b[1] for b in blocks)


def _resample_width(images: np.ndarray, n_out: int, start: int, count: int) -> np.ndarray:
    """uint8 images [N, H, W, 3] -> float channel rows [N, H, 3, count]: outputs start.. of the width resized to
    n_out. The pixels are copied channel-planar once (the float copy is needed anyway), so every product reads
    contiguous rows and multiplies no zeros between channels."""
    n, h, w, _ = images.shape
    blocks, dtype, clamp = _axis_plan(w, n_out, start, count)
    first, last = _span(w, n_out, start, count)  # the crop's columns only
    x = _buffer("planar", (n, h, 3, last - first), dtype)
    x[...] = images[:, :, first:last].transpose(0, 1, 3, 2)
    x = x.reshape(n * h * 3, last - first)
    out = _buffer("width", (n * h * 3, count), dtype)
    for in_lo, in_hi, lo, hi, matrix in blocks:
        step = max(1, _SMALL_PRODUCT // matrix.size)
        for c in range(0, len(x), step):
            np.matmul(x[c:c + step, in_lo - first:in_hi - first], matrix, out=out[c:c + step, lo:hi])
    return _round(out, clamp).reshape(n, h, 3, count)


def _resample_height(y: np.ndarray, n_in: int, n_out: int, start: int, count: int, first_row: int) -> np.ndarray:
    """Images y [N, rows, M] holding input rows first_row.. of n_in -> [N, count, M]: outputs start.. of the
    height resized to n_out."""
    blocks, dtype, clamp = _axis_plan(n_in, n_out, start, count)
    y = y.astype(dtype, copy=False)
    out = _buffer("height", (y.shape[0], count, y.shape[2]), dtype)
    for in_lo, in_hi, lo, hi, matrix in blocks:
        np.matmul(matrix.T, y[:, in_lo - first_row:in_hi - first_row], out=out[:, lo:hi])
    return _round(out, clamp)


CHUNK = 4  # images resized together: enough for large matrix products, few enough to stay in the CPU's caches...
CHUNK_BYTES = 1 << 19  # ...and more while their pixels stay under this: small images cost Python calls, not products


def chunk_size(height: int, width: int) -> int:
    """How many height x width images are resized together: CHUNK, more for small ones (up to CHUNK_BYTES of
    pixels), whose cost is per call, not per pixel (32 images of 64x64 to r32: 0.10 -> 0.04 ms per image)."""
    return max(CHUNK, CHUNK_BYTES // max(1, height * width * 3))


def _resize_center_crop_chunk(images: np.ndarray, resolution: int, crop_fraction: float) -> np.ndarray:
    """A chunk (`chunk_size`) of equal-size uint8 images [N, H, W, 3] -> float [N, r, 3, r] (row, channel, column) in this
    thread's workspace: valid until the thread's next call."""
    n, r = images.shape[0], resolution
    top, left, h, w = aspect_window(*images.shape[1:3])
    images = images[:, top:top + h, left:left + w]
    nh, nw = resized_size(h, w, eval_resize_size(r, crop_fraction))
    y0, x0 = crop_origin(nh, nw, r)
    lo, hi = _span(h, nh, y0, r) if nh != h else (y0, y0 + r)  # the crop's rows only
    images = images[:, lo:hi]
    if nw != w:  # width first, as torch
        x = _resample_width(images, nw, x0, r)
    else:
        x = _buffer("planar", (n, hi - lo, 3, r), np.float32)
        x[...] = images[:, :, x0:x0 + r].transpose(0, 1, 3, 2)
    y = x.reshape(n, hi - lo, 3 * r)
    if nh != h:
        y = _resample_height(y, h, nh, y0, r, lo)
    return y.reshape(n, r, 3, r)


def _check_arguments(images: np.ndarray, resolution: int, crop_fraction: float) -> None:
    """ValueError unless images are uint8 [N, H, W, 3] with N, H, W >= 1, resolution an integer >= 1 and
    crop_fraction in (0, 1] (above 1 torch pads the crop, which is not reproduced here)."""
    if not isinstance(images, np.ndarray):
        raise ValueError(f"images must be a numpy array, uint8 [N, H, W, 3], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8 or 0 in images.shape:
        raise ValueError(f"images must be uint8 [N, H, W, 3] with N, H, W >= 1, got {images.dtype} "
                         f"{list(images.shape)}")
    if isinstance(resolution, (bool, np.bool_)) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ValueError(f"resolution must be an integer >= 1, got {resolution!r}")
    if isinstance(crop_fraction, (bool, np.bool_)) or not isinstance(crop_fraction, (int, float, np.floating)) \
            or not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be a number in (0, 1], got {crop_fraction!r}")


def resize_center_crop_pixels(images: np.ndarray, resolution: int,
                              crop_fraction: float = CROP_FRACTION) -> np.ndarray:
    """Equal-size uint8 images [N, H, W, 3] -> the center crop of their resize, as float [N, r, r, 3] (channels
    last) holding integers 0..255: the pixels `training.preprocess.resize_center_crop` gives on CPU. ValueError
    for another shape or dtype, a resolution below 1 or a crop_fraction outside (0, 1]."""
    _check_arguments(images, resolution, crop_fraction)
    out = np.empty((len(images), resolution, resolution, 3), dtype=np.float32)
    chunk = chunk_size(*images.shape[1:3])
    for i in range(0, len(images), chunk):  # each chunk's result lives in the workspace until the next one
        out[i:i + chunk] = _resize_center_crop_chunk(images[i:i + chunk], resolution, crop_fraction).transpose(
            0, 1, 3, 2)
    return out


def _normalize_into(out: np.ndarray, pixels: np.ndarray, mean, std) -> None:
    """out [N, 3, r, r] float32 <- pixels [N, r, 3, r] normalized (see `normalize_pixels`)."""
    std32, mean32 = np.asarray(std, np.float32), np.asarray(mean, np.float32)
    scale = (np.float32(1) / (np.float32(255) * std32)).reshape(-1, 1, 1)
    shift = (-mean32 / std32).reshape(-1, 1, 1)
    np.multiply(pixels.transpose(0, 2, 1, 3), scale, out=out, dtype=np.float32)
    out += shift


def normalize_pixels(pixels: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Pixels [N, r, r, 3] (channels last, values 0..255) -> float32 model input [N, 3, r, r], (x / 255 - mean)
    / std computed as x * (1 / (255 std)) + (-mean / std) in float32, one rounding per operation, as
    `to_model_input` does."""
    out = np.empty((pixels.shape[0], 3) + pixels.shape[1:3], dtype=np.float32)
    _normalize_into(out, pixels.transpose(0, 1, 3, 2), mean, std)
    return out


def preprocess_pixels(images: np.ndarray, resolution: int, crop_fraction: float = CROP_FRACTION,
                      mean=IMAGENET_MEAN, std=IMAGENET_STD, out: np.ndarray | None = None) -> np.ndarray:
    """Equal-size uint8 images [N, H, W, 3] -> float32 model input [N, 3, r, r], equal to
    `training.preprocess.preprocess` on CPU, written to `out` when given (float32 [N, 3, r, r]). ValueError for
    another shape or dtype (of images or out), a resolution below 1 or a crop_fraction outside (0, 1]."""
    _check_arguments(images, resolution, crop_fraction)
    shape = (len(images), 3, resolution, resolution)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != np.float32:
        got = f"{out.dtype} {list(out.shape)}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"out must be a float32 array {list(shape)}, got {got}")
    chunk = chunk_size(*images.shape[1:3])
    for i in range(0, len(images), chunk):
        _normalize_into(out[i:i + chunk], _resize_center_crop_chunk(images[i:i + chunk], resolution,
                                                                     crop_fraction), mean, std)
    return out


def preprocess_rows(pixels: list, rows, resolution: int, crop_fraction: float, mean, std, pool=None) -> np.ndarray:
    """The model input float32 [len(rows), 3, r, r] of `rows` (indices into pixels, uint8 [H, W, 3] arrays of any
    sizes), as a runtime makes a stage's input: images of one size preprocessed together, `chunk_size` at a time, the
    chunks spread over `pool` (a concurrent.futures executor; None: this thread): numpy releases the GIL in its
    products. ValueError as `preprocess_pixels`."""
    out = np.empty((len(rows), 3, resolution, resolution), dtype=np.float32)
    by_shape: dict[tuple, list[int]] = {}
    for j, i in enumerate(rows):
        by_shape.setdefault(pixels[i].shape, []).append(j)
    tasks = [js[c:c + size] for shape, js in by_shape.items() for size in [chunk_size(*shape[:2])]
             for c in range(0, len(js), size)]  # a chunk per task

    def run(js: list[int]) -> None:
        batch = np.stack([pixels[rows[j]] for j in js])
        if js[-1] - js[0] == len(js) - 1:  # consecutive rows (images of one size): written in place
            preprocess_pixels(batch, resolution, crop_fraction, mean, std, out=out[js[0]:js[-1] + 1])
        else:
            out[js] = preprocess_pixels(batch, resolution, crop_fraction, mean, std)
    if pool is None or len(tasks) == 1:
        for js in tasks:
            run(js)
    else:
        list(pool.map(run, tasks))
    return out
