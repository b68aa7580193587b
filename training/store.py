"""The family directory on disk: family.json, shared.safetensors, patches/rNNN.safetensors.

Like a PEFT adapter, a patch file is tiny and lives apart from the shared weights; shared + one patch is
the plain model's state dict for that resolution.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import platform
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbones import SOURCES, resolve_arch
from rescascade.serve.errors import ArtifactError, ConfigError, RescascadeError
from .family import CLASSIFIER_KINDS, PATCH_KINDS, ResolutionFamily, check_resolutions, res_key
from rescascade.serve.fileio import atomic_path, check_schema, read_json, sha256_file, write_json
from rescascade.serve.images import DECODE_SCALES
from .params import count_parameters
from .preprocess import CROP_FRACTION, IMAGENET_MEAN, IMAGENET_STD

SCHEMA_VERSION = 1
REQUIRED = ("arch", "width_mult", "num_classes", "resolutions", "patch", "classifier", "files")


def patch_path(run_dir, resolution: int) -> Path:
    return Path(run_dir) / "patches" / f"{res_key(resolution)}.safetensors"


def library_versions() -> dict:
    import numpy
    import torchvision
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torchvision": torchvision.__version__, "numpy": numpy.__version__}
    try:
        import timm
        versions["timm"] = timm.__version__
    except ImportError:
        pass
    return versions


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    return sha256_file(path)


def save_family(family: ResolutionFamily, run_dir, class_names=None, provenance: dict | None = None,
                extra: dict | None = None, write_doc: bool = True, decode_scale: str = "full") -> dict:
    """Write the family directory; family.json goes last and records every file's sha256 (write_doc=False: the
    weight files only, and the doc returned for the caller to write when the rest of the run is done).
    decode_scale: how the cascade runtime decodes a JPEG for each stage, which the family's predictions must
    match (images.DECODE_SCALES: "stage", at the smallest DCT scale that covers the stage's resize; "full")."""
    run_dir = Path(run_dir)
    files = {"shared.safetensors": _save_tensors(family.shared_state_dict(), run_dir / "shared.safetensors")}
    for r in family.resolutions:
        files[f"patches/{res_key(r)}.safetensors"] = _save_tensors(family.patch_state_dict(r), patch_path(run_dir, r))
    doc = {
        "schema_version": SCHEMA_VERSION,
        **family.config,
        "class_names": list(class_names) if class_names is not None else
                       [str(i) for i in range(family.num_classes)],
        "shared": {"convolutions": True, "classifier": family.classifier_kind == "shared",
                   "bn_statistics": family.patch_kind == "scale_bias"},
        "preprocessing": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "crop_fraction": CROP_FRACTION,
                          "decode_scale": decode_scale,
                          "eval": "resize shorter side to round(r / crop_fraction), center-crop r, "
                                  "scale to [0,1], normalize",
                          "train": "RandomResizedCrop + horizontal flip"},
        "parameters": count_parameters(family),
        "provenance": {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       "versions": library_versions(), **(provenance or {})},
        "files": files,
        **(extra or {}),
    }
    if write_doc:
        write_json(run_dir / "family.json", doc)
    return doc


def model_name(doc: dict) -> str:
    """A family's model, as a cascade's stages name it: its arch, with its width where not 1 (family.json's content
    -> "mobilenet_v2_x0.35", "resnet50", "tf_efficientnet_lite0")."""
    width = float(doc.get("width_mult", 1.0))
    return doc["arch"] if width == 1.0 else f"{doc['arch']}_x{width:g}"


def read_family_json(run_dir) -> dict:
    path = Path(run_dir) / "family.json"
    if Path(run_dir).is_file():
        raise ArtifactError(f"{run_dir} is a file; give the family directory written by `rescascade train`")
    if not path.exists() and (Path(run_dir) / "independent.json").exists():
        raise ArtifactError(f"{run_dir} holds K independent models (train --independent, the baseline), not a "
                            "resolution family; info, profile, build and eval take a family directory")
    if not path.exists() and any((Path(run_dir) / f).exists() for f in ("shared.safetensors",
                                                                          "checkpoints/last.pt")):  # written last
        raise ArtifactError(f"{run_dir} is an unfinished run of `rescascade train` (stopped before family.json was "
                            "written): re-run the same train command with --resume")
    doc = read_json(path, "a family directory's family.json (written by `rescascade train`)")
    check_schema(doc, path, "family", SCHEMA_VERSION, REQUIRED)
    source = doc.get("source", "torchvision")
    if not isinstance(doc["arch"], str) or source not in SOURCES:
        raise ArtifactError(f"{path}: arch must be a model name and source one of {', '.join(SOURCES)} (found "
                            f"{doc['arch']!r}, {source!r}); the file was edited or damaged: restore it or re-run "
                            "`rescascade train`")
    try:
        resolve_arch(f"{source}:{doc['arch']}")
    except ConfigError as e:
        raise ArtifactError(f"{path}: this family's model cannot be built here: {e}") from None
    check_resolutions(doc["resolutions"])
    validate(doc, path)
    return doc


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(doc: dict, path) -> None:
    """The fields every stage reads, with the values they may take; raises RescascadeError naming the field."""
    def check(ok: bool, what: str) -> None:
        if not ok:
            raise ArtifactError(f"{path}: {what}; the file was edited or damaged: restore it or re-run `rescascade train`")
    check(_number(doc["width_mult"]) and doc["width_mult"] > 0, "width_mult must be a positive number")
    n = doc["num_classes"]
    check(isinstance(n, int) and not isinstance(n, bool) and n >= 2, "num_classes must be an integer >= 2")
    names = doc.get("class_names")
    check(isinstance(names, list) and len(names) == n and all(isinstance(c, str) for c in names),
          f"class_names must list the {n} class names")
    check(doc["patch"] in PATCH_KINDS, f"patch must be one of {', '.join(PATCH_KINDS)}")
    check(doc["classifier"] in CLASSIFIER_KINDS, f"classifier must be one of {', '.join(CLASSIFIER_KINDS)}")
    files = doc["files"]
    check(isinstance(files, dict) and files and all(isinstance(k, str) and isinstance(v, str) and len(v) == 64
                                                    for k, v in files.items()), "files must map names to sha256s")
    prep = doc.get("preprocessing", {})
    check(isinstance(prep, dict), "preprocessing must be an object")
    for key in ("mean", "std"):
        if key in prep:
            v = prep[key]
            check(isinstance(v, list) and len(v) == 3 and all(_number(x) for x in v) and
                  (key == "mean" or min(v) > 0), f"preprocessing.{key} must be 3 numbers" +
                  (" > 0" if key == "std" else ""))
    if "crop_fraction" in prep:
        check(_number(prep["crop_fraction"]) and 0 < prep["crop_fraction"] <= 1,
              "preprocessing.crop_fraction must be in (0, 1]")
    check(prep.get("decode_scale", "full") in DECODE_SCALES,
          f"preprocessing.decode_scale must be one of {', '.join(DECODE_SCALES)}")


def _load_tensors(path: Path, expected_sha: str | None, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: family.json lists it ({what}); copy the whole family directory "
                            "or re-run `rescascade train`")
    if expected_sha is not None and sha256_file(path) != expected_sha:
        raise ArtifactError(f"{path} does not match the sha256 recorded in family.json: it changed after training; "
                            "restore it or re-run `rescascade train`")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file ({e}); restore it or re-run train") from None


FAMILY_INPUTS = ("family.json", "predictions", "patches", "onnx", "shared.safetensors")  # what commands read


def family_files(run_dir) -> list[Path]:
    """The files of a family directory that rescascade's commands read (family.json, weights, patches,
    predictions, the ONNX export cache, profiles): an output must never be written over one of them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for entry in run_dir.iterdir():
        if entry.name in FAMILY_INPUTS or entry.name.startswith("profile"):
            out += [entry] if entry.is_file() else [f for f in entry.rglob("*") if f.is_file()]
    return out


def verify_files(run_dir, doc: dict) -> None:
    """Every weight file family.json lists is there with the sha256 it records (RescascadeError naming the first that
    is not)."""
    for name, sha in doc["files"].items():
        path = Path(run_dir) / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: family.json lists it; copy the whole family directory or re-run "
                                "`rescascade train`")
        if sha256_file(path) != sha:
            raise ArtifactError(f"{path} does not match the sha256 recorded in family.json: it changed after training; "
                                "restore it or re-run `rescascade train`")


def load_family(run_dir, verify: bool = True) -> tuple[ResolutionFamily, dict]:
    """Load a family directory, validating schema, architecture, resolutions, files and shapes."""
    run_dir = Path(run_dir)
    doc = read_family_json(run_dir)
    try:
        family = ResolutionFamily.from_config(doc)
    except ConfigError as e:
        raise ArtifactError(f"{run_dir / 'family.json'}: {e}") from None
    files = doc["files"]
    shared_sha = files.get("shared.safetensors") if verify else None
    try:
        family.load_shared_state_dict(_load_tensors(run_dir / "shared.safetensors", shared_sha, "shared weights"),
                                      what=str(run_dir / "shared.safetensors"))
        for r in family.resolutions:
            name = f"patches/{res_key(r)}.safetensors"
            path = run_dir / name
            family.load_patch_state_dict(r, _load_tensors(path, files.get(name) if verify else None,
                                                          f"the patch of resolution {r}"), what=str(path))
    except RescascadeError as e:
        built, here = doc.get("source_version"), family.arch_.library_version
        if built is None or built == here or isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"{e} (the family was built with {family.arch_.source} {built}, this is {here}: "
                            f"install {family.arch_.source}=={built})") from None
    return family.eval(), doc


def weights_id(doc: dict) -> str:
    """The identity of a family's weights: a sha256 over the sha256 of every weight file. Predictions and
    profiles record it; it stays the same when family.json gains figures (top-1) after training."""
    return hashlib.sha256(json.dumps(doc["files"], sort_keys=True).encode()).hexdigest()


def family_sha256(run_dir) -> str:
    """The identity of a family: the sha256 of its family.json (which records every weight file's sha256)."""
    return sha256_file(Path(run_dir) / "family.json")
