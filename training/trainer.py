"""Multitask training of a resolution family (and the K-independent-models baseline).

Every step feeds the batch to every resolution (the same random crop resized on the device, or one crop per
resolution), sums the weighted per-resolution losses and steps once: shared weights learn from all
resolutions, each patch from its own. Runs as one process or under `torchrun` with DistributedDataParallel
(gloo on CPU, nccl on GPU). A checkpoint is written atomically after every epoch; resuming from it continues
exactly as an uninterrupted run would (seeds are derived from (seed, epoch), not carried in RNG state).
"""
from __future__ import annotations

import copy
import csv
import functools
import hashlib
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .backbones import batchnorm_layers, train_logits
from .config import TrainConfig
from .data import ImageSet, TrainDataset, collate_skipping
from rescascade.serve.errors import ConfigError, RescascadeError
from .family import PatchedBatchNorm2d, PatchedLinear, res_key
from rescascade.serve.fileio import atomic_path, write_text
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, resize_center_crop
from .progress import progress


class IndependentModels(nn.Module):
    """K plain models of one arch, one per resolution: the baseline with no sharing at all. arch: the name recorded
    (`str` of `backbones.Arch`); classifier and logits: the module names of the classifier and of its logits layer
    (as `ResolutionFamily` finds them)."""

    def __init__(self, resolutions, make_model, arch: str, classifier: str, logits: str):
        super().__init__()
        self.resolutions = tuple(resolutions)
        self.models = nn.ModuleDict({res_key(r): make_model() for r in resolutions})
        self.arch, self.classifier_name, self.logits_name = arch, classifier, logits

    def forward(self, x, resolution):
        return train_logits(self.models[res_key(resolution)](x))

    def groups(self):
        """(shared-like weights, patch-like BatchNorm affine, classifier) parameters, for the same recipe."""
        convs, bns, head = [], [], []
        for m in self.models.values():
            bn = {id(p) for mod in batchnorm_layers(m).values() for p in mod.parameters(recurse=False)}
            cls = {id(p) for p in m.get_submodule(self.classifier_name).parameters()}
            for p in m.parameters():
                (bns if id(p) in bn else head if id(p) in cls else convs).append(p)
        return convs, bns, head


class MultiResolutionForward(nn.Module):
    """One forward over all resolutions (so DDP sees one forward per backward), plus RS-Nets' ensemble weights."""

    def __init__(self, model: nn.Module, resolutions, ensemble: bool):
        super().__init__()
        self.model, self.resolutions = model, tuple(resolutions)
        self.alpha = nn.Parameter(torch.zeros(len(resolutions))) if ensemble else None

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.model(x, r) for x, r in zip(xs, self.resolutions)]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher || student) at temperature t, scaled by t² (Hinton et al.); teacher is detached."""
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher.detach() / t, -1),
                    reduction="batchmean", log_target=True) * t * t


# ---- distributed environment ----------------------------------------------------------------------------
@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "DistEnv":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, env: DistEnv) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
        return torch.device(f"cuda:{env.local_rank}" if name == "cuda" else name)
    return torch.device(name)


# ---- the trainer ----------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: nn.Module
    metrics: list[dict] = field(default_factory=list)
    skipped_images: int = 0         # summed over epochs
    seconds: float = 0.0
    unreadable: dict[str, str] = field(default_factory=dict)   # id -> error of the images that failed to decode


def _param_groups(model: nn.Module, cfg: TrainConfig, ensemble: nn.Parameter | None) -> list[dict]:
    """shared convolutions / BatchNorm patches (γ, β) / classifier, each with its rate and trainability."""
    lr = cfg.lr
    patch_lr = cfg.patch_lr if cfg.patch_lr is not None else lr
    head_lr = cfg.head_lr if cfg.head_lr is not None else lr
    if isinstance(model, IndependentModels):
        convs, patches, head = model.groups()
    else:
        patches, head = model.bn_parameters(), model.classifier_parameters()
        taken = {id(p) for p in patches + head}
        convs = [p for p in model.parameters() if id(p) not in taken]
    for params, trainable in ((convs, cfg.shared == "train"), (patches, cfg.patches in ("train", "affine")),
                              (head, cfg.classifier == "train")):
        for p in params:
            p.requires_grad_(trainable)
    if cfg.freeze_top:
        for p in _own_parameters(model, cfg.resolutions[-1]):
            p.requires_grad_(False)
    groups = [
        {"name": "shared", "params": [p for p in convs if p.requires_grad], "lr": lr, "weight_decay": cfg.weight_decay},
        {"name": "patches", "params": [p for p in patches if p.requires_grad], "lr": patch_lr, "weight_decay": 0.0},
        {"name": "head", "params": [p for p in head if p.requires_grad], "lr": head_lr, "weight_decay": cfg.weight_decay},
    ]
    if ensemble is not None:
        groups.append({"name": "ensemble", "params": [ensemble], "lr": head_lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _own_parameters(model: nn.Module, resolution: int) -> list[nn.Parameter]:
    """What belongs to one resolution alone: its patch and, if heads are per resolution, its head (a family); its
    whole model (independent models)."""
    if isinstance(model, IndependentModels):
        return list(model.models[res_key(resolution)].parameters())
    return model.patch_parameters(resolution)  # a per-resolution head is part of the patch


def _set_bn_mode(model: nn.Module, cfg: TrainConfig) -> None:
    """patches 'frozen' or 'affine': BatchNorm keeps its statistics (eval mode); otherwise it re-estimates them
    from the training crops (on narrow data that hurts a wide head: statistics of 10 classes are not ImageNet's)."""
    if cfg.patches in ("frozen", "affine"):
        for m in model.modules():
            if isinstance(m, (PatchedBatchNorm2d, nn.BatchNorm2d)):
                m.eval()


def _optimizer(groups, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "rmsprop":  # the paper's (TF-style) optimizer
        return torch.optim.RMSprop(groups, alpha=0.9, eps=0.0316, momentum=cfg.momentum)
    return torch.optim.AdamW(groups)


def _schedule(opt, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":  # the paper's recipe, rescaled: x0.98 per epoch-equivalent
            return 0.98 ** (step / steps_per_epoch)
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class _TrainCrops:
    """uint8 crop(s) for one image: one RandomResizedCrop at the top resolution, or one per resolution; or
    ("center") the eval crop at the top resolution, flipped at random: short fine-tuning on few images then learns
    on the pixels it will be tested on (objects at the test scale), not on zoomed-in random crops."""

    def __init__(self, resolutions, mode: str, scale):
        import torchvision.transforms.v2 as T
        sizes = list(resolutions) if mode == "independent" else [max(resolutions)]
        if mode == "center":  # the eval crop itself (the function prediction and the runtime use), then a flip
            self.transforms = [T.Compose([functools.partial(resize_center_crop, resolution=r),
                                          T.RandomHorizontalFlip()]) for r in sizes]
        else:
            self.transforms = [T.Compose([T.RandomResizedCrop(r, scale=scale, antialias=True),
                                          T.RandomHorizontalFlip()]) for r in sizes]

    def __call__(self, img):
        return [t(img) for t in self.transforms]


def _inputs(crops: list[torch.Tensor], resolutions, device, channels_last: bool) -> list[torch.Tensor]:
    """uint8 crops -> normalized float inputs at every resolution (resized on the device when one crop)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    xs = [((c.to(device, non_blocking=True).float() / 255) - mean) / std for c in crops]
    if len(xs) == 1 and len(resolutions) > 1:
        top = xs[0]
        xs = [top if r == top.shape[-1] else
              F.interpolate(top, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
              for r in resolutions]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [x.contiguous(memory_format=fmt) for x in xs]


def _data_identity(images: ImageSet) -> dict:
    """What the training images are (class names, count, a sha256 over ids and labels): a checkpoint records it, so
    that --resume with other data stops instead of mixing two data sets in one run."""
    h = hashlib.sha256(json.dumps([list(images.class_names), list(images.ids),
                                   [int(y) for y in images.labels]]).encode())
    return {"classes": list(images.class_names), "images": len(images), "sha256": h.hexdigest()}


def _config_json(cfg: TrainConfig) -> str:
    d = asdict(cfg)
    for k in ("workers", "device"):  # how to run, not what is trained: may change on resume
        d.pop(k)
    return json.dumps(d, sort_keys=True)


@dataclass
class _Run:
    """What one training run steps with: built once by `train`, used by every `train_one_epoch`."""
    cfg: TrainConfig
    model: nn.Module                 # the family (or the independent models) being trained
    wrapper: MultiResolutionForward  # all resolutions in one forward (what DDP wraps)
    net: nn.Module                   # the wrapper, or its DistributedDataParallel
    teacher: nn.Module | None        # a frozen copy of the start, asked at the top resolution
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    anchors: list                    # (patch parameter, its start) for L2-SP
    stats_only: bool                 # nothing learned: train-mode forwards re-estimate BN statistics
    device: torch.device
    env: DistEnv
    dataset: TrainDataset

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)


@dataclass
class EpochStats:
    """One epoch's sums over the images seen (per resolution: loss sum, correct count)."""
    sums: dict
    seen: int = 0
    kd_sum: float = 0.0
    skipped: int = 0
    unreadable: dict = field(default_factory=dict)   # id -> error
    seconds: float = 0.0


def training_loss(logits: list[torch.Tensor], y: torch.Tensor, fixed_top, run: _Run):
    """The step's objective: weighted cross-entropy per resolution plus the chosen distillation (top: from the
    top resolution; teacher: from the frozen start; ensemble: RS-Nets, Wang et al. ECCV 2020, §3.2) and L2-SP on
    the patches. -> (total, per-resolution cross-entropies, distillation loss)."""
    cfg = run.cfg
    losses = [F.cross_entropy(lg.float(), y, label_smoothing=cfg.label_smoothing) for lg in logits]
    loss = cfg.label_weight * sum(w * lo for w, lo in zip(cfg.weights, losses))
    kd = torch.zeros((), device=y.device)
    T = cfg.distill_temperature
    if cfg.distill == "top":
        top = logits[-1].float()
        kd = sum((w * kd_loss(lg.float(), top, T) for w, lg in zip(cfg.weights, logits[:-1])), kd)
    elif cfg.distill == "teacher":
        # the top resolution is the teacher's own: it learns from labels only (if at all)
        kd = sum((w * kd_loss(lg.float(), fixed_top, T) for w, lg in zip(cfg.weights, logits[:-1])), kd)
    elif cfg.distill == "ensemble":  # ensemble logit + (ensemble -> each) + top-down KD
        a = torch.softmax(run.wrapper.alpha, 0)
        ens = sum(a[k] * lg.detach().float() for k, lg in enumerate(logits))
        loss = loss + cfg.label_weight * F.cross_entropy(ens, y)
        kd = sum(kd_loss(lg.float(), ens, T) for lg in logits)
        kd = kd + sum(kd_loss(logits[i].float(), logits[j].float(), T)
                      for i in range(len(logits)) for j in range(i + 1, len(logits)))
        kd = kd * 2 / (len(logits) + 1)
    total = loss + cfg.distill_weight * kd
    if cfg.patch_l2sp:  # keep the patches near where they started (L2-SP)
        total = total + cfg.patch_l2sp * sum(((p - p0) ** 2).sum() for p, p0 in run.anchors)
    return total, losses, kd


def _loader(run: _Run, epoch: int) -> torch.utils.data.DataLoader:
    """The epoch's batches: shuffled by (seed, epoch), so a resumed run draws what an uninterrupted one would."""
    cfg, env = run.cfg, run.env
    if env.world > 1:
        sampler = torch.utils.data.DistributedSampler(run.dataset, env.world, env.rank, shuffle=True,
                                                      seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
    else:
        sampler = torch.utils.data.RandomSampler(run.dataset,
                                                 generator=torch.Generator().manual_seed(cfg.seed + epoch))
    return torch.utils.data.DataLoader(
        run.dataset, batch_size=cfg.batch_size // env.world, sampler=sampler, num_workers=cfg.workers,
        drop_last=True, collate_fn=collate_skipping, persistent_workers=False, pin_memory=run.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))


def train_one_epoch(run: _Run, epoch: int) -> EpochStats:
    """One pass over the training images: every batch through every resolution, one optimizer step."""
    cfg, device = run.cfg, run.device
    torch.manual_seed(cfg.seed * 100_003 + epoch)  # augmentation and dropout: a function of (seed, epoch)
    loader = _loader(run, epoch)
    run.net.train()
    _set_bn_mode(run.model, cfg)
    if run.teacher is not None:
        run.teacher.eval()
    st = EpochStats({r: {"loss": 0.0, "correct": 0} for r in cfg.resolutions})
    t_epoch = time.perf_counter()
    bar = progress(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", enabled=run.env.main)
    for batch, bad in bar:
        st.skipped += len(bad)
        st.unreadable.update((b.id, b.error) for b in bad)
        if not _every_process(batch is not None and len(batch[1]) >= 2, run):
            continue  # too few readable images here (or in another process): every process skips the step
        crops, y = batch
        y = y.to(device, non_blocking=True)
        xs = _inputs(crops, cfg.resolutions, device, channels_last=True)
        fixed_top = None
        if run.teacher is not None:
            with torch.no_grad(), run.autocast():
                fixed_top = run.teacher(xs[-1], cfg.resolutions[-1]).float()

        def forward():  # a frozen top resolution is the teacher's forward, run once above
            return run.net(xs[:-1]) + [fixed_top] if cfg.freeze_top else run.net(xs)
        if run.stats_only:
            with torch.no_grad():
                logits = forward()
            st.seen += len(y)
            for r, lg in zip(cfg.resolutions, logits):
                st.sums[r]["correct"] += int((lg.argmax(1) == y).sum())
            continue
        with run.autocast():
            logits = forward()
            total, losses, kd = training_loss(logits, y, fixed_top, run)
        run.opt.zero_grad(set_to_none=True)
        total.backward()
        run.opt.step()
        run.sched.step()
        n = len(y)
        st.seen += n
        st.kd_sum += kd.item() * n
        for r, lo, lg in zip(cfg.resolutions, losses, logits):
            st.sums[r]["loss"] += lo.item() * n
            st.sums[r]["correct"] += int((lg.argmax(1) == y).sum())
        ips = st.seen * run.env.world / (time.perf_counter() - t_epoch)
        bar.set_postfix(loss=f"{total.item():.3f}", top1=f"{st.sums[cfg.resolutions[-1]]['correct'] / st.seen:.3f}",
                        img_s=f"{ips:.0f}")
    bar.close()
    if run.env.world > 1:  # the unreadable images of every process, so that rank 0 reports them all
        gathered = [None] * run.env.world
        dist.all_gather_object(gathered, (st.skipped, st.unreadable))
        st.skipped = sum(skipped for skipped, _ in gathered)
        st.unreadable = {k: v for _, part in gathered for k, v in part.items()}
    if not run.stats_only and not all(math.isfinite(st.sums[r]["loss"]) for r in cfg.resolutions):
        raise RescascadeError(f"training diverged in epoch {epoch + 1} (the loss is not finite); lower the learning "
                              "rates (--lr, --patch-lr, --head-lr) and start over with --overwrite")
    st.seconds = time.perf_counter() - t_epoch
    return st


def _every_process(ok: bool, run: _Run) -> bool:
    """Whether `ok` holds in every training process (itself alone without DDP): a step that one process skips
    must be skipped by all, or the others wait forever in DDP's all-reduce."""
    if run.env.world == 1:
        return ok
    flag = torch.tensor([int(ok)], device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _epoch_metrics(run: _Run, epoch: int, st: EpochStats) -> list[dict]:
    """metrics.csv rows of one epoch, one per resolution."""
    lr_now = {g["name"]: g["lr"] for g in run.opt.param_groups}
    seen, world = max(st.seen, 1), run.env.world
    return [{"epoch": epoch + 1, "resolution": r, "loss": st.sums[r]["loss"] / seen,
             "top1": st.sums[r]["correct"] / seen, "distill_loss": st.kd_sum / seen,
             "lr": lr_now.get("shared", lr_now.get("patches")), "patch_lr": lr_now.get("patches"),
             "images_per_s": st.seen * world / st.seconds, "skipped_images": st.skipped}
            for r in run.cfg.resolutions]


def _teacher(model: nn.Module, cfg: TrainConfig) -> nn.Module | None:
    """A frozen copy of the starting point, asked at the top resolution: the teacher, and with freeze_top the top
    resolution itself (so its statistics never see a training-mode forward)."""
    if cfg.freeze_top and not isinstance(model, IndependentModels) and (cfg.shared == "train" or (
            cfg.classifier == "train" and not isinstance(model.logits_layer, PatchedLinear))):
        raise ConfigError("--freeze-top needs --shared frozen and a per-resolution or frozen classifier: trained "
                          "shared weights would change the top resolution anyway")
    if not (cfg.distill == "teacher" or cfg.freeze_top):
        return None
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _optimization(model: nn.Module, wrapper: MultiResolutionForward, cfg: TrainConfig, steps_per_epoch: int):
    """-> (optimizer, schedule, L2-SP anchors, stats_only) for the trainable groups of `cfg`."""
    groups = _param_groups(model, cfg, wrapper.alpha)
    if not groups and cfg.patches != "stats":
        raise ConfigError("nothing to train: shared weights, patches and classifier are all frozen")
    stats_only = not groups  # statistics only: forward passes in train mode re-estimate each resolution's BN stats
    if stats_only:
        groups = [{"name": "none", "params": [nn.Parameter(torch.zeros(1))], "lr": 0.0, "weight_decay": 0.0}]
    opt = _optimizer(groups, cfg)
    anchors = []
    if cfg.patch_l2sp:
        anchors = [(p, p.detach().clone()) for g in groups if g["name"] == "patches" for p in g["params"]]
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt, _schedule(opt, cfg, steps_per_epoch), anchors, stats_only


def _resume(ckpt_path: Path, run: _Run, data_id: dict, log) -> tuple[int, list[dict]]:
    """Load the checkpoint into the run when it was written with the same settings, model and data.
    -> (epochs done, metrics so far). Raises RescascadeError naming what differs."""
    try:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a damaged file: torch raises many kinds)
        raise RescascadeError(f"{ckpt_path} cannot be read ({type(e).__name__}); start over with --overwrite") from None
    if ck["config"] != _config_json(run.cfg):
        old, new = json.loads(ck["config"]), json.loads(_config_json(run.cfg))
        diff = [k for k in new if old.get(k) != new[k]]
        raise RescascadeError(f"{ckpt_path} was written with other settings ({', '.join(diff)} differ); "
                              "resume with the same flags or train into a new --out")
    old_data = json.loads(ck.get("data", "null"))
    if old_data is not None and old_data != data_id:
        raise RescascadeError(f"{ckpt_path} was trained on other data ({old_data['images']} images of "
                              f"{len(old_data['classes'])} classes, now {data_id['images']} of "
                              f"{len(data_id['classes'])}; or the same counts, other images): resume with the same "
                              "--data and options, or train into a new --out")
    old_model, new_model = json.loads(ck.get("model_identity", "null")), _model_identity(run.model)
    if old_model is not None and old_model != new_model:
        diff = ", ".join(f"--{k.replace('_', '-')} {old_model.get(k)} (now {new_model.get(k)})"
                         for k in new_model if old_model.get(k) != new_model[k])
        raise RescascadeError(f"{ckpt_path} holds another model: {diff}; resume with the same flags, or start over "
                              "with --overwrite")
    try:
        run.wrapper.load_state_dict(ck["model"])
    except RuntimeError:  # shapes or names differ: another --arch, --width-mult, --patch or --classifier
        raise RescascadeError(f"{ckpt_path} holds another model (its --arch, --width-mult, --patch or --classifier "
                              "differ); resume with the same flags, or start over with --overwrite") from None
    run.opt.load_state_dict(ck["optimizer"])
    run.sched.load_state_dict(ck["scheduler"])
    if run.env.main:
        log(f"resuming from {ckpt_path} after epoch {ck['epoch']}")
    return ck["epoch"], json.loads(ck["metrics"])


def _save_checkpoint(ckpt_path: Path, run: _Run, epoch: int, metrics: list[dict], data_id: dict) -> None:
    with atomic_path(ckpt_path) as tmp:
        torch.save({"model": run.wrapper.state_dict(), "optimizer": run.opt.state_dict(),
                    "scheduler": run.sched.state_dict(), "epoch": epoch + 1, "config": _config_json(run.cfg),
                    "metrics": json.dumps(metrics), "data": json.dumps(data_id),
                    "model_identity": json.dumps(_model_identity(run.model))}, tmp)


def _model_identity(model: nn.Module) -> dict:
    """What model a checkpoint holds: the arch with its library (two archs may share one state dict's layout, e.g.
    timm's efficientnet_b0 and tf_efficientnet_b0) and the family's options."""
    if isinstance(model, IndependentModels):
        return {"arch": model.arch}
    c = model.config
    return {"arch": f"{c['source']}:{c['arch']}", "width_mult": c["width_mult"], "patch": c["patch"],
            "classifier": c["classifier"]}


def _start_process_group(cfg: TrainConfig, env: DistEnv) -> torch.device:
    """Join torchrun's process group (gloo on CPU, nccl on GPU) when there is one; -> this process's device."""
    if env.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device != "cpu" and torch.cuda.is_available() else "gloo")
    device = pick_device(cfg.device, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def train(model: nn.Module, train_set: ImageSet, cfg: TrainConfig, out_dir, resume: bool = False,
          log=print, probe_cache=None) -> TrainResult:
    """Train `model` (a ResolutionFamily or IndependentModels) in place; checkpoints go to out_dir.
    epochs 0 trains nothing: the starting point (e.g. ImageNet weights in every patch, with --head-init probe the
    linear-probe heads on them) is written as is. probe_cache: a `probe.ProbeCache` shared by several variants
    trained from one start (head_init probe). Raises ConfigError for settings that cannot train, RescascadeError
    for a checkpoint of other settings, model or data, and for a diverged run."""
    env = DistEnv.from_env()
    quiet = log if env.main else (lambda s: None)
    if cfg.epochs == 0:
        if cfg.head_init == "probe":
            from .probe import init_heads_by_probe
            t0, device = time.perf_counter(), pick_device(cfg.device, env)
            init_heads_by_probe(model.to(device, memory_format=torch.channels_last), train_set, device, log=log,
                                cache=probe_cache)
            return TrainResult(model.cpu().eval(), seconds=time.perf_counter() - t0)
        return TrainResult(model.eval())
    device = _start_process_group(cfg, env)
    ckpt_path = Path(out_dir) / "checkpoints" / "last.pt"
    model.to(device, memory_format=torch.channels_last)  # halves eager cost on CPU and suits tensor cores on GPU
    if cfg.dropout is not None:
        dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        if not dropouts:
            raise ConfigError(f"--dropout {cfg.dropout:g}: this model has no dropout layers to set; leave it out")
        for m in dropouts:
            m.p = cfg.dropout
    if cfg.head_init == "probe":  # on resume too: the teacher below is a copy of this start (heads then reload)
        from .probe import init_heads_by_probe
        init_heads_by_probe(model, train_set, device, log=quiet, cache=probe_cache)
    teacher = _teacher(model, cfg)
    wrapper = MultiResolutionForward(model, cfg.resolutions, ensemble=cfg.distill == "ensemble").to(device)
    if cfg.batch_size // env.world < 2:
        raise ConfigError(f"--batch-size {cfg.batch_size} over {env.world} processes leaves < 2 images per process")
    dataset = TrainDataset(train_set, _TrainCrops(cfg.resolutions, cfg.crop, cfg.crop_scale))
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"{len(dataset)} training images are fewer than one batch of {cfg.batch_size}; "
                          "lower --batch-size or add images")
    opt, sched, anchors, stats_only = _optimization(model, wrapper, cfg, steps_per_epoch)
    net = wrapper
    if env.world > 1:
        net = nn.parallel.DistributedDataParallel(wrapper, device_ids=[device.index] if device.type == "cuda" else None)
    run = _Run(cfg, model, wrapper, net, teacher, opt, sched, anchors, stats_only, device, env, dataset)

    start_epoch, metrics = 0, []
    data_id = _data_identity(train_set)
    if resume and ckpt_path.is_file():
        start_epoch, metrics = _resume(ckpt_path, run, data_id, log)
    elif resume:
        quiet(f"--resume: no checkpoint at {ckpt_path}; starting from the beginning")
    t_start, skipped_total, unreadable = time.perf_counter(), 0, {}
    for epoch in range(start_epoch, cfg.epochs):
        st = train_one_epoch(run, epoch)
        skipped_total += st.skipped
        unreadable.update(st.unreadable)
        metrics += _epoch_metrics(run, epoch, st)
        if env.main:
            accs = " ".join(f"r{r}:{st.sums[r]['correct'] / max(st.seen, 1):.3f}" for r in cfg.resolutions)
            loss = sum(st.sums[r]["loss"] for r in cfg.resolutions) / max(st.seen, 1)
            log(f"epoch {epoch + 1}/{cfg.epochs}  loss {loss:.4f}  train top-1 {accs}  "
                f"{st.seen * env.world / st.seconds:.1f} img/s" +
                (f"  ({st.skipped} unreadable images skipped)" if st.skipped else ""))
            _save_checkpoint(ckpt_path, run, epoch, metrics, data_id)
            write_metrics_csv(Path(out_dir) / "metrics.csv", metrics)
        if env.world > 1:
            dist.barrier()
    model.eval()
    return TrainResult(model, metrics, skipped_total, time.perf_counter() - t_start, unreadable)


def write_metrics_csv(path, rows: list[dict]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())
