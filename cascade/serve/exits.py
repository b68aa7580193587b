"""A stage's exit decision and what a cascade run returns, shared by both runtimes (`CascadeRunner` on torch,
`rescascade.serve.bundle.BundleRunner` on ONNX Runtime alone): plain numpy, no torch import.

The decision calls the same confidence functions the optimizer used on stored logits, so a threshold means the
same thing when a cascade is built and when it is served.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .confidence import combine, confidence, log_probs
from .counts import ExitCounts
from .errors import ConfigError, RescascadeError, check_int
from .images import Encoded, ImageError
from .limits import MAX_BATCH


@dataclass
class StageTiming:
    """What one stage of a run did: rows it classified, inference calls, rows it decoded, and seconds spent
    decoding, preprocessing, in inference and deciding. stage: its key (its resolution in a family's plan, MODEL/rR
    in a pool's: `names.stage_key`)."""
    stage: int | str
    rows: int = 0
    calls: int = 0
    decoded: int = 0            # rows decoded at this stage (0 where it reuses the last stage's decode)
    decode_s: float = 0.0
    preprocess_s: float = 0.0
    inference_s: float = 0.0
    decide_s: float = 0.0


@dataclass
class CascadeResult:
    labels: np.ndarray          # [N] predicted class index (-1 where the input failed)
    probs: np.ndarray           # [N, C] probabilities of the answering stage (NaN rows where failed)
    exit_stage: np.ndarray      # [N] index of the answering stage (-1 where failed)
    confidence: np.ndarray      # [N] confidence at the answering stage
    errors: dict[int, str] = field(default_factory=dict)   # input index -> what went wrong
    stage_timings: list[StageTiming] = field(default_factory=list)
    wall_s: float = 0.0
    class_names: list[str] = field(default_factory=list)   # the family's, index -> name
    stage_names: list[str] = field(default_factory=list)   # the stages', in order: "MODEL/rR" (`names`)

    @property
    def names(self) -> list[str | None]:
        """[N] the predicted class names (None where the input failed)."""
        return [self.class_names[k] if k >= 0 else None for k in self.labels]

    @property
    def exit_names(self) -> list[str | None]:
        """[N] the name of the stage that answered each input (None where the input failed)."""
        return [self.stage_names[k] if k >= 0 else None for k in self.exit_stage]


@dataclass
class Answers:
    labels: np.ndarray       # [N] (-1: no answer yet)
    probs: np.ndarray        # [N, C]
    exit_stage: np.ndarray   # [N]
    confidence: np.ndarray   # [N]

    @classmethod
    def empty(cls, n: int, num_classes: int) -> "Answers":
        return cls(np.full(n, -1, dtype=np.int64), np.full((n, num_classes), np.nan, dtype=np.float32),
                   np.full(n, -1, dtype=np.int64), np.full(n, np.nan))


def exit_step(logits: np.ndarray, k: int, threshold: float, temperature: float, measure: str, combined: bool,
              history: list[np.ndarray], active: np.ndarray, answers: Answers, counts: ExitCounts | None = None):
    """Stage k's decision on its logits (rows aligned with `active`): the confident rows get their answers,
    the rest go on; `counts` (when given) records the stage's confidences and exits. -> (rows still active,
    log-probabilities of the stages run so far for those rows). The profile times this very function as the
    stage's decision cost."""
    lp = log_probs(logits, temperature)
    if combined:
        history = history + [lp]
        lp = combine(history) if len(history) > 1 else lp
    conf = confidence(lp, measure)
    done = np.ones(len(active), dtype=bool) if threshold == -math.inf else conf >= threshold  # the last answers all
    rows = active[done]
    answers.labels[rows] = lp[done].argmax(-1)
    answers.probs[rows] = np.exp(lp[done])
    answers.exit_stage[rows] = k
    answers.confidence[rows] = conf[done]
    if combined:
        history = [h[~done] for h in history]
    if counts is not None:
        counts.add_stage(k, conf, done)
    return active[~done], history


def decision_step(batch: int, num_classes: int):
    """A stage's decision on random [batch, num_classes] logits as a no-argument function, for the profiler to time
    (`run_profile(decision_step=...)`): temperature log-softmax, the free ensemble with one earlier stage,
    confidence, exit mask, writing the answers: the dearest path a build can choose; it does not depend on the
    resolution."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(batch, num_classes)).astype(np.float32)
    earlier = [rng.normal(size=(batch, num_classes)).astype(np.float32)]
    active = np.arange(batch)
    answers = Answers.empty(batch, num_classes)
    counts = ExitCounts.for_cascade([96, 128], "max_prob", num_classes, "timed")
    return lambda: exit_step(logits, 1, 0.5, 1.3, "max_prob", True, earlier, active, answers, counts)


def in_batches(run: Callable[[list], CascadeResult], items: list, batch_size: int) -> CascadeResult:
    """`run` (a list of inputs -> CascadeResult) on consecutive batches of at most batch_size inputs, the results
    joined in input order (errors keyed by input index, stage timings added up): a runtime holds the files,
    decodes and model inputs of one batch at a time, so its memory is set by the batch size, not by how many
    inputs it is given."""
    if len(items) <= batch_size:
        return run(items)
    parts = [run(items[s:s + batch_size]) for s in range(0, len(items), batch_size)]
    timings = [StageTiming(t.stage) for t in max((p.stage_timings for p in parts), key=len)]
    for part in parts:
        for total, t in zip(timings, part.stage_timings):
            for key in ("rows", "calls", "decoded", "decode_s", "preprocess_s", "inference_s", "decide_s"):
                setattr(total, key, getattr(total, key) + getattr(t, key))
    starts = np.cumsum([0] + [len(p.labels) for p in parts])
    return CascadeResult(np.concatenate([p.labels for p in parts]), np.concatenate([p.probs for p in parts]),
                         np.concatenate([p.exit_stage for p in parts]), np.concatenate([p.confidence for p in parts]),
                         {int(start) + i: e for start, p in zip(starts, parts) for i, e in p.errors.items()},
                         timings, sum(p.wall_s for p in parts), parts[0].class_names, parts[0].stage_names)


def load_inputs(images: Sequence, max_pixels: int, to_pixels: Callable) -> tuple[list, dict[int, str]]:
    """A runtime's inputs, one by one: paths are read, encoded bytes become `Encoded` (header checked, decoded
    stage by stage), anything else goes through `to_pixels` (the runtime's own decoded layout; ValueError for
    what it refuses) -> (items, or None where an input failed; input index -> its error). A missing, corrupt or
    oversized input fails itself only."""
    out, errors = [], {}
    for i, item in enumerate(images):
        try:
            if isinstance(item, (str, os.PathLike)):
                if not str(item):
                    raise ImageError("an empty path: give the image file's path")
                item = Path(item).read_bytes()
            out.append(Encoded(item, max_pixels) if isinstance(item, (bytes, bytearray, memoryview))
                       else to_pixels(item))
        except (OSError, ValueError) as e:
            out.append(None)
            errors[i] = error_text(e)
    return out, errors


def decode_stage(items: list, pixels: list, active: np.ndarray, min_side: int | None, errors: dict[int, str],
                 convert: Callable | None = None) -> tuple[np.ndarray, int]:
    """Decode a stage's active encoded inputs (`Encoded`) at the scale min_side needs, keeping the
    last decode where it has that scale; decoded inputs in `items` pass as they are. pixels[i] becomes row i's
    current pixels (uint8 tensors [3, H, W] if `tensors`, else arrays [H, W, 3]). -> (the rows still active: a
    row whose data fails to decode gets its error in `errors`, how many rows were decoded)."""
    keep, decoded = [], 0
    for i in active:
        item = items[i]
        if isinstance(item, Encoded):
            try:
                now = item.pixels(min_side) if convert is None else item.view(min_side, convert)
            except (OSError, ValueError) as e:  # damaged data behind a readable header
                errors[int(i)] = error_text(e)
                continue
            if now is not pixels[i]:
                pixels[i], decoded = now, decoded + 1
        keep.append(i)
    return np.array(keep, dtype=np.int64), decoded


def error_text(e: Exception) -> str:
    """One line for an input that failed: what is wrong with it. rescascade's own errors (`ImageError`, ...) and
    the machine's (a file that cannot be read) say it in words; another library's exception keeps its type's
    name, the only hint of where it came from."""
    if isinstance(e, OSError) and e.strerror and e.filename:  # the machine's answer, not Python's repr of it
        return f"cannot read {e.filename}: {e.strerror}"
    text = str(e).splitlines()[0][:200] if str(e).strip() else "unreadable"
    return text if isinstance(e, RescascadeError) else f"{type(e).__name__}: {text}"


def warmup_sizes(warmup) -> bool | list[int]:
    """A runtime's `warmup` argument checked: True, False, or the batch sizes (sorted, unique) to warm up at.
    ConfigError otherwise."""
    if warmup is True or warmup is False:
        return warmup
    if isinstance(warmup, (str, bytes)) or not hasattr(warmup, "__iter__"):
        raise ConfigError(f"warmup {warmup!r}: give True, False or batch sizes such as [1, 32]")
    return sorted({check_int("warmup", b, 1, MAX_BATCH) for b in warmup})
