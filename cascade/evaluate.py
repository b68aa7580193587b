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
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from rescascade.profiling.measure import torch_threads
from rescascade.training.config import MAX_BATCH, MAX_THREADS
from rescascade.training.data import ImageSet, heldout_listing, resolve_source
from rescascade.training.errors import ConfigError, RescascadeError, check_int
from rescascade.training.fileio import write_json
from rescascade.training.images import ImageError, pixel_digest
from rescascade.training.progress import progress
from rescascade.training.store import read_family_json

from .config import read_config
from .optimizer import Cascade, Stage
from .plots import eval_plot
from .predictions import Predictions, load_predictions
from .runtime import CascadeRunner

# the load_data options family.json records (training/data.py): replaying them re-derives the same splits
SPLIT_OPTIONS = ("calib_fraction", "val_fraction", "seed", "label_space", "train_per_class", "heldout_per_class",
                 "synthetic_classes", "max_image_pixels", "data_root")


def _own_images(images: ImageSet, pred: Predictions, source: str) -> ImageSet:
    """Exactly the images of a predictions file, in its order: by id, with the labels it recorded."""
    position = {image_id: k for k, image_id in enumerate(images.ids)}
    missing = [str(i) for i in pred.ids if str(i) not in position]
    if missing:
        raise RescascadeError(f"{len(missing)} of the {pred.n} images in {pred.path} are not in {source} (e.g. "
                              f"{missing[0]}): the data changed since training; restore it, or give other images with --data")
    chosen = images.subset([position[str(i)] for i in pred.ids])
    if not np.array_equal(chosen.labels, pred.labels):
        k = int(np.flatnonzero(chosen.labels != pred.labels)[0])
        raise RescascadeError(f"{source} labels {chosen.ids[k]} as class {chosen.class_names[chosen.labels[k]]!r}, but the "
                              f"family predicted it as class {chosen.class_names[pred.labels[k]]!r}: the data changed since "
                              "training; restore it")
    return chosen


def _by_class_name(images: ImageSet, family_names: list[str], spec: str) -> ImageSet:
    """Relabel images into the family's class order, matching class names (other names stop)."""
    if images.class_names == family_names:
        return images
    unknown = [c for c in images.class_names if c not in family_names]
    if unknown:
        def show(names):
            return ", ".join(names[:10]) + (f" ... ({len(names)} in all)" if len(names) > 10 else "")
        raise ConfigError(f"--data {spec} has classes the family does not know ({show(unknown)}); its classes are "
                          f"[{show(images.class_names)}], the family's [{show(family_names)}]: evaluate on images of the "
                          "family's classes, in folders named as the family names them")
    to_family = np.array([family_names.index(c) for c in images.class_names], dtype=np.int64)
    return ImageSet(family_names, to_family[images.labels], images.ids, images.reader, images.index)


class ScoredImages(NamedTuple):
    images: ImageSet
    source: str                  # the --data spec they come from (resolved)
    digests: np.ndarray | None   # per image, the pixel digest the family predicted it with (own images only)
    own: bool                    # the family's own held-out images (else other data)


def images_to_score(config, data: str | None, split: str, limit: int | None, log=print) -> ScoredImages:
    """The images `eval` scores.

    Without --data (or with the family's own source): exactly the ids of predictions/{split}.npz, looked up in the
    source as family.json recorded it (resolved path), their labels and pixels checked. With other data: every
    image it holds out (an image folder's val/, else all of it), classes matched to the family's by name.
    limit: N images spread evenly over them (every class, not the first one's)."""
    fam = read_family_json(config.family_dir)
    prov = fam.get("provenance", {}).get("data", {})
    opts = {k: prov[k] for k in SPLIT_OPTIONS if prov.get(k) is not None}
    recorded = prov.get("resolved_source") or prov.get("source")
    own = data is None or resolve_source(data, opts.get("data_root", "data")) == recorded
    spec = recorded if own else data
    if not spec:
        raise RescascadeError(f"{config.family_dir}/family.json does not record its data source; pass --data")
    pool = heldout_listing(spec, **opts)
    digests = None
    if own:
        if pool.class_names != fam["class_names"]:
            raise RescascadeError(f"{spec} now has classes {pool.class_names[:10]}, the family was trained on "
                                  f"{fam['class_names'][:10]}: the data changed since training; restore it")
        pred = load_predictions(config.family_dir / "predictions" / f"{split}.npz")
        images, digests = _own_images(pool, pred, spec), pred.pixel_digests
    else:
        if split != "test":
            raise ConfigError("--split chooses among the family's own held-out images; --data images are scored whole")
        images, bad = _by_class_name(pool, fam["class_names"], spec).readable("--data")
        for b in bad:
            log(f"{b['id']}: unreadable, left out ({b['error']})")
    if limit and limit < len(images):
        keep = np.unique(np.linspace(0, len(images) - 1, limit).round().astype(np.int64))
        images = images.subset(keep)
        digests = None if digests is None else digests[keep]
    return ScoredImages(images, spec, digests, own)


def _decode_all(images: ImageSet, digests: np.ndarray | None, log) -> tuple[list[torch.Tensor], np.ndarray]:
    """Decoded images and labels. With digests (the family's own images) every image must decode to the pixels it
    was predicted on; other data leaves unreadable images out, named."""
    out, labels, changed = [], [], []
    for i in range(len(images)):
        try:
            image = images.read(i)
        except (ImageError, OSError) as e:
            if digests is not None:
                raise RescascadeError(f"{images.ids[i]} no longer decodes ({e}), though the family predicted on it: the "
                                      "file changed since training; restore it, or give other images with --data") from None
            log(f"{images.ids[i]}: unreadable, left out ({e})")
            continue
        if digests is not None and pixel_digest(image) != digests[i]:
            changed.append(images.ids[i])
        out.append(image)
        labels.append(images.labels[i])
    if changed:
        raise RescascadeError(f"{len(changed)} of {len(images)} images decode to other pixels than the family predicted on "
                              f"(e.g. {changed[0]}): the files changed since training; restore them, or give other "
                              "images with --data")
    return out, np.array(labels, dtype=np.int64)


def _batches(n: int, b: int):
    return [np.arange(s, min(s + b, n)) for s in range(0, n, b)]


def run_eval(cascade_json, data: str | None = None, backend: str | None = None, batch_size: int | None = None,
             split: str = "test", repeats: int = 3, threads: int | None = None, limit: int | None = None,
             out: str | None = None, plot: bool = True, log=print) -> dict:
    """`rescascade eval`: run the cascade of `cascade_json` and its reference model back to back on the same
    batches (alternating order, `repeats` passes, median per batch) and measure top-1 and ms per image.
    Images: exactly the family's test (or calib) images, looked up by recorded id and pixel digest, or every
    image of `data` (classes matched by name); `limit` spreads N images over them. batch_size: default the one the
    cascade was built for. Writes a JSON report (and a PNG with `plot`) beside cascade.json or at `out` and
    returns it: accuracy, ms_per_image, images_per_s of both, measured vs predicted cost ratio, exit fractions.
    Raises ConfigError for bad values, DataError when images are gone or changed since prediction."""
    for name, value, high in (("batch_size", batch_size, MAX_BATCH), ("repeats", repeats, None),
                              ("threads", threads, MAX_THREADS), ("limit", limit, None)):
        if value is not None:
            check_int(name, value, 1, high)
    if split not in ("calib", "test"):
        raise ConfigError(f"--split {split!r}: use test or calib")
    config = read_config(cascade_json)
    b = batch_size or int(config.doc["profile"]["batch_size"])
    images, spec, digests, own = images_to_score(config, data, split, limit, log)
    with torch_threads(threads):
        decoded, labels = _decode_all(images, digests, log)
        if not decoded:
            raise RescascadeError(f"no readable {split} images in {spec}")
        ref = config.reference
        casc = CascadeRunner(config, backend=backend, threads=threads)
        refr = CascadeRunner(config, backend=backend, threads=threads, stages=Cascade([Stage(ref, -math.inf)]))
        casc_ms, ref_ms, pred_c, pred_r, exits, stage_time = _time_side_by_side(casc, refr, decoded, b, repeats)
        threads_used = torch.get_num_threads()
    per_batch_c, per_batch_r = np.median(casc_ms, 1), np.median(ref_ms, 1)
    n = len(decoded)
    acc_c, acc_r = float((pred_c == labels).mean()), float((pred_r == labels).mean())
    ms_img_c, ms_img_r = per_batch_c.sum() / n, per_batch_r.sum() / n
    exp = config.doc["expected"].get(split, {})
    report = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cascade_json": str(Path(cascade_json).resolve()), "data": spec, "split": split, "images": n,
        "backend": casc.backend_name, "precision": casc.precision, "batch_size": b, "repeats": repeats,
        "threads": threads_used,
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
    figures = [acc_c, acc_r, ms_img_c, ms_img_r, report["measured_cost_ratio"]]
    if not all(math.isfinite(v) for v in figures):  # never replace a report with a broken one
        raise RescascadeError(f"the measurement gave no valid figures ({figures}); nothing written")
    if out is None or Path(out).is_dir():  # a partial or other-data run gets its own report, not the test split's
        tag = hashlib.sha256(spec.encode()).hexdigest()[:8]
        name = split if own else f"data-{Path(spec.partition(':')[2] or spec).name}-{tag}"
        name = config.path.stem + f"_eval_{name}" + (f"_limit{limit}" if limit else "") + ".json"
        out = (Path(out) if out is not None else config.path.parent) / name
    out = Path(out)
    write_json(out, report)
    if plot:
        eval_plot(report, out.with_suffix(".png"))
    log(format_eval(report))
    log(f"wrote {out}")
    return report


def _time_side_by_side(casc, refr, decoded: list, batch_size: int, repeats: int):
    """Run the cascade and the reference on the same batches, alternating which goes first, `repeats` times.
    -> (cascade ms [batches, repeats], reference ms, cascade labels [N], reference labels [N], exit stages [N],
    the cascade's per-resolution stage seconds from the first pass)."""
    batches = _batches(len(decoded), batch_size)
    for runner in (casc, refr):  # warm-up: every stage at the batch shapes it will see
        for idx in batches[:2]:
            runner([decoded[i] for i in idx])
    casc_ms = np.zeros((len(batches), repeats))
    ref_ms = np.zeros((len(batches), repeats))
    pred_c = np.zeros(len(decoded), dtype=np.int64)
    pred_r = np.zeros(len(decoded), dtype=np.int64)
    exits = np.zeros(len(decoded), dtype=np.int64)
    stage_time = {}
    for rep in range(repeats):
        for j, idx in enumerate(progress(batches, desc=f"eval pass {rep + 1}/{repeats}", unit="batch")):
            batch = [decoded[i] for i in idx]
            order = (casc, refr) if (j + rep) % 2 == 0 else (refr, casc)
            for runner in order:
                res = runner(batch)
                (casc_ms if runner is casc else ref_ms)[j, rep] = 1000 * res.wall_s
                if rep == 0 and runner is refr:
                    pred_r[idx] = res.labels
                elif rep == 0:
                    pred_c[idx], exits[idx] = res.labels, res.exit_stage
                    for t in res.stage_timings:
                        s = stage_time.setdefault(t.resolution, {"rows": 0, "preprocess_s": 0.0, "inference_s": 0.0,
                                                                 "decide_s": 0.0})
                        s["rows"] += t.rows
                        s["preprocess_s"] += t.preprocess_s
                        s["inference_s"] += t.inference_s
                        s["decide_s"] += t.decide_s
    return casc_ms, ref_ms, pred_c, pred_r, exits, stage_time


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

