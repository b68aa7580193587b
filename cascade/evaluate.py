"""`rescascade eval`: the cascade's measured accuracy and latency against the reference model, on the same
backend, batch size and test images. Predicted (from the profile) vs measured cost. This is the number the
README quotes.

Protocol: decode the test split once into memory; warm both runners up; then for every batch run the cascade
and the reference back to back (alternating which goes first), repeated `repeats` times, and keep each batch's
median. Machine noise hits both sides alike; the ratio is what we report.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch

from rescascade.profiling.measure import torch_threads
from rescascade.serve.errors import ConfigError, RescascadeError, check_int
from rescascade.serve.fileio import not_an_input, output_file, write_json
from rescascade.serve.limits import MAX_BATCH, MAX_THREADS
from rescascade.serve.names import key_resolution, stage_name, stage_names
from rescascade.serve.plan import plan_keys
from rescascade.training.progress import progress
from rescascade.training.store import family_files

from .config import read_config
from .optimizer import Cascade, Stage
from .plots import eval_plot
from .predictions import load_predictions
from .runtime import CascadeRunner
from .scoring import decode_all, encoded_all, images_to_score

__all__ = ["run_eval", "format_eval", "images_to_score"]

def _batches(n: int, b: int):
    return [np.arange(s, min(s + b, n)) for s in range(0, n, b)]


def run_eval(cascade_json, data: str | None = None, backend: str | None = None, batch_size: int | None = None,
             split: str = "test", repeats: int = 3, threads: int | None = None, limit: int | None = None,
             out: str | None = None, plot: bool = True, from_bytes: bool = False, log=print) -> dict:
    """`rescascade eval`: run the cascade of `cascade_json` and its reference model back to back on the same
    batches (alternating order, `repeats` passes, median per batch) and measure top-1 and ms per image.
    Images: exactly the family's test (or calib) images, looked up by recorded id and pixel digest, or every
    image of `data` (classes matched by name); `limit` spreads N images over them. batch_size: default the one the
    cascade was built for. Writes a JSON report (and a PNG with `plot`) beside cascade.json or at `out` and
    returns it: accuracy, ms_per_image, images_per_s of both, measured vs predicted cost ratio, exit fractions.
    from_bytes: also run both from the encoded files (decode included, at the scale each stage decodes at), the
    end-to-end figures under "from_bytes", next to the decoded-tensor ones. Raises ConfigError for bad values,
    DataError when images are gone or changed since prediction."""
    for name, value, high in (("batch_size", batch_size, MAX_BATCH), ("repeats", repeats, None),
                              ("threads", threads, MAX_THREADS), ("limit", limit, None)):
        if value is not None:
            check_int(name, value, 1, high)
    if split not in ("calib", "test"):
        raise ConfigError(f"--split {split!r}: use test or calib")
    config = read_config(cascade_json)
    b = batch_size or int(config.doc["profile"]["batch_size"])
    images, spec, digests, own = images_to_score(config, data, split, limit, log)
    out, plot_path = report_paths(config, out, split, spec, own, limit)
    inputs = [config.path, *(f for d in config.member_dirs for f in family_files(d))]
    for path in (out, plot_path):
        not_an_input(path, inputs)
    with torch_threads(threads):
        calib = None if own else load_predictions(config.family_dir / "predictions" / "calib.npz")
        fitted_on = None if calib is None or calib.pixel_digests is None else set(calib.pixel_digests)
        decoded, labels, kept = decode_all(images, digests, log, fitted_on)
        if not decoded:
            raise RescascadeError(f"no readable {split} images in {spec} that the thresholds were not fitted on")
        encoded = encoded_all(images, kept, spec) if from_bytes else None
        ref = config.reference
        # no warm-up at load: _time_side_by_side warms both up on the images themselves
        casc = CascadeRunner(config, backend=backend, threads=threads, batch_size=b, warmup=False)
        refr = CascadeRunner(config, backend=backend, threads=threads, stages=Cascade([Stage(ref, -math.inf)]),
                             batch_size=b, warmup=False)
        casc_ms, ref_ms, pred_c, pred_r, exits, stage_time = _time_side_by_side(casc, refr, decoded, b, repeats)
        if from_bytes:
            bytes_run = _time_side_by_side(casc, refr, encoded, b, repeats, desc="eval from bytes")
        threads_used = torch.get_num_threads()
    per_batch_c, per_batch_r = np.median(casc_ms, 1), np.median(ref_ms, 1)
    n = len(decoded)
    acc_c, acc_r = float((pred_c == labels).mean()), float((pred_r == labels).mean())
    ms_img_c, ms_img_r = per_batch_c.sum() / n, per_batch_r.sum() / n
    exp = config.doc["expected"].get(split, {})
    names = stage_names(config.doc)
    report = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cascade_json": str(Path(cascade_json).resolve()), "data": spec, "split": split, "images": n,
        "backend": casc.backend_name, "precision": casc.precision, "batch_size": b, "repeats": repeats,
        "threads": threads_used,
        "cascade": {"stages": config.doc["stages"],
                    "stage_names": [names[key] for key in plan_keys(config.doc)], "accuracy": acc_c,
                    "ms_per_image": ms_img_c,
                    "batch_ms_median": float(np.median(per_batch_c)), "batch_ms_p90": float(np.percentile(per_batch_c, 90)),
                    "images_per_s": 1000 / ms_img_c,
                    "exit_fractions": [float((exits == k).mean()) for k in range(len(config.doc["stages"]))],
                    "stage_seconds": stage_time["cascade"]},
        "reference": {"resolution": key_resolution(ref), "stage": names[ref], "accuracy": acc_r,
                      "ms_per_image": ms_img_r,
                      "stage_seconds": stage_time["reference"],
                      "batch_ms_median": float(np.median(per_batch_r)), "batch_ms_p90": float(np.percentile(per_batch_r, 90)),
                      "images_per_s": 1000 / ms_img_r},
        "inputs": "decoded",
        "measured_cost_ratio": ms_img_c / ms_img_r,
        "predicted_cost_ratio": _predicted_ratio(config, exp, decoded=True),
        "predicted_accuracy": exp.get("accuracy"),
        "agreement_with_reference": float((pred_c == pred_r).mean()),
    }
    if from_bytes:
        report["from_bytes"] = _bytes_figures(bytes_run, labels, config, exp)
    if "decode" in config.doc["profile"] and "decoded_inputs" not in exp:
        log(f"cascade.json predicts no decoded-input cost for {split} (built before it did): re-run `rescascade build` "
            "for that prediction")
    figures = [acc_c, acc_r, ms_img_c, ms_img_r, report["measured_cost_ratio"]]
    if not all(math.isfinite(v) for v in figures):  # never replace a report with a broken one
        raise RescascadeError(f"the measurement gave no valid figures ({figures}); nothing written")
    write_json(out, report)
    if plot:
        eval_plot(report, plot_path)
    log(format_eval(report))
    log(f"wrote {out}")
    return report


def report_paths(config, out, split: str, spec: str, own: bool, limit: int | None) -> tuple[Path, Path]:
    """(report JSON, plot PNG) of an eval: `out`, or a name beside cascade.json (in `out` when it is a directory)
    that tells a partial or other-data run from the test split's. Checked before anything is measured: ConfigError
    for an `out` that is not a regular file (`fileio.output_file`)."""
    if out is None or (isinstance(out, (str, os.PathLike)) and Path(out).is_dir()):
        tag = hashlib.sha256(spec.encode()).hexdigest()[:8]
        name = split if own else f"data-{Path(spec.partition(':')[2] or spec).name}-{tag}"
        name = config.path.stem + f"_eval_{name}" + (f"_limit{limit}" if limit else "") + ".json"
        out = (Path(out) if out is not None else config.path.parent) / name
    output_file(out)
    out = Path(out)
    plot = out.with_suffix(".png") if out.suffix != ".png" else out.with_suffix(".plot.png")
    output_file(plot, "--out (its plot)")
    return out, plot


def _predicted_ratio(config, exp: dict, decoded: bool) -> float | None:
    """The cost ratio cascade.json predicts on a split (`exp`, its expected figures) for decoded inputs or from
    the encoded files: its main figure is the one its costs counted (the decode where profile.decode is recorded),
    decoded_inputs the other; None where it predicts none."""
    counted_decode = "decode" in config.doc["profile"]
    if decoded:
        return exp.get("decoded_inputs", {}).get("cost_vs_reference") if counted_decode else \
            exp.get("cost_vs_reference")
    return exp.get("cost_vs_reference") if counted_decode else None


def _bytes_figures(run, labels: np.ndarray, config, exp: dict) -> dict:
    """The end-to-end figures of a from-bytes run (`_time_side_by_side` on encoded images)."""
    casc_ms, ref_ms, pred_c, pred_r, exits, stage_time = run
    n = len(labels)
    ms_c, ms_r = np.median(casc_ms, 1).sum() / n, np.median(ref_ms, 1).sum() / n
    def decode_ms(who: str) -> float:
        return 1000 * sum(s["decode_s"] for s in stage_time[who].values()) / n
    return {"cascade": {"accuracy": float((pred_c == labels).mean()), "ms_per_image": ms_c,
                        "decode_ms_per_image": decode_ms("cascade"),
                        "exit_fractions": [float((exits == k).mean()) for k in range(len(config.doc["stages"]))],
                        "stage_seconds": stage_time["cascade"]},
            "reference": {"accuracy": float((pred_r == labels).mean()), "ms_per_image": ms_r,
                          "decode_ms_per_image": decode_ms("reference"), "stage_seconds": stage_time["reference"]},
            "measured_cost_ratio": ms_c / ms_r,
            "predicted_cost_ratio": _predicted_ratio(config, exp, decoded=False),
            "decode_counted": "decode" in config.doc["profile"]}


def _time_side_by_side(casc, refr, decoded: list, batch_size: int, repeats: int, desc: str = "eval"):
    """Run the cascade and the reference on the same batches (decoded tensors or encoded bytes), alternating which
    goes first, `repeats` times. -> (cascade ms [batches, repeats], reference ms, cascade labels [N], reference
    labels [N], exit stages [N], per-resolution stage seconds from the first pass: {"cascade": ..., "reference":
    ...})."""
    batches = _batches(len(decoded), batch_size)
    for runner in (casc, refr):  # warm-up: every stage at the batch shapes it will see
        for idx in batches[:2]:
            runner([decoded[i] for i in idx])
    casc_ms = np.zeros((len(batches), repeats))
    ref_ms = np.zeros((len(batches), repeats))
    pred_c = np.zeros(len(decoded), dtype=np.int64)
    pred_r = np.zeros(len(decoded), dtype=np.int64)
    exits = np.zeros(len(decoded), dtype=np.int64)
    stage_time = {"cascade": {}, "reference": {}}
    for rep in range(repeats):
        for j, idx in enumerate(progress(batches, desc=f"{desc} pass {rep + 1}/{repeats}", unit="batch")):
            batch = [decoded[i] for i in idx]
            order = (casc, refr) if (j + rep) % 2 == 0 else (refr, casc)
            for runner in order:
                res = runner(batch)
                (casc_ms if runner is casc else ref_ms)[j, rep] = 1000 * res.wall_s
                if rep > 0:
                    continue
                if runner is refr:
                    pred_r[idx] = res.labels
                else:
                    pred_c[idx], exits[idx] = res.labels, res.exit_stage
                _add_stage_times(stage_time["reference" if runner is refr else "cascade"], res.stage_timings)
    return casc_ms, ref_ms, pred_c, pred_r, exits, stage_time


def _add_stage_times(into: dict, timings) -> None:
    for t in timings:
        s = into.setdefault(str(t.stage), {"rows": 0, "decoded": 0, "decode_s": 0.0, "preprocess_s": 0.0,
                                                "inference_s": 0.0, "decide_s": 0.0})
        for key in s:
            s[key] += getattr(t, key)


def format_eval(r: dict) -> str:
    c, ref = r["cascade"], r["reference"]
    stages = " -> ".join(c.get("stage_names") or [stage_name(None, s["resolution"]) for s in c["stages"]])
    reference = ref.get("stage") or stage_name(None, ref["resolution"])
    pred = r["predicted_cost_ratio"]
    lines = [f"measured on {r['images']} {r['split']} images, {r['backend']} {r['precision']}, batch {r['batch_size']}, "
             f"{r['threads']} threads, median of {r['repeats']} passes",
             "",
             "| model | top-1 | ms/image | batch ms (median) | batch ms (p90) | images/s | cost vs reference |",
             "|---|---|---|---|---|---|---|",
             f"| cascade {stages} | {100 * c['accuracy']:.2f}% | {c['ms_per_image']:.3f} | {c['batch_ms_median']:.2f} | "
             f"{c['batch_ms_p90']:.2f} | {c['images_per_s']:.1f} | {r['measured_cost_ratio']:.3f}x |",
             f"| reference {reference} | {100 * ref['accuracy']:.2f}% | {ref['ms_per_image']:.3f} | "
             f"{ref['batch_ms_median']:.2f} | {ref['batch_ms_p90']:.2f} | {ref['images_per_s']:.1f} | 1.000x |",
             "",
             f"exits per stage: {' / '.join(f'{100 * e:.1f}%' for e in c['exit_fractions'])}; "
             f"cost ratio predicted {pred:.3f}x, measured {r['measured_cost_ratio']:.3f}x" if pred is not None else
             f"exits per stage: {' / '.join(f'{100 * e:.1f}%' for e in c['exit_fractions'])}"]
    fb = r.get("from_bytes")
    if fb:
        p = fb["predicted_cost_ratio"]
        lines += ["", "from the encoded files (decode included):", "",
                  "| model | top-1 | ms/image | of which decode | cost vs reference |", "|---|---|---|---|---|",
                  f"| cascade {stages} | {100 * fb['cascade']['accuracy']:.2f}% | {fb['cascade']['ms_per_image']:.3f} | "
                  f"{fb['cascade']['decode_ms_per_image']:.3f} | {fb['measured_cost_ratio']:.3f}x |",
                  f"| reference {reference} | {100 * fb['reference']['accuracy']:.2f}% | "
                  f"{fb['reference']['ms_per_image']:.3f} | {fb['reference']['decode_ms_per_image']:.3f} | 1.000x |",
                  "", f"end-to-end cost ratio measured {fb['measured_cost_ratio']:.3f}x" +
                  (f", predicted {p:.3f}x" if p is not None else
                   " (the build counted no decode: no prediction)" if not fb.get("decode_counted") else "")]
    ratio = fb["measured_cost_ratio"] if fb else r["measured_cost_ratio"]
    if ratio >= 1:
        lines.append("the cascade is not cheaper than the reference here: serve the single model")
    return "\n".join(lines)

