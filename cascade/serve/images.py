"""One decode for every stage: encoded image bytes -> uint8 RGB tensor [3, H, W] (or array [H, W, 3]).

Training, prediction, eval and the cascade runtime all call `decode`, so a photo means the same pixels
everywhere. Pillow reads it (every format Pillow reads; for JPEG its pixels equal torchvision's `decode_image`,
both being libjpeg-turbo), and:

- the size is read from the header and checked against a pixel limit before any pixel is decoded (default:
  89,478,485, Pillow's default `Image.MAX_IMAGE_PIXELS`, held here: another library setting Pillow's process-wide
  limit to None does not turn rescascade's off), so a few-byte "decompression bomb" costs nothing;
- a JPEG is any file Pillow reads with its JPEG decoder, a phone's MPO (a JPEG with more images after it) too:
  its primary image decodes exactly as the same JPEG alone, at the same reduced DCT scales;
- the EXIF orientation is applied (`ImageOps.exif_transpose`): a portrait phone photo stored sideways comes out
  upright, as torchvision's `decode_image(..., apply_exif_orientation=True)` gives it;
- a multi-frame file (animated GIF, WebP or PNG, multi-page TIFF) gives its first frame;
- any bit depth and mode becomes 8-bit RGB: 16-bit samples keep their high byte (v x 257 -> v, as torchvision's
  `to_dtype(..., scale=True)` does), grey is repeated over the channels, palettes are expanded, CMYK and YCbCr
  converted, alpha dropped.

Anything else (not an image, truncated, over the limit, floating-point pixels, metadata Pillow cannot parse: any
exception from decoding) raises `ImageError` with what is wrong; callers that read many images fail that image
only. Only the tensor-returning functions import torch: the
deployed runtime (`rescascade.serve.bundle`) decodes with numpy and Pillow alone.
"""
from __future__ import annotations

import io
import math
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from .errors import DataError

# Pillow's default decompression-bomb limit, as a constant: Image.MAX_IMAGE_PIXELS is process-wide, and another
# library may have set it to None before rescascade is imported
DEFAULT_MAX_PIXELS = 89_478_485

_ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose reads
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # "I": Pillow's mode for 16-bit PPM/PGM and some TIFFs


class ImageError(DataError, ValueError):
    """An input that does not decode to an image: not an image, truncated, unsupported pixels, or more pixels
    than the limit allows. The message says which."""


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, before any pixel is decoded."""
    format: str | None   # Pillow's format name: JPEG, PNG, GIF, WEBP, BMP, TIFF, PPM, ...
    width: int
    height: int
    mode: str            # Pillow's mode: RGB, L, P, I;16, CMYK, ...


def _open(data: bytes | str | os.PathLike, max_pixels: int | None) -> Image.Image:
    """Open (header only: bytes in memory, or a file of which only the header is read) and check the pixel
    count; the caller closes the image."""
    in_memory = isinstance(data, bytes)
    try:
        with warnings.catch_warnings():  # our own limit decides, below; Pillow's warning would repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data) if in_memory else data)
    except Image.DecompressionBombError as e:  # Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS) came first
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{int(found.group(1)):,} pixels" if found else "the image"
        limit = min(max_pixels or 2 * Image.MAX_IMAGE_PIXELS, 2 * Image.MAX_IMAGE_PIXELS)
        raise ImageError(f"{pixels} exceeds the limit of {limit:,} (max_image_pixels; above "
                         f"{2 * Image.MAX_IMAGE_PIXELS:,} raise PIL.Image.MAX_IMAGE_PIXELS too); not decoded: raise "
                         "the limit only for files you trust") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise ImageError(f"cannot read the file: {e.strerror}") from None
    except UnidentifiedImageError:
        size = len(data) if in_memory else os.path.getsize(data)
        raise ImageError(f"not an image Pillow can read ({size} bytes)") from None
    except Exception as e:  # noqa: BLE001 (Pillow's plugins raise many kinds for damaged headers)
        raise ImageError(f"damaged image header: {type(e).__name__}: {e}") from None
    w, h = im.size
    if w * h == 0:
        im.close()
        raise ImageError(f"the image is empty ({w}x{h} pixels)")
    if max_pixels is not None and w * h > max_pixels:
        im.close()
        raise ImageError(f"{w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} (max_image_pixels); "
                         "not decoded: raise the limit only for files you trust")
    return im


def probe(data: bytes | str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Check an encoded image without decoding its pixels: read the header (format, size, mode), check the pixel
    count, and verify the data where the format carries checksums (PNG's CRCs catch a truncated file).

    data: the encoded file's bytes, or its path. max_pixels: width x height above which the image is refused (None:
    no limit). Raises ImageError. Cheap, so listing a folder can check every file first; damage that only a decode
    finds (a truncated JPEG) is reported by `decode`."""
    with _open(data, max_pixels) as im:
        info = ImageInfo(im.format, im.size[0], im.size[1], im.mode)
        try:
            im.verify()
        except Exception as e:  # noqa: BLE001 (Pillow's plugins raise many kinds here)
            raise ImageError(f"{info.format or 'image'} data is damaged: {e}") from None
        return info


def _rgb8(im: Image.Image) -> np.ndarray:
    """Any Pillow image -> uint8 [H, W, 3]."""
    if im.mode in _SIXTEEN_BIT:
        grey = (np.clip(np.asarray(im), 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode == "F":
        raise ImageError("floating-point pixels (mode F) have no defined 8-bit range; save the image as 8- or 16-bit")
    if im.mode != "RGB":
        with warnings.catch_warnings():  # palette transparency is dropped with the alpha channel anyway
            warnings.simplefilter("ignore", UserWarning)
            im = im.convert("RGB")
    return np.array(im, dtype=np.uint8)


def pil_pixels(image: Image.Image) -> np.ndarray:
    """An opened Pillow image -> uint8 RGB array [H, W, 3], upright (EXIF orientation), 8 bits. Raises ImageError."""
    try:
        if image.getexif().get(_ORIENTATION, 1) != 1:  # exif_transpose copies even an upright image: only when needed
            image = ImageOps.exif_transpose(image)
        return _rgb8(image)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 (truncated data, metadata Pillow cannot parse: struct.error, ...)
        raise ImageError(f"{image.format or 'image'} data does not decode: {type(e).__name__}: {e}") from None


DCT_SCALES = (8, 4, 2, 1)  # the reduced sizes libjpeg decodes to in the DCT domain: 1/8, 1/4, 1/2, full
DECODE_SCALES = ("stage", "full")  # a family's decode policy: each stage's own reduced JPEG scale, or always full


def _draft_request(width: int, height: int, min_side: int) -> tuple[int, int]:
    """The size `decode` asks Pillow's draft for: the image scaled so that its shorter side is min_side."""
    ratio = min(1.0, min_side / min(width, height))
    return math.ceil(width * ratio), math.ceil(height * ratio)


def jpeg_scale(width: int, height: int, min_side: int | None) -> int:
    """The denominator (1, 2, 4 or 8) of the DCT scale at which `decode(..., min_side=)` decodes a width x height
    JPEG: the largest whose shorter side is still >= min_side (None: 1, a full decode). The same rule as Pillow's
    `JpegImageFile.draft` applies to the request `decode` makes, so the cost model can tell without decoding
    whether two stages share one decode."""
    if min_side is None:
        return 1
    req_w, req_h = _draft_request(width, height, min_side)
    fit = min(width // req_w, height // req_h)
    return next(s for s in DCT_SCALES if fit >= s)


def _raw(data) -> bytes:
    """bytes, bytearray, memoryview, or a 1-D uint8 tensor or array of a file's bytes -> bytes."""
    if hasattr(data, "numpy"):  # a torch tensor
        data = data.numpy()
    return data.tobytes() if isinstance(data, np.ndarray) else bytes(data)


def decode_pixels(data, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> np.ndarray:
    """Encoded image -> uint8 RGB array [H, W, 3], upright (EXIF orientation applied), first frame of an animation.

    data: the file's bytes (or a 1-D uint8 tensor or array of them). max_pixels: refuse images with more pixels, checked
    from the header before decoding (None: no limit; Pillow's own hard limit, twice `Image.MAX_IMAGE_PIXELS`,
    still applies unless that is raised too). min_side: a JPEG is decoded at the smallest of libjpeg's DCT scales
    (1/2, 1/4, 1/8; Pillow's `draft`; `jpeg_scale` tells which) whose shorter side is still >= min_side, far
    cheaper than a full decode of a large photo; other formats, and None, decode in full. Raises ImageError."""
    with _open(_raw(data), max_pixels) as im:
        try:
            im.seek(0)
            if min_side is not None and is_jpeg(im):
                im.draft(im.mode, _draft_request(*im.size, min_side))
        except Exception as e:  # noqa: BLE001 (no first frame, a damaged JPEG header)
            raise ImageError(f"{im.format or 'image'} does not decode: {type(e).__name__}: {e}") from None
        return pil_pixels(im)


def is_jpeg(image: Image.Image) -> bool:
    """Whether Pillow reads `image` with its JPEG decoder (JPEG, and MPO: a JPEG followed by more images), so that
    it decodes at reduced DCT scales (`draft`)."""
    return isinstance(image, JpegImagePlugin.JpegImageFile)


class Encoded:
    """One encoded image whose header has been checked, decoded on demand at the scale a stage needs: a JPEG at
    `jpeg_scale` of the stage's resize, any other format in full. The last decode is kept, so stages that need
    the same scale share it (`pixels` and `decode` return the very same object). Raises ImageError from the
    constructor for data that is not an image or has too many pixels, from `pixels`/`decode` for data damaged
    behind its header."""

    def __init__(self, data, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.data = _raw(data)
        self.max_pixels = max_pixels
        with _open(self.data, max_pixels) as im:
            self.format, self.jpeg, (self.width, self.height) = im.format, is_jpeg(im), im.size
        self._scale, self._pixels, self._view = None, None, None

    def scale(self, min_side: int | None) -> int:
        """The DCT scale denominator a decode for min_side uses (1 for anything but a JPEG)."""
        return jpeg_scale(self.width, self.height, min_side) if self.jpeg else 1

    def pixels(self, min_side: int | None = None) -> np.ndarray:
        """uint8 [H, W, 3], decoded at `scale(min_side)`, or the last decode if it used that scale."""
        s = self.scale(min_side)
        if s != self._scale:
            self._pixels = decode_pixels(self.data, self.max_pixels, min_side if s > 1 else None)
            self._scale, self._view = s, None
        return self._pixels

    def view(self, min_side: int | None, convert):
        """convert(`pixels(min_side)`) (a runtime's own layout, e.g. a torch tensor over the same memory), made once
        per decode: the very same object while the decode is kept."""
        pixels = self.pixels(min_side)
        if self._view is None:
            self._view = convert(pixels)
        return self._view
