"""The Triton Inference Server model that serves an exported cascade: `rescascade export --format triton` copies
this file as MODEL/1/model.py next to the bundle (MODEL/1/bundle/), for Triton's Python backend.

A Triton ensemble runs every model it names; a cascade must skip the stages an image does not need, which is
what the Python backend's own code can do (triton-inference-server/server #3459, #7589, #8288). Each `execute`
gets the requests the dynamic batcher grouped, runs them as one batch through `BundleRunner` (ONNX Runtime,
numpy, Pillow: no torch in Triton's Python environment) and answers each request with its rows.

Inputs (one of them per request): IMAGE, TYPE_STRING [1]: an encoded image file (JPEG, PNG, ...); PIXELS,
TYPE_UINT8 [H, W, 3]: decoded RGB. Outputs per image: LABEL (INT64, -1 where the image failed), CLASS_NAME,
PROBABILITY (FP32, of the answer), EXIT_STAGE (INT64, index of the answering stage), RESOLUTION (INT32, its
resolution), STAGE (its name: the model it runs and its resolution, "mobilenet_v2/r96"), ERROR (empty, or what is
wrong with that image). Parameters (config.pbtxt): reference ("true": the
reference model alone), providers (comma-separated ONNX Runtime providers), threads, counts_path (where the exit
counts are written, for `rescascade drift`; relative paths are inside the model's directory; {instance} becomes
the instance's name, so instances do not overwrite each other's counts; a reloaded or restarted model goes on
counting into the file of its plan, and writes a new file, never over one of another plan). Exits per stage
are also Triton metrics: rescascade_stage_inputs_total and rescascade_stage_exits_total{model, stage}, stage
the stage's name.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

COUNTS_EVERY_S = 10.0  # write the counts file at most this often (and at unload)
WARMUP_MAX = 64        # warm up at batch 1 and at the max batch size up to this


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils
        self.pb = pb_utils
        version_dir = Path(args["model_repository"]) / args["model_version"]
        sys.path.insert(0, str(version_dir / "bundle"))  # the bundle's own copy of the runtime
        from rescascade.serve.bundle import BundleRunner
        from rescascade.serve.counts import continue_counts
        from rescascade.serve.names import key_resolution

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        providers = [p.strip() for p in params.get("providers", "CPUExecutionProvider").split(",") if p.strip()]
        threads = int(params["threads"]) if params.get("threads") else None
        batch = min(max(1, int(config.get("max_batch_size", 1))), WARMUP_MAX)
        self.runner = BundleRunner(version_dir / "bundle", providers=providers, threads=threads,
                                   reference=params.get("reference", "false") == "true", warmup=sorted({1, batch}),
                                   batch_size=max(1, int(config.get("max_batch_size", 1))))
        self.resolutions = [key_resolution(key) for key, _ in self.runner.stages]
        counts = params.get("counts_path", "").replace("{instance}", args["model_instance_name"])
        self.counts_path = None if not counts else (Path(counts) if Path(counts).is_absolute()
                                                     else Path(args["model_repository"]) / counts)
        if self.counts_path is not None:  # a reload or restart goes on counting, never overwrites earlier counts
            self.runner.counts, self.counts_path = continue_counts(self.counts_path, self.runner.counts)
        self._saved_at = time.monotonic()
        self._metrics(pb_utils, args["model_name"])

    def _metrics(self, pb_utils, model: str) -> None:
        """Counters per stage (Triton's custom metrics, where this Triton has them)."""
        self.reached = self.exited = None
        try:
            inputs = pb_utils.MetricFamily("rescascade_stage_inputs_total", "images that reached a cascade stage",
                                           pb_utils.MetricFamily.COUNTER)
            exits = pb_utils.MetricFamily("rescascade_stage_exits_total", "images answered by a cascade stage",
                                          pb_utils.MetricFamily.COUNTER)
        except AttributeError:  # a Triton before custom metrics: the counts file still has them
            return
        self._families = (inputs, exits)  # a family must outlive its metrics
        names = self.runner.plan.stage_names
        self.reached = [inputs.Metric({"model": model, "stage": name}) for name in names]
        self.exited = [exits.Metric({"model": model, "stage": name}) for name in names]

    def _inputs(self, request) -> list:
        image = self.pb.get_input_tensor_by_name(request, "IMAGE")
        if image is not None:
            return [bytes(v) for v in image.as_numpy().reshape(-1)]
        pixels = self.pb.get_input_tensor_by_name(request, "PIXELS")
        if pixels is not None:
            return list(pixels.as_numpy())
        raise ValueError("give IMAGE (encoded image bytes) or PIXELS (uint8 [H, W, 3])")

    def execute(self, requests):
        items, spans, failed = [], [], {}
        for k, request in enumerate(requests):
            try:
                rows = self._inputs(request)
            except ValueError as e:
                failed[k] = str(e)
                rows = []
            spans.append((len(items), len(rows)))
            items += rows
        before = (list(self.runner.counts.reached), list(self.runner.counts.exited))
        result = self.runner(items)  # no rows at all: empty answers
        responses = []
        for k, (start, n) in enumerate(spans):
            if k in failed:
                responses.append(self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(failed[k])))
                continue
            rows = slice(start, start + n)
            labels = result.labels[rows]
            ok = labels >= 0
            prob = np.where(ok, result.probs[rows].max(axis=1, initial=-np.inf, where=ok[:, None]), np.nan)
            stage = result.exit_stage[rows]
            names = [result.class_names[c] if c >= 0 else "" for c in labels]
            errors = [result.errors.get(start + i, "") for i in range(n)]
            outputs = {"LABEL": labels.astype(np.int64), "PROBABILITY": prob.astype(np.float32),
                       "EXIT_STAGE": stage.astype(np.int64),
                       "RESOLUTION": np.array([self.resolutions[s] if s >= 0 else 0 for s in stage], np.int32),
                       "STAGE": np.array([name or "" for name in result.exit_names[rows]], dtype=object),
                       "CLASS_NAME": np.array(names, dtype=object), "ERROR": np.array(errors, dtype=object)}
            responses.append(self.pb.InferenceResponse(
                output_tensors=[self.pb.Tensor(name, value.reshape(n, 1)) for name, value in outputs.items()]))
        self._count(before)
        return responses

    def _count(self, before) -> None:
        counts = self.runner.counts
        if self.reached is not None:
            for k in range(len(self.resolutions)):
                self.reached[k].increment(counts.reached[k] - before[0][k])
                self.exited[k].increment(counts.exited[k] - before[1][k])
        if self.counts_path is not None and time.monotonic() - self._saved_at >= COUNTS_EVERY_S:
            self._save()

    def _save(self) -> None:
        """Write the counts; a failure (a read-only repository) is logged, never the requests' failure."""
        self._saved_at = time.monotonic()
        try:
            self.runner.counts.save(self.counts_path)
        except Exception as e:  # noqa: BLE001 (read-only, full, replaced by a directory: never the requests' failure)
            self.pb.Logger.log_warn(f"rescascade: cannot write the exit counts to {self.counts_path}: {e}")

    def finalize(self) -> None:
        if self.counts_path is not None:
            self._save()
