"""The stage loop every runtime runs (`CascadeRunner` on torch, `BundleRunner` on ONNX Runtime alone): decode what
each stage needs, make its input, infer, decide who exits, record the timings and the counts.

What differs between runtimes is only the `Engine`: the layout of decoded pixels, how a stage's input is made
from them and how the model runs. The plan (`plan.Plan`: stages, thresholds, confidence, decode plan,
preprocessing, class names) is read from a cascade.json or a bundle.json by the same function.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Protocol

import numpy as np

from .counts import ExitCounts
from .exits import Answers, CascadeResult, StageTiming, decode_stage, exit_step
from .images import Encoded
from .names import key_model, key_resolution
from .plan import Plan
from .preprocess_np import stage_min_side


class Engine(Protocol):
    """A runtime's side of the loop. `convert`: what an `Encoded` image's decoded uint8 [H, W, 3] pixels become
    (None: they stay arrays). `inputs(pixels)` -> a function (rows, resolution, new pixels since its last call) ->
    the model input of those rows at that resolution: it may keep what it made from the pixels (e.g. one batch
    copied to a GPU) between the stages of one run. `infer(key, x)` -> logits float32 [rows, C] of the stage
    keyed `key` (`names.stage_key`: its resolution in a family's plan, MODEL/rR in a pool's)."""
    convert: Callable | None

    def inputs(self, pixels: list) -> Callable: ...

    def infer(self, key: int | str, x) -> np.ndarray: ...


class MemberEngines:
    """The loop's engine of a pool's plan: the stage MODEL/rR runs on model MODEL's engine at resolution R
    (`engines`: model -> a family's engine keyed by resolution). The members preprocess alike (the pool checks it),
    so one member's engine makes every stage's input."""

    def __init__(self, engines: dict):
        self.engines = engines

    def _any(self):
        return next(e for e in self.engines.values() if e.sessions)

    @property
    def convert(self):
        return self._any().convert

    def inputs(self, pixels: list) -> Callable:
        return self._any().inputs(pixels)

    def infer(self, key: str, x) -> np.ndarray:
        return self.engines[key_model(key)].infer(key_resolution(key), x)


def run_plan(items: list, errors: dict[int, str], plan: Plan, engine: Engine,
             counts: ExitCounts | None) -> CascadeResult:
    """Run `plan` on loaded inputs (`exits.load_inputs`: decoded pixels in the engine's layout, `Encoded` images,
    or None where an input failed, its error in `errors`), recording exits and inputs into `counts` (None: not
    counted). Stage 1 runs on every readable input; the confident ones exit; only the rest are decoded (where
    the next stage needs a larger scale) and sent on. -> CascadeResult in input order."""
    t_start = time.perf_counter()
    n = len(items)
    pixels = [None if item is None or isinstance(item, Encoded) else item for item in items]  # the current decode
    answers = Answers.empty(n, len(plan.class_names))
    active = np.array([i for i in range(n) if items[i] is not None], dtype=np.int64)
    history: list[np.ndarray] = []  # log-probs of the stages run so far, rows aligned with `active`
    timings = []
    make_input = engine.inputs(pixels)
    for k, (key, threshold) in enumerate(plan.stages):
        r = key_resolution(key)
        t = StageTiming(key)
        timings.append(t)
        if len(active) == 0:
            break
        t0 = time.perf_counter()
        side = stage_min_side(plan.decode_at or r, plan.crop_fraction, plan.decode_scale)
        kept, t.decoded = decode_stage(items, pixels, active, side, errors, engine.convert)
        if len(kept) < len(active):  # rows whose data failed to decode: drop them, and their history
            still = np.isin(active, kept)
            history = [h[still] for h in history]
            active = kept
        t1 = time.perf_counter()
        t.decode_s = t1 - t0
        if len(active) == 0:
            break
        x = make_input(active, r, k == 0 or t.decoded > 0)
        t2 = time.perf_counter()
        logits = engine.infer(key, x)
        t3 = time.perf_counter()
        t.rows, t.calls = len(active), 1
        last = k == len(plan.stages) - 1
        active, history = exit_step(logits, k, -math.inf if last else threshold, plan.temperatures.get(key, 1.0),
                                    plan.measure, plan.combined, history, active, answers, counts)
        t.preprocess_s, t.inference_s = t2 - t1, t3 - t2
        t.decide_s = time.perf_counter() - t3
    if counts is not None:
        counts.inputs += n
        counts.errors += len(errors)
    return CascadeResult(answers.labels, answers.probs, answers.exit_stage, answers.confidence, errors, timings,
                         time.perf_counter() - t_start, list(plan.class_names), plan.stage_names)
