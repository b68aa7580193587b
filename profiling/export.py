"""Export one resolution of a family to ONNX: the plain model at that resolution (shared weights + its patch).

The graph is the arch's plain model in eval mode, input `input` [batch, 3, r, r] (spatial size static, batch dynamic
so ONNX Runtime serves any batch and TensorRT builds one static-shape engine per batch size from it), output
`logits`. The exporter is the one torch recommends, torch.export-based (`torch.onnx.export(dynamo=True)`, with
onnxscript); the legacy TorchScript exporter exports only where it fails, and says why (`onnx_export`; the meta
file records which one). BatchNorm is folded by the tools, not by walking a model's layout: the exporter's optimizer
folds each BatchNorm into the convolution before it, and ONNX Runtime's and TensorRT's graph optimizers fuse
whatever is left. Each export is checked numerically against the PyTorch model; past the tolerance it fails loudly.
Exports are cached in RUN_DIR/onnx/ keyed by the family's weights id.

`export_shared` writes the family as deployment stores it (K models for the price of one): one shared model whose
BatchNorms read their per-channel scale and shift from an external file, and per resolution a patch file of those
bytes (scale = gamma / sqrt(var + eps), shift = beta - mean * scale, the BatchNorm folded to an affine: 2 numbers a
channel instead of 4), plus any other tensor the resolution owns (a per-resolution classifier), packed losslessly
(`serve.ort.pack_patch`: ~0.82x) and followed by a trailer naming the resolution and the family's weights id (the
shared model's metadata records the id too), so a patch of another resolution or family is told apart. ONNX Runtime
reads a stage's unpacked patch as that external file (`serve.ort.stage_session`) and folds it into the convolutions
as before.
"""
from __future__ import annotations

import copy
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from rescascade.serve.errors import ArtifactError, ConfigError
from rescascade.serve.fileio import atomic_path, sha256_file, write_json
from rescascade.training.family import ResolutionFamily, res_key

from rescascade.serve.ort import PATCH_LOCATION, WEIGHTS_KEY, pack_patch, session_options, stage_session

EXPORT_VERSION = 4  # 2: any arch, BatchNorm folded by the exporter; 3: patches and shared model name their family;
# 4: patches packed
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}  # max |logit difference|, relative to max(1, max |logit|)


EXPORTERS = ("dynamo", "legacy")
EXPORTER_ENV = "RESCASCADE_ONNX_EXPORTER"  # "legacy" skips torch.export (the suite: 0.5-1.8 s an export, not 5-24)


def exporter() -> str:
    """The exporter to try first: "dynamo" (torch.export-based, the one torch recommends; the default) or "legacy"
    (TorchScript-based, deprecated since torch 2.9), from the environment variable RESCASCADE_ONNX_EXPORTER.
    ConfigError for another value."""
    name = os.environ.get(EXPORTER_ENV, "dynamo")
    if name not in EXPORTERS:
        raise ConfigError(f"{EXPORTER_ENV}={name!r}: choose {' or '.join(EXPORTERS)} (unset: dynamo)")
    return name


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def onnx_export(model: nn.Module, example: torch.Tensor, path: Path, finish: Callable[[Path], object],
                dynamic: tuple[int, ...] = (0,), keep_batchnorms: bool = False) -> tuple[object, dict]:
    """Export model (eval mode) to ONNX at `path`: input "input" shaped like `example` [N, 3, H, W], its `dynamic`
    axes left free (0: batch; 2, 3: height and width), output "logits". Then `finish(path)` rewrites and checks the
    file against PyTorch (raising ArtifactError past the tolerance) and its result is returned.

    torch.export (`dynamo=True`, which torch recommends) exports first; where it fails, or its file fails `finish`,
    the legacy TorchScript exporter exports again and a RuntimeWarning says why. keep_batchnorms: every BatchNorm
    stays a node with its parameters named as in the state dict (constants folded, but no optimizer, which would
    fold them into the convolutions), for `export_shared`. -> (finish's result, {"exporter": "dynamo" | "legacy",
    "fallback": why legacy or None, "opset": N})."""
    reason = f"{EXPORTER_ENV}=legacy"
    if exporter() == "dynamo":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), str(path), dynamo=True, optimize=not keep_batchnorms,
                                  verbose=False, external_data=False,  # one file, no PATH.data beside it
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_shapes=({axis: torch.export.Dim.AUTO for axis in dynamic},))
            fixed = _tidy(path, dynamic, fold=keep_batchnorms)
            if fixed:  # torch.export specialised an axis the model's code fixes (e.g. a view to batch 1)
                raise ArtifactError(f"torch.export fixed input axes {fixed} that must stay free")
            return finish(path), {"exporter": "dynamo", "fallback": None, "opset": _opset(path)}
        except Exception as e:  # noqa: BLE001 (whatever torch.export or onnxscript raise, the legacy path follows)
            reason = f"torch.export failed: {_first_line(e)}"
            warnings.warn(f"exported {type(model).__name__} with the legacy TorchScript ONNX exporter: {reason}",
                          RuntimeWarning, stacklevel=2)
    names = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, do_constant_folding=not keep_batchnorms,
                          input_names=["input"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"input": {axis: names[axis] for axis in dynamic},
                                        "logits": {0: "batch"} if 0 in dynamic else {}})
    return finish(path), {"exporter": "legacy", "fallback": reason, "opset": _opset(path)}


def _tidy(path: Path, dynamic: tuple[int, ...], fold: bool) -> list[int]:
    """Rewrite torch.export's ONNX file as small as the legacy exporter's, which a deployed bundle ships: without the
    per-node metadata it records (stack traces, module scopes: ~12 % of MobileNetV2's file), the intermediate shapes
    and the all-zero biases it gives convolutions without one; where `fold`, with its constant subgraphs folded
    (onnxscript's constant folding alone: its optimizer would also fold the BatchNorms `export_shared` keeps).
    -> the axes of `dynamic` its input fixes."""
    import onnxscript.optimizer  # here: 1 s to import, which only torch.export's files need
    model = onnx.load(str(path))
    if fold:
        onnxscript.optimizer.fold_constants(model)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        if node.op_type == "Conv" and len(node.input) == 3 and node.input[2] in inits and \
                not numpy_helper.to_array(inits[node.input[2]]).any():
            del node.input[2]  # the zero bias torch.export gives a convolution without one
    onnxscript.optimizer.remove_unused_nodes(model)  # and the initializers no node reads
    del model.graph.value_info[:]  # intermediate shapes: ONNX Runtime infers them again
    onnx.save(model, str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [axis for axis in dynamic if dims[axis].HasField("dim_value")]


def _opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def check_onnx(path: Path, reference: nn.Module, resolution: int, precision: str, n: int = 4) -> float:
    """Max |ONNX - PyTorch| logits on random inputs (ONNX Runtime CPU); raises past the tolerance."""
    return check_session(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), reference, resolution,
                         precision, n)


def check_session(sess, reference: nn.Module, resolution: int, precision: str, n: int = 4) -> float:
    """Max |ONNX Runtime session - PyTorch model| logits on n random inputs [n, 3, r, r]; ArtifactError past the
    tolerance (TOLERANCE, relative to max(1, max |logit|))."""
    torch.manual_seed(0)
    x = torch.randn(n, 3, resolution, resolution)
    with torch.no_grad():
        want = reference(x).float().numpy()
    feed = x.numpy().astype(np.float16 if precision == "fp16" else np.float32)
    got = sess.run(None, {"input": feed})[0].astype(np.float32)
    diff = float(np.abs(got - want).max())
    limit = TOLERANCE[precision] * max(1.0, float(np.abs(want).max()))
    if not np.isfinite(diff) or diff > limit:
        raise ArtifactError(f"ONNX export of resolution {resolution} ({precision}) differs from PyTorch by {diff:.3g} "
                            f"(tolerance {limit:.3g}); this is a bug in export, please report it")
    return diff


def export_model(model: nn.Module, resolution: int, out: Path, precision: str = "fp32") -> tuple[float, dict]:
    """Export a copy of a plain model to OUT (atomically, `onnx_export`) and check it against the model; returns
    (the max |logit difference|, which exporter made it: `onnx_export`'s info). Raises ArtifactError past the
    tolerance."""
    reference = model.eval()  # what the export must match
    exported = copy.deepcopy(reference)
    example = torch.randn(1, 3, resolution, resolution)
    if precision == "fp16":
        exported = exported.half()
        example = example.half()
    with atomic_path(out) as tmp:
        return onnx_export(exported, example, tmp, lambda path: check_onnx(path, reference, resolution, precision))


def export_resolution(family: ResolutionFamily, run_dir, resolution: int, weights_id: str,
                      precision: str = "fp32") -> tuple[Path, dict]:
    """ONNX file for one resolution (cached in RUN_DIR/onnx); returns (path, info with max_abs_diff)."""
    if precision not in TOLERANCE:
        raise ArtifactError(f"precision {precision!r} is not one of {', '.join(TOLERANCE)}")
    return cached_export(lambda: family.plain_model(resolution), resolution,
                         Path(run_dir) / "onnx" / f"{res_key(resolution)}.{precision}.onnx", weights_id, precision)


def cached_export(make_model, resolution: int, out: Path, weights_id: str,
                  precision: str = "fp32") -> tuple[Path, dict]:
    """OUT, exported from make_model() unless OUT's meta file says it holds these weights (weights_id) already;
    returns (path, info with max_abs_diff and onnx_sha256)."""
    meta_path = out.with_suffix(".json")
    meta = _cache_hit(meta_path, weights_id, [out])
    if meta is not None:
        return out, meta
    diff, how = export_model(make_model(), resolution, out, precision)
    meta = _cache_record(meta_path, weights_id, [out], resolution=resolution, precision=precision,
                         max_abs_diff=diff, batch="dynamic", **how)
    return out, meta


def _cache_hit(meta_path: Path, weights_id: str, files: list[Path]) -> dict | None:
    """An export's meta file, where it says `files` hold an export of these weights (weights_id) by this exporter,
    each unchanged since it was checked (its sha256); None otherwise (export again)."""
    if not (meta_path.is_file() and all(f.is_file() for f in files)):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):  # damaged: a cache miss, exported again
        return None
    if not isinstance(meta, dict):
        return None
    same = meta.get("weights_sha256") == weights_id and meta.get("export_version") == EXPORT_VERSION and \
        meta.get("sha256") == {f.name: sha256_file(f) for f in files}
    return meta if same else None


def _cache_record(meta_path: Path, weights_id: str, files: list[Path], **info) -> dict:
    """Write the meta file `_cache_hit` reads: the weights, the exporter's version, info, every file's sha256 (the
    first one's also as onnx_sha256, which TensorRT's engine cache keys on)."""
    sha = {f.name: sha256_file(f) for f in files}
    meta = {"export_version": EXPORT_VERSION, "weights_sha256": weights_id, **info, "sha256": sha,
            "onnx_sha256": sha[files[0].name]}
    write_json(meta_path, meta)
    return meta


def cached_shared(run_dir, weights_id: str, resolutions, precision: str = "fp32") \
        -> tuple[Path, dict[int, Path], dict] | None:
    """`export_shared`'s result where RUN_DIR/onnx holds it for these weights (weights_id) and every resolution,
    each file unchanged since it was checked against PyTorch; None where it must export. Needs no family in
    memory: a runtime on ONNX Runtime opens its sessions from these files alone."""
    out, meta_path, patches = _shared_paths(run_dir, resolutions, precision)
    meta = _cache_hit(meta_path, weights_id, [out, *patches.values()])
    return None if meta is None else (out, patches, meta)


def _shared_paths(run_dir, resolutions, precision: str) -> tuple[Path, Path, dict[int, Path]]:
    """Where `export_shared` caches a family's export: (RUN_DIR/onnx/shared.<precision>.onnx, its meta file,
    {resolution: RUN_DIR/onnx/r<R>.<precision>.patch}). ArtifactError for an unknown precision."""
    if precision not in TOLERANCE:
        raise ArtifactError(f"precision {precision!r} is not one of {', '.join(TOLERANCE)}")
    folder = Path(run_dir) / "onnx"
    return (folder / f"shared.{precision}.onnx", folder / f"shared.{precision}.json",
            {r: folder / f"{res_key(r)}.{precision}.patch" for r in resolutions})


def export_shared(family: ResolutionFamily, run_dir, weights_id: str,
                  precision: str = "fp32") -> tuple[Path, dict[int, Path], dict]:
    """The family as one shared ONNX model and one patch file per resolution (see the module), cached in
    RUN_DIR/onnx/shared.<precision>.onnx and RUN_DIR/onnx/r<R>.<precision>.patch. Every resolution's session
    (`serve.ort.stage_session`) is checked against its PyTorch plain model. Returns (shared model path,
    {resolution: patch path}, info with max_abs_diff per resolution).
    Raises ArtifactError past the tolerance, or for an arch whose BatchNorm parameters the exporter renamed."""
    cached = cached_shared(run_dir, weights_id, family.resolutions, precision)
    if cached is not None:
        return cached
    out, meta_path, patches = _shared_paths(run_dir, family.resolutions, precision)
    top = max(family.resolutions)
    model = _distinct_batchnorms(family.plain_model(top))
    example = torch.randn(1, 3, top, top)
    if precision == "fp16":
        model, example = copy.deepcopy(model).half(), example.half()
    patch_names = set(family.patch_state_dict(top))

    def split_and_check(path: Path) -> tuple[dict, dict]:
        """The exported file made the shared model, every resolution's session checked -> (diffs, packed patches)."""
        layout = _split_patch(path, patch_names, weights_id)
        itemsizes = {entry[4].itemsize for entry in layout}
        itemsize = itemsizes.pop() if len(itemsizes) == 1 else 1  # one element size: shuffled by it
        diffs, packed = {}, {}
        for r in family.resolutions:
            data = _patch_bytes(layout, family.patch_state_dict(r))
            sess = stage_session(str(path), data, r, session_options(), ["CPUExecutionProvider"])
            diffs[str(r)] = check_session(sess, family.plain_model(r), r, precision)
            packed[r] = pack_patch(data, itemsize, r, weights_id)
        return diffs, packed

    with atomic_path(out) as tmp:
        # height and width free: one file serves every resolution
        (diffs, packed), how = onnx_export(model, example, tmp, split_and_check, dynamic=(0, 2, 3),
                                           keep_batchnorms=True)
        for r, path in patches.items():  # only once every resolution checked
            with atomic_path(path) as ptmp:
                ptmp.write_bytes(packed[r])
    meta = _cache_record(meta_path, weights_id, [out, *patches.values()], precision=precision,
                         max_abs_diff=diffs, **how)
    return out, patches, meta


def _distinct_batchnorms(model: nn.Module) -> nn.Module:
    """The model with every BatchNorm tensor made unlike any other (its first element a number of its own): the
    exporter merges equal initializers under one name (an untrained model's are all ones and zeros), and the
    shared model must keep each BatchNorm's own names. Their values do not matter: the patches replace them."""
    ident = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for tensor in (module.weight, module.bias, module.running_mean, module.running_var):
                    if tensor is None:
                        continue
                    ident += 1
                    tensor.fill_(1.0)
                    tensor[0] = ident + 1  # small integers: exact in fp16 too
    return model


def _split_patch(path: Path, owned: set[str], weights_id: str) -> list[tuple]:
    """Rewrite the ONNX model at `path` (recording weights_id in its metadata) so that every tensor a resolution
    owns (`owned`: its patch's state-dict names) is read from the external file PATCH_LOCATION: each BatchNorm's scale and bias (its mean and variance
    become shared zeros and ones), and any other owned initializer as it is. -> the patch layout [(name, kind, eps,
    state-dict prefix or name, numpy dtype, shape, offset)]."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    layout, offset, consumed = [], 0, set()

    def place(name: str, kind: str, eps: float, key: str) -> None:
        nonlocal offset
        t = inits[name]
        offset += -offset % 64  # aligned, as ONNX Runtime maps external data
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        shape = tuple(t.dims)
        layout.append((name, kind, eps, key, dtype, shape, offset))
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        t.ClearField("raw_data")
        for field in ("float_data", "int32_data", "double_data"):
            t.ClearField(field)
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for k, v in (("location", PATCH_LOCATION), ("offset", str(offset)), ("length", str(nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        offset += nbytes

    constants: dict[tuple, str] = {}
    made = []  # the nodes that make them, placed first
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        _, scale, bias, mean, var = node.input
        prefix = scale.rsplit(".", 1)[0]
        names = [f"{prefix}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
        if [scale, bias, mean, var] != names or not set(names) <= owned & set(inits):
            raise ArtifactError(f"the exporter renamed BatchNorm parameters ({scale!r}): this arch cannot be "
                                "exported as one shared model; please report it")
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        place(scale, "scale", eps, prefix)
        place(bias, "shift", eps, prefix)
        consumed |= set(names)
        dtype = helper.tensor_dtype_to_np_dtype(inits[mean].data_type)
        for i, value in ((3, 0.0), (4, 1.0)):  # zeros and ones made at load (ConstantOfShape: no bytes stored)
            key = (value, dtype.str, tuple(inits[mean].dims))
            if key not in constants:
                name = constants[key] = f"rescascade.{'ones' if value else 'zeros'}.{dtype.name}.{key[2][0]}"
                model.graph.initializer.append(numpy_helper.from_array(np.array(key[2], np.int64), name + ".shape"))
                made.append(helper.make_node("ConstantOfShape", [name + ".shape"], [name],
                                             value=numpy_helper.from_array(np.array([value], dtype))))
            node.input[i] = constants[key]
    for name in sorted(owned - consumed):
        if name.endswith("num_batches_tracked"):
            continue
        if name not in inits:
            raise ArtifactError(f"{name!r}, a tensor each resolution owns, is not a tensor of the exported model; "
                                "this arch cannot be exported as one shared model; please report it")
        place(name, "tensor", 0.0, name)
    helper.set_model_props(model, {WEIGHTS_KEY: weights_id})  # which family's weights: its patches name it too
    nodes = made + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for node in model.graph.node for i in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, str(path))
    return layout


def _patch_bytes(layout: list[tuple], patch: dict[str, torch.Tensor]) -> bytes:
    """One resolution's patch bytes, as the shared model reads them: its tensors in `layout`'s order and offsets
    (little-endian). A BatchNorm's
    scale is stored times sqrt(1 + eps), since the shared model's BatchNorm divides by sqrt(1 + eps) (variance 1)."""
    out = bytearray()
    for _, kind, eps, key, dtype, shape, offset in layout:
        if kind == "tensor":
            value = patch[key].detach().double()
        else:
            g, b = patch[f"{key}.weight"].detach().double(), patch[f"{key}.bias"].detach().double()
            mean, var = patch[f"{key}.running_mean"].detach().double(), patch[f"{key}.running_var"].detach().double()
            scale = g / torch.sqrt(var + eps)
            value = scale * math.sqrt(1 + eps) if kind == "scale" else b - mean * scale
        out += b"\0" * (offset - len(out))
        out += value.numpy().astype(dtype.newbyteorder("<")).reshape(shape).tobytes()
    return bytes(out)
