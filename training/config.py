"""What a training run is: the TrainConfig dataclass and its checks (no torch import, so `--help` and argument
errors stay fast). Like a PEFT config: plain values, validated when made, recorded in family.json."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable

from rescascade.serve.errors import ConfigError, check_bool, check_int, check_number

MIN_RESOLUTION = 32    # the usual CNNs downsample 32x
MAX_RESOLUTION = 1024  # above, a batch's activations outgrow any machine's memory (r=20000: ~38 GB per image)


def parse_size(text: str) -> tuple[int, int]:
    """"WxH" (e.g. 4000x3000: width first, as photo sizes are written) -> (width, height); ConfigError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m:
        raise ConfigError(f"image size {text!r}: give WIDTHxHEIGHT, e.g. 1600x1200")
    if min(int(m.group(1)), int(m.group(2))) < 1:
        raise ConfigError(f"image size {text!r}: both sides must be at least 1 pixel")
    return int(m.group(1)), int(m.group(2))


def check_resolutions(resolutions: Iterable[int]) -> tuple[int, ...]:
    """The input sizes, sorted; ConfigError for non-integers, repeats, or sizes outside 32..1024."""
    try:
        rs = [int(r) for r in resolutions]
        if any(isinstance(v, bool) or (not isinstance(v, str) and r != v) for r, v in zip(rs, resolutions)):
            raise ValueError  # True, or 32.5 (int() would cut it to 32)
    except (TypeError, ValueError):
        raise ConfigError(f"--resolutions must be integers, got {resolutions!r}; e.g. 96,128,160,192,224") from None
    if not rs:
        raise ConfigError("no resolutions given; pass e.g. --resolutions 96,128,160,192,224")
    if len(set(rs)) != len(rs):
        raise ConfigError(f"resolutions {rs} repeat a value; give each resolution once")
    if min(rs) < MIN_RESOLUTION:
        raise ConfigError(f"resolution {min(rs)} is below {MIN_RESOLUTION}, the smallest input a CNN that downsamples "
                          "32x accepts")
    if max(rs) > MAX_RESOLUTION:
        raise ConfigError(f"resolution {max(rs)} is above {MAX_RESOLUTION}; give input sizes such as 96,128,160,192,224")
    return tuple(sorted(rs))


OPTIMIZERS = ("sgd", "rmsprop", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DISTILL = ("none", "top", "ensemble", "teacher")


@dataclass
class TrainConfig:
    """How a family is trained (the `train` flags of the same names): resolutions, epochs, batch size, optimizer
    and per-group learning rates, schedule, what is shared, trained and distilled, augmentation, seeds, device.
    Every value is checked at construction (ConfigError naming the field); `TrainConfig.preset(name)` gives a
    named recipe."""
    resolutions: tuple[int, ...]
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.01                # shared weights
    patch_lr: float | None = None   # BatchNorm patches; None = lr (the paper found patches like larger rates)
    head_lr: float | None = None    # classifier; None = lr
    momentum: float = 0.9
    weight_decay: float = 4e-5      # not applied to patches (γ, β) or biases
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    loss_weights: tuple[float, ...] | None = None   # per resolution, on its label and distillation losses
    label_weight: float = 1.0
    shared: str = "train"           # train | frozen (transfer mode: only patches, and the head, learn)
    classifier: str = "train"       # train | frozen
    patches: str = "train"          # train (γ, β and statistics) | affine (γ, β; statistics kept) | stats | frozen
    distill: str = "none"           # none | top | ensemble (RS-Nets) | teacher (frozen start at the top resolution
                                    # teaches the lower ones)
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    crop: str = "same"              # same: one RandomResizedCrop resized to every r | independent: one per r |
                                    # center: the eval crop (+ flip) at the top r, resized to every r
    crop_scale: tuple[float, float] = (0.08, 1.0)
    head_init: str = "none"         # none | probe (fit each new head on frozen features first, then train)
    patch_l2sp: float = 0.0         # penalty on the patches' distance to their start (L2-SP); keeps them general
    dropout: float | None = None    # the model's dropout layers while training; None keeps the model's own
    freeze_top: bool = False        # the top resolution's patch and own head stay as they start (the teacher, and
                                    # the reference a cascade must match)
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    amp: bool = True                # bf16 autocast on CUDA
    independent: bool = False       # K separate torchvision models, same recipe: the baseline

    @classmethod
    def preset(cls, name: str, **overrides) -> "TrainConfig":
        """A named recipe (`rescascade.training.recipes.PRESETS`: finetune, transfer, patches-distill,
        patches-distill-keep-head, synthetic) with `overrides` on top; its family options (arch, width_mult, patch,
        classifier layout, weights) and data are the family's and run_train's, not the config's. resolutions
        default to (96, 128, 160, 192, 224) where the preset names none. Raises ConfigError for an unknown name
        or field."""
        from .recipes import preset, split_options
        fields, _ = split_options({**preset(name), **overrides})
        unknown = set(overrides) - set(cls.__dataclass_fields__) - {"classifier"}
        if unknown:
            raise ConfigError(f"TrainConfig has no field(s) {', '.join(sorted(unknown))}")
        fields.setdefault("resolutions", (96, 128, 160, 192, 224))
        return cls(**fields)

    def __post_init__(self):
        """Every value checked here, so a Python caller gets the CLI's one-line errors (ConfigError)."""
        self.resolutions = check_resolutions(self.resolutions)
        for name in ("epochs", "batch_size", "seed", "workers"):
            check_int(name, getattr(self, name))
        for name in ("amp", "freeze_top", "independent"):
            check_bool(name, getattr(self, name))
        for name in ("lr", "patch_lr", "head_lr", "weight_decay", "warmup_epochs", "label_weight", "distill_weight",
                     "patch_l2sp"):
            if getattr(self, name) is not None:  # patch_lr, head_lr: None = lr
                check_number(name, getattr(self, name), 0)
        for name in ("momentum", "label_smoothing", "distill_temperature", "dropout"):  # ranges checked below
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name))
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", str(self.device))):
            raise ConfigError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        for name, value, allowed in (("optimizer", self.optimizer, OPTIMIZERS), ("schedule", self.schedule, SCHEDULES),
                                     ("distill", self.distill, DISTILL), ("shared", self.shared, ("train", "frozen")),
                                     ("classifier", self.classifier, ("train", "frozen")),
                                     ("patches", self.patches, ("train", "affine", "stats", "frozen")),
                                     ("head_init", self.head_init, ("none", "probe")),
                                     ("crop", self.crop, ("same", "independent", "center"))):
            if value not in allowed:
                raise ConfigError(f"--{name} {value!r} is not one of {', '.join(allowed)}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout {self.dropout} must be in [0, 1)")
        if self.epochs < 0 or self.batch_size < 2:
            raise ConfigError(f"need --epochs >= 0 and --batch-size >= 2 (got {self.epochs}, {self.batch_size})")
        if self.loss_weights is not None:
            self.loss_weights = tuple(float(w) for w in self.loss_weights)
            if len(self.loss_weights) != len(self.resolutions):
                raise ConfigError(f"--loss-weights has {len(self.loss_weights)} values for "
                                  f"{len(self.resolutions)} resolutions; give one per resolution")
        if self.distill == "top" and len(self.resolutions) < 2:
            raise ConfigError("--distill top needs at least two resolutions")
        self.crop_scale = tuple(float(s) for s in self.crop_scale)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"--crop-scale {','.join(f'{v:g}' for v in self.crop_scale)}: give MIN,MAX with "
                              "0 < MIN <= MAX <= 1 (the share of the image a random crop covers), e.g. 0.25,1")
        for name, value, lo, hi in (("momentum", self.momentum, 0.0, 1.0),
                                    ("label_smoothing", self.label_smoothing, 0.0, 1.0)):
            if not lo <= value < hi:
                raise ConfigError(f"--{name.replace('_', '-')} {value:g} must be in [{lo:g}, {hi:g})")
        if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
            raise ConfigError(f"--distill-temperature {self.distill_temperature:g} must be > 0")
        if self.loss_weights is not None and not all(math.isfinite(w) and w >= 0 for w in self.loss_weights):
            raise ConfigError(f"--loss-weights {','.join(f'{w:g}' for w in self.loss_weights)} must all be finite "
                              "numbers >= 0")
        if self.workers < 0:
            raise ConfigError(f"--workers {self.workers} must be >= 0 (0 loads images in the training process)")
        if self.seed < 0:
            raise ConfigError(f"--seed {self.seed} must be >= 0")

    @property
    def weights(self) -> tuple[float, ...]:
        return self.loss_weights or tuple(1.0 for _ in self.resolutions)


