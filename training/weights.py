"""Pretrained initialisation: torchvision's ImageNet weights, a local state-dict file, or none."""
from __future__ import annotations

import os
import pickle
import urllib.error
from pathlib import Path

import torch
from torchvision.models import MobileNet_V2_Weights

from .errors import RescascadeError


def imagenet_weights(tag: str = "IMAGENET1K_V1") -> MobileNet_V2_Weights:
    try:
        return MobileNet_V2_Weights[tag]
    except KeyError:
        names = ", ".join(w.name for w in MobileNet_V2_Weights)
        raise RescascadeError(f"unknown ImageNet weights {tag!r} for mobilenet_v2; choose one of {names}") from None


def hub_cache_path(weights: MobileNet_V2_Weights) -> Path:
    """Where torchvision's weights API keeps this file (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict from .pth/.pt (torch.load with weights_only=True: no pickled code) or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise RescascadeError(f"weights file {path} not found; pass --weights imagenet, none, or an existing state-dict file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a corrupt file, or a pickle with code in it)
        if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e):
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


def resolve_weights(spec: str | None) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Return (state dict or None, description) for --weights imagenet[:TAG] | none | PATH."""
    if spec is None or spec == "none":
        return None, "none"
    if spec == "imagenet" or spec.startswith("imagenet:"):
        weights = imagenet_weights(spec.split(":", 1)[1] if ":" in spec else "IMAGENET1K_V1")
        cached = hub_cache_path(weights)
        if not cached.is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            try:  # torch.hub downloads to a temp file and renames, checking the hash prefix in the name
                torch.hub.download_url_to_file(weights.url, str(cached), hash_prefix=None, progress=True)
            except (urllib.error.URLError, OSError) as e:
                raise RescascadeError(f"cannot download ImageNet weights {weights.url} ({getattr(e, 'reason', e)}); "
                                      f"put the file at {cached} or pass --weights PATH to a local state dict "
                                      "(a torchvision MobileNetV2 state dict saved with torch.save)") from None
        return load_state_dict_file(cached), f"torchvision {weights.name} ({cached.name})"
    return load_state_dict_file(spec), f"file {Path(spec).resolve()}"
