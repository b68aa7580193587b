"""The plain models a family is made of: any torchvision classification model (`torchvision.models.get_model`) or,
with the optional `timm` extra, any timm model (`timm.create_model`) whose normalization layers are BatchNorm.

A model is named by `arch`: a torchvision name (`torchvision.models.list_models(module=torchvision.models)`),
"timm:NAME" for a timm model, or a bare timm name that torchvision does not have. The classifier is found through the
model's own interface: timm's `get_classifier()`, and for torchvision the attribute its builders name it by (`fc`,
`classifier`, `head`, `heads`), never by index.
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

import torch
from torch import nn

from rescascade.serve.errors import ConfigError, RescascadeError

DEFAULT_ARCH = "mobilenet_v2"  # the paper's model
SOURCES = ("torchvision", "timm")
TORCHVISION_CLASSIFIERS = ("fc", "classifier", "head", "heads")  # what torchvision's builders call the classifier
BATCHNORM_CLASSES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class Arch:
    """A model name resolved to the library that builds it (`source`: torchvision | timm)."""
    name: str
    source: str

    @property
    def library_version(self) -> str:
        return _library(self.source).__version__

    def __str__(self) -> str:
        return self.name if self.source == "torchvision" else f"timm:{self.name}"


def _library(source: str):
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise ConfigError("timm models need the timm package: pip install 'rescascade[timm]'") from None
        return timm
    import torchvision
    return torchvision


@functools.lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    import torchvision
    return tuple(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return timm.list_models()


def resolve_arch(arch: str) -> Arch:
    """Which library builds `arch`: "NAME" (torchvision's, else timm's), "timm:NAME" or "torchvision:NAME".
    Raises ConfigError naming the closest known names for an unknown one, or when timm is needed and missing."""
    if not isinstance(arch, str) or not arch.strip():
        raise ConfigError(f"arch must be a model name such as mobilenet_v2 or resnet50, got {arch!r}")
    given, source = arch, None
    if ":" in arch:
        source, arch = arch.split(":", 1)
        if source not in SOURCES:
            raise ConfigError(f"--arch {given}: the prefix must be one of {', '.join(SOURCES)}")
        if not arch:
            raise ConfigError(f"--arch {given}: give a model name after the prefix, e.g. {source}:resnet50")
    if "." in arch:
        tag = arch.split(".", 1)[1]
        raise ConfigError(f"--arch {given}: .{tag} is a pretrained tag; give --arch {given.rsplit('.', 1)[0]} "
                          f"--weights imagenet:{tag}")
    if source in (None, "torchvision") and arch in torchvision_names():
        return Arch(arch, "torchvision")
    if source == "timm":
        _library("timm")  # ConfigError naming the extra when timm is missing
    timm_names = _timm_names() if source != "torchvision" else []
    if arch in timm_names:
        return Arch(arch, "timm")
    close = difflib.get_close_matches(arch, list(dict.fromkeys([*torchvision_names(), *timm_names])), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    where = "torchvision's classification models" + ("" if source == "torchvision" else
                                                      " or timm's" if timm_names else
                                                      " (timm is not installed: pip install 'rescascade[timm]')")
    raise ConfigError(f"--arch {given!r} is not one of {where}{hint}")


def build_plain(arch: Arch, num_classes: int, width_mult: float = 1.0) -> nn.Module:
    """A freshly initialised plain model (train mode). width_mult is passed only when it is not 1.0 (the
    MobileNets take it; other builders refuse it: ConfigError)."""
    kwargs = {"num_classes": int(num_classes)}
    if width_mult != 1.0:
        kwargs["width_mult"] = float(width_mult)
    try:
        if arch.source == "timm":
            return _library("timm").create_model(arch.name, pretrained=False, **kwargs)
        import torchvision
        return torchvision.models.get_model(arch.name, weights=None, **kwargs)
    except TypeError as e:
        if "width_mult" in kwargs and "width_mult" in str(e):
            raise ConfigError(f"--width-mult applies to torchvision's MobileNets; {arch}'s builder takes no "
                              "width_mult") from None
        raise ConfigError(f"{arch} cannot be built for {num_classes} classes ({e})") from None


def forward_at_every_resolution(model: nn.Module, arch: Arch, resolutions, num_classes: int) -> None:
    """Run the model (eval mode, no gradients) on one blank image at each resolution: ConfigError naming the first
    resolution it cannot take (too small for its pooling, or odd sizes its blocks cannot join), or an output that is
    not [1, num_classes] logits."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for r in resolutions:
                try:
                    out = model(torch.zeros(1, 3, r, r))
                except RuntimeError as e:
                    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                    raise ConfigError(f"{arch} cannot take {r}x{r} inputs ({first}); choose other --resolutions") \
                        from None
                if not (isinstance(out, torch.Tensor) and tuple(out.shape) == (1, num_classes)):
                    got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ConfigError(f"{arch} gives {got} at {r}x{r}, not [1, {num_classes}] logits: it is not a "
                                      "plain classifier")
    finally:
        model.train(was_training)


def batchnorm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm of the model (any subclass of torch's _BatchNorm), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def check_patchable(model: nn.Module, arch: Arch) -> dict[str, nn.Module]:
    """The BatchNorm layers a patch can replace; ConfigError naming what was found when there are none, or when one
    is a kind whose forward the patch cannot reproduce."""
    bns = batchnorm_layers(model)
    if not bns:
        norms = sorted({type(m).__name__ for m in model.modules()
                        if type(m).__name__.endswith(("Norm", "Norm1d", "Norm2d", "Norm3d"))})
        found = f"it normalizes with {', '.join(norms)}" if norms else "it has no normalization layers"
        raise ConfigError(f"{arch} has no BatchNorm ({found}): a resolution patch is a set of BatchNorm statistics "
                          "and affines; choose a BatchNorm CNN such as mobilenet_v2, resnet50 or efficientnet_b0")
    for name, m in bns.items():
        if not (type(m) in BATCHNORM_CLASSES or is_timm_batchnorm_act(m)):
            raise ConfigError(f"{arch}: BatchNorm {name} is a {type(m).__module__}.{type(m).__name__}, whose forward "
                              "the patch cannot reproduce; choose another model")
        if not (m.affine and m.track_running_stats):
            raise ConfigError(f"{arch}: BatchNorm {name} has no affine or no running statistics: there is nothing "
                              "for a patch to hold")
    return bns


def is_timm_batchnorm_act(m: nn.Module) -> bool:
    """timm's BatchNormAct2d: BatchNorm, then its `drop`, then its `act` (timm.layers.norm_act)."""
    return type(m).__name__ == "BatchNormAct2d" and type(m).__module__.startswith("timm.") and \
        isinstance(getattr(m, "drop", None), nn.Module) and isinstance(getattr(m, "act", None), nn.Module)


def classifier_name(model: nn.Module, arch: Arch) -> str:
    """The module name of the model's classifier (a Linear, or a Sequential whose last Linear makes the logits)."""
    if arch.source == "timm":
        head = model.get_classifier()
        for name, m in model.named_modules():
            if m is head and name:
                return name
    else:
        for name in TORCHVISION_CLASSIFIERS:
            if isinstance(getattr(model, name, None), nn.Module):
                return name
    raise ConfigError(f"{arch}: cannot find its classifier (looked for {', '.join(TORCHVISION_CLASSIFIERS)})")


def logits_layer_name(model: nn.Module, classifier: str, arch: Arch) -> str:
    """The layer inside the classifier that makes the logits (its last Linear, or the classifier itself)."""
    module = model.get_submodule(classifier)
    layers = [(f"{classifier}.{n}" if n else classifier, m) for n, m in module.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise ConfigError(f"{arch}: its classifier {classifier} ({type(module).__name__}) holds no Linear layer")
    return layers[-1][0]


def train_logits(output):
    """The logits of a training-mode forward: torchvision's GoogLeNet and Inception add auxiliary outputs there
    (a named tuple whose `logits` field is the main one)."""
    return getattr(output, "logits", output)


def copy_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy a state dict of exactly the model's names (BatchNorm's num_batches_tracked aside) into the model's
    tensors in place; unlike load_state_dict it needs no version metadata (MNASNet's loader refuses without it)."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    if own.keys() != {k for k in state if not k.endswith("num_batches_tracked")}:
        raise RescascadeError(f"the state dict does not fit the model: {sorted(own.keys() ^ state.keys())[:3]}")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k])
    return model


def require_linear(layer: nn.Module, arch, what: str) -> None:
    """ConfigError unless the logits layer is an nn.Linear (per-resolution heads and linear probes need one)."""
    if not (isinstance(layer, nn.Linear) and layer.bias is not None):
        raise ConfigError(f"{what} needs a Linear classifier with a bias; {arch}'s is a {type(layer).__name__}: use "
                          "the shared classifier (--classifier shared) and --head-init none")


@torch.no_grad()
def features_before(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of `layer` (the logits layer: the pooled features) when the model runs on x: [N, D] float."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    if not seen:
        raise RescascadeError("the classifier did not run in the model's forward")
    return seen[0].flatten(1)


def check_preprocessing(model: nn.Module, arch: Arch, mean, std) -> None:
    """timm records the mean/std its pretrained weights expect: ConfigError when they are not rescascade's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}  # torchvision's ImageNet weights all use ImageNet's
    want = tuple(cfg.get("mean", mean)), tuple(cfg.get("std", std))
    if any(abs(a - b) > 1e-3 for a, b in zip(want[0] + want[1], tuple(mean) + tuple(std))):
        raise ConfigError(f"{arch}'s pretrained weights expect mean {want[0]} and std {want[1]}; rescascade feeds "
                          f"ImageNet's ({tuple(mean)}, {tuple(std)}): use --weights none or another model")
