"""Preprocessing for resolution r: resize the shorter side to round(r / 0.875) (antialiased),
center-crop r, scale to [0, 1], normalize with ImageNet mean/std. torchvision v2 functionals on tensors, shared
by training, prediction, profiling and the runtime, so every stage sees exactly the same pixels; the geometry and
constants live in `preprocess_np`, whose numpy version gives the same pixels without torch."""
from __future__ import annotations

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from rescascade.serve.preprocess_np import (CROP_FRACTION, IMAGENET_MEAN, IMAGENET_STD, MAX_ASPECT, aspect_window,  # noqa: F401
                            eval_resize_size, stage_min_side)


def bound_aspect(images: torch.Tensor, max_aspect: int = MAX_ASPECT) -> torch.Tensor:
    """The central max_aspect:1 part of images longer than that (a view; `aspect_window`), else images unchanged.
    The center crop keeps only the middle of the long side, so cutting it to 4:1 first bounds the resize's work
    and changes no pixel of ordinary images (up to 4:1); beyond, the crop's pixels move by at most the rounding of
    the resized length."""
    top, left, h, w = aspect_window(*images.shape[-2:], max_aspect)
    return images if (h, w) == tuple(images.shape[-2:]) else images[..., top:top + h, left:left + w]


def resize_center_crop(images: torch.Tensor, resolution: int, crop_fraction: float = CROP_FRACTION) -> torch.Tensor:
    """Images [..., C, H, W] (uint8 stays uint8) -> [..., C, r, r]; works on a batch of equal-size images.
    uint8 in channels-last memory (how decode_image returns pixels) takes torch's fast path: about 2x quicker on CPU
    than the same batch in channels-first memory, with the same output. Aspect ratios beyond 4:1 are first cut to
    their central 4:1 part (`bound_aspect`), so the work stays bounded."""
    x = TF.resize(bound_aspect(images), [eval_resize_size(resolution, crop_fraction)], antialias=True)
    return TF.center_crop(x, [resolution, resolution])


def to_model_input(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 [..., C, r, r] in any memory layout -> normalized float32, contiguous [..., C, r, r].

    (x / 255 - mean) / std as one converting copy and one in-place x * scale + shift: on CPU at 224 this is 3-4x
    cheaper than to_dtype + normalize (which make three passes over the float batch); same values to 1e-6."""
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    out.copy_(images)
    mean = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return out.mul_(1 / (255 * std)).add_(-mean / std)


def preprocess(images: torch.Tensor, resolution: int, crop_fraction: float = CROP_FRACTION,
               mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Decoded uint8 images [N, C, H, W] (or [C, H, W]) -> the model input at `resolution`."""
    return to_model_input(resize_center_crop(images, resolution, crop_fraction), mean, std)


def channels_last_batch(images: list[torch.Tensor], device="cpu") -> torch.Tensor:
    """Equal-size decoded uint8 images [3, H, W] -> one contiguous uint8 batch [n, H, W, 3] on `device`: the
    layout decode_image gives (each image's permute is a plain copy) and the resize's fast path. Index its rows
    with index_select (indexing a permuted view is ~20x slower); preprocess(batch.permute(0, 3, 1, 2), r)."""
    return torch.stack([im.permute(1, 2, 0) for im in images]).to(device, non_blocking=True)


def eval_transform(resolution: int, crop_fraction: float = CROP_FRACTION) -> T.Compose:
    """The same as `preprocess`, as a torchvision v2 transform for datasets of uint8 tensors or PIL images."""
    return T.Compose([T.ToImage(), T.Resize(eval_resize_size(resolution, crop_fraction), antialias=True),
                      T.CenterCrop(resolution), T.ToDtype(torch.float32, scale=True),
                      T.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])


def train_transform(resolution: int) -> T.Compose:
    """RandomResizedCrop(r) + horizontal flip, kept uint8 (the trainer normalizes on the device)."""
    return T.Compose([T.ToImage(), T.RandomResizedCrop(resolution, antialias=True), T.RandomHorizontalFlip()])
