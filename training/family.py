"""A resolution family: one MobileNetV2 whose convolutions (and, by default, classifier) are shared by every
input resolution, while each resolution owns a scale-and-bias patch: every BatchNorm's γ, β and running
statistics ("K for the price of 1", Mudrakarta et al., ICLR 2019).

The family *is* a torchvision MobileNetV2 built with a patched norm layer, so its state-dict names are
torchvision's. `state_dict_for(r)` gives exactly the state dict of a plain torchvision model for resolution
r; `to_torchvision(r)` builds that model (used for export, profiling and fast inference).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import MobileNetV2, mobilenet_v2

from .config import check_resolutions
from .errors import ConfigError, RescascadeError

ARCH = "mobilenet_v2"
PATCH_KINDS = ("scale_bias_stats", "scale_bias")  # γ,β,μ,σ² private | γ,β private, statistics shared
CLASSIFIER_KINDS = ("shared", "per_resolution")


def res_key(resolution: int) -> str:
    """Name of a resolution's patch: r096, r128, ... (also the patch file's stem)."""
    return f"r{int(resolution):03d}"


class PatchedBatchNorm2d(nn.Module):
    """BatchNorm2d holding one (γ, β[, running mean, running var]) patch per resolution.

    `active` selects the patch; nothing else differs between resolutions. With share_stats the running
    statistics are one set for all resolutions (the γ/β-only patch).
    """

    def __init__(self, num_features: int, resolutions: Sequence[int], share_stats: bool = False,
                 eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum, self.share_stats = num_features, eps, momentum, share_stats
        self.keys = [res_key(r) for r in resolutions]
        self.weight = nn.ParameterDict({k: nn.Parameter(torch.ones(num_features)) for k in self.keys})
        self.bias = nn.ParameterDict({k: nn.Parameter(torch.zeros(num_features)) for k in self.keys})
        for k in self._stat_keys():
            self.register_buffer(f"running_mean_{k}", torch.zeros(num_features))
            self.register_buffer(f"running_var_{k}", torch.ones(num_features))
        self.active = self.keys[0]

    def _stat_keys(self) -> list[str]:
        return ["shared"] if self.share_stats else self.keys

    def stats(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        sk = "shared" if self.share_stats else key
        return getattr(self, f"running_mean_{sk}"), getattr(self, f"running_var_{sk}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.stats(self.active)
        return F.batch_norm(x, mean, var, self.weight[self.active], self.bias[self.active],
                            self.training, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, patches={self.keys}, share_stats={self.share_stats}"


class PatchedLinear(nn.Module):
    """A Linear layer with one weight/bias per resolution (the per-resolution classifier option)."""

    def __init__(self, in_features: int, out_features: int, resolutions: Sequence[int]):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.keys = [res_key(r) for r in resolutions]
        self.weight = nn.ParameterDict({k: nn.Parameter(torch.empty(out_features, in_features)) for k in self.keys})
        self.bias = nn.ParameterDict({k: nn.Parameter(torch.zeros(out_features)) for k in self.keys})
        for w in self.weight.values():
            nn.init.normal_(w, 0, 0.01)  # torchvision's MobileNetV2 classifier init
        self.active = self.keys[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[self.active], self.bias[self.active])


class ResolutionFamily(MobileNetV2):
    """MobileNetV2 with a scale-and-bias patch per input resolution.

    forward(x, resolution) runs the model for that resolution (x should already be r x r).
    """

    def __init__(self, resolutions: Sequence[int], num_classes: int = 1000, width_mult: float = 1.0,
                 patch: str = "scale_bias_stats", classifier: str = "shared", dropout: float = 0.2):
        resolutions = check_resolutions(resolutions)
        if patch not in PATCH_KINDS:
            raise ConfigError(f"unknown patch kind {patch!r}; choose one of {', '.join(PATCH_KINDS)}")
        if classifier not in CLASSIFIER_KINDS:
            raise ConfigError(f"unknown classifier kind {classifier!r}; choose one of {', '.join(CLASSIFIER_KINDS)}")
        if int(num_classes) < 2:
            raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
        if not width_mult > 0:
            raise ConfigError(f"width_mult must be positive, got {width_mult}")
        norm = partial(PatchedBatchNorm2d, resolutions=resolutions, share_stats=(patch == "scale_bias"))
        super().__init__(num_classes=int(num_classes), width_mult=float(width_mult), norm_layer=norm,
                         dropout=dropout)
        if classifier == "per_resolution":
            linear = self.classifier[1]
            self.classifier[1] = PatchedLinear(linear.in_features, linear.out_features, resolutions)
        self.resolutions = resolutions
        self.num_classes = int(num_classes)
        self.width_mult = float(width_mult)
        self.patch_kind = patch
        self.classifier_kind = classifier
        self.dropout = dropout
        self.set_resolution(resolutions[-1])

    @classmethod
    def pretrained(cls, resolutions: Sequence[int], num_classes: int = 1000, weights: str | None = "imagenet",
                   **kwargs) -> "ResolutionFamily":
        """A family whose shared weights and every patch start from torchvision MobileNetV2 weights: "imagenet"
        (torchvision's IMAGENET1K_V1, from the hub cache or downloaded), "imagenet:TAG" (another
        MobileNet_V2_Weights name), a path to a saved state dict, or None (a fresh init). A classifier for
        another class count starts fresh. kwargs: width_mult, patch, classifier, dropout (see the class).
        Raises ConfigError for bad values, RescascadeError when the weights cannot be read or do not fit."""
        from .weights import resolve_weights
        state, _ = resolve_weights(weights)
        family = cls(resolutions, num_classes, **kwargs)
        if state is not None:
            family.load_torchvision_state_dict(state, what=f"weights {weights}")
        return family

    # ---- selecting a resolution -------------------------------------------------------------------------
    def patched_modules(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.named_modules() if isinstance(m, (PatchedBatchNorm2d, PatchedLinear))}

    def set_resolution(self, resolution: int) -> None:
        if int(resolution) not in self.resolutions:
            raise RescascadeError(f"resolution {resolution} is not in this family {list(self.resolutions)}")
        key = res_key(resolution)
        for m in self.patched_modules().values():
            m.active = key
        self.active_resolution = int(resolution)

    def forward(self, x: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
        if resolution is not None and resolution != self.active_resolution:
            self.set_resolution(resolution)
        return super().forward(x)

    @property
    def config(self) -> dict:
        return {"arch": ARCH, "width_mult": self.width_mult, "num_classes": self.num_classes,
                "resolutions": list(self.resolutions), "patch": self.patch_kind,
                "classifier": self.classifier_kind, "dropout": self.dropout}

    @classmethod
    def from_config(cls, config: dict) -> "ResolutionFamily":
        return cls(config["resolutions"], num_classes=config["num_classes"], width_mult=config["width_mult"],
                   patch=config["patch"], classifier=config["classifier"], dropout=config.get("dropout", 0.2))

    # ---- torchvision-named views: shared weights and one patch --------------------------------------------
    def _patch_entries(self, key: str) -> dict[str, torch.Tensor]:
        """torchvision name -> this family's tensor, for everything private to resolution `key`."""
        out = {}
        for name, m in self.patched_modules().items():
            out[f"{name}.weight"] = m.weight[key]
            out[f"{name}.bias"] = m.bias[key]
            if isinstance(m, PatchedBatchNorm2d) and not m.share_stats:
                out[f"{name}.running_mean"], out[f"{name}.running_var"] = m.stats(key)
        return out

    def _shared_entries(self) -> dict[str, torch.Tensor]:
        """torchvision name -> tensor, for everything all resolutions share."""
        patched = self.patched_modules()
        private = {id(t) for m in patched.values() for t in [*m.parameters(), *m.buffers()]}
        out = {n: t for n, t in [*self.named_parameters(), *self.named_buffers()] if id(t) not in private}
        for name, m in patched.items():
            if isinstance(m, PatchedBatchNorm2d) and m.share_stats:
                out[f"{name}.running_mean"], out[f"{name}.running_var"] = m.stats("shared")
        return out

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._shared_entries().items()}

    def patch_state_dict(self, resolution: int) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._patch_entries(self._key(resolution)).items()}

    def state_dict_for(self, resolution: int) -> dict[str, torch.Tensor]:
        """The state dict of a plain torchvision MobileNetV2 equal to this family at `resolution`."""
        return {**self.shared_state_dict(), **self.patch_state_dict(resolution)}

    def _key(self, resolution: int) -> str:
        if int(resolution) not in self.resolutions:
            raise RescascadeError(f"resolution {resolution} is not in this family {list(self.resolutions)}")
        return res_key(resolution)

    @staticmethod
    def _copy_into(targets: list[tuple[str, torch.Tensor]], source: dict[str, torch.Tensor], what: str) -> None:
        """Copy source[name] into each target tensor; the names must match exactly, shapes too."""
        names = {n for n, _ in targets}
        missing = sorted(names - set(source))
        unexpected = sorted(set(source) - names)
        if missing:
            raise RescascadeError(f"{what} lacks {len(missing)} tensor(s), e.g. {missing[0]}; "
                                  "it was written for a different architecture or family")
        if unexpected:
            raise RescascadeError(f"{what} has {len(unexpected)} tensor(s) this family does not have, e.g. "
                                  f"{unexpected[0]}; it was written for a different architecture or family")
        for name, t in targets:
            s = source[name]
            if tuple(s.shape) != tuple(t.shape):
                raise RescascadeError(f"{what}: {name} has shape {list(s.shape)} but this family needs {list(t.shape)}; "
                                      "it belongs to a model with another width_mult or num_classes")
        with torch.no_grad():
            for name, t in targets:
                t.copy_(source[name].to(dtype=t.dtype))

    def load_shared_state_dict(self, sd: dict[str, torch.Tensor], what: str = "shared weights") -> None:
        self._copy_into(list(self._shared_entries().items()), sd, what)

    def load_patch_state_dict(self, resolution: int, sd: dict[str, torch.Tensor], what: str | None = None) -> None:
        self._copy_into(list(self._patch_entries(self._key(resolution)).items()), sd,
                        what or f"patch {res_key(resolution)}")

    def load_torchvision_state_dict(self, sd: dict[str, torch.Tensor], what: str = "pretrained weights") -> None:
        """Initialise from a plain torchvision MobileNetV2 state dict: the shared weights, and *every* patch
        from the pretrained BatchNorm. A classifier for another class count is left at its fresh init."""
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        targets = list(self._shared_entries().items())
        for r in self.resolutions:
            targets += list(self._patch_entries(res_key(r)).items())
        head_fits = all(tuple(sd[n].shape) == tuple(t.shape) for n, t in targets
                        if n.startswith("classifier.") and n in sd)
        if not head_fits:  # a new num_classes replaces the classifier
            targets = [(n, t) for n, t in targets if not n.startswith("classifier.")]
            sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
        self._copy_into(targets, sd, what)

    # ---- parameter groups ------------------------------------------------------------------------------
    def patch_parameters(self, resolution: int) -> list[nn.Parameter]:
        key = self._key(resolution)
        return [m.weight[key] for m in self.patched_modules().values()] + \
               [m.bias[key] for m in self.patched_modules().values()]

    def bn_parameters(self) -> list[nn.Parameter]:
        """Every patch's γ and β (all resolutions)."""
        return [p for m in self.modules() if isinstance(m, PatchedBatchNorm2d) for p in (*m.weight.values(),
                                                                                       *m.bias.values())]

    def classifier_parameters(self) -> list[nn.Parameter]:
        return list(self.classifier.parameters())

    def shared_parameters(self, include_classifier: bool = True) -> list[nn.Parameter]:
        patched = {id(p) for r in self.resolutions for p in self.patch_parameters(r)}
        cls = {id(p) for p in self.classifier_parameters()}
        return [p for p in self.parameters() if id(p) not in patched and (include_classifier or id(p) not in cls)]

    # ---- plain models ----------------------------------------------------------------------------------
    def to_torchvision(self, resolution: int) -> MobileNetV2:
        """A standalone torchvision MobileNetV2 equal to this family at `resolution` (eval mode, copied)."""
        model = mobilenet_v2(num_classes=self.num_classes, width_mult=self.width_mult, dropout=self.dropout)
        sd = self.state_dict_for(resolution)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
        return model.eval()
