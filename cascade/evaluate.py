"""`rescascade eval`: the cascade's measured accuracy and latency against the reference model, on the same
backend, batch size and test images. Predicted (from the profile) vs measured cost. This is the number the
README quotes.

Protocol: decode the test split once into memory; warm both runners up; then for every batch run the cascade
and the reference back to back (alternating which goes first), repeated `repeats` times, and keep each batch's
median. Machine noise hits both sides alike; the ratio is what we report.
"""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.data import load_data
from training.fileio import UserError, write_json
from training.store import read_family_json

from .config import read_config
from .optimizer import Cascade, Stage
from .runtime import CascadeRunner


def test_images(config, data: str | None, split: str, limit: int | None):
    """The held-out split the family was built with (re-derived from its provenance), or --data."""
    fam = read_family_json(config.family_dir)
    prov = fam.get("provenance", {}).get("data", {})
    spec = data or prov.get("source")
    if not spec:
        raise UserError(f"{config.family_dir}/family.json does not record its data source; pass --data")
    opts = {"seed": prov.get("seed", 0), "calib_fraction": prov.get("calib_fraction", 0.5),
            "label_space": prov.get("label_space", "native"), "heldout_per_class": prov.get("heldout_per_class")}
    splits = load_data(spec, **opts)
    images = splits.test if split == "test" else splits.calib
    if limit:
        images = images.subset(np.arange(min(limit, len(images))))
    if len(splits.class_names) != fam["num_classes"]:
        raise UserError(f"--data {spec} has {len(splits.class_names)} classes, the family {fam['num_classes']}")
    return images, spec


def _decode_all(images) -> tuple[list[torch.Tensor | None], np.ndarray]:
    out = []
    for i in range(len(images)):
        try:
            out.append(images.read(i))
        except Exception:
            out.append(None)
    return out, images.labels


def _batches(n: int, b: int):
    return [np.arange(s, min(s + b, n)) for s in range(0, n, b)]


def run_eval(cascade_json, data: str | None = None, backend: str | None = None, batch_size: int | None = None,
             split: str = "test", repeats: int = 3, threads: int | None = None, limit: int | None = None,
             out: str | None = None, plot: bool = True, log=print) -> dict:
    config = read_config(cascade_json)
    if threads:
        torch.set_num_threads(threads)
    b = batch_size or int(config.doc["profile"]["batch_size"])
    images, spec = test_images(config, data, split, limit)
    decoded, labels = _decode_all(images)
    good = [i for i, im in enumerate(decoded) if im is not None]
    if len(good) < len(decoded):
        log(f"{len(decoded) - len(good)} unreadable test images left out")
    decoded, labels = [decoded[i] for i in good], labels[good]
    ref = config.reference
    casc = CascadeRunner(config, backend=backend, threads=threads)
    refr = CascadeRunner(config, backend=backend, threads=threads, stages=Cascade([Stage(ref, -math.inf)]))
    batches = _batches(len(decoded), b)
    # warm-up: every stage at the batch shapes it will see
    for runner in (casc, refr):
        for idx in batches[:2]:
            runner([decoded[i] for i in idx])
    casc_ms = np.zeros((len(batches), repeats))
    ref_ms = np.zeros((len(batches), repeats))
    pred_c = np.zeros(len(decoded), dtype=np.int64)
    pred_r = np.zeros(len(decoded), dtype=np.int64)
    exits = np.zeros(len(decoded), dtype=np.int64)
    stage_time = {}
    for rep in range(repeats):
        for j, idx in enumerate(tqdm(batches, desc=f"eval pass {rep + 1}/{repeats}", leave=False, disable=None)):
            batch = [decoded[i] for i in idx]
            order = (casc, refr) if (j + rep) % 2 == 0 else (refr, casc)
            for runner in order:
                res = runner(batch)
                (casc_ms if runner is casc else ref_ms)[j, rep] = 1000 * res.wall_s
                if rep == 0:
                    if runner is casc:
                        pred_c[idx], exits[idx] = res.labels, res.exit_stage
                        for t in res.stage_timings:
                            s = stage_time.setdefault(t.resolution, {"rows": 0, "preprocess_s": 0.0,
                                                                     "inference_s": 0.0, "decide_s": 0.0})
                            s["rows"] += t.rows
                            s["preprocess_s"] += t.preprocess_s
                            s["inference_s"] += t.inference_s
                            s["decide_s"] += t.decide_s
                    else:
                        pred_r[idx] = res.labels
    per_batch_c, per_batch_r = np.median(casc_ms, 1), np.median(ref_ms, 1)
    n = len(decoded)
    acc_c, acc_r = float((pred_c == labels).mean()), float((pred_r == labels).mean())
    ms_img_c, ms_img_r = per_batch_c.sum() / n, per_batch_r.sum() / n
    exp = config.doc["expected"].get(split, {})
    report = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cascade_json": str(Path(cascade_json).resolve()), "data": spec, "split": split, "images": n,
        "backend": casc.backend_name, "precision": casc.precision, "batch_size": b, "repeats": repeats,
        "threads": torch.get_num_threads(),
        "cascade": {"stages": config.doc["stages"], "accuracy": acc_c, "ms_per_image": ms_img_c,
                    "batch_ms_median": float(np.median(per_batch_c)), "batch_ms_p90": float(np.percentile(per_batch_c, 90)),
                    "images_per_s": 1000 / ms_img_c,
                    "exit_fractions": [float((exits == k).mean()) for k in range(len(config.doc["stages"]))],
                    "stage_seconds": {str(r): v for r, v in stage_time.items()}},
        "reference": {"resolution": ref, "accuracy": acc_r, "ms_per_image": ms_img_r,
                      "batch_ms_median": float(np.median(per_batch_r)), "batch_ms_p90": float(np.percentile(per_batch_r, 90)),
                      "images_per_s": 1000 / ms_img_r},
        "measured_cost_ratio": ms_img_c / ms_img_r,
        "predicted_cost_ratio": exp.get("cost_vs_reference"),
        "predicted_accuracy": exp.get("accuracy"),
        "agreement_with_reference": float((pred_c == pred_r).mean()),
    }
    out = Path(out) if out else config.path.with_name(config.path.stem + f"_eval_{split}.json")
    write_json(out, report)
    if plot:
        _plot(report, out.with_suffix(".png"))
    log(format_eval(report))
    log(f"wrote {out}")
    return report


def format_eval(r: dict) -> str:
    c, ref = r["cascade"], r["reference"]
    stages = " -> ".join(f"r{s['resolution']}" for s in c["stages"])
    pred = r["predicted_cost_ratio"]
    lines = [f"measured on {r['images']} {r['split']} images, {r['backend']} {r['precision']}, batch {r['batch_size']}, "
             f"{r['threads']} threads, median of {r['repeats']} passes",
             "",
             "| model | top-1 | ms/image | batch ms (median) | batch ms (p90) | images/s | cost vs reference |",
             "|---|---|---|---|---|---|---|",
             f"| cascade {stages} | {100 * c['accuracy']:.2f}% | {c['ms_per_image']:.3f} | {c['batch_ms_median']:.2f} | "
             f"{c['batch_ms_p90']:.2f} | {c['images_per_s']:.1f} | {r['measured_cost_ratio']:.3f}x |",
             f"| reference r{ref['resolution']} | {100 * ref['accuracy']:.2f}% | {ref['ms_per_image']:.3f} | "
             f"{ref['batch_ms_median']:.2f} | {ref['batch_ms_p90']:.2f} | {ref['images_per_s']:.1f} | 1.000x |",
             "",
             f"exits per stage: {' / '.join(f'{100 * e:.1f}%' for e in c['exit_fractions'])}; "
             f"cost ratio predicted {pred:.3f}x, measured {r['measured_cost_ratio']:.3f}x" if pred is not None else
             f"exits per stage: {' / '.join(f'{100 * e:.1f}%' for e in c['exit_fractions'])}"]
    if r["measured_cost_ratio"] >= 1:
        lines.append("the cascade is not cheaper than the reference here: serve the single model")
    return "\n".join(lines)


def _plot(report: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import _save
    c, ref = report["cascade"], report["reference"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    axes[0].bar(["cascade", f"r{ref['resolution']}"], [c["ms_per_image"], ref["ms_per_image"]],
                color=["tab:orange", "tab:grey"])
    if report["predicted_cost_ratio"] is not None:
        axes[0].axhline(report["predicted_cost_ratio"] * ref["ms_per_image"], ls="--", color="tab:blue",
                        label="predicted (profile)")
        axes[0].legend(fontsize=7)
    axes[0].set_ylabel("ms per image (measured)")
    axes[1].bar(["cascade", f"r{ref['resolution']}"], [100 * c["accuracy"], 100 * ref["accuracy"]],
                color=["tab:orange", "tab:grey"])
    lo = min(c["accuracy"], ref["accuracy"]) * 100
    axes[1].set_ylim(max(0, lo - 5), min(100, max(c["accuracy"], ref["accuracy"]) * 100 + 2))
    axes[1].set_ylabel(f"top-1 on {report['split']} (%)")
    fig.suptitle(f"{report['backend']} {report['precision']}, batch {report['batch_size']}: measured", fontsize=10)
    _save(fig, path)
