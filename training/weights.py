"""Pretrained initialisation by the libraries' own names: torchvision's weights enums (`get_model_weights`), timm's
pretrained tags, a local state-dict file, or none; and the check that weights given as a file expect the input
normalization rescascade feeds (`check_input_normalization`)."""
from __future__ import annotations

import contextlib
import os
import urllib.error
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import DEFAULT_ARCH, Arch, resolve_arch
from rescascade.serve.errors import ConfigError, RescascadeError

NORMALIZATION_IMAGES = 32    # training images the input-normalization check feeds
MAX_VARIANCE_FACTOR = 2.5    # the first BatchNorm's input variance vs its running variance: beyond, another normalization


def torchvision_weights(arch: Arch, tag: str | None = None) -> Enum:
    """The member of torchvision's weights enum for `arch`: `tag`, or IMAGENET1K_V1 (the original ImageNet recipe)
    where the enum has it, else its DEFAULT."""
    from torchvision.models import get_model_weights
    enum = get_model_weights(arch.name)
    tag = tag or ("IMAGENET1K_V1" if "IMAGENET1K_V1" in enum.__members__ else "DEFAULT")
    try:
        return enum[tag.upper()]  # the enum's names are upper case: imagenet1k_v1 means IMAGENET1K_V1
    except KeyError:
        names = ", ".join([w.name for w in enum] + ["DEFAULT"])
        raise RescascadeError(f"unknown ImageNet weights {tag!r} for {arch}; choose one of {names}") from None


def hub_cache_path(weights: Enum) -> Path:
    """Where torchvision's weights API keeps this file (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict from .pth/.pt (torch.load with weights_only=True: no pickled code) or .safetensors."""
    path = Path(path)
    if path.is_dir():
        raise RescascadeError(f"--weights {path} is a directory; give a state-dict file (.pth or .safetensors) in it")
    if not path.is_file():
        raise RescascadeError(f"weights file {path} not found; pass --weights imagenet, none, or an existing "
                              "state-dict file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a corrupt file, or a pickle with code in it)
        if "Unsupported global" in str(e):  # a pickle that holds more than tensors (classes, functions)
            raise RescascadeError(f"{path} holds pickled Python objects besides tensors, which rescascade does not load "
                                  "(unpickling can run code); save the state dict alone, torch.save(model.state_dict(), "
                                  "path), or as .safetensors") from None
        raise RescascadeError(f"cannot read weights {path} ({type(e).__name__}: damaged or not a weights file); give a "
                              "plain state dict (.pth saved with torch.save(model.state_dict())) or a .safetensors "
                              "file") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]  # common checkpoint layout
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RescascadeError(f"{path} is not a state dict of tensors; save one with torch.save(model.state_dict(), path)")
    return sd


def _torchvision_pretrained(arch: Arch, tag: str | None) -> tuple[dict[str, torch.Tensor], str]:
    weights = torchvision_weights(arch, tag)
    cached = hub_cache_path(weights)
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:  # torch.hub downloads to a temp file and renames
            torch.hub.download_url_to_file(weights.url, str(cached), hash_prefix=None, progress=True)
        except (urllib.error.URLError, OSError) as e:
            raise RescascadeError(f"cannot download ImageNet weights {weights.url} ({getattr(e, 'reason', e)}); "
                                  f"put the file at {cached} or pass --weights PATH to a local state dict "
                                  f"(a torchvision {arch.name} state dict saved with torch.save)") from None
    return load_state_dict_file(cached), f"torchvision {type(weights).__name__}.{weights.name} ({cached.name})"


@contextlib.contextmanager
def _hub_offline_unless_reachable(host: str = "huggingface.co", timeout_s: float = 3.0):
    """Switch the Hugging Face hub to its offline mode (the local cache only) while `host` cannot be reached: it
    otherwise retries for about a minute before failing."""
    import socket

    from huggingface_hub import constants
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        reachable = True
    except OSError:
        reachable = False
    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = was or not reachable
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


def _timm_pretrained(arch: Arch, tag: str | None) -> tuple[dict[str, torch.Tensor], str]:
    import timm
    tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch.name}.*") if t.split(".", 1)[0] == arch.name]
    if not tags:
        raise RescascadeError(f"timm has no pretrained weights for {arch}; use --weights none or PATH")
    if tag is not None and tag not in tags:
        raise RescascadeError(f"unknown pretrained tag {tag!r} for {arch}; choose one of {', '.join(tags)}")
    name = f"{arch.name}.{tag or tags[0]}"
    repo = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) or f"timm/{name}"
    try:  # timm's own loader: the Hugging Face hub cache, or a download (at once offline, not after retries)
        with _hub_offline_unless_reachable():
            model = timm.create_model(name, pretrained=True)
    except Exception as e:  # noqa: BLE001 (offline, hub errors: all mean "not available here")
        raise RescascadeError(f"cannot get timm's pretrained weights for {name} ({type(e).__name__}); download "
                              f"model.safetensors from https://huggingface.co/{repo} and pass --weights PATH") from None
    return model.state_dict(), f"timm {model.pretrained_cfg.get('architecture', arch.name)}." \
                                f"{model.pretrained_cfg.get('tag', '')} (Hugging Face hub)"


def resolve_weights(spec: str | None, arch: Arch | str = DEFAULT_ARCH) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Return (state dict of the plain model or None, description) for --weights imagenet[:TAG] | none | PATH.
    imagenet: torchvision's weights enum for `arch` (IMAGENET1K_V1, else DEFAULT; TAG: another member) or timm's
    pretrained weights (TAG: a timm tag such as a1_in1k). Raises RescascadeError when they cannot be had."""
    if spec is None or spec == "none":
        return None, "none"
    if spec == "imagenet" or spec.startswith("imagenet:"):
        arch = resolve_arch(arch) if isinstance(arch, str) else arch
        tag = spec.split(":", 1)[1] if ":" in spec else None
        return (_timm_pretrained if arch.source == "timm" else _torchvision_pretrained)(arch, tag)
    return load_state_dict_file(spec), f"file {Path(spec).resolve()}"


class _Reached(Exception):
    """Stops a forward at the first BatchNorm it reaches."""


def check_input_normalization(model: nn.Module, images: list[torch.Tensor], resolution: int, mean, std,
                              what: str) -> None:
    """Whether loaded weights expect the input normalization rescascade feeds: a state-dict file does not say
    which mean/std it was trained with, but its first BatchNorm does. Its running variance is the variance of the
    first convolution's output on the images it was trained on; fed images normalized another way (a checkpoint
    trained on [0, 1] inputs, or on (x - 0.5) / 0.5), that output's variance is off by a large factor (measured
    on ImageNet MobileNetV2, ShuffleNetV2 and EfficientNet-Lite0 weights: within 1.05x with the right
    normalization, 4.7-19x with those two).

    model: the plain model (eval mode) with the weights loaded; images: decoded uint8 [3, H, W], preprocessed here
    at `resolution` with `mean`/`std`; what: the weights' name for the message. Raises ConfigError when the median
    over channels of the variance ratio is beyond MAX_VARIANCE_FACTOR either way. Models without BatchNorm, a first
    BatchNorm whose statistics were never estimated (a fresh init), and no images are not checked."""
    from .preprocess import preprocess
    first = next((m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
    if first is None or not images:
        return
    seen = []

    def first_input(module, args):
        seen.append((module, args[0].detach()))
        raise _Reached  # the rest of the forward is not needed

    hooks = [m.register_forward_pre_hook(first_input)
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.no_grad():
            model(torch.stack([preprocess(im, resolution, mean=mean, std=std) for im in images]))
    except _Reached:
        pass
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        return
    bn, x = seen[0]  # the first BatchNorm the forward reaches
    if bn.running_var is None or (bool((bn.running_var == 1).all()) and bool((bn.running_mean == 0).all())):
        return  # statistics never estimated (a fresh init): they say nothing about the training inputs
    dims = [d for d in range(x.dim()) if d != 1]
    ratio = (x.var(dims) + bn.eps) / (bn.running_var + bn.eps)
    factor = float(np.exp(np.median(np.log(ratio.double().numpy()))))
    if not 1 / MAX_VARIANCE_FACTOR <= factor <= MAX_VARIANCE_FACTOR:
        name = next((n for n, m in model.named_modules() if m is bn), "the first BatchNorm")
        raise ConfigError(
            f"--weights {what}: on {len(images)} training images normalized as rescascade feeds them (mean "
            f"{tuple(mean)}, std {tuple(std)}), the first BatchNorm's input ({name}) varies {factor:.3g}x as much "
            f"as in the images it was trained on (within {MAX_VARIANCE_FACTOR:g}x expected): the file was trained "
            f"with another input normalization ({'e.g. inputs in [0, 1], mean 0 / std 1' if factor > 1 else 'e.g. (x - 0.5) / 0.5 or [0, 255]'}), "
            "and would lose much of its accuracy here; fold that normalization into the first convolution, or use "
            "weights trained with ImageNet's mean/std")


def normalization_images(images, n: int = NORMALIZATION_IMAGES) -> list[torch.Tensor]:
    """Up to n decoded images spread over an ImageSet (unreadable ones skipped), for `check_input_normalization`."""
    out = []
    for i in np.unique(np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(np.int64)):
        try:
            out.append(images.read(int(i)))
        except (ValueError, OSError):  # an unreadable image: the others decide
            continue
    return out
