"""A resolution family: one network whose convolutions (and, by default, classifier) are shared by every input
resolution, while each resolution owns a scale-and-bias patch: every BatchNorm's γ, β and running statistics
("K for the price of 1", Mudrakarta et al., ICLR 2019, §3).

Any BatchNorm CNN of torchvision or timm (`backbones`) becomes a family by module surgery, the way timm's
`convert_splitbn_model` and PEFT's `inject_adapter_in_model` change a model in place: every BatchNorm becomes a
`PatchedBatchNorm2d` holding one patch per resolution, each starting from that BatchNorm's own affine and statistics.
The state-dict names stay the plain model's: `state_dict_for(r)` is exactly the state dict of the plain model for
resolution r, and `plain_model(r)` builds that model (for export, profiling and fast inference).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import (DEFAULT_ARCH, build_plain, check_patchable, classifier_name, copy_state,
                        forward_at_every_resolution, is_timm_batchnorm_act, logits_layer_name, require_linear,
                        resolve_arch, train_logits)
from .config import check_resolutions
from rescascade.serve.errors import ConfigError, RescascadeError

PATCH_KINDS = ("scale_bias_stats", "scale_bias")  # γ,β,μ,σ² private | γ,β private, statistics shared
CLASSIFIER_KINDS = ("shared", "per_resolution")


def res_key(resolution: int) -> str:
    """Name of a resolution's patch: r096, r128, ... (also the patch file's stem)."""
    return f"r{int(resolution):03d}"


class PatchedBatchNorm2d(nn.Module):
    """A BatchNorm holding one (γ, β[, running mean, running var]) patch per resolution.

    `active` selects the patch; nothing else differs between resolutions. With share_stats the running
    statistics are one set for all resolutions (the γ/β-only patch). `replacing(bn, ...)` makes one from a model's
    BatchNorm, every patch starting from its affine and statistics (timm's BatchNormAct2d keeps its drop and act).
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
        self.post = False  # timm's BatchNormAct2d: drop and act after the normalization
        self.active = self.keys[0]

    @classmethod
    def replacing(cls, bn: nn.modules.batchnorm._BatchNorm, resolutions: Sequence[int],
                  share_stats: bool) -> "PatchedBatchNorm2d":
        momentum = 0.1 if bn.momentum is None else bn.momentum  # None (a cumulative average) has no per-patch count
        new = cls(bn.num_features, resolutions, share_stats, eps=bn.eps, momentum=momentum)
        with torch.no_grad():
            for k in new.keys:
                new.weight[k].copy_(bn.weight)
                new.bias[k].copy_(bn.bias)
            for k in new._stat_keys():
                getattr(new, f"running_mean_{k}").copy_(bn.running_mean)
                getattr(new, f"running_var_{k}").copy_(bn.running_var)
        if is_timm_batchnorm_act(bn):
            new.drop, new.act, new.post = bn.drop, bn.act, True
        return new

    def _stat_keys(self) -> list[str]:
        return ["shared"] if self.share_stats else self.keys

    def stats(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        sk = "shared" if self.share_stats else key
        return getattr(self, f"running_mean_{sk}"), getattr(self, f"running_var_{sk}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.stats(self.active)
        x = F.batch_norm(x, mean, var, self.weight[self.active], self.bias[self.active],
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x)) if self.post else x

    def extra_repr(self) -> str:
        return f"{self.num_features}, patches={self.keys}, share_stats={self.share_stats}"


class PatchedLinear(nn.Module):
    """A Linear layer with one weight/bias per resolution (the per-resolution classifier option); `replacing(linear,
    ...)` starts every resolution's copy from that layer."""

    def __init__(self, in_features: int, out_features: int, resolutions: Sequence[int]):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.keys = [res_key(r) for r in resolutions]
        self.weight = nn.ParameterDict({k: nn.Parameter(torch.zeros(out_features, in_features)) for k in self.keys})
        self.bias = nn.ParameterDict({k: nn.Parameter(torch.zeros(out_features)) for k in self.keys})
        self.active = self.keys[0]

    @classmethod
    def replacing(cls, linear: nn.Linear, resolutions: Sequence[int]) -> "PatchedLinear":
        new = cls(linear.in_features, linear.out_features, resolutions)
        with torch.no_grad():
            for k in new.keys:  # a per-resolution head needs a bias (backbones.require_linear)
                new.weight[k].copy_(linear.weight)
                new.bias[k].copy_(linear.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[self.active], self.bias[self.active])


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` (dotted) is."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


class ResolutionFamily(nn.Module):
    """A BatchNorm CNN (`arch`: any torchvision or timm BatchNorm model, see `backbones`) with a scale-and-bias patch
    per input resolution; the plain model is `self.model`, its BatchNorm layers patched.

    forward(x, resolution): logits [N, num_classes] float32 for x [N, 3, r, r] float32 (already normalized) at that
    resolution. check_forward: run one blank image per resolution first (ConfigError for a resolution the arch
    cannot take); `from_config` skips it, a saved family having been checked when it was made. Raises ConfigError
    for bad values or an arch without BatchNorm.
    """

    def __init__(self, resolutions: Sequence[int], num_classes: int = 1000, *, arch: str = DEFAULT_ARCH,
                 width_mult: float = 1.0, patch: str = "scale_bias_stats", classifier: str = "shared",
                 check_forward: bool = True):
        super().__init__()
        resolutions = check_resolutions(resolutions)
        if patch not in PATCH_KINDS:
            raise ConfigError(f"unknown patch kind {patch!r}; choose one of {', '.join(PATCH_KINDS)}")
        if classifier not in CLASSIFIER_KINDS:
            raise ConfigError(f"unknown classifier kind {classifier!r}; choose one of {', '.join(CLASSIFIER_KINDS)}")
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
            raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes}")
        if not width_mult > 0:
            raise ConfigError(f"width_mult must be positive, got {width_mult}")
        self.arch_ = resolve_arch(arch)
        plain = build_plain(self.arch_, int(num_classes), float(width_mult))
        batchnorms = check_patchable(plain, self.arch_)
        if check_forward:
            forward_at_every_resolution(plain, self.arch_, resolutions, int(num_classes))
        self.classifier_name = classifier_name(plain, self.arch_)
        self.logits_name = logits_layer_name(plain, self.classifier_name, self.arch_)
        if classifier == "per_resolution":
            require_linear(plain.get_submodule(self.logits_name), self.arch_, "--classifier per-resolution")
            _replace(plain, self.logits_name, PatchedLinear.replacing(plain.get_submodule(self.logits_name),
                                                                      resolutions))
        for name, bn in batchnorms.items():
            _replace(plain, name, PatchedBatchNorm2d.replacing(bn, resolutions, share_stats=patch == "scale_bias"))
        self.model = plain
        self.resolutions = resolutions
        self.num_classes = int(num_classes)
        self.width_mult = float(width_mult)
        self.patch_kind = patch
        self.classifier_kind = classifier
        self.set_resolution(resolutions[-1])

    @classmethod
    def pretrained(cls, resolutions: Sequence[int], num_classes: int = 1000, weights: str | None = "imagenet",
                   **kwargs) -> "ResolutionFamily":
        """A family whose shared weights and every patch start from pretrained weights of its arch: "imagenet" (for
        torchvision the weights enum's IMAGENET1K_V1, else its DEFAULT, from the hub cache or downloaded; for timm
        its default pretrained tag through the Hugging Face hub), "imagenet:TAG" (another tag), a path to a saved
        state dict of the plain model, or None (a fresh init). A classifier for another class count starts fresh.
        kwargs: arch, width_mult, patch, classifier (see the class). Raises ConfigError for bad values,
        RescascadeError when the weights cannot be read or do not fit."""
        from .weights import resolve_weights
        family = cls(resolutions, num_classes, **kwargs)
        state, _ = resolve_weights(weights, family.arch_)
        if state is not None:
            family.load_plain_state_dict(state, what=f"weights {weights}")
        return family

    @property
    def arch(self) -> str:
        return self.arch_.name

    # ---- selecting a resolution -------------------------------------------------------------------------
    def patched_modules(self) -> dict[str, nn.Module]:
        """The patched layers, by their name in the plain model."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, (PatchedBatchNorm2d, PatchedLinear))}

    def set_resolution(self, resolution: int) -> None:
        key = self._key(resolution)
        for m in self.patched_modules().values():
            m.active = key
        self.active_resolution = int(resolution)

    def forward(self, x: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
        if resolution is not None and resolution != self.active_resolution:
            self.set_resolution(resolution)
        return train_logits(self.model(x))

    @property
    def logits_layer(self) -> nn.Module:
        """The classifier's layer that makes the logits (nn.Linear, PatchedLinear, or a 1x1 convolution)."""
        return self.model.get_submodule(self.logits_name)

    @property
    def config(self) -> dict:
        return {"arch": self.arch, "source": self.arch_.source, "source_version": self.arch_.library_version,
                "width_mult": self.width_mult, "num_classes": self.num_classes,
                "resolutions": list(self.resolutions), "patch": self.patch_kind, "classifier": self.classifier_kind}

    @classmethod
    def from_config(cls, config: dict) -> "ResolutionFamily":
        return cls(config["resolutions"], num_classes=config["num_classes"],
                   arch=f"{config.get('source', 'torchvision')}:{config['arch']}", width_mult=config["width_mult"],
                   patch=config["patch"], classifier=config["classifier"], check_forward=False)

    # ---- plain-model-named views: shared weights and one patch --------------------------------------------
    def _patch_entries(self, key: str) -> dict[str, torch.Tensor]:
        """plain-model name -> this family's tensor, for everything private to resolution `key`."""
        out = {}
        for name, m in self.patched_modules().items():
            out[f"{name}.weight"] = m.weight[key]
            out[f"{name}.bias"] = m.bias[key]
            if isinstance(m, PatchedBatchNorm2d) and not m.share_stats:
                out[f"{name}.running_mean"], out[f"{name}.running_var"] = m.stats(key)
        return out

    def _shared_entries(self) -> dict[str, torch.Tensor]:
        """plain-model name -> tensor, for everything all resolutions share."""
        patched = self.patched_modules()
        private = {id(t) for m in patched.values()
                   for t in [*m.weight.values(), *m.bias.values(), *m.buffers(recurse=False)]}
        out = {n: t for n, t in [*self.model.named_parameters(), *self.model.named_buffers()] if id(t) not in private}
        for name, m in patched.items():
            if isinstance(m, PatchedBatchNorm2d) and m.share_stats:
                out[f"{name}.running_mean"], out[f"{name}.running_var"] = m.stats("shared")
        return out

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._shared_entries().items()}

    def patch_state_dict(self, resolution: int) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._patch_entries(self._key(resolution)).items()}

    def state_dict_for(self, resolution: int) -> dict[str, torch.Tensor]:
        """The state dict of the plain model (`plain_model`) equal to this family at `resolution`."""
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
                raise RescascadeError(f"{what}: {name} has shape {list(s.shape)} but this family needs "
                                      f"{list(t.shape)}; it belongs to another architecture, width_mult or num_classes")
        with torch.no_grad():
            for name, t in targets:
                t.copy_(source[name].to(dtype=t.dtype))

    def load_shared_state_dict(self, sd: dict[str, torch.Tensor], what: str = "shared weights") -> None:
        self._copy_into(list(self._shared_entries().items()), sd, what)

    def load_patch_state_dict(self, resolution: int, sd: dict[str, torch.Tensor], what: str | None = None) -> None:
        self._copy_into(list(self._patch_entries(self._key(resolution)).items()), sd,
                        what or f"patch {res_key(resolution)}")

    def load_plain_state_dict(self, sd: dict[str, torch.Tensor], what: str = "pretrained weights") -> None:
        """Initialise from a state dict of the plain model (e.g. pretrained weights): the shared weights, and *every*
        patch from the pretrained BatchNorm. A logits layer for another class count is left at its fresh init.
        Raises RescascadeError naming the first tensor that is missing, extra or of another shape."""
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ConfigError(f"{what} must be a state dict (a dict of name -> tensor), got {type(sd).__name__}")
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        targets = list(self._shared_entries().items())
        for r in self.resolutions:
            targets += list(self._patch_entries(res_key(r)).items())
        head = self.logits_name + "."
        head_fits = all(tuple(sd[n].shape) == tuple(t.shape) for n, t in targets if n.startswith(head) and n in sd)
        if not head_fits:  # a new num_classes replaces the logits layer
            targets = [(n, t) for n, t in targets if not n.startswith(head)]
            sd = {k: v for k, v in sd.items() if not k.startswith(head)}
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
        """The classifier's parameters (every resolution's, for a per-resolution head)."""
        return list(self.model.get_submodule(self.classifier_name).parameters())

    def shared_parameters(self, include_classifier: bool = True) -> list[nn.Parameter]:
        patched = {id(p) for r in self.resolutions for p in self.patch_parameters(r)}
        cls = {id(p) for p in self.classifier_parameters()}
        return [p for p in self.parameters() if id(p) not in patched and (include_classifier or id(p) not in cls)]

    # ---- plain models ----------------------------------------------------------------------------------
    def plain_model(self, resolution: int) -> nn.Module:
        """A standalone plain model (the arch's own class, no patch) equal to this family at `resolution` (eval
        mode, copied)."""
        model = build_plain(self.arch_, self.num_classes, self.width_mult)
        return copy_state(model, self.state_dict_for(resolution)).eval()
