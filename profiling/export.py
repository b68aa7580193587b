"""Export one resolution of a family to ONNX: the plain model at that resolution (shared weights + its patch).

The graph is the arch's plain model in eval mode, input `input` [batch, 3, r, r] (spatial size static, batch dynamic
so ONNX Runtime serves any batch and TensorRT builds one static-shape engine per batch size from it), output
`logits`. BatchNorm is folded by the tools, not by walking a model's layout: the exporter folds each BatchNorm into
the convolution before it in eval mode, and ONNX Runtime's and TensorRT's graph optimizers fuse whatever is left.
Each export is checked numerically against the PyTorch model; past the tolerance it fails loudly. Exports are cached
in RUN_DIR/onnx/ keyed by the family's weights id.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rescascade.training.errors import ArtifactError
from rescascade.training.family import ResolutionFamily, res_key
from rescascade.training.fileio import atomic_path, sha256_file, write_json

EXPORT_VERSION = 2  # 2: any arch, BatchNorm folded by the exporter
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}  # max |logit difference|, relative to max(1, max |logit|)


def _export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=17,
                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # the TorchScript-based exporter: fast and dependable for plain CNNs
            torch.onnx.export(model, (example,), str(path), dynamo=False, **kwargs)
        except (TypeError, RuntimeError, AttributeError):  # newer torch without it: the torch.export path
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["input"],
                              output_names=["logits"], dynamic_shapes=({0: batch},))


def check_onnx(path: Path, reference: nn.Module, resolution: int, precision: str, n: int = 4) -> float:
    """Max |ONNX - PyTorch| logits on random inputs (ONNX Runtime CPU); raises past the tolerance."""
    import onnxruntime as ort
    torch.manual_seed(0)
    x = torch.randn(n, 3, resolution, resolution)
    with torch.no_grad():
        want = reference(x).float().numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = x.numpy().astype(np.float16 if precision == "fp16" else np.float32)
    got = sess.run(None, {"input": feed})[0].astype(np.float32)
    diff = float(np.abs(got - want).max())
    limit = TOLERANCE[precision] * max(1.0, float(np.abs(want).max()))
    if not np.isfinite(diff) or diff > limit:
        raise ArtifactError(f"ONNX export of resolution {resolution} ({precision}) differs from PyTorch by {diff:.3g} "
                            f"(tolerance {limit:.3g}); this is a bug in export, please report it")
    return diff


def export_model(model: nn.Module, resolution: int, out: Path, precision: str = "fp32") -> float:
    """Export a copy of a plain model to OUT (atomically) and check it against the model; returns the max |logit
    difference|. Raises ArtifactError past the tolerance."""
    reference = model.eval()  # what the export must match
    exported = copy.deepcopy(reference)
    example = torch.randn(1, 3, resolution, resolution)
    if precision == "fp16":
        exported = exported.half()
        example = example.half()
    with atomic_path(out) as tmp:
        _export(exported, example, tmp)
        return check_onnx(tmp, reference, resolution, precision)


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
    returns (path, info with max_abs_diff)."""
    meta_path = out.with_suffix(".json")
    if out.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("weights_sha256") == weights_id and meta.get("export_version") == EXPORT_VERSION and \
                meta.get("onnx_sha256") == sha256_file(out):  # a file changed since it was checked is exported again
            return out, meta
    diff = export_model(make_model(), resolution, out, precision)
    meta = {"export_version": EXPORT_VERSION, "weights_sha256": weights_id, "resolution": resolution,
            "precision": precision, "max_abs_diff": diff, "opset": 17, "batch": "dynamic",
            "onnx_sha256": sha256_file(out)}
    write_json(meta_path, meta)
    return out, meta

