"""Helpers the benchmark scripts share: a MobileNetV2 family to measure, and markdown tables."""
from __future__ import annotations

from pathlib import Path

import _shared_data  # noqa: F401  (registers this lab's data sources: shared-imagenette, shared-imagenet-samples)
import torch

from rescascade.training.family import ResolutionFamily
from rescascade.training.store import save_family

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
IMAGENET_WEIGHTS = SHARED_DATA / "mobilenet_v2_imagenet" / "mobilenet_v2_tv_imagenet1k_qnnpack_dequant.pth"
IMAGENETTE = SHARED_DATA / "imagenette_224"


def imagenet_family(out: Path, resolutions=(96, 128, 160, 192, 224)) -> Path:
    """A MobileNetV2 1.0 family from the shared ImageNet weights (random weights if they are absent):
    latency does not depend on the weights' values."""
    if (out / "family.json").is_file():
        return out
    fam = ResolutionFamily(resolutions)
    if IMAGENET_WEIGHTS.is_file():
        fam.load_plain_state_dict(torch.load(IMAGENET_WEIGHTS, weights_only=True))
    save_family(fam, out, provenance={"data": {"source_size": [224, 224]}})
    return out


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
