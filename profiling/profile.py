"""`rescascade profile`: per-resolution latency of a family on this device -> profile.csv + profile.json (§2).

For every (resolution, batch size): build/warm the engine (build time recorded), time inference with the
shared protocol, and time separately what else a cascade stage pays at that resolution: the preprocessing
(resize a decoded uint8 source image to r, crop, normalize) on the backend's device, and the runtime's decision
step. Per batch size it also times the two parts of moving images that differ between stages: the upload (stack
the decoded images into one batch on the device), which the runtime does once per batch and which is included in
preprocess_ms, and the gather (pick the rows still running) that every later stage pays instead. Timing runs in
rounds over all configurations (round-robin), so a burst of noise on a shared machine lands on every configuration
a little instead of on one configuration entirely. Rows are merged into profile.csv atomically: re-running a
configuration replaces its row.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rescascade.serve.errors import ConfigError, RescascadeError, check_int
from rescascade.serve.fileio import atomic_path, check_schema, output_file, read_json, write_json
from rescascade.serve.images import DECODE_SCALES, DEFAULT_MAX_PIXELS, jpeg_scale
from rescascade.serve.limits import MAX_BATCH, MAX_THREADS, default_threads
from rescascade.serve.preprocess_np import IMAGENET_MEAN, IMAGENET_STD, preprocess_rows
from rescascade.training.config import parse_size
from rescascade.training.preprocess import (CROP_FRACTION, channels_last_batch, eval_resize_size, preprocess,
                                            stage_min_side)
from rescascade.training.progress import progress
from rescascade.training.store import family_sha256, load_family, weights_id

from .backends import get_backend
from .decode import DECODE_COLUMNS, time_decode
from .measure import (Protocol, after, cpu_timer, cuda_timer, device_key, fingerprint, run_protocol,
                      summarize, torch_threads)

PROFILE_SCHEMA = 1
KEY = ["backend", "precision", "resolution", "batch_size"]
TIMES = ["median_ms", "preprocess_ms", "overhead_ms", "upload_ms", "gather_ms"]  # what the cost model reads
# source_size: the decoded image a row's preprocessing started from (the stage's DCT scale of served_size);
# served_size: the size of the images to be served (run_profile's source_size), one per (backend, precision)
COLUMNS = KEY + ["median_ms", "mean_ms", "std_ms", "p90_ms", "p99_ms", "min_ms", "cv", "n_iters", "per_image_ms",
                 "preprocess_ms", "preprocess_per_image_ms", "overhead_ms", "upload_ms", "gather_ms", "source_size",
                 "served_size", "threads", "build_s", "smoke", "measured_at"]


SOURCE_POOL_BYTES = 64 << 20  # more than a CPU's last-level cache


def source_pool(source_size: tuple[int, int]) -> list[torch.Tensor]:
    """Decoded-like uint8 images [3, H, W] in channels-last memory (as decode_image returns them), more bytes in
    all than the caches hold: cycling through them, every timed batch starts cold, as in the runtime."""
    h, w = source_size
    n = -(-SOURCE_POOL_BYTES // (h * w * 3))
    return [im.permute(2, 0, 1) for im in torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8)]


def cycle_batches(pool: list[torch.Tensor], batch: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive, endlessly repeated batches of b images from the pool (repeated to b images if it is smaller)."""
    if batch > len(pool):
        pool = pool * -(-batch // len(pool))
    return (pool[s:s + batch] for s in itertools.cycle(range(0, len(pool) - batch + 1, batch)))


def time_preprocess(resolution: int, batch: int, pool: list[torch.Tensor], device: str, protocol: Protocol,
                    threads: int | None = None, between=None) -> np.ndarray:
    """Median cost of turning b decoded images into the model input at r on `device`, the way the runtime does
    it (batched in channels-last memory, resized, normalized) with the torch threads it uses next to this
    backend. `between`, untimed, runs before each timed step: the stage's inference, which in the runtime comes
    between two batches' preprocessing (timed back to back, preprocessing measured 1.3-2x less than the runtime
    paid at batch 1 to 4)."""
    batches = cycle_batches(pool, batch)

    def work():
        return preprocess(channels_last_batch(next(batches), device).permute(0, 3, 1, 2), resolution)
    step = after(between, (cuda_timer if device == "cuda" else cpu_timer)(work))
    with torch_threads(threads):
        return run_protocol(step, protocol)


def time_numpy_preprocess(resolution: int, batch: int, pool: list[torch.Tensor], crop_fraction: float,
                          protocol: Protocol, threads: int | None = None, between=None) -> np.ndarray:
    """Median cost of turning b decoded images into the model input at r as the ONNX Runtime CPU engine does
    (`serve.preprocess_np.preprocess_rows` over a pool of `threads` workers, as `serve.ort_engine.OrtEngine`): no
    upload and no gather, each stage reads the decoded arrays. `between` as in `time_preprocess`."""
    arrays = [im.permute(1, 2, 0).numpy() for im in pool]
    batches = cycle_batches(arrays, batch)
    with ThreadPoolExecutor(threads or default_threads()) as workers:
        def work():
            return preprocess_rows(next(batches), range(batch), resolution, crop_fraction, IMAGENET_MEAN,
                                   IMAGENET_STD, workers)
        return run_protocol(after(between, cpu_timer(work)), protocol)


def time_upload(batch: int, pool: list[torch.Tensor], device: str, protocol: Protocol, threads: int | None = None,
                between=None) -> tuple[np.ndarray, np.ndarray]:
    """(upload, gather) times of a batch: stacking b decoded images into the runtime's one channels-last batch on
    `device` (once per batch: the first stage's preprocessing includes it), and index_select of the rows still
    running from that batch (every later stage; timed on all b rows, the most a later stage picks)."""
    batches = cycle_batches(pool, batch)
    timer = cuda_timer if device == "cuda" else cpu_timer
    sources = []

    def upload():
        sources.append(channels_last_batch(next(batches), device))
        del sources[:-1]  # keep only the batch just uploaded (the gather reads it)
    rows = torch.arange(batch, device=device).flip(0)  # every row, reordered: a gather, not a contiguous slice
    with torch_threads(threads):
        up = run_protocol(after(between, timer(upload)), protocol)
        gather = run_protocol(after(between, timer(lambda: sources[-1].index_select(0, rows))), protocol)
    return up, gather


def _as_list(values, name: str) -> list:
    """One value or a sequence of them, as a list (ConfigError for anything else, e.g. a string)."""
    if isinstance(values, int) and not isinstance(values, bool):
        return [values]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"--{name.replace('_', '-')} {values!r}: give integers, e.g. (1, 32)")
    return list(values)


def time_decision(decision_step, batch: int, num_classes: int, protocol: Protocol, between=None) -> np.ndarray:
    """A stage's decision on [b, C] logits: `decision_step(b, C)` builds it (the cascade runtime's own function,
    handed down, since the runtime lives above this layer). `between`, untimed, runs before each step: an
    inference, which precedes every decision in the runtime (back to back, the decision measured 2-4x less than
    the runtime paid)."""
    return run_protocol(after(between, cpu_timer(decision_step(batch, num_classes))), protocol)


def _source_size(given, doc: dict, family) -> tuple[int, int]:
    """(height, width) of the decoded image preprocessing is timed on: `given` ((width, height) or "WxH", as
    `build --source-size`), else the held-out images' typical size recorded at training, else round(top
    resolution / 0.875) square."""
    if given is not None:
        w, h = _size(given, "--source-size")
        return h, w
    recorded = doc.get("provenance", {}).get("data", {}).get("source_size")
    if recorded:
        return tuple(int(v) for v in recorded)
    side = eval_resize_size(max(family.resolutions))
    return side, side


def decode_path(profile_csv: Path) -> Path:
    """Where the decode rows of a profile live: beside it, profile.csv -> profile_decode.csv."""
    return profile_csv.with_name(profile_csv.stem + "_decode.csv")


@dataclass
class Profile:
    """A family's measured costs: `table` has one row per (backend, precision, resolution, batch size), times in
    ms (median_ms per batch, preprocess_ms, overhead_ms: the decision, upload_ms, gather_ms, percentiles, n_iters);
    `decode` one per (source size, resolution): the ms per image of the JPEG decode that stage does
    (profiling/decode.py; None for a profile without it); `meta` records the family's weights sha256, the device
    fingerprint and the protocol."""
    table: pd.DataFrame
    meta: dict
    path: Path
    decode: pd.DataFrame | None = None

    @classmethod
    def load(cls, path) -> "Profile":
        """profile.csv (or a family directory holding one) and its profile.json, validated; RescascadeError
        when missing or damaged."""
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"give the path of a profile.csv or of its family directory, got {type(path).__name__}")
        path = Path(path)
        if path.is_dir():
            path = path / "profile.csv"
        if not path.is_file():
            raise RescascadeError(f"profile {path} not found; run `rescascade profile RUN_DIR` first")
        meta_path = path.with_suffix(".json")
        meta = read_json(meta_path, "the profile.json written beside profile.csv by `rescascade profile`")
        check_schema(meta, meta_path, "profile", PROFILE_SCHEMA, ("weights_sha256", "device"))
        try:
            df = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise RescascadeError(f"{path} is not a readable CSV ({e}); re-run `rescascade profile`") from None
        missing = [c for c in KEY + ["median_ms", "preprocess_ms"] if c not in df.columns]
        if missing:
            raise RescascadeError(f"{path} lacks column(s) {', '.join(missing)}; re-run `rescascade profile`")
        for column, low in (("resolution", 1), ("batch_size", 1), *((c, 0) for c in TIMES if c in df.columns)):
            values = pd.to_numeric(df[column], errors="coerce")
            bad = ~(np.isfinite(values) & (values >= low))
            if column in ("upload_ms", "gather_ms"):  # profiles from before these columns leave them empty
                bad &= df[column].notna()
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise RescascadeError(f"{path}: {column} {df[column].iloc[row]} in row {row + 2} is not a number >= {low}; "
                                      "the file was edited or damaged: re-run `rescascade profile`")
            df[column] = values
        df["resolution"], df["batch_size"] = df["resolution"].astype(int), df["batch_size"].astype(int)
        df["smoke"] = df["smoke"].astype(bool) if "smoke" in df.columns else False  # profiles before the column: measured
        recorded = "x".join(str(v) for v in meta["source_size"]) if meta.get("source_size") else None
        if "served_size" not in df.columns:  # profiles before the column: the size profile.json names
            df["served_size"] = recorded
        df["served_size"] = df["served_size"].where(df["served_size"].notna(), recorded)
        return cls(df, meta, path, _read_decode(decode_path(path)))


def _read_decode(path: Path) -> pd.DataFrame | None:
    """profile_decode.csv, validated (None when there is none)."""
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise RescascadeError(f"{path} is not a readable CSV ({e}); re-run `rescascade profile`") from None
    if "decoded_for" not in df.columns:  # profiles from before the column timed each stage's own decode only
        df["decoded_for"] = df["resolution"]
    missing = [c for c in DECODE_COLUMNS if c not in df.columns and c != "preprocess_ms"]
    if missing:
        raise RescascadeError(f"{path} lacks column(s) {', '.join(missing)}; re-run `rescascade profile`")
    for column, low in (("source_width", 1), ("source_height", 1), ("resolution", 1), ("decoded_for", 1), ("scale", 1),
                        ("median_ms", 0)):
        values = pd.to_numeric(df[column], errors="coerce")
        bad = ~(np.isfinite(values) & (values >= low))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise RescascadeError(f"{path}: {column} {df[column].iloc[row]} in row {row + 2} is not a number >= {low}; "
                                  "the file was edited or damaged: re-run `rescascade profile`")
        df[column] = values if column == "median_ms" else values.astype(int)
    bad = ~df.scale.isin((1, 2, 4, 8)) | ~df.decode_scale.isin(DECODE_SCALES) | ~df.smoke.astype(str).isin(
        ("True", "False"))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise RescascadeError(f"{path}: row {row + 2} has scale {df.scale.iloc[row]}, decode_scale "
                              f"{df.decode_scale.iloc[row]!r}, smoke {df.smoke.iloc[row]!r} (scale 1, 2, 4 or 8; "
                              f"decode_scale {' or '.join(DECODE_SCALES)}); the file was edited or damaged: re-run "
                              "`rescascade profile`")
    df["smoke"] = df.smoke.astype(str) == "True"
    return df


def read_profile(path) -> tuple[pd.DataFrame, dict]:
    """profile.csv (or a family directory holding one) and its profile.json, validated: (table, meta)."""
    profile = Profile.load(path)
    return profile.table, profile.meta

def run_profile(run_dir, backend: str = "onnxruntime", precision: str = "fp32", batch_sizes=(1,),
                resolutions=None, threads: int | None = None, protocol: Protocol | None = None, out=None,
                source_size=None, log=print, *, decision_step, decode_sizes=None) -> pd.DataFrame:
    """Time every (resolution, batch size) of the family in RUN_DIR on `backend`, round-robin under `protocol`,
    and write RUN_DIR/profile.csv + profile.json (or `out`): one row per pair with the median and percentiles, in
    ms per batch, of inference, preprocessing, upload, gather and the decision.

    decision_step: (batch size, classes) -> a no-argument function running one stage's decision, timed as the
    decision cost (the cascade runtime's `rescascade.runtime.decision_step`). Preprocessing is timed on the source
    image (source_size: (width, height) or "WxH" of the images to be served, as `build --source-size`; default the
    held-out images' typical size) as each stage decodes it. decode_sizes: more (width, height) of JPEGs whose
    per-stage decode is timed into profile_decode.csv, beside the source size's. Smoke rows (a protocol marked
    smoke) never replace measured ones. Raises RescascadeError for resolutions outside the family, batch sizes
    outside 1..MAX_BATCH, a source size of more pixels than the runtime decodes, an unusable backend or a damaged
    profile beside it. Returns the rows written."""
    protocol = protocol or Protocol()
    family, doc = load_family(run_dir)
    wid = weights_id(doc)
    engine_backend = get_backend(backend)
    if resolutions is not None:
        resolutions = [check_int("resolutions", r, 1) for r in _as_list(resolutions, "resolutions")]
    resolutions = list(resolutions or family.resolutions)
    bad = [r for r in resolutions if r not in family.resolutions]
    if bad:
        raise ConfigError(f"resolution(s) {bad} are not in the family {list(family.resolutions)}")
    batch_sizes = sorted({check_int("batch_sizes", b, 1, MAX_BATCH) for b in _as_list(batch_sizes, "batch_sizes")})
    if not batch_sizes:
        raise ConfigError("--batch-sizes is empty: give at least one, e.g. 1,32")
    if threads is not None:
        check_int("threads", threads, 1, MAX_THREADS)
    if not isinstance(protocol, Protocol):
        raise ConfigError(f"protocol must be a Protocol (e.g. Protocol(min_seconds=0.5)), got "
                          f"{type(protocol).__name__}")
    device = engine_backend.device
    threads = threads or (default_threads() if device == "cpu" else None)
    given_size, source_size = source_size is not None, _source_size(source_size, doc, family)
    if source_size[0] * source_size[1] > DEFAULT_MAX_PIXELS:
        raise ConfigError(f"--source-size {source_size[1]}x{source_size[0]}: {source_size[0] * source_size[1]:,} "
                          f"pixels is more than the runtime decodes ({DEFAULT_MAX_PIXELS:,}, its max_image_pixels); "
                          "give the size your images have")
    prep = doc.get("preprocessing", {})
    crop_fraction, decode_scale = prep.get("crop_fraction", CROP_FRACTION), prep.get("decode_scale", "full")
    if isinstance(decode_sizes, str):
        decode_sizes = decode_sizes.split(",")
    if decode_sizes is not None and not isinstance(decode_sizes, (list, tuple)):
        raise ConfigError(f"decode_sizes {decode_sizes!r}: give (width, height) pairs or 'WxH' strings")
    if decode_sizes is None:  # a family whose held-out images were given decoded serves no files by default
        decode_sizes = [tuple(source_size[::-1])] if prep.get("held_out_files", True) or given_size else []
    else:
        decode_sizes = list(dict.fromkeys(map(_size, decode_sizes)))
        if not decode_sizes:
            raise ConfigError("--decode-sizes is empty: give at least one, e.g. 500x375")
        # the source size too: the preprocessing of the other sizes is priced relative to it
        decode_sizes = list(dict.fromkeys([tuple(source_size[::-1])] + decode_sizes))
    for w, h in decode_sizes:
        if w * h > DEFAULT_MAX_PIXELS:
            raise ConfigError(f"--decode-sizes {w}x{h}: {w * h:,} pixels is more than the runtime decodes "
                              f"({DEFAULT_MAX_PIXELS:,}, its max_image_pixels); give the sizes your images have")
    if out is not None and (not isinstance(out, (str, os.PathLike)) or not str(out)):
        raise ConfigError(f"--out {out!r}: give the profile.csv to write (or its directory)")
    out = Path(out) if out else Path(run_dir) / "profile.csv"
    if out.is_dir():
        out = out / "profile.csv"
    for path in (out, out.with_suffix(".json"), decode_path(out)):
        output_file(path)  # before the measuring: an output that cannot be written fails now
    fp = fingerprint(threads)
    old = None
    if out.is_file():
        old, meta = read_profile(out)
        if meta["weights_sha256"] != wid:
            raise RescascadeError(f"{out} profiles another family (weights {meta['weights_sha256'][:12]}, this one "
                                  f"{wid[:12]}); write this profile elsewhere with --out")
        if device_key(meta["device"]) != device_key(fp):
            raise RescascadeError(f"{out} was measured on another device ({meta['device'].get('cpu')}, "
                                  f"gpu {meta['device'].get('gpu')}); profiles of different devices go in different "
                                  "files: pass --out")
    combos = [(r, b) for r in resolutions for b in batch_sizes]
    served = f"{source_size[1]}x{source_size[0]}"
    if old is not None:  # one served size per (backend, precision): rows this run keeps must be of its size
        rest = old[(old.backend == backend) & (old.precision == precision) & (old.served_size != served)]
        kept = sorted({(int(r), int(b)) for r, b in zip(rest.resolution, rest.batch_size)} - set(combos))
        if kept:
            raise ConfigError(
                f"{out} holds {backend} {precision} rows timed for {', '.join(sorted(set(rest.served_size.astype(str))))}"
                f" images ({', '.join(f'r{r} batch {b}' for r, b in kept[:4])}{' ...' if len(kept) > 4 else ''}); this "
                f"run times {served}: profile every one of them again (--batch-sizes "
                f"{','.join(str(b) for b in sorted({b for _, b in kept} | set(batch_sizes)))}, every resolution) so "
                "the file holds one source size, or write to another --out")
    if old is not None and protocol.smoke:  # smoke figures never replace measurements
        measured = old[~old.smoke & (old.backend == backend) & (old.precision == precision)]
        hit = sorted({(int(r), int(b)) for r, b in zip(measured.resolution, measured.batch_size)} & set(combos))
        if hit:
            raise RescascadeError(f"{out} holds measured rows for {', '.join(f'r{r} batch {b}' for r, b in hit[:4])}"
                                  f"{' ...' if len(hit) > 4 else ''}; --quick figures would replace them: write the smoke "
                                  "run elsewhere with --out, or measure without --quick")
    with torch_threads(threads):
        rows = _measure(family, run_dir, wid, engine_backend, backend, precision, resolutions, batch_sizes, threads,
                        protocol, source_size, decision_step, decode_scale, crop_fraction)
    decode_rows = time_decode(decode_sizes, resolutions, crop_fraction, decode_scale, protocol,
                              numpy_inputs=engine_backend.numpy_inputs) if decode_sizes else None
    new = pd.DataFrame(rows, columns=COLUMNS)
    if old is not None:
        keys = set(map(tuple, new[KEY].astype(str).values))
        old = old[[tuple(k) not in keys for k in old[KEY].astype(str).values]]
        new = pd.concat([old, new], ignore_index=True)
    new = new.sort_values(KEY).reset_index(drop=True)
    with atomic_path(out) as tmp:
        new.to_csv(tmp, index=False, float_format="%.6g")
    if decode_rows is not None:
        _merge_decode(decode_path(out), decode_rows)
    meta = {"schema_version": PROFILE_SCHEMA, "family": str(Path(run_dir).resolve()),
            "family_json_sha256": family_sha256(run_dir), "weights_sha256": wid, "device": fp,
            "protocol": vars(protocol), "source_size": [int(source_size[1]), int(source_size[0])],  # [width, height]
            "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_json(out.with_suffix(".json"), meta)
    return new


JPEG_MAX_SIDE = 65500  # the JPEG format's largest width or height


def _size(size, name: str = "decode_sizes") -> tuple[int, int]:
    """(width, height) from a pair of integers or "WxH", each side 1..JPEG_MAX_SIDE; ConfigError otherwise."""
    if isinstance(size, str):
        w, h = parse_size(size)
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        w, h = (check_int(name, v, 1) for v in size)
    else:
        raise ConfigError(f"{name} {size!r}: give WIDTHxHEIGHT, e.g. 500x375")
    if max(w, h) > JPEG_MAX_SIDE:
        raise ConfigError(f"{name} {w}x{h}: a JPEG is at most {JPEG_MAX_SIDE} pixels on a side")
    return w, h


def _merge_decode(path: Path, new: pd.DataFrame) -> None:
    """Write decode rows beside the profile: new rows replace older rows of the same (source size, resolution,
    decoded_for, decode scale), except that smoke figures never replace measured ones."""
    old = _read_decode(path)
    if old is not None:
        key = ["source_width", "source_height", "resolution", "decoded_for", "decode_scale"]
        old_keys = [tuple(k) for k in old[key].astype(str).values]
        new_keys = [tuple(k) for k in new[key].astype(str).values]
        stale = ~old.decode_scale.isin(set(new.decode_scale))  # the family now decodes otherwise
        old, old_keys = old[~stale.values], [k for k, st in zip(old_keys, stale) if not st]
        measured = {k for k, smoke in zip(old_keys, old.smoke) if not smoke}
        if new.smoke.all():  # smoke figures never replace measured ones
            new = new[[k not in measured for k in new_keys]]
            new_keys = [k for k in new_keys if k not in measured]
        old = old[[k not in set(new_keys) for k in old_keys]]
        new = pd.concat([old, new], ignore_index=True)
    new = new.sort_values(["source_width", "source_height", "resolution", "decoded_for"]).reset_index(drop=True)
    with atomic_path(path) as tmp:
        new.to_csv(tmp, index=False, float_format="%.6g")


def _measure(family, run_dir, wid: str, engine_backend, backend: str, precision: str, resolutions: list[int],
             batch_sizes: list[int], threads: int | None, protocol: Protocol, source_size, decision_step,
             decode_scale: str = "full", crop_fraction: float = CROP_FRACTION) -> list[dict]:
    """Build and warm every engine, then time every (resolution, batch size) round-robin: one row each.
    Each stage's preprocessing starts from the source as that stage decodes it (a JPEG at its DCT scale)."""
    combos = [(r, b) for r in resolutions for b in batch_sizes]
    device = engine_backend.device
    engines, build = {}, {}
    for r in resolutions:  # build and warm everything first; timing below interleaves the configurations
        engines[r] = engine_backend.open(family, run_dir, wid, r, precision, threads)
        for b in batch_sizes:
            before = engines[r].build_seconds
            engines[r].warm(b)
            build[r, b] = engines[r].build_seconds - before
    timers = {(r, b): engines[r].timer(b) for r, b in combos}
    inference = {c: [] for c in combos}
    prep = {c: [] for c in combos}
    decide = {b: [] for b in batch_sizes}  # the decision step does not depend on the resolution
    moves = {b: ([], []) for b in batch_sizes}  # (upload, gather): nor do these (same source images)
    h, w = source_size
    decoded = {r: (-(-h // (s := jpeg_scale(w, h, stage_min_side(r, crop_fraction, decode_scale)))), -(-w // s))
               for r in resolutions}
    pools = {size: source_pool(size) for size in set(decoded.values())}
    pool = pools[decoded[max(resolutions)]]  # the upload and gather: of the top stage's pixels, the largest
    bar = progress(total=protocol.rounds * len(combos), desc=f"profile {backend} {precision}", unit="config")
    for k in range(protocol.rounds):  # round-robin: a burst of machine noise hits one round, not one config
        part = protocol.round(k)
        for r, b in combos:
            inference[r, b].append(run_protocol(timers[r, b], part))
            if engine_backend.numpy_inputs:
                prep[r, b].append(time_numpy_preprocess(r, b, pools[decoded[r]], crop_fraction, part, threads,
                                                        between=timers[r, b]))
            else:
                prep[r, b].append(time_preprocess(r, b, pools[decoded[r]], device, part,
                                                  engines[r].preprocess_threads, between=timers[r, b]))
            bar.update(1)
        for b in batch_sizes:
            decide[b].append(time_decision(decision_step, b, family.num_classes, part,
                                           between=timers[resolutions[0], b]))
            if engine_backend.numpy_inputs:  # nothing is uploaded or gathered: each stage reads the arrays
                continue
            for times, t in zip(moves[b], time_upload(b, pool, device, part, engines[resolutions[0]].preprocess_threads,
                                                      between=timers[resolutions[0], b])):
                times.append(t)
    bar.close()
    decision = {b: summarize(np.concatenate(times)) for b, times in decide.items()}
    upload = {b: summarize(np.concatenate(up))["median_ms"] if up else 0.0 for b, (up, _) in moves.items()}
    gather = {b: summarize(np.concatenate(g))["median_ms"] if g else 0.0 for b, (_, g) in moves.items()}
    rows = []
    for r, b in combos:
        stats = summarize(np.concatenate(inference[r, b]))
        pre = summarize(np.concatenate(prep[r, b]))
        rows.append({"backend": backend, "precision": precision, "resolution": r, "batch_size": b, **stats,
                     "per_image_ms": stats["median_ms"] / b, "preprocess_ms": pre["median_ms"],
                     "preprocess_per_image_ms": pre["median_ms"] / b, "overhead_ms": decision[b]["median_ms"],
                     "upload_ms": upload[b], "gather_ms": gather[b],
                     "source_size": f"{decoded[r][1]}x{decoded[r][0]}", "served_size": f"{w}x{h}",
                     "threads": threads or 0,
                     "build_s": round(build[r, b], 3), "smoke": protocol.smoke,
                     "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    return rows


def format_profile(df: pd.DataFrame, backend: str | None = None, precision: str | None = None) -> str:
    """The profile as a table: per resolution and batch size, latency, spread and cost relative to the top r."""
    sel = df
    if backend:
        sel = sel[sel.backend == backend]
    if precision:
        sel = sel[sel.precision == precision]
    lines = ["| backend | prec | res | batch | median ms | p90 | p99 | CV | ms/img | preproc ms/img | "
             "of which upload | decide ms/img | vs top r |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (be, pr, b), g in sel.groupby(["backend", "precision", "batch_size"]):
        top = g.loc[g.resolution.idxmax()]
        for _, row in g.sort_values("resolution").iterrows():
            upload = row.get("upload_ms", float("nan")) / row.batch_size  # nan: a profile from before the column
            lines.append(f"| {be} | {pr} | {row.resolution} | {b} | {row.median_ms:.3f} | {row.p90_ms:.3f} | "
                         f"{row.p99_ms:.3f} | {row.cv:.2f} | {row.per_image_ms:.3f} | "
                         f"{row.preprocess_per_image_ms:.3f} | {upload:.3f} | {row.overhead_ms / row.batch_size:.3f} | "
                         f"{row.median_ms / top.median_ms:.2f} |")
    return "\n".join(lines)


def format_decode(df: pd.DataFrame) -> str:
    """The decode rows as a table: per source size and stage resolution, the DCT scale and the ms per image (each
    stage's own decode; not the rows of a cascade decoded once)."""
    lines = ["| source (WxH) | JPEG bits/px | res | scale | decoded (WxH) | decode ms/img |", "|---|---|---|---|---|---|"]
    own = df[df.decoded_for == df.resolution]
    for row in own.sort_values(["source_width", "source_height", "resolution"]).itertuples():
        lines.append(f"| {row.source_width}x{row.source_height} | {row.bits_per_pixel:.2f} | {row.resolution} | "
                     f"1/{row.scale} | {row.decoded_width}x{row.decoded_height} | {row.median_ms:.3f} |")
    return "\n".join(lines)
