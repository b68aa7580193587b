"""Which images `eval` (and `build --refine`) score, read as the cascade runtime will get them.

Without other data: exactly the family's own held-out images of a split, looked up by the ids its predictions
recorded, each checked against the pixel digest it was predicted on. Other data: every image it holds out, its
classes matched to the family's by name.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from rescascade.serve.errors import ConfigError, RescascadeError
from rescascade.serve.images import ImageError
from rescascade.training.data import ImageSet, heldout_listing, resolve_source
from rescascade.training.images import pixel_digest
from rescascade.training.store import read_family_json

from .predictions import Predictions, load_predictions

# the load_data options family.json records (training/data.py): replaying them re-derives the same splits
SPLIT_OPTIONS = ("calib_fraction", "val_fraction", "seed", "label_space", "train_per_class", "heldout_per_class",
                 "synthetic_classes", "max_image_pixels", "data_root")


def _own_images(images: ImageSet, pred: Predictions, source: str) -> ImageSet:
    """Exactly the images of a predictions file, in its order: by id, with the labels it recorded."""
    position = {image_id: k for k, image_id in enumerate(images.ids)}
    missing = [str(i) for i in pred.ids if str(i) not in position]
    if missing:
        raise RescascadeError(f"{len(missing)} of the {pred.n} images in {pred.path} are not in {source} (e.g. "
                              f"{missing[0]}): the data changed since training; restore it, or give other images with --data")
    chosen = images.subset([position[str(i)] for i in pred.ids])
    if not np.array_equal(chosen.labels, pred.labels):
        k = int(np.flatnonzero(chosen.labels != pred.labels)[0])
        raise RescascadeError(f"{source} labels {chosen.ids[k]} as class {chosen.class_names[chosen.labels[k]]!r}, but the "
                              f"family predicted it as class {chosen.class_names[pred.labels[k]]!r}: the data changed since "
                              "training; restore it")
    return chosen


def _by_class_name(images: ImageSet, family_names: list[str], spec: str) -> ImageSet:
    """Relabel images into the family's class order, matching class names (other names stop)."""
    if images.class_names == family_names:
        return images
    unknown = [c for c in images.class_names if c not in family_names]
    if unknown:
        def show(names):
            return ", ".join(names[:10]) + (f" ... ({len(names)} in all)" if len(names) > 10 else "")
        raise ConfigError(f"--data {spec} has classes the family does not know ({show(unknown)}); its classes are "
                          f"[{show(images.class_names)}], the family's [{show(family_names)}]: evaluate on images of the "
                          "family's classes, in folders named as the family names them")
    to_family = np.array([family_names.index(c) for c in images.class_names], dtype=np.int64)
    return ImageSet(family_names, to_family[images.labels], images.ids, images.reader, images.index)


class ScoredImages(NamedTuple):
    images: ImageSet
    source: str                  # the --data spec they come from (resolved)
    digests: np.ndarray | None   # per image, the pixel digest the family predicted it with (own images only)
    own: bool                    # the family's own held-out images (else other data)


def images_to_score(config, data: str | None, split: str, limit: int | None, log=print) -> ScoredImages:
    """The images `eval` scores.

    Without --data (or with the family's own source): exactly the ids of predictions/{split}.npz, looked up in the
    source as family.json recorded it (resolved path), their labels and pixels checked. With other data: every
    image it holds out (an image folder's val/, else all of it), classes matched to the family's by name.
    limit: N images spread evenly over them (every class, not the first one's)."""
    fam = read_family_json(config.family_dir)
    prov = fam.get("provenance", {}).get("data", {})
    opts = {k: prov[k] for k in SPLIT_OPTIONS if prov.get(k) is not None}
    recorded = prov.get("resolved_source") or prov.get("source")
    own = data is None or resolve_source(data, opts.get("data_root", "data")) == recorded
    spec = recorded if own else data
    if not spec:
        raise RescascadeError(f"{config.family_dir}/family.json does not record its data source; pass --data")
    pool = heldout_listing(spec, **opts)
    digests = None
    if own:
        if pool.class_names != fam["class_names"]:
            raise RescascadeError(f"{spec} now has classes {pool.class_names[:10]}, the family was trained on "
                                  f"{fam['class_names'][:10]}: the data changed since training; restore it")
        pred = load_predictions(config.family_dir / "predictions" / f"{split}.npz")
        images, digests = _own_images(pool, pred, spec), pred.pixel_digests
    else:
        if split != "test":
            raise ConfigError("--split chooses among the family's own held-out images; --data images are scored whole")
        images, bad = _by_class_name(pool, fam["class_names"], spec).readable("--data")
        for b in bad:
            log(f"{b['id']}: unreadable, left out ({b['error']})")
    if limit and limit < len(images):
        keep = np.unique(np.linspace(0, len(images) - 1, limit).round().astype(np.int64))
        images = images.subset(keep)
        digests = None if digests is None else digests[keep]
    return ScoredImages(images, spec, digests, own)


def decode_all(images: ImageSet, digests: np.ndarray | None, log,
               fitted_on: set[str] | None = None) -> tuple[list[torch.Tensor], np.ndarray, list[int]]:
    """Decoded images, labels and their positions in `images`. With digests (the family's own images) every image
    must decode to the pixels it was predicted on; other data leaves unreadable images out, named, and the images
    whose pixel digest is in `fitted_on` (the family's calib images, wherever they now lie or however re-encoded
    without loss: the thresholds were fitted on them), counted."""
    out, labels, changed, kept, fitted = [], [], [], [], 0
    for i in range(len(images)):
        try:
            image = images.read(i)
        except (ImageError, OSError) as e:
            if digests is not None:
                raise RescascadeError(f"{images.ids[i]} no longer decodes ({e}), though the family predicted on it: the "
                                      "file changed since training; restore it, or give other images with --data") from None
            log(f"{images.ids[i]}: unreadable, left out ({e})")
            continue
        digest = pixel_digest(image) if digests is not None or fitted_on else None
        if digests is not None and digest != digests[i]:
            changed.append(images.ids[i])
        if fitted_on and digest in fitted_on:
            fitted += 1
            continue
        out.append(image)
        labels.append(images.labels[i])
        kept.append(i)
    if changed:
        raise RescascadeError(f"{len(changed)} of {len(images)} images decode to other pixels than the family predicted on "
                              f"(e.g. {changed[0]}): the files changed since training; restore them, or give "
                              "other images with --data")
    if fitted:
        log(f"left out {fitted} of the {len(images)} images: they are the family's calib images (same pixels), on "
            "which the thresholds were fitted; scoring them would flatter the cascade")
    return out, np.array(labels, dtype=np.int64), kept


def encoded_all(images: ImageSet, kept: list[int], spec: str) -> list[bytes]:
    """The encoded files of the images at `kept`, as the bytes a service would receive."""
    out = []
    for i in kept:
        enc = images.encoded(i)
        if enc is None:
            raise ConfigError(f"--from-bytes: the images of {spec} are held decoded (no files to read bytes from); "
                              "evaluate on image files (--data imagefolder:PATH) or without --from-bytes")
        out.append(enc.data)
    return out
