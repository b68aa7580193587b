"""Labelled images from every source the trainer takes, as uint8 tensors, split into train / calib / test.

Sources (the --data argument):
  synthetic[:N]                 the built-in resolution-sensitive set (training/synthetic.py), N training images
  imagefolder:PATH              PATH/train and PATH/val (or one folder of class folders, split by --val-fraction)
  cifar10 | cifar100 | imagenette   torchvision datasets under --data-root (--download fetches them)
  shared-imagenette:DIR         ../shared/data/imagenette_224: tars + manifests (labels: 10-way, or 1000-way
                                with --label-space imagenet)
  shared-imagenet-samples:DIR   ../shared/data/imagenet_sample_images: 1,000 held-out photos, 1000-way

Held-out images (never trained on) are split into calib and test deterministically (stratified, seeded).
Unreadable images are skipped at load time and counted, never a crash in the middle of an epoch.
"""
from __future__ import annotations

import csv
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from .fileio import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


# ---- readers: picklable callables index -> uint8 [3, H, W] (they cross DataLoader worker processes) -------
def decode(data: bytes | torch.Tensor) -> torch.Tensor:
    if isinstance(data, bytes):
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_image(data, mode=ImageReadMode.RGB)


class FileReader:
    def __init__(self, paths: list[str]):
        self.paths = paths

    def __call__(self, i: int) -> torch.Tensor:
        with open(self.paths[i], "rb") as f:
            return decode(f.read())


class TarReader:
    """Reads members of an uncompressed tar by offset; the file is opened lazily in each process."""

    def __init__(self, tar_path: str, members: list[str]):
        self.tar_path = tar_path
        with tarfile.open(tar_path) as tf:
            index = {m.name: (m.offset_data, m.size) for m in tf.getmembers() if m.isfile()}
        missing = [m for m in members if m not in index]
        if missing:
            raise UserError(f"{tar_path} lacks {len(missing)} file(s) its manifest lists, e.g. {missing[0]}")
        self.spans = [index[m] for m in members]
        self._fh = None

    def __getstate__(self):
        return {**self.__dict__, "_fh": None}

    def __call__(self, i: int) -> torch.Tensor:
        if self._fh is None:
            self._fh = open(self.tar_path, "rb")
        offset, size = self.spans[i]
        self._fh.seek(offset)
        return decode(self._fh.read(size))


class TensorReader:
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __call__(self, i: int) -> torch.Tensor:
        return self.images[i]


class TorchvisionReader:
    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self, i: int) -> torch.Tensor:
        from torchvision.transforms.v2.functional import pil_to_tensor
        img = self.dataset[i][0]
        return pil_to_tensor(img.convert("RGB")) if not isinstance(img, torch.Tensor) else img


@dataclass
class ImageSet:
    """Labelled images decoded lazily: read(i) -> uint8 [3, H, W]; ids are stable names for predictions."""
    class_names: list[str]
    labels: np.ndarray
    ids: list[str]
    reader: Callable[[int], torch.Tensor]
    index: np.ndarray = field(default=None)  # positions in the reader (a subset keeps the reader)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.index is None:
            self.index = np.arange(len(self.labels))

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> torch.Tensor:
        return self.reader(int(self.index[i]))

    def subset(self, idx) -> "ImageSet":
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet(self.class_names, self.labels[idx], [self.ids[i] for i in idx], self.reader, self.index[idx])


@dataclass
class DataSplits:
    train: ImageSet | None
    calib: ImageSet
    test: ImageSet
    class_names: list[str]
    description: dict


def check_classes(labels: np.ndarray, class_names: list[str], what: str) -> None:
    if len(class_names) < 2:
        raise UserError(f"{what} has {len(class_names)} class(es); a classifier needs at least 2")
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise UserError(f"{what}: class(es) {', '.join(empty[:5])} have no images; add images or remove the class")


def limit_per_class(s: ImageSet, n: int | None, seed: int) -> ImageSet:
    """At most n images per class, chosen deterministically (spread over the set, not the first n)."""
    if not n:
        return s
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(s.labels == c))[:n] for c in range(len(s.class_names))]
    return s.subset(np.sort(np.concatenate(keep)))


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (a, b) with ~fraction of every class in a; deterministic in seed."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(idx)))
        a.append(idx[:k])
        b.append(idx[k:])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


# ---- sources ---------------------------------------------------------------------------------------------
def _list_image_folder(root: Path) -> tuple[list[str], list[int], list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{root} has no class folders; an image folder holds one sub-folder of images per class")
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += [str(p) for p in files]
        labels += [c] * len(files)
    return paths, labels, classes


def image_folder(path: str, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"image folder {root} not found")
    if (root / "train").is_dir():
        if not (root / "val").is_dir():
            raise UserError(f"{root}/train exists but {root}/val does not; add val/ or point at one class-folder tree")
        tp, tl, classes = _list_image_folder(root / "train")
        vp, vl, vclasses = _list_image_folder(root / "val")
        if vclasses != classes:
            raise UserError(f"{root}/val has classes {vclasses[:5]}... but train has {classes[:5]}...; "
                            "both need the same class folders")
        train = ImageSet(classes, tl, [str(Path(p).relative_to(root)) for p in tp], FileReader(tp))
        check_classes(train.labels, classes, f"{root}/train")
        val = ImageSet(classes, vl, [str(Path(p).relative_to(root)) for p in vp], FileReader(vp))
        return train, val
    paths, labels, classes = _list_image_folder(root)
    full = ImageSet(classes, labels, [str(Path(p).relative_to(root)) for p in paths], FileReader(paths))
    check_classes(full.labels, classes, str(root))
    val_idx, train_idx = stratified_split(full.labels, val_fraction, seed + 1)
    return full.subset(train_idx), full.subset(val_idx)


def _read_manifest(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path} not found; the shared data folder needs its tar files and manifests")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet class names in torchvision's order (from torchvision's weights meta)."""
    from torchvision.models import MobileNet_V2_Weights
    return list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def shared_imagenette(path: str, label_space: str) -> tuple[ImageSet, ImageSet]:
    root = Path(path)
    out = []
    for split, tar in (("train_subset500", "imagenette224_train_subset500.tar"), ("val", "imagenette224_val.tar")):
        rows = _read_manifest(root / f"manifest_{split}.csv")
        if label_space == "imagenet":
            labels, classes = [int(r["imagenet_index"]) for r in rows], imagenet_class_names()
        else:
            names = {int(r["imagenette_index"]): r["class_name"] for r in rows}
            labels, classes = [int(r["imagenette_index"]) for r in rows], [names[i] for i in sorted(names)]
        reader = TarReader(str(root / tar), [r["path"] for r in rows])
        out.append(ImageSet(classes, labels, [r["path"] for r in rows], reader))
    return out[0], out[1]


def shared_imagenet_samples(path: str) -> ImageSet:
    root = Path(path)
    rows = _read_manifest(root / "labels.csv")
    tar = root / "imagenet_sample_images_1000.tar"
    members = [f"imagenet_sample_images/{r['file']}" for r in rows]
    return ImageSet(imagenet_class_names(), [int(r["imagenet_index"]) for r in rows], [r["file"] for r in rows],
                    TarReader(str(tar), members))


def torchvision_dataset(name: str, root: str, download: bool) -> tuple[ImageSet, ImageSet]:
    import torchvision.datasets as D
    try:
        if name in ("cifar10", "cifar100"):
            cls = D.CIFAR10 if name == "cifar10" else D.CIFAR100
            train, val = cls(root, train=True, download=download), cls(root, train=False, download=download)
        else:
            train = D.Imagenette(root, split="train", size="320px", download=download)
            val = D.Imagenette(root, split="val", size="320px", download=download)
    except RuntimeError as e:
        raise UserError(f"{name} not found under {root} ({e}); pass --download (needs network) "
                        "or --data-root pointing at a copy") from None
    out = []
    for ds in (train, val):
        labels = ds.targets if hasattr(ds, "targets") else [s[1] for s in ds._samples]
        classes = list(ds.classes) if name != "imagenette" else [c[0] for c in ds.classes]
        out.append(ImageSet(classes, labels, [f"{name}/{i}" for i in range(len(labels))], TorchvisionReader(ds)))
    return out[0], out[1]


def synthetic(n_train: int, num_classes: int, seed: int) -> tuple[ImageSet, ImageSet]:
    from .synthetic import class_names, make_synthetic
    n_heldout = max(400, 2 * n_train)  # images are free here: a big held-out set keeps calib/test noise low
    images, labels = make_synthetic(n_train + n_heldout, num_classes=num_classes, seed=seed)
    full = ImageSet(class_names(num_classes), labels.numpy(), [f"synthetic/{seed}/{i}" for i in range(len(labels))],
                    TensorReader(images))
    return full.subset(np.arange(n_train)), full.subset(np.arange(n_train, len(labels)))


def load_data(spec: str, *, calib_fraction: float = 0.5, val_fraction: float = 0.2, seed: int = 0,
              label_space: str = "native", data_root: str = "data", download: bool = False,
              train_per_class: int | None = None, heldout_per_class: int | None = None,
              synthetic_classes: int = 8) -> DataSplits:
    """Parse --data SPEC into train / calib / test splits."""
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        train, heldout = synthetic(int(arg) if arg else 2000, synthetic_classes, seed)
    elif kind == "imagefolder":
        train, heldout = image_folder(arg, val_fraction, seed)
    elif kind in ("cifar10", "cifar100", "imagenette"):
        train, heldout = torchvision_dataset(kind, arg or data_root, download)
    elif kind == "shared-imagenette":
        train, heldout = shared_imagenette(arg, label_space)
    elif kind == "shared-imagenet-samples":
        train, heldout = None, shared_imagenet_samples(arg)
    else:
        raise UserError(f"unknown --data {spec!r}; use synthetic[:N], imagefolder:PATH, cifar10, cifar100, "
                        "imagenette, shared-imagenette:DIR or shared-imagenet-samples:DIR")
    if not 0 < calib_fraction < 1:
        raise UserError(f"--calib-fraction must be between 0 and 1, got {calib_fraction}")
    if train is not None:
        train = limit_per_class(train, train_per_class, seed)
    heldout = limit_per_class(heldout, heldout_per_class, seed + 2)
    calib_idx, test_idx = stratified_split(heldout.labels, calib_fraction, seed + 3)
    desc = {"source": spec, "label_space": label_space, "seed": seed, "calib_fraction": calib_fraction,
            "train_images": 0 if train is None else len(train), "calib_images": len(calib_idx),
            "test_images": len(test_idx), "train_per_class": train_per_class, "heldout_per_class": heldout_per_class}
    return DataSplits(train, heldout.subset(calib_idx), heldout.subset(test_idx), heldout.class_names, desc)


# ---- torch datasets over an ImageSet ----------------------------------------------------------------------
class TrainDataset(torch.utils.data.Dataset):
    """(crop, label) with crop = transform(image), or None for an unreadable image (the collate drops it)."""

    def __init__(self, images: ImageSet, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        try:
            img = self.images.read(i)
        except Exception:  # corrupt / unreadable file: counted and skipped by the collate
            return None
        return self.transform(img), int(self.images.labels[i])


class EvalDataset(torch.utils.data.Dataset):
    """(list of uint8 [3, r, r] per resolution, label, position) with the eval preprocessing of each r."""

    def __init__(self, images: ImageSet, resolutions, crop_fraction: float):
        from .preprocess import resize_center_crop
        self.images, self.resolutions, self.crop_fraction = images, list(resolutions), crop_fraction
        self._resize = resize_center_crop

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        try:
            img = self.images.read(i)
        except Exception:
            return None
        return [self._resize(img, r, self.crop_fraction) for r in self.resolutions], int(self.images.labels[i]), i


def collate_skipping(batch):
    """Default collate over the readable items; returns (collated or None, number skipped)."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, skipped
    return torch.utils.data.default_collate(good), skipped
