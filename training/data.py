"""Labelled images from every source the trainer takes, as uint8 tensors, split into train / calib / test.

Sources (the --data argument):
  synthetic[:N]                 the built-in resolution-sensitive set (training/synthetic.py), N training images
  imagefolder:PATH              PATH/train and PATH/val (or one folder of class folders, split by --val-fraction)
  cifar10 | cifar100 | imagenette   torchvision datasets under --data-root (--download fetches them)
  NAME[:ARG]                    any source added with `register_source(NAME, read)`

Held-out images (never trained on) are split into calib and test deterministically (stratified, seeded), from
the listing alone, so the same data and options always give the same ids. Then every listed image's header is
read (serve/images.py: no pixel decoded): unreadable images and images over the pixel limit are left out and
named, and a class left without images stops with one line. An image that fails later, in the middle of its
data, is skipped where it is read and named too; one bad image never stops a batch.
"""
from __future__ import annotations

import functools
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rescascade.serve.errors import ConfigError, DataError, check_int
from rescascade.serve.fileio import printable
from rescascade.serve.images import DECODE_SCALES, DEFAULT_MAX_PIXELS, Encoded, ImageError, probe

from .images import decode, decode_encoded, pixel_digest
from .progress import progress

MAX_SYNTHETIC = 200_000  # synthetic training images (with their held-out images: ~22 GB of pixels)


# ---- readers: picklable callables index -> uint8 [3, H, W] (they cross DataLoader worker processes) -------
class FileReader:
    """Image files by path, decoded by training.images.decode (EXIF orientation, any bit depth, pixel limit)."""

    def __init__(self, paths: list[str], max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.paths, self.max_pixels = paths, max_pixels

    def encoded(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read()

    def check(self, i: int) -> None:
        """Read the header only (raises ImageError or OSError)."""
        probe(self.paths[i], self.max_pixels)

    def __call__(self, i: int) -> torch.Tensor:
        return decode(self.encoded(i), self.max_pixels)


@functools.lru_cache(maxsize=8)
def _tar_index(tar_path: str, size: int, mtime_ns: int) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size) of an uncompressed tar: read once per file version (listing a large tar
    takes seconds; the splits of one source list it several times)."""
    with tarfile.open(tar_path) as tf:
        return {m.name: (m.offset_data, m.size) for m in tf.getmembers() if m.isfile()}


class TarReader:
    """Reads members of an uncompressed tar by offset; the file is opened lazily in each process."""

    def __init__(self, tar_path: str, members: list[str], max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.tar_path, self.max_pixels = tar_path, max_pixels
        st = os.stat(tar_path)
        index = _tar_index(str(tar_path), st.st_size, st.st_mtime_ns)
        missing = [m for m in members if m not in index]
        if missing:
            raise DataError(f"{tar_path} lacks {len(missing)} file(s) its manifest lists, e.g. {missing[0]}")
        self.spans = [index[m] for m in members]
        self._fh = None

    def __getstate__(self):
        return {**self.__dict__, "_fh": None}

    def encoded(self, i: int) -> bytes:
        if self._fh is None:
            self._fh = open(self.tar_path, "rb")
        offset, size = self.spans[i]
        self._fh.seek(offset)
        return self._fh.read(size)

    def check(self, i: int) -> None:
        probe(self.encoded(i), self.max_pixels)

    def __call__(self, i: int) -> torch.Tensor:
        return decode(self.encoded(i), self.max_pixels)


class TensorReader:
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __call__(self, i: int) -> torch.Tensor:
        return self.images[i]


class ArrayReader:
    """Images held as uint8 arrays [N, H, W, 3] (torchvision's CIFAR datasets keep theirs so)."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __call__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


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
        # names that were not UTF-8 on disk, made printable once here for every source (fileio.printable)
        self.class_names = [printable(c) if isinstance(c, str) else c for c in self.class_names]
        self.ids = [printable(i) if isinstance(i, str) else i for i in self.ids]
        if self.index is None:
            self.index = np.arange(len(self.labels))

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> torch.Tensor:
        return self.reader(int(self.index[i]))

    def encoded(self, i: int) -> Encoded | None:
        """Image i as the encoded file (header checked), to decode at a stage's scale; None for sets held decoded
        (tensors, arrays)."""
        read_bytes = getattr(self.reader, "encoded", None)
        if read_bytes is None:
            return None
        return Encoded(read_bytes(int(self.index[i])), getattr(self.reader, "max_pixels", DEFAULT_MAX_PIXELS))

    def subset(self, idx) -> "ImageSet":
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet(self.class_names, self.labels[idx], [self.ids[i] for i in idx], self.reader, self.index[idx])

    def readable(self, what: str) -> tuple["ImageSet", list[dict]]:
        """(the images whose header reads and whose size is within the pixel limit, [{id, error}] of the others).
        Reads headers only; sets decoded already (tensors, arrays) are all readable."""
        check = getattr(self.reader, "check", None)
        if check is None or len(self) == 0:
            return self, []
        keep, bad = [], []
        for i in progress(range(len(self)), desc=f"checking {what} images", unit="img"):
            try:
                check(int(self.index[i]))
                keep.append(i)
            except (ImageError, OSError) as e:
                bad.append({"id": self.ids[i], "error": str(e)})
        return self.subset(keep), bad


@dataclass
class DataSplits:
    train: ImageSet | None
    calib: ImageSet
    test: ImageSet
    class_names: list[str]
    description: dict


def check_classes(labels: np.ndarray, class_names: list[str], what: str, hint: str = "add images or remove the "
                  "class") -> None:
    if len(class_names) < 2:
        raise DataError(f"{what} has {len(class_names)} class(es); a classifier needs at least 2")
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        more = f" (and {len(empty) - 5} more)" if len(empty) > 5 else ""
        raise DataError(f"{what}: class(es) {', '.join(empty[:5])}{more} have no readable images; {hint}")


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
def list_image_folder(root: Path, id_root: Path, max_pixels: int | None) -> tuple[ImageSet, dict[str, int]]:
    """Class folders of images, listed exactly as torchvision's ImageFolder lists them (its own find_classes and
    make_dataset, its IMG_EXTENSIONS). -> (images with ids relative to id_root, {extension: count} of the files in
    class folders that ImageFolder does not list, e.g. .gif)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    try:
        classes, class_to_idx = find_classes(root)
    except FileNotFoundError:
        raise DataError(f"{root} has no class folders; an image folder holds one sub-folder of images per "
                        "class") from None
    samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    listed = {path for path, _ in samples}
    not_listed: dict[str, int] = {}
    for name in classes:
        for folder, _, files in os.walk(root / name, followlinks=True):
            for f in files:
                if os.path.join(folder, f) not in listed:
                    ext = os.path.splitext(f)[1].lower() or "(none)"
                    not_listed[ext] = not_listed.get(ext, 0) + 1
    paths = [path for path, _ in samples]
    ids = [os.path.relpath(path, id_root) for path in paths]
    images = ImageSet(classes, [label for _, label in samples], ids, FileReader(paths, max_pixels))
    return images, dict(sorted(not_listed.items()))


def image_folder(path: str, val_fraction: float | None, seed: int,
                 max_pixels: int | None) -> tuple[ImageSet, ImageSet, dict[str, int]]:
    """(train, held-out, files not listed) of PATH/train + PATH/val, or of one class-folder tree split by
    val_fraction (stratified, seeded; None: every image is held out). Held-out classes are checked like training
    ones (after reading headers)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} not found")
    if (root / "train").is_dir():
        if not (root / "val").is_dir():
            raise DataError(f"{root}/train exists but {root}/val does not; add val/ or point at one class-folder tree")
        train, skipped = list_image_folder(root / "train", root, max_pixels)
        val, skipped_val = list_image_folder(root / "val", root, max_pixels)
        if val.class_names != train.class_names:
            raise DataError(f"{root}/val has classes {val.class_names} but {root}/train has {train.class_names}; "
                            "both need the same class folders")
        return train, val, {k: skipped.get(k, 0) + skipped_val.get(k, 0) for k in {**skipped, **skipped_val}}
    full, skipped = list_image_folder(root, root, max_pixels)
    if val_fraction is None:
        return full.subset([]), full, skipped
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    check_classes(full.labels, full.class_names, str(root))
    val_idx, train_idx = stratified_split(full.labels, val_fraction, seed + 1)
    return full.subset(train_idx), full.subset(val_idx), skipped


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet class names in torchvision's order (from torchvision's weights meta)."""
    from torchvision.models import MobileNet_V2_Weights
    return list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def torchvision_dataset(name: str, root: str, download: bool, max_pixels: int | None) -> tuple[ImageSet, ImageSet]:
    """CIFAR (its uint8 arrays) or Imagenette (its files, decoded by training.images like every file)."""
    import torchvision.datasets as D
    try:
        if name in ("cifar10", "cifar100"):
            cls = D.CIFAR10 if name == "cifar10" else D.CIFAR100
            train, val = cls(root, train=True, download=download), cls(root, train=False, download=download)
        else:
            train = D.Imagenette(root, split="train", size="320px", download=download)
            val = D.Imagenette(root, split="val", size="320px", download=download)
    except RuntimeError as e:
        raise DataError(f"{name} not found under {root} ({e}); pass --download (needs network) "
                        "or --data-root pointing at a copy") from None
    out = []
    for ds in (train, val):
        if name == "imagenette":
            paths, labels = [str(p) for p, _ in ds._samples], [y for _, y in ds._samples]
            classes = [c[0] for c in ds.classes]
            ids = [os.path.relpath(p, root) for p in paths]
            out.append(ImageSet(classes, labels, ids, FileReader(paths, max_pixels)))
        else:
            labels = ds.targets
            out.append(ImageSet(list(ds.classes), labels, [f"{name}/{'train' if ds.train else 'test'}/{i}"
                                                           for i in range(len(labels))], ArrayReader(ds.data)))
    return out[0], out[1]


def synthetic(n_train: int, num_classes: int, seed: int) -> tuple[ImageSet, ImageSet]:
    from .synthetic import class_names, make_synthetic
    n_heldout = max(400, 2 * n_train)  # images are free here: a big held-out set keeps calib/test noise low
    images, labels = make_synthetic(n_train + n_heldout, num_classes=num_classes, seed=seed)
    full = ImageSet(class_names(num_classes), labels.numpy(), [f"synthetic/{seed}/{i}" for i in range(len(labels))],
                    TensorReader(images))
    return full.subset(np.arange(n_train)), full.subset(np.arange(n_train, len(labels)))


def resolve_source(spec: str, data_root: str = "data") -> str:
    """The --data spec with its path made absolute: what the family records, so that `eval` run from another
    directory reads the same images (a relative imagefolder:../photos would name another folder there)."""
    kind, _, arg = spec.partition(":")
    source = SOURCES.get(kind)
    if source and source.path == "required" and arg:
        return f"{kind}:{Path(arg).expanduser().resolve()}"
    if source and source.path == "data_root":
        return f"{kind}:{Path(arg or data_root).expanduser().resolve()}"
    return spec


def _check_unreadable(what: str, bad: list[dict], log) -> None:
    if bad:
        log(f"{what}: {len(bad)} unreadable image(s) left out, e.g. " +
            "; ".join(f"{b['id']} ({b['error']})" for b in bad[:3]) +
            " (family.json lists them all under provenance.data.unreadable)")


@dataclass(frozen=True)
class SourceOptions:
    """What a data source may use besides its argument (the --data options of the same names)."""
    val_fraction: float | None = 0.2      # share of one class-folder tree held out (None: list it all as held out)
    seed: int = 0
    label_space: str = "native"           # native, or imagenet: ImageNet's 1000 classes where the source has them
    data_root: str = "data"               # where datasets without a path argument live
    download: bool = False
    synthetic_classes: int = 8
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class DataSource:
    """A --data source: `read(arg, options)` -> (training ImageSet or None for evaluation-only sources, held-out
    ImageSet[, {extension: count} of files seen but not listed]). The held-out images are split into calib and
    test by load_data; ids must be stable across calls (eval looks recorded ids up again).
    path: "required" (ARG is a path, recorded absolute), "data_root" (ARG defaults to --data-root) or "none".
    folder_classes: the classes come from folders, so each must hold images (a fixed label space need not)."""
    read: Callable
    path: str = "required"
    folder_classes: bool = False


SOURCES: dict[str, DataSource] = {}
BUILT_IN: tuple[str, ...] = ()  # set once the built-ins below are registered


def register_source(name: str, read: Callable, *, path: str = "required", folder_classes: bool = False) -> None:
    """Make `--data NAME[:ARG]` (and load_data("NAME:ARG")) read images with `read(arg, SourceOptions)`; see
    DataSource for what it returns. Raises ConfigError for a name that is not a word (letters, digits, - and _),
    a built-in's name, a `read` that cannot be called, or a bad `path` kind."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w-]*", name) or \
            path not in ("required", "data_root", "none") or not callable(read):
        raise ConfigError(f"register_source({name!r}, read, path={path!r}): give a name of letters, digits, - and _, "
                          "a callable read(arg, options), and path one of required, data_root, none")
    if name in BUILT_IN:
        raise ConfigError(f"register_source: {name!r} is a built-in source; register yours under another name")
    SOURCES[name] = DataSource(read, path, folder_classes)


def _synthetic_source(arg: str, o: SourceOptions):
    try:
        n_train = int(arg) if arg else 2000
    except ValueError:
        n_train = -1
    if not 1 <= n_train <= MAX_SYNTHETIC:  # each image is 112 x 112 x 3 bytes, held-out ones twice over
        raise DataError(f"--data synthetic:{arg}: synthetic:N takes 1 to {MAX_SYNTHETIC:,} training images")
    return synthetic(n_train, o.synthetic_classes, o.seed)


def _torchvision_source(name: str):
    return lambda arg, o: torchvision_dataset(name, arg or o.data_root, o.download, o.max_image_pixels)


register_source("synthetic", _synthetic_source, path="none")
register_source("imagefolder", lambda arg, o: image_folder(arg, o.val_fraction, o.seed, o.max_image_pixels),
                folder_classes=True)
for _name in ("cifar10", "cifar100", "imagenette"):
    register_source(_name, _torchvision_source(_name), path="data_root")


def _read_source(spec: str, options: SourceOptions):
    """--data SPEC -> (training images or None, held-out images, {extension: count} of files not listed)."""
    if not isinstance(spec, str):
        raise ConfigError(f"--data {spec!r}: give a source as text, e.g. 'imagefolder:PATH' or 'synthetic:1000'")
    if options.label_space not in ("native", "imagenet"):
        raise ConfigError(f"--label-space {options.label_space!r}: use native or imagenet")
    kind, _, arg = spec.partition(":")
    if kind not in SOURCES:
        raise DataError(f"unknown --data {spec!r}; use synthetic[:N], imagefolder:PATH, cifar10, cifar100, "
                        f"imagenette{''.join(f', {k}' for k in SOURCES if k not in BUILT_IN)}")
    if SOURCES[kind].path == "required" and not arg:
        raise ConfigError(f"--data {spec!r} needs a path: {kind}:PATH")
    got = SOURCES[kind].read(arg, options)
    if not (isinstance(got, tuple) and len(got) in (2, 3) and (got[0] is None or isinstance(got[0], ImageSet))
            and isinstance(got[1], ImageSet) and (len(got) == 2 or isinstance(got[2], dict))):
        raise DataError(f"the {kind!r} source's read() returned {type(got).__name__}; it must return (training "
                        "ImageSet or None, held-out ImageSet[, {extension: count}])")
    train, heldout, *rest = got
    return train, heldout, (rest[0] if rest else {})


BUILT_IN = tuple(SOURCES)


def heldout_listing(spec: str, *, seed: int = 0, label_space: str = "native", data_root: str = "data",
                    synthetic_classes: int = 8, max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
                    **_split_options) -> ImageSet:
    """Every image SPEC can hold out, listed, neither split nor checked: an image folder's val/ (or all of a tree
    that --val-fraction splits), a dataset's held-out part. Recorded ids are looked up here, so images added to or
    removed from the data since do not move them; other data is scored whole."""
    _, heldout, _ = _read_source(spec, SourceOptions(None, seed, label_space, data_root, False, synthetic_classes,
                                                     max_image_pixels))
    return heldout


def load_data(spec: str, *, calib_fraction: float = 0.5, val_fraction: float = 0.2, seed: int = 0,
              label_space: str = "native", data_root: str = "data", download: bool = False,
              train_per_class: int | None = None, heldout_per_class: int | None = None,
              synthetic_classes: int = 8, max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
              check_train: bool = True, log=print) -> DataSplits:
    """Parse --data SPEC into train / calib / test splits of readable images.

    The splits are made from the listing (deterministic in the options and seed), then each split keeps the
    images whose header reads within max_image_pixels (check_train=False skips reading the training images'
    headers, for callers that use only the held-out ones). The description records every option that defines
    the splits, the resolved source, the images each split holds and the unreadable ones, by id.
    Raises ConfigError for bad options, DataError for an unknown source or a class left without readable images."""
    if not (isinstance(calib_fraction, (int, float)) and 0 < calib_fraction < 1):
        raise ConfigError(f"--calib-fraction must be between 0 and 1, got {calib_fraction!r}")
    for name, value in (("seed", seed), ("synthetic_classes", synthetic_classes)):
        check_int(name, value, 0)
    for name, value in (("train_per_class", train_per_class), ("heldout_per_class", heldout_per_class),
                        ("max_image_pixels", max_image_pixels)):
        if value is not None:
            check_int(name, value, 1)
    train, heldout, not_listed = _read_source(spec, SourceOptions(val_fraction, seed, label_space, data_root, download,
                                                                  synthetic_classes, max_image_pixels))
    if not_listed:
        log(f"{sum(not_listed.values())} file(s) in the class folders are not images torchvision's ImageFolder "
            f"lists and are not used ({', '.join(f'{k} {v}' for k, v in not_listed.items())})")
    kind = spec.partition(":")[0]
    unreadable = {}
    if train is not None:
        train = limit_per_class(train, train_per_class, seed)
        if check_train:
            train, unreadable["train"] = train.readable("training")
            _check_unreadable("train", unreadable["train"], log)
            if SOURCES[kind].folder_classes:  # classes that come from folders (not a fixed label space) need images
                check_classes(train.labels, train.class_names, f"{spec} (training images)")
    heldout = limit_per_class(heldout, heldout_per_class, seed + 2)
    calib_idx, test_idx = stratified_split(heldout.labels, calib_fraction, seed + 3)
    calib, unreadable["calib"] = heldout.subset(calib_idx).readable("calib")
    test, unreadable["test"] = heldout.subset(test_idx).readable("test")
    for split in ("calib", "test"):
        _check_unreadable(split, unreadable[split], log)
    if SOURCES[kind].folder_classes:
        check_classes(np.concatenate([calib.labels, test.labels]), heldout.class_names, f"{spec} (held-out images)",
                      "add images, or raise --val-fraction if the folder is split by it")
    for split, images in (("calib", calib), ("test", test)):
        if len(images) == 0 and train is not None:  # a family needs both (an evaluation-only source may not)
            raise DataError(f"{spec}: the {split} split has no readable images ({len(heldout)} held-out images, "
                            f"--calib-fraction {calib_fraction}); add held-out images or change --calib-fraction")
    desc = {"source": spec, "resolved_source": resolve_source(spec, data_root), "label_space": label_space,
            "seed": seed, "calib_fraction": calib_fraction, "val_fraction": val_fraction,
            "train_per_class": train_per_class, "heldout_per_class": heldout_per_class,
            "synthetic_classes": synthetic_classes, "max_image_pixels": max_image_pixels,
            "data_root": str(Path(data_root).expanduser().resolve()),
            "train_images": 0 if train is None else len(train), "calib_images": len(calib), "test_images": len(test),
            "unreadable": {k: v for k, v in unreadable.items() if v}, "not_listed": not_listed}
    return DataSplits(train, calib, test, heldout.class_names, desc)


# ---- torch datasets over an ImageSet ----------------------------------------------------------------------
@dataclass
class Unreadable:
    """What a dataset returns for an image that failed to decode: the collate leaves it out and passes it on."""
    id: str
    error: str


def _read(images: ImageSet, i: int) -> torch.Tensor | Unreadable:
    try:
        return images.read(i)
    except (ImageError, OSError) as e:  # damaged data behind a readable header, or a file gone since listing
        return Unreadable(images.ids[i], str(e))


class TrainDataset(torch.utils.data.Dataset):
    """(crop, label) with crop = transform(image), or Unreadable (the collate leaves it out)."""

    def __init__(self, images: ImageSet, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = _read(self.images, i)
        return img if isinstance(img, Unreadable) else (self.transform(img), int(self.images.labels[i]))


class EvalDataset(torch.utils.data.Dataset):
    """(list of uint8 [3, r, r] per resolution, label, position, pixel digest) with the eval preprocessing of each
    r, or Unreadable. decode_scale "stage": each resolution resizes a JPEG decoded at the scale the cascade runtime
    decodes it at for that stage (`images.Encoded`), so the logits thresholds are fitted on are the ones it
    meets; "full": every resolution from the full decode. The digest is always the full decode's. pairs: (r, R)
    with R > r, whose views follow the resolutions' in the list: r from the decode at R's scale (what a cascade
    decoded once at R's scale gives stage r; decode_scale "stage" only)."""

    def __init__(self, images: ImageSet, resolutions, crop_fraction: float, decode_scale: str = "full",
                 pairs=()):
        from .preprocess import resize_center_crop, stage_min_side
        if decode_scale not in DECODE_SCALES:
            raise ConfigError(f"decode_scale {decode_scale!r}: use one of {', '.join(DECODE_SCALES)}")
        self.images, self.resolutions, self.crop_fraction = images, list(resolutions), crop_fraction
        self.decode_scale, self.pairs = decode_scale, list(pairs)
        self._resize, self._min_side = resize_center_crop, stage_min_side

    def __len__(self):
        return len(self.images)

    def _views(self, i: int) -> tuple[list[torch.Tensor], str]:
        full = self.images.read(i)
        enc = self.images.encoded(i) if self.decode_scale == "stage" else None
        sources = {1: full}  # DCT scale -> pixels

        def source(r: int) -> torch.Tensor:  # the decode stage r gets
            side = self._min_side(r, self.crop_fraction, "stage")
            scale = 1 if enc is None else enc.scale(side)
            if scale not in sources:
                sources[scale] = decode_encoded(enc, side)
            return sources[scale]
        views = [self._resize(source(r), r, self.crop_fraction) for r in self.resolutions]
        views += [self._resize(source(at), r, self.crop_fraction) for r, at in self.pairs]
        return views, pixel_digest(full)

    def __getitem__(self, i):
        try:
            views, digest = self._views(i)
        except (ImageError, OSError) as e:  # damaged data behind a readable header, or a file gone since listing
            return Unreadable(self.images.ids[i], str(e))
        return views, int(self.images.labels[i]), i, digest


def collate_skipping(batch):
    """Default collate over the readable items -> (collated or None, [Unreadable] left out)."""
    bad = [b for b in batch if isinstance(b, Unreadable)]
    good = [b for b in batch if not isinstance(b, Unreadable)]
    if not good:
        return None, bad
    return torch.utils.data.default_collate(good), bad
