"""The kernel's image decode (`rescascade.serve.images`) as torch tensors, for training, prediction and the torch
runtime: uint8 [3, H, W] views over the decoded uint8 [H, W, 3] arrays (channels-last memory, the layout
torchvision's decode_image returns and the resize's fast path)."""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image

from rescascade.serve.images import DEFAULT_MAX_PIXELS, Encoded, decode_pixels, pil_pixels


def as_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> the same memory as a uint8 tensor [3, H, W] (channels-last)."""
    return torch.from_numpy(pixels).permute(2, 0, 1)


def decode(data, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> torch.Tensor:
    """Encoded image -> uint8 RGB tensor [3, H, W] in channels-last memory; `serve.images.decode_pixels` (see
    there: arguments, ImageError) as a tensor."""
    return as_tensor(decode_pixels(data, max_pixels, min_side))


def decode_encoded(image: Encoded, min_side: int | None = None) -> torch.Tensor:
    """`image.pixels(min_side)` as a uint8 tensor [3, H, W] over the same memory, the same object while its
    decode is kept."""
    return image.view(min_side, as_tensor)


def from_pil(image: Image.Image) -> torch.Tensor:
    """An opened Pillow image -> uint8 RGB tensor [3, H, W], as `decode` makes it (EXIF orientation, 8 bits)."""
    return as_tensor(pil_pixels(image))


def pixel_digest(image: torch.Tensor) -> str:
    """A short fingerprint (16 hex digits, BLAKE2b) of decoded pixels and their shape, whatever the memory layout:
    predictions record it per image so that `eval` can check it scores the very images the family predicted."""
    h = hashlib.blake2b(str(tuple(image.shape)).encode(), digest_size=8)
    h.update(image.contiguous().numpy().tobytes())
    return h.hexdigest()
