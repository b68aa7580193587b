"""`rescascade train`: data -> trained family directory with predictions."""
from __future__ import annotations

import inspect
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from . import rundir
from .backbones import build_plain, check_preprocessing, copy_state, resolve_arch
from .data import DataSplits, load_data, resolve_source
from rescascade.serve.errors import ConfigError, RescascadeError
from .family import DEFAULT_ARCH, ResolutionFamily, res_key
from rescascade.serve.fileio import atomic_path, sha256_file, write_json
from rescascade.serve.images import DECODE_SCALES
from .predict import predict_logits, top1, write_predictions
from .preprocess import IMAGENET_MEAN, IMAGENET_STD
from .store import library_versions, save_family, weights_id
from .trainer import DistEnv, IndependentModels, TrainConfig, pick_device, train
from .weights import check_input_normalization, normalization_images, resolve_weights

MAX_WIDTH_MULT = 4.0  # MobileNetV2 at 4x width has 16x the multiply-adds: beyond, a typo rather than a model


def build_model(cfg: TrainConfig, num_classes: int, width_mult: float, patch: str, classifier_kind: str,
                weights: str | None, arch: str = DEFAULT_ARCH, images=None):
    """The family to train (or, with cfg.independent, the K plain models), initialised from `weights`. Weights
    from a file are checked against the input normalization rescascade feeds on some of `images` (an ImageSet;
    `weights.check_input_normalization`); ImageNet weights against what their library records."""
    if not 0 < width_mult <= MAX_WIDTH_MULT:
        raise ConfigError(f"--width-mult {width_mult:g} must be in (0, {MAX_WIDTH_MULT:g}]")
    if weights and weights.startswith("imagenet") and width_mult != 1.0:
        raise RescascadeError(f"the ImageNet weights are for width_mult 1.0; drop --width-mult {width_mult} "
                              "or use --weights none / PATH")
    torch.manual_seed(cfg.seed)  # the fresh classifier's init
    family = ResolutionFamily(cfg.resolutions, num_classes=num_classes, arch=arch, width_mult=width_mult, patch=patch,
                              classifier=classifier_kind)
    state, weights_desc = resolve_weights(weights, family.arch_)
    if state is not None:
        if weights.startswith("imagenet"):
            check_preprocessing(family.model, family.arch_, IMAGENET_MEAN, IMAGENET_STD)
        family.load_plain_state_dict(state, what=f"--weights {weights}")
        if not weights.startswith("imagenet") and images is not None:
            top = cfg.resolutions[-1]
            check_input_normalization(family.plain_model(top), normalization_images(images), top, IMAGENET_MEAN,
                                      IMAGENET_STD, weights)
    if cfg.independent:
        def make():  # pretrained: the family's start (the same classifier-replacement rule); else a fresh init each
            m = build_plain(family.arch_, num_classes, width_mult)
            return copy_state(m, family.state_dict_for(cfg.resolutions[0])) if state is not None else m
        torch.manual_seed(cfg.seed)
        return IndependentModels(cfg.resolutions, make, str(family.arch_), family.classifier_name,
                                 family.logits_name), weights_desc
    return family, weights_desc


def run_train(data: str, out: str, cfg: TrainConfig, *, arch: str = DEFAULT_ARCH, width_mult: float = 1.0,
              patch: str = "scale_bias_stats",
              classifier_kind: str = "shared", weights: str | None = "imagenet", resume: bool = False,
              overwrite: bool = False,
              data_options: dict | None = None, predict_batch: int = 64, log=print, preset: str | None = None,
              splits: DataSplits | None = None, predictors=None, probe_cache=None, decode_scale: str = "stage") -> dict:
    """Train and write the family directory; returns family.json (or the baseline's json for --independent).

    out: a new or empty directory; an interrupted run there needs resume=True (continue) or overwrite=True (start
    over); a finished run there is returned as it is with resume=True and the same settings, replaced with
    overwrite=True; a folder of the user's own files needs overwrite=True (nothing of theirs is deleted).
    family.json is written last: a directory without it is an unfinished run.
    splits: already loaded data (skips --data parsing; its description is recorded). predictors: a function
    (trained model, run directory, its json doc) -> {resolution: callable from a float32 [N, 3, r, r] batch to
    [N, classes] logits}, e.g. `rescascade.profiling.engines.onnxruntime_predictors` for faster bulk prediction on
    CPU; None: the plain models in PyTorch. probe_cache: a `probe.ProbeCache` shared by several runs
    from one start on the same `splits` (each probes the same frozen features). decode_scale: how the predictions,
    and the cascade runtime after them, decode a JPEG for each resolution ("stage": at the smallest DCT scale that
    covers its resize, far cheaper for large photos; "full"); recorded in family.json. With "stage" and held-out
    files, the predictions also hold each resolution decoded at every larger one's scale, so that `build` can
    price and judge a cascade decoded once (`Predictions.decoded_at`)."""
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"run_train(data, out, cfg): cfg must be a TrainConfig (e.g. TrainConfig.preset(...)), got "
                          f"{type(cfg).__name__}")
    built = resolve_arch(arch)  # an unknown name stops before anything is read or written
    if decode_scale not in DECODE_SCALES:
        raise ConfigError(f"--decode-scale {decode_scale!r}: use one of {', '.join(DECODE_SCALES)}")
    env = DistEnv.from_env()
    out = Path(out)
    data_options = {"seed": cfg.seed, **(data_options or {})}
    source = splits.description["resolved_source"] if splits else resolve_source(data, data_options.get("data_root",
                                                                                                       "data"))
    state = rundir.prepare(out, resume, overwrite,
                           lambda doc: _differences(doc, cfg, source, data_options, built, width_mult, patch,
                                                      classifier_kind),
                           log if env.main else _quiet)
    if isinstance(state, dict):  # --resume of a finished run made with the same settings
        return state
    splits = splits or load_data(data, **data_options, log=log if env.main else _quiet)
    if splits.train is None:
        raise ConfigError(f"--data {data} holds only held-out images; train on another source")
    if cfg.epochs and len(splits.train) < cfg.batch_size:
        raise RescascadeError(f"{len(splits.train)} training images are fewer than one batch of {cfg.batch_size}; "
                              "lower --batch-size or add images")
    num_classes = len(splits.class_names)
    model, weights_desc = build_model(cfg, num_classes, width_mult, patch, classifier_kind, weights, arch,
                                      splits.train)
    if env.main:
        d = splits.description
        log(f"data: {d['train_images']} train, {d['calib_images']} calib, {d['test_images']} test images, "
            f"{num_classes} classes; weights: {weights_desc}")
        if overwrite:  # every input checked: only now does the earlier run go
            rundir.replace(out, state, log)
    result = train(model, splits.train, cfg, out, resume=resume and not overwrite, log=log, probe_cache=probe_cache)
    if env.world > 1:
        dist.barrier()
        if not env.main:
            dist.destroy_process_group()
            return {}
    return _package(result, splits, cfg, out, weights_desc, preset, predictors, predict_batch, env, log, built,
                    decode_scale)


def _package(result, splits: DataSplits, cfg: TrainConfig, out: Path, weights_desc: str, preset: str | None,
             predictors, predict_batch: int, env: DistEnv, log, arch, decode_scale: str) -> dict:
    """Write the trained model's weights, its calib/test predictions, then family.json (or independent.json)
    last, and remove the checkpoint: the run is complete."""
    model = result.model.cpu()
    data_desc = splits.description
    data_desc["source_size"] = typical_size(splits.test)
    if result.unreadable:  # damaged data behind a readable header: not trained on
        data_desc["train_images"] -= len(result.unreadable)
        data_desc.setdefault("unreadable", {}).setdefault("train", []).extend(
            {"id": k, "error": v} for k, v in sorted(result.unreadable.items()))
    provenance = {"data": data_desc, "weights": weights_desc, "train_config": asdict(cfg),
                  "preset": preset, "epochs": cfg.epochs, "train_seconds": round(result.seconds, 1),
                  "skipped_train_images": result.skipped_images, "world_size": env.world}
    device = pick_device(cfg.device, env)
    files = all(hasattr(s.reader, "encoded") for s in (splits.calib, splits.test))
    if not files:
        decode_scale = "full"  # held-out images given decoded: predicted on those pixels, as a runtime given them
    if cfg.independent:
        doc = _save_independent(model, out, splits.class_names, provenance, arch)
        models = {r: model.models[res_key(r)] for r in cfg.resolutions}
    else:
        doc = save_family(model, out, class_names=splits.class_names, provenance=provenance, write_doc=False,
                          decode_scale=decode_scale)
        doc["preprocessing"]["held_out_files"] = files  # False: no encoded images to time a decode on
        models = {r: model.plain_model(r) for r in model.resolutions}
    if predictors is not None:
        models = predictors(model, out, doc)
    wid = weights_id(doc)
    figures = {}
    for split, images in (("calib", splits.calib), ("test", splits.test)):
        pred = predict_logits(models, images, batch_size=predict_batch, device=str(device),
                              workers=min(cfg.workers, 2), desc=f"predict {split}",
                              decode_scale="full" if cfg.independent else decode_scale, decoded_at=True)
        write_predictions(out / "predictions" / f"{split}.npz", pred, wid, split)
        figures[split] = {str(r): acc for r, acc in top1(pred).items()}
        data_desc[f"{split}_images"] = len(pred["labels"])  # the images actually scored
        if pred["unreadable"]:
            data_desc.setdefault("unreadable", {}).setdefault(split, []).extend(pred["unreadable"])
            log(f"{split}: {pred['skipped']} unreadable image(s) skipped, e.g. {pred['unreadable'][0]['id']} "
                f"({pred['unreadable'][0]['error']})")
    doc["top1"] = figures
    write_json(out / ("independent.json" if cfg.independent else "family.json"), doc)  # last: the run is complete
    rundir.remove_checkpoint(out)
    if env.world > 1:
        dist.destroy_process_group()
    log("top-1 (test): " + "  ".join(f"r{r}: {100 * figures['test'][str(r)]:.2f}%" for r in cfg.resolutions))
    return doc


def _quiet(_: str) -> None:
    pass


# options recorded in family.json's provenance.data that define the data a run trains on
DATA_IDENTITY = ("seed", "calib_fraction", "val_fraction", "label_space", "train_per_class", "heldout_per_class",
                 "synthetic_classes", "max_image_pixels")


def _differences(doc: dict, cfg: TrainConfig, source: str, data_options: dict, arch, width_mult: float,
                 patch: str, classifier_kind: str) -> list[str]:
    """What differs between a finished run (its family.json) and the run asked for (arch: a `backbones.Arch`):
    model, config fields, data."""
    model = {"--arch": ((doc.get("source", "torchvision"), doc.get("arch")), (arch.source, arch.name)),
             "--width-mult": (doc.get("width_mult"), width_mult), "--patch": (doc.get("patch"), patch),
             "--classifier": (doc.get("classifier"), classifier_kind)}
    if doc.get("kind") == "independent":  # the baseline's json records no family options
        model = {}
    prov = doc.get("provenance", {})
    old = json.loads(json.dumps(prov.get("train_config", {})))
    new = json.loads(json.dumps(asdict(cfg)))
    differ = [k for k, (was, now) in model.items() if was != now]
    differ += [k for k in new if k not in ("workers", "device") and old.get(k) != new[k]]
    data = prov.get("data", {})
    if data.get("resolved_source", data.get("source")) != source:
        differ.append("--data")
    defaults = {k: v.default for k, v in inspect.signature(load_data).parameters.items()}
    differ += [f"--{k.replace('_', '-')}" for k in DATA_IDENTITY
               if k in data and data_options.get(k, defaults[k]) != data[k]]
    return differ


def typical_size(images, n: int = 32) -> list[int] | None:
    """Median decoded [H, W] of a few held-out images: what a deployed cascade resizes from (for profiling)."""
    sizes = []
    for i in range(0, len(images), max(1, len(images) // n)):
        try:
            sizes.append(images.read(i).shape[-2:])
        except Exception:
            continue
    return [int(v) for v in np.median(np.array(sizes), 0)] if sizes else None


def _save_independent(model: IndependentModels, out: Path, class_names, provenance, arch) -> dict:
    """The baseline's directory: one full plain-model state dict per resolution; not a family."""
    files = {}
    for r in model.resolutions:
        path = out / "models" / f"{res_key(r)}.safetensors"
        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous() for k, v in model.models[res_key(r)].state_dict().items()}, str(tmp))
        files[f"models/{res_key(r)}.safetensors"] = sha256_file(path)
    one = sum(p.numel() for p in next(iter(model.models.values())).parameters())
    k = len(model.resolutions)
    return {"schema_version": 1, "kind": "independent", "arch": arch.name, "source": arch.source,
            "resolutions": list(model.resolutions),
            "class_names": list(class_names), "files": files,
            "parameters": {"one_model": one, "k": k, "k_independent": k * one},
            "provenance": {"versions": library_versions(), **provenance}}
