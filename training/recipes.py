"""Named training presets (`rescascade train --preset NAME`): documented defaults that flags can override.

Each preset fills TrainConfig fields and family options; anything given explicitly on the command line wins.
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    # Multitask fine-tuning of everything from ImageNet weights (the paper's multitask mode, short schedule).
    "finetune": {
        "doc": "multitask fine-tuning of shared weights, patches and head from ImageNet weights",
        "weights": "imagenet", "epochs": 10, "optimizer": "sgd", "lr": 0.005, "patch_lr": 0.05, "head_lr": 0.05,
        "schedule": "cosine", "warmup_epochs": 0.5, "crop_scale": (0.25, 1.0),
    },
    # The paper's transfer mode: shared convolutions frozen, only patches (and the head) learn, at large rates.
    "transfer": {
        "doc": "transfer mode: shared weights frozen; patches and classifier learn (large patch learning rate)",
        "weights": "imagenet", "shared": "frozen", "epochs": 10, "optimizer": "sgd", "lr": 0.0, "patch_lr": 0.1,
        "head_lr": 0.1, "schedule": "cosine", "warmup_epochs": 0.5, "crop_scale": (0.25, 1.0),
    },
    # From scratch on the built-in synthetic data: small, fast on two CPU cores (used by `rescascade demo`).
    "synthetic": {
        "doc": "small family from scratch on the built-in synthetic set (CPU, minutes)",
        "weights": "none", "width_mult": 0.35, "resolutions": (32, 48, 64, 96), "epochs": 12, "batch_size": 64,
        "optimizer": "adamw", "lr": 0.003, "patch_lr": 0.003, "head_lr": 0.003, "weight_decay": 0.01,
        "schedule": "cosine", "warmup_epochs": 0.5, "crop_scale": (0.5, 1.0), "data": "synthetic:2400",
    },
}


def preset(name: str | None) -> dict:
    from .fileio import UserError
    if name is None:
        return {}
    if name not in PRESETS:
        raise UserError(f"unknown --preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {k: v for k, v in PRESETS[name].items() if k != "doc"}
