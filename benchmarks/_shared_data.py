"""This lab's real data (../shared/data, see its README) as rescascade data sources: importing this module makes
`--data shared-imagenette:DIR` and `shared-imagenet-samples:DIR` readable (rescascade.training.data
.register_source). The library itself knows only image folders and torchvision's datasets.

  shared-imagenette:DIR         imagenette_224: tars + manifests (labels: 10-way, or 1000-way with
                                label_space="imagenet")
  shared-imagenet-samples:DIR   imagenet_sample_images: 1,000 held-out photos, 1000-way (evaluation only)
"""
from __future__ import annotations

import csv
from pathlib import Path

from rescascade.serve.errors import DataError
from rescascade.serve.images import DEFAULT_MAX_PIXELS
from rescascade.training.data import ImageSet, SourceOptions, TarReader, imagenet_class_names, register_source


def _read_manifest(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path} not found; the shared data folder needs its tar files and manifests")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def shared_imagenette(path: str, label_space: str = "native",
                      max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[ImageSet, ImageSet]:
    """(training subset of 500 per class, the validation images) of the Imagenette tars, 10-way or 1000-way."""
    root = Path(path)
    out = []
    for split, tar in (("train_subset500", "imagenette224_train_subset500.tar"), ("val", "imagenette224_val.tar")):
        rows = _read_manifest(root / f"manifest_{split}.csv")
        if label_space == "imagenet":
            labels, classes = [int(r["imagenet_index"]) for r in rows], imagenet_class_names()
        else:
            names = {int(r["imagenette_index"]): r["class_name"] for r in rows}
            labels, classes = [int(r["imagenette_index"]) for r in rows], [names[i] for i in sorted(names)]
        reader = TarReader(str(root / tar), [r["path"] for r in rows], max_pixels)
        out.append(ImageSet(classes, labels, [r["path"] for r in rows], reader))
    return out[0], out[1]


def shared_imagenet_samples(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageSet:
    """The 1,000 ImageNet sample photos, one per class, 1000-way."""
    root = Path(path)
    rows = _read_manifest(root / "labels.csv")
    tar = root / "imagenet_sample_images_1000.tar"
    members = [f"imagenet_sample_images/{r['file']}" for r in rows]
    return ImageSet(imagenet_class_names(), [int(r["imagenet_index"]) for r in rows], [r["file"] for r in rows],
                    TarReader(str(tar), members, max_pixels))


def _imagenette_source(arg: str, o: SourceOptions):
    return shared_imagenette(arg, o.label_space, o.max_image_pixels)


def _samples_source(arg: str, o: SourceOptions):
    return None, shared_imagenet_samples(arg, o.max_image_pixels)


register_source("shared-imagenette", _imagenette_source)
register_source("shared-imagenet-samples", _samples_source)
