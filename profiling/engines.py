"""What predicts at each resolution of a trained family or baseline: the backends' engines, for bulk prediction
(`train --predict-backend onnxruntime`) and the benchmarks."""
from __future__ import annotations

from pathlib import Path

from rescascade.training.family import ResolutionFamily, res_key
from rescascade.training.store import weights_id

from .backends import get_backend
from .backends.onnxruntime_backend import OnnxRuntimeEngine
from .export import cached_export


def family_predictors(family: ResolutionFamily, run_dir, wid: str, backend: str) -> dict:
    """resolution -> what predicts at it: the plain model (backend "torch"), or the backend's engine
    (an ONNX export of the plain model, cached in RUN_DIR by weights id `wid`)."""
    if backend == "torch":
        return {r: family.plain_model(r) for r in family.resolutions}
    be = get_backend(backend)
    return {r: be.open(family, run_dir, wid, r, "fp32").run for r in family.resolutions}


def independent_ids(doc: dict) -> dict[int, str]:
    """resolution -> the sha256 of that independent model's weight file (independent.json records them)."""
    return {r: doc["files"][f"models/{res_key(r)}.safetensors"] for r in doc["resolutions"]}


def onnx_predictors(models: dict, run_dir, ids: dict[int, str]) -> dict:
    """resolution -> ONNX Runtime (CPU) engine of a plain model, exported to RUN_DIR/onnx (cached by
    ids: resolution -> the model's weights sha256): the independent baseline predicts as fast as a family does."""
    engines = {}
    for r, m in models.items():
        path, _ = cached_export(lambda m=m: m, r, Path(run_dir) / "onnx" / f"{res_key(r)}.fp32.onnx", ids[r])
        engines[r] = OnnxRuntimeEngine(path, r, "cpu", "fp32", None, Path(run_dir) / "engines").run
    return engines


def onnxruntime_predictors(model, run_dir, doc: dict) -> dict:
    """`run_train(predictors=...)` on ONNX Runtime (CPU): resolution -> engine for a just-trained family, or for
    each model of an independent baseline (`model.models`), exported once and cached by weights id."""
    if doc.get("kind") == "independent":
        models = {r: model.models[res_key(r)] for r in doc["resolutions"]}
        return onnx_predictors(models, run_dir, independent_ids(doc))
    return family_predictors(model, run_dir, weights_id(doc), "onnxruntime")
