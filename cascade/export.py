"""Export a cascade for deployment outside rescascade: a self-contained bundle that runs without torch, or a
Triton model repository that serves it (`export_triton`).

DIR/bundle.json     the cascade (stages, thresholds, temperatures, confidence measure, expected exit fractions),
                    the preprocessing, the class names, and every file's sha256
DIR/model.<precision>.onnx  the family's shared weights, once (profiling.export.export_shared)
DIR/patches/r<R>.<precision>.patch  each stage's and the reference's patch: its BatchNorms' scale and shift
                    (and anything else the resolution owns); with the shared model, that resolution's model,
                    checked against PyTorch. K resolutions of MobileNetV2 weigh about 1 + 0.01 K models.
DIR/MODEL/...       a pool's cascade (`pool.Pool`): each member the plan runs in a folder of its own, holding its
                    shared model and its stages' patches as above (bundle.json's "members", schema 5)
DIR/rescascade/serve/  the runtime kernel (`rescascade.serve`, copied whole): onnxruntime, numpy and Pillow
                    are all it needs
DIR/README.txt      how to run it

The directory is written beside DIR and renamed into place, so an interrupted export leaves any earlier bundle
there whole.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from rescascade.profiling.export import TOLERANCE, export_shared
from rescascade.serve.errors import ConfigError, check_bool, check_int
from rescascade.serve.fileio import sha256_file, write_json, write_text
from rescascade.serve.limits import MAX_BATCH, MAX_THREADS
from rescascade.serve.ort import unpack_patch
from rescascade.serve.preprocess_np import CROP_FRACTION, IMAGENET_MEAN, IMAGENET_STD, MAX_ASPECT
from rescascade.training.family import res_key
from rescascade.training.store import load_family, model_name, weights_id

from .config import CascadeConfig, read_config
from .runtime import check_member
from .serve.bundle import BUNDLE_FORMAT, BUNDLE_SCHEMA, FAMILY_SCHEMA, RESIZE, Bundle, bundle_members
from .serve.names import key_model, key_resolution, stage_label
from .serve.plan import plan_fields

_README = """A rescascade cascade, exported by `rescascade export` from {source}.

Stages: {stages}; reference: {reference}. Needs Python >= 3.10 with onnxruntime,
numpy and Pillow (no torch). From the directory that holds this one:

    PYTHONPATH={name} python -m rescascade.serve {name} photo.jpg   # name, probability, exit stage; exit 1 if an image failed

    import sys; sys.path.insert(0, "{name}")
    from rescascade.serve.bundle import BundleRunner
    result = BundleRunner("{name}")(["photo.jpg"])   # labels, names, probs, exit_stage, errors
    BundleRunner("{name}", reference=True)            # the reference model alone, for comparison
"""


def export_bundle(config, out, precision: str = "fp32", overwrite: bool = False, log=print) -> Path:
    """Write the bundle of `config` (a cascade.json path or a CascadeConfig; its family must be where it says)
    to the directory `out`: see the module. precision: the ONNX models' ("fp32"; "fp16" for GPUs). `out` may be
    new, empty, or an earlier export of the same cascade.json (replaced); an export of another cascade is replaced
    only with `overwrite`, and a directory holding anything an export did not write never. Returns the bundle.json
    path. Raises ConfigError (bad precision, out not usable, another export into out running), ArtifactError /
    RescascadeError (family missing or changed, export differing from PyTorch)."""
    if precision not in TOLERANCE:
        raise ConfigError(f"precision {precision!r}: choose one of {', '.join(TOLERANCE)}")
    out = _out_dir(out)
    check_bool("overwrite", overwrite)
    config = config if isinstance(config, CascadeConfig) else read_config(config)
    source = _source(config)
    with _staged(out, _bundle_files, "a bundle", source, overwrite) as tmp:
        models = _write_bundle(config, tmp, out.name, precision, log)
    log(f"wrote {out}/ (bundle.json, the shared model and {models} patches, the runtime): "
        f"PYTHONPATH={out} python -m rescascade.serve {out} IMAGE...")
    return out / "bundle.json"


def _source(config: CascadeConfig) -> str | None:
    """What an export is an export of: the cascade.json it was written from (its real path), None for a config
    never saved."""
    return str(Path(config.path).resolve()) if config.path else None


def _write_bundle(config: CascadeConfig, tmp: Path, name: str, precision: str, log) -> int:
    """The bundle's files, into the directory tmp (see the module). -> how many patches it holds."""
    pooled = config.pooled
    keys = {s.resolution for s in config.cascade.stages} | {config.reference}
    members, patch_count, doc = [], 0, None
    for k, entry in enumerate(config.members):
        model = entry.get("model") if pooled else None
        resolutions = sorted(key_resolution(key) for key in keys if key_model(key) == model)
        if not resolutions:  # a pool member the plan never runs: not deployed
            continue
        member_doc = check_member(config, k)
        doc = doc or member_doc  # the preprocessing and class names (a pool's members share them)
        fam_dir, wid = config.member_dirs[k], weights_id(member_doc)
        family, _ = load_family(fam_dir, verify=False)  # just verified
        log(f"exporting {model_name(member_doc)}'s shared model and the patches of "
            f"{', '.join(f'r{r}' for r in resolutions)} ({precision}) ...")
        shared_path, patches, meta = export_shared(family, fam_dir, wid, precision)
        folder = f"{model_name(member_doc)}/" if pooled else ""  # a pool's members side by side
        file = f"{folder}model.{precision}.onnx"
        (tmp / folder / "patches").mkdir(parents=True)
        shutil.copyfile(shared_path, tmp / file)
        shared = {"file": file, "sha256": sha256_file(tmp / file), "model": model_name(member_doc),
                  "precision": precision, "input": "input", "output": "logits",
                  "patch_bytes": len(unpack_patch(patches[resolutions[0]].read_bytes())),
                  "exporter": meta.get("exporter", "legacy"), "opset": meta.get("opset", 17)}  # exports before: legacy
        if meta.get("fallback"):
            log(f"  the shared model was exported by the legacy exporter ({meta['fallback']})")
        models = {}
        for r in resolutions:
            file = f"{folder}patches/{res_key(r)}.{precision}.patch"
            shutil.copyfile(patches[r], tmp / file)
            models[str(r)] = {"file": file, "sha256": sha256_file(tmp / file),
                              "max_abs_diff": meta["max_abs_diff"][str(r)]}
        members.append({"model": model_name(member_doc), "weights_sha256": wid,
                        "family_json_sha256": entry["family_json_sha256"], "shared": shared, "models": models})
        patch_count += len(models)
    _copy_runtime(tmp)
    prep = doc.get("preprocessing", {})
    one = members[0]
    bundle = {
        "format": BUNDLE_FORMAT, "schema_version": BUNDLE_SCHEMA if pooled else FAMILY_SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"cascade_json": _source(config), "cascade_json_sha256": sha256_file(config.path)
                   if config.path else None,
                   **({} if pooled else {"weights_sha256": one["weights_sha256"],
                                         "family_json_sha256": one["family_json_sha256"]})},
        **({"members": members} if pooled else {"shared": one["shared"], "models": one["models"]}),
        **plan_fields(config.doc),  # the plan, as cascade.json holds it (`serve.plan`)
        "profile": {k: config.doc["profile"].get(k) for k in ("backend", "precision", "batch_size", "device")},
        "preprocessing": {"resize": RESIZE, "crop_fraction": prep.get("crop_fraction", CROP_FRACTION),
                          "mean": list(prep.get("mean") or IMAGENET_MEAN),
                          "std": list(prep.get("std") or IMAGENET_STD),
                          "decode_scale": prep.get("decode_scale", "full"), "max_aspect": MAX_ASPECT},
        "class_names": list(doc["class_names"]), "num_classes": int(doc["num_classes"]),
    }
    write_json(tmp / "bundle.json", bundle)
    write_text(tmp / "README.txt", _README.format(
        source=Path(config.path).resolve() if config.path else "a CascadeConfig", name=name,
        reference=stage_label(config.reference),
        stages=" -> ".join(stage_label(s.resolution) for s in config.cascade.stages)))
    Bundle(tmp)  # reads back as the runtime will
    return patch_count


def _out_dir(out) -> Path:
    """`out` as a directory path; ConfigError for what is not a path."""
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise ConfigError(f"--out {out!r}: give the directory to write, e.g. deploy/pets")
    return Path(out)


_BUNDLE_PACKAGE = '''"""rescascade's runtime kernel alone, as a bundle carries it: `rescascade.serve`."""
'''


def _copy_runtime(dest: Path) -> None:
    """Copy the runtime kernel (the `rescascade.serve` folder, every module of it, as installed) into
    dest/rescascade/serve/, under a `rescascade` package of its own."""
    from . import serve
    (dest / "rescascade").mkdir()
    write_text(dest / "rescascade" / "__init__.py", _BUNDLE_PACKAGE)
    shutil.copytree(Path(serve.__file__).parent, dest / "rescascade" / "serve",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _foreign_files(out: Path, ours) -> list[str]:
    """Files under `out` that an export did not write (`ours(relative path)` says which it did)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if not p.is_dir() and "__pycache__" not in p.parts and not ours(p.relative_to(out)))


def _bundle_doc(bundle_json: Path) -> dict | None:
    """An earlier bundle's bundle.json, or None where there is no bundle of rescascade's."""
    try:
        doc = json.loads(bundle_json.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == BUNDLE_FORMAT else None


def _bundle_files(root: Path):
    """(`ours`, source) for a bundle at root: `ours(relative path)` says which files an export wrote there
    (bundle.json, README.txt, the models bundle.json names, the runtime's modules), source which cascade.json it
    was exported from; None where root holds no bundle."""
    doc = _bundle_doc(root / "bundle.json")
    try:
        models = {m["file"] for member in bundle_members(doc) for m in member["models"].values()} | \
            {member["shared"]["file"] for member in bundle_members(doc) if member.get("shared")}
        source = doc["source"]["cascade_json"]
    except (TypeError, KeyError, AttributeError):
        return None
    return (lambda rel: rel.parts[0] == "rescascade" or str(rel) in {"bundle.json", "README.txt", *models}), source


def _repository_files(root: Path):
    """(`ours`, source) for a Triton repository at root: models cascade and reference, each config.pbtxt,
    1/model.py and 1/bundle/ (exit counts are the user's data: not ours); None where root holds none."""
    inner = {name: _bundle_files(root / name / "1" / "bundle") for name in ("cascade", "reference")}
    if any(v is None for v in inner.values()):
        return None

    def ours(rel: Path) -> bool:
        parts = rel.parts
        if len(parts) < 2 or parts[0] not in inner:
            return False
        if len(parts) == 2:
            return parts[1] == "config.pbtxt"
        if parts[1] != "1" or len(parts) < 3:
            return False
        return parts[2] == "model.py" if len(parts) == 3 else \
            parts[2] == "bundle" and inner[parts[0]][0](Path(*parts[3:]))
    return ours, inner["cascade"][1]


@contextmanager
def _export_lock(out: Path):
    """Hold `out`'s export lock (an flock on .NAME.lock beside it, removed after): a second export into the same
    directory meanwhile stops with ConfigError instead of both succeeding and one result vanishing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"another export into {out} is running (it holds {lock}); wait for it to finish, or "
                              "export to another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not a lock file its last holder just removed
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def _staged(out: Path, files, kind: str, source: str | None, overwrite: bool):
    """Yield a new directory beside `out` to write; on success it replaces `out`, on failure it is removed and
    `out` is untouched. `out` may be new, empty, or an earlier export holding only what that export wrote
    (`files(out)`: (which files an export there wrote, the cascade.json it came from), or None if it is not
    one) of the same `source` (of another only with `overwrite`); anything else is refused with ConfigError, so
    nothing of the user's is ever deleted. The whole export holds `out`'s lock (`_export_lock`)."""
    here = Path.cwd()
    if Path(os.path.abspath(out)) in (here, *here.parents):
        raise ConfigError(f"{out} is the current directory or holds it: an export replaces its directory as a "
                          "whole; give another directory (or run from its parent)")
    with _export_lock(out):
        if out.exists() or out.is_symlink():
            if out.is_symlink() or not out.is_dir():
                raise ConfigError(f"{out} exists and is {'a symbolic link' if out.is_symlink() else 'not a directory'}"
                                  ": give a new or empty directory")
            if any(out.iterdir()):
                earlier = files(out)
                if earlier is None:
                    raise ConfigError(f"{out} is not empty and not {kind}: give a new or empty directory (an earlier "
                                      "export of the same cascade there is replaced)")
                ours, was = earlier
                foreign = _foreign_files(out, ours)
                if foreign:
                    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                    raise ConfigError(f"{out} holds files the export did not write ({shown}): move them elsewhere "
                                      "first (exit counts are drift data: keep them), or export to a new directory")
                if (was is None or was != source) and not overwrite:
                    raise ConfigError(f"{out} holds an export of another cascade ({was or 'a config never saved'}); "
                                      "pass --overwrite to replace it, or export to a new directory")
        new = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        new.chmod(0o777 & ~umask)  # mkdtemp's 0700 would keep a server running as another user out
        try:
            yield new
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
                old.rmdir()
                out.rename(old)
                try:
                    new.rename(out)
                except OSError:
                    old.rename(out)  # put the earlier export back
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                new.rename(out)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise


_CONFIG_PBTXT = """# {what} served by Triton's Python backend (model.py runs the bundle in 1/bundle/).
name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}
instance_group [ {{ count: {instances} kind: {kind} }} ]
input [
  {{ name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "PIXELS" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] optional: true }}
]
output [
  {{ name: "LABEL" data_type: TYPE_INT64 dims: [ 1 ] }},
  {{ name: "CLASS_NAME" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "PROBABILITY" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "EXIT_STAGE" data_type: TYPE_INT64 dims: [ 1 ] }},
  {{ name: "RESOLUTION" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "STAGE" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "ERROR" data_type: TYPE_STRING dims: [ 1 ] }}
]
parameters: [
  {{ key: "reference" value: {{ string_value: "{reference}" }} }},
  {{ key: "providers" value: {{ string_value: "{providers}" }} }},
  {{ key: "counts_path" value: {{ string_value: "{counts_path}" }} }}{threads}
]
"""
TRITON_DEVICES = {"cpu": ("KIND_CPU", "CPUExecutionProvider"),
                  "gpu": ("KIND_GPU", "CUDAExecutionProvider,CPUExecutionProvider")}


def export_triton(config, out, precision: str = "fp32", max_batch_size: int = 32, instances: int = 1,
                  max_queue_delay_us: int = 1000, device: str = "cpu", threads: int | None = None,
                  overwrite: bool = False, log=print) -> Path:
    """Write a Triton model repository to `out` that serves the cascade of `config` (model "cascade") and, for
    comparison, its reference model alone (model "reference"): each is a Python-backend model (`triton_model.py`
    as 1/model.py, `config.pbtxt` with dynamic batching up to max_batch_size, `instances` instances) running the
    exported bundle (1/bundle/) with ONNX Runtime on `device` ("cpu", or "gpu": the CUDA provider in GPU
    instances; Triton's Python environment then needs onnxruntime-gpu) and `threads` CPU threads per instance
    (default: every CPU; give CPUs / instances). Each instance writes its exit counts to
    cascade/exit_counts.<instance>.json (`rescascade drift` adds them up; the reference writes none). `out` may
    be new, empty, or an earlier repository of the same cascade.json (replaced; of another cascade only with
    `overwrite`); anything else is refused. Returns `out`. Raises ConfigError for bad values, and what
    `export_bundle` raises."""
    check_int("max_batch_size", max_batch_size, 1, MAX_BATCH)
    check_int("instances", instances, 1, 64)
    check_int("max_queue_delay_us", max_queue_delay_us, 0, 10_000_000)
    if threads is not None:
        check_int("threads", threads, 1, MAX_THREADS)
    if device not in TRITON_DEVICES:
        raise ConfigError(f"device {device!r}: choose one of {', '.join(TRITON_DEVICES)}")
    out = _out_dir(out)
    check_bool("overwrite", overwrite)
    config = config if isinstance(config, CascadeConfig) else read_config(config)
    with _staged(out, _repository_files, "a model repository written by rescascade", _source(config),
                 overwrite) as tmp:
        kind, providers = TRITON_DEVICES[device]
        bundle = tmp / "cascade" / "1" / "bundle"
        log(f"exporting the bundle ({precision}) ...")
        bundle.mkdir(parents=True)
        _write_bundle(config, bundle, bundle.name, precision, log=lambda s: None)
        model_py = importlib.util.find_spec("rescascade.triton_model").origin
        for name, reference in (("cascade", "false"), ("reference", "true")):
            version = tmp / name / "1"
            if name != "cascade":
                shutil.copytree(bundle, version / "bundle")
            shutil.copyfile(model_py, version / "model.py")
            what = f"The reference model {stage_label(config.reference)} of a rescascade cascade, alone," \
                if name == "reference" else \
                "A rescascade cascade, " + " -> ".join(stage_label(s.resolution) for s in config.cascade.stages) + ","
            write_text(tmp / name / "config.pbtxt", _CONFIG_PBTXT.format(
                what=what, name=name, max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                instances=instances, kind=kind, reference=reference, providers=providers,
                counts_path="" if name == "reference" else "exit_counts.{instance}.json",  # one stage: no exits to count
                threads="" if threads is None else
                f',\n  {{ key: "threads" value: {{ string_value: "{threads}" }} }}'))
    log(f"wrote the Triton model repository {out}/ (models cascade and reference): tritonserver "
        f"--model-repository {out}")
    return out
