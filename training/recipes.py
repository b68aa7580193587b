"""Named training presets (`rescascade train --preset NAME`): documented defaults that flags can override.

Each preset fills TrainConfig fields and family options; anything given explicitly on the command line wins.
"""
from __future__ import annotations

from rescascade.serve.errors import ConfigError

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
    # Real-data cascades with a new head (e.g. Imagenette 10-way): convolutions and BN statistics frozen; each
    # resolution gets a linear head fitted on frozen features first (a linear probe); then the lower resolutions'
    # γ, β and heads learn from the labels and, mostly, from the probed top-resolution model (the teacher, which
    # stays as it is: it is the reference a cascade must match), on the eval crop + flip: on 5,000 Imagenette images
    # this lifted r96 from 92.3 to 94.1 % test top-1 and r128 from 94.8 to 96.2 %, where random-resized crops and
    # re-estimated statistics lowered every resolution (README). AdamW: plain SGD at the rates patches like
    # diverged here (a fresh 10-way head's gradients are large).
    "patches-distill": {
        "doc": "new-head transfer for cascades: frozen convolutions and statistics, linear-probe heads per "
               "resolution, the lower resolutions' γ, β and heads learn by distillation from the probed top one",
        "weights": "imagenet", "shared": "frozen", "classifier": "per-resolution", "head_init": "probe",
        "patches": "affine", "distill": "teacher", "freeze_top": True, "label_weight": 0.3, "distill_weight": 0.7,
        "distill_temperature": 2.0, "epochs": 5, "batch_size": 32, "optimizer": "adamw", "lr": 0.0,
        "patch_lr": 0.001, "head_lr": 0.0003, "weight_decay": 0.0, "dropout": 0.0, "schedule": "cosine",
        "warmup_epochs": 0.5, "crop": "center",
    },
    # Keep a pretrained head (e.g. ImageNet 1000-way): convolutions, head and BN statistics frozen; the lower
    # resolutions' γ, β learn only by distillation from the frozen top-resolution model (labels unused), held near
    # their start by L2-SP so that narrow training data (10 classes) does not narrow the 1000-way model.
    "patches-distill-keep-head": {
        "doc": "keep the pretrained head: frozen convolutions, head and statistics; lower resolutions' γ, β learn "
               "by distillation from the frozen top-resolution model (labels unused), L2-SP 10",
        "weights": "imagenet", "shared": "frozen", "classifier": "frozen", "patches": "affine",
        "distill": "teacher", "label_weight": 0.0, "distill_weight": 1.0, "distill_temperature": 1.0,
        "patch_l2sp": 10.0, "epochs": 2, "batch_size": 32, "optimizer": "adamw", "lr": 0.0, "patch_lr": 0.003,
        "head_lr": 0.0, "weight_decay": 0.0, "schedule": "cosine", "warmup_epochs": 0.2, "crop_scale": (0.25, 1.0),
        "crop": "same",
    },
    # From scratch on the built-in synthetic data: small, fast on two CPU cores (used by `rescascade demo`).
    "synthetic": {
        "doc": "small family from scratch on the built-in synthetic set (CPU, minutes)",
        "weights": "none", "width_mult": 0.35, "resolutions": (32, 48, 64, 96), "epochs": 12, "batch_size": 64,
        "optimizer": "adamw", "lr": 0.003, "patch_lr": 0.003, "head_lr": 0.003, "weight_decay": 0.01,
        "schedule": "cosine", "warmup_epochs": 0.5, "crop_scale": (0.5, 1.0), "data": "synthetic:2400",
    },
}


FAMILY_OPTIONS = ("arch", "width_mult", "patch", "weights")


def split_options(opts: dict) -> tuple[dict, dict]:
    """Preset/CLI options -> (TrainConfig fields, run_train family options). `classifier` is the CLI's
    shared | per-resolution | frozen: the head's layout (shared or per resolution) and whether it trains."""
    from .config import TrainConfig
    fields = set(TrainConfig.__dataclass_fields__)
    classifier = opts.get("classifier", "shared")
    cfg = {k: v for k, v in opts.items() if k in fields and k != "classifier"}
    cfg["classifier"] = "frozen" if classifier == "frozen" else "train"
    family = {k: opts[k] for k in FAMILY_OPTIONS if k in opts}
    family["classifier_kind"] = "per_resolution" if classifier == "per-resolution" else "shared"
    return cfg, family


def preset(name: str | None) -> dict:
    if name is None:
        return {}
    if name not in PRESETS:
        raise ConfigError(f"unknown --preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {k: v for k, v in PRESETS[name].items() if k != "doc"}
