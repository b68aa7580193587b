"""Linear-probe initialisation of new heads: fit each resolution's linear classifier on frozen features
(multinomial logistic regression, L-BFGS) before the patches train.

Why: a fresh head starts random, so in the first steps its gradients are large and, under distillation, the
teacher's targets are noise; fitting the head first (linear probing, then fine-tuning) gives the patches a
sensible target from the first step. Features are taken in eval mode on the eval crop of every image.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import features_before, require_linear
from .data import EvalDataset, ImageSet, collate_skipping
from .family import PatchedLinear, ResolutionFamily, res_key
from .preprocess import CROP_FRACTION, to_model_input


@torch.no_grad()
def probe_features(backbone, images: ImageSet, resolutions, device, batch_size: int = 64) -> tuple[dict, torch.Tensor]:
    """backbone(x, r) -> pooled features. Returns ({r: [N, D]}, labels [N]) over the readable images."""
    loader = torch.utils.data.DataLoader(EvalDataset(images, resolutions, CROP_FRACTION), batch_size=batch_size,
                                         collate_fn=collate_skipping)
    feats = {r: [] for r in resolutions}
    labels = []
    for batch, _ in loader:
        if batch is None:
            continue
        views, y = batch[:2]
        for r, v in zip(resolutions, views):
            x = to_model_input(v.to(device)).contiguous(memory_format=torch.channels_last)
            feats[r].append(backbone(x, r).float().cpu())
        labels.append(y)
    return {r: torch.cat(f) for r, f in feats.items()}, torch.cat(labels)


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-4, iters: int = 200):
    """Multinomial logistic regression with an L2 penalty on the weights; returns (weight [C, D], bias [C])."""
    mean, std = x.mean(0), x.std(0) + 1e-6  # standardise for conditioning, folded back into W, b below
    z = (x - mean) / std
    w = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        weight = w / std
        bias = b - (w * (mean / std)).sum(1)
    return weight, bias


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def choose_l2(x: torch.Tensor, y: torch.Tensor, num_classes: int, grid=L2_GRID, folds: int = 3, seed: int = 0) -> float:
    """The L2 penalty with the lowest held-out log-loss in k-fold cross-validation on the training features.
    Log-loss, not accuracy: the cascade exits on these heads' confidences, so calibration counts too (on 10-way
    Imagenette the chosen penalty lifted r96's test top-1 from 90.7 % (1e-4) to 92.3 %)."""
    if len(y) < 20 * folds:
        return grid[len(grid) // 2]  # too few images to tell the penalties apart
    fold = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) % folds
    losses = []
    for l2 in grid:
        total = 0.0
        for k in range(folds):
            w, b = fit_linear(x[fold != k], y[fold != k], num_classes, l2=l2)
            total += float(F.cross_entropy(x[fold == k] @ w.T + b, y[fold == k], reduction="sum"))
        losses.append(total / len(y))
    return grid[min(range(len(grid)), key=losses.__getitem__)]


class ProbeCache:
    """Linear probes already fitted, for a caller that trains several variants from one start on one image set (a
    benchmark's unpatched, statistics-only and patch families, the independent models): they probe the same frozen
    features and the fit is deterministic, so it is done once. (backbone sha256, resolution, classes) ->
    (weight [C, D], bias [C], L2), valid for one ImageSet object: another image set empties it."""

    def __init__(self):
        self.images = None
        self.fits: dict[tuple, tuple] = {}

    def for_images(self, images: ImageSet) -> dict[tuple, tuple]:
        if images is not self.images:
            self.images, self.fits = images, {}
        return self.fits


def backbone_sha256(state: dict[str, torch.Tensor], logits_name: str) -> str:
    """Hash of a plain model's state dict without its logits layer: what the probe's features depend on."""
    h = hashlib.sha256()
    for name in sorted(state):
        if name.startswith(logits_name + ".") or name.endswith("num_batches_tracked"):
            continue
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def init_heads_by_probe(model: nn.Module, images: ImageSet, device, log=print, cache: ProbeCache | None = None) -> None:
    """Fit the classifier(s) of a ResolutionFamily (per-resolution or shared head) or of IndependentModels by a
    linear probe on the frozen features of `images`; `cache` reuses per-resolution fits of the same start."""
    was_training = model.training
    model.eval()
    resolutions = model.resolutions
    if isinstance(model, ResolutionFamily):
        linear = model.logits_layer
        if not isinstance(linear, PatchedLinear):
            require_linear(linear, model.arch_, "--head-init probe")

        def backbone(x, r):
            model.set_resolution(r)
            return features_before(model.model, linear, x)
        heads = {r: (linear.weight[res_key(r)], linear.bias[res_key(r)]) for r in resolutions} \
            if isinstance(linear, PatchedLinear) else None
        shared = None if heads else (linear.weight, linear.bias)
        num_classes = model.num_classes
        state_at = model.state_dict_for
    else:  # IndependentModels
        layers = {r: model.models[res_key(r)].get_submodule(model.logits_name) for r in resolutions}
        require_linear(layers[resolutions[0]], model.logits_name, "--head-init probe")

        def backbone(x, r):
            return features_before(model.models[res_key(r)], layers[r], x)
        heads = {r: (layers[r].weight, layers[r].bias) for r in resolutions}
        shared = None
        num_classes = heads[resolutions[0]][0].shape[0]

        def state_at(r):
            return model.models[res_key(r)].state_dict()
    if heads:
        fitted = (cache or ProbeCache()).for_images(images)
        keys = {r: (backbone_sha256(state_at(r), model.logits_name), r, num_classes) for r in resolutions}
        todo = [r for r in resolutions if keys[r] not in fitted]
        feats, y = probe_features(backbone, images, todo, device) if todo else ({}, None)
        with torch.no_grad():
            for r in resolutions:
                if r in todo:
                    l2 = choose_l2(feats[r], y, num_classes)
                    w, b = fit_linear(feats[r], y, num_classes, l2=l2)
                    acc = float(((feats[r] @ w.T + b).argmax(1) == y).float().mean())
                    log(f"linear probe r{r}: L2 {l2:g} (cross-validated), train top-1 {100 * acc:.1f}%")
                    fitted[keys[r]] = (w, b, l2)
                else:
                    w, b, l2 = fitted[keys[r]]
                    log(f"linear probe r{r}: L2 {l2:g}, the same start probed before in this process")
                heads[r][0].copy_(w)
                heads[r][1].copy_(b)
    else:  # one head for every resolution: fitted on all of their features
        feats, y = probe_features(backbone, images, resolutions, device)
        x, ys = torch.cat([feats[r] for r in resolutions]), y.repeat(len(resolutions))
        l2 = choose_l2(x, ys, num_classes)
        w, b = fit_linear(x, ys, num_classes, l2=l2)
        with torch.no_grad():
            shared[0].copy_(w)
            shared[1].copy_(b)
    model.train(was_training)
