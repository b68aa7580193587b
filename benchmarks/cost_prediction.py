"""Do the costs hold? Predicted vs measured cost ratio at batch 1 and 32, and the cascade from encoded bytes.

On the 10-way real-data family (benchmarks/cascade_realdata.py's patches+distill variant: Imagenette, ImageNet
MobileNetV2 weights, ONNX Runtime CPU):

1. Prediction vs measurement, `--runs` times (each a fresh profile): at batch 1 and at batch 32 (batch-aware),
   `build` from the profile alone and `build --refine N` (the runtime checks the costs on N calib images and the
   choice is made again, cascade/refine.py); then `eval --from-bytes` measures the refined build's cascade against
   its reference on the test half: cost ratios predicted by the profile, by the refined costs, and measured, for
   decoded inputs and from the JPEG files.
2. From bytes at three source sizes: test photos re-encoded (JPEG q90, stretched to 4:3) at 500x375, 1600x1200
   and 4000x3000; the profile times each stage's decode at those sizes, `build --source-size --refine N` counts
   it (the refinement runs the family's own calib files: it corrects the stage costs, the decode stays the
   profile's), and `eval --from-bytes` runs cascade and reference end to end at batch 1 and 32: decode,
   preprocessing, inference, total, ratio (predicted: the refined build's), top-1. The build weighs decoding
   each JPEG at every stage's own scale against decoding it once at a larger stage's (`--decode-plan auto`);
   where it picks "once", the per-stage plan's cascade (`--decode-plan stage`) is measured beside it, and a
   second table gives each plan's best cascade with its predicted calib cost.

    python benchmarks/cost_prediction.py [--quick] [--runs 3] [--refine 200] [--photos 100]

--quick checks the pipeline on a few images at three resolutions; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import IMAGENET_WEIGHTS, IMAGENETTE, ROOT, table  # noqa: E402
from cascade_realdata import in_memory, train_variant, variants  # noqa: E402

from rescascade.build import run_build  # noqa: E402
from rescascade.evaluate import run_eval  # noqa: E402
from rescascade.profiling.measure import Protocol  # noqa: E402
from rescascade.profiling.profile import decode_path, run_profile  # noqa: E402
from rescascade.runtime import decision_step  # noqa: E402
from rescascade.training.data import DataSplits, load_data  # noqa: E402

SIZES = ((500, 375), (1600, 1200), (4000, 3000))
QUIET = dict(log=lambda s: None)


def family(args, log) -> Path:
    """The 10-way patches+distill family; its calib and test images stay encoded (predicted as the runtime decodes
    them), only the training images are held decoded."""
    raw = load_data(f"shared-imagenette:{IMAGENETTE}", seed=0, label_space="native",
                    train_per_class=4 if args.quick else args.train_per_class, heldout_per_class=6 if args.quick else None)
    splits = DataSplits(in_memory(raw.train), raw.calib, raw.test, raw.class_names,
                        {**raw.description, "source": f"shared-imagenette:{IMAGENETTE}"})
    out = Path(args.out) / ("quick" if args.quick else f"{args.train_per_class}-per-class")
    return train_variant("10way", "patches+distill", variants("10way")["patches+distill"], splits, out, args, log)


def with_decoded_at(fam: Path, log) -> None:
    """Give a family trained before `Predictions.decoded_at` its decode-once logits: calib and test predicted again
    (ONNX Runtime), each resolution also from every larger one's decode; the logits it had must come back."""
    from cascade_realdata import predictors

    from rescascade.predictions import load_predictions
    from rescascade.scoring import images_to_score
    from rescascade.training.predict import predict_logits, write_predictions

    for split in ("calib", "test"):
        path = fam / "predictions" / f"{split}.npz"
        old = load_predictions(path)
        if old.decode_plans():
            continue
        log(f"  predicting {split} from each larger stage's decode (decode-once plans) ...")
        images = images_to_score(SimpleNamespace(family_dir=fam), None, split, None, log).images
        new = predict_logits(predictors(fam), images, batch_size=32, decode_scale="stage", decoded_at=True,
                             desc=f"predict {split}")
        diff = float(np.abs(new["logits"] - old.logits).max())
        if list(new["ids"]) != list(old.ids) or diff > 1e-3:
            sys.exit(f"{path}: predicting again gave other logits (largest difference {diff:.2g}): retrain with "
                     "--fresh")
        write_predictions(path, {**new, "logits": old.logits}, old.weights_sha256, split)


def profile(fam: Path, args, decode_sizes=None) -> None:
    """A fresh profile (the old one removed): batch 1..32 (--quick: 1 and 32), each stage's decode at
    decode_sizes."""
    for path in (fam / "profile.csv", fam / "profile.json", decode_path(fam / "profile.csv")):
        path.unlink(missing_ok=True)
    protocol = Protocol(warmup_iters=2, warmup_seconds=0.0, min_iters=3, min_seconds=0.0, rounds=1, smoke=True) \
        if args.quick else Protocol(min_seconds=1.0, rounds=3)
    sizes = [1, 32] if args.quick else [1, 2, 4, 8, 16, 32]  # batch-aware costs interpolate between them
    run_profile(fam, "onnxruntime", "fp32", sizes, protocol=protocol, decision_step=decision_step,
                decode_sizes=decode_sizes, **QUIET)


def prediction_rows(fam: Path, args, log) -> list[list]:
    rows = []
    for run in range(1, args.runs + 1):
        t0 = time.perf_counter()
        profile(fam, args)
        for b in (1, 32):
            plain = run_build(fam, batch_size=b, batch_aware=b > 1, out=fam / f"plain_b{b}.json", plots=False, **QUIET)
            path = fam / f"refined_b{b}.json"
            built = run_build(fam, batch_size=b, batch_aware=b > 1, out=path, plots=False, refine=args.refine, **QUIET)
            ev = run_eval(path, batch_size=b, repeats=1, from_bytes=True, plot=False, limit=16 if args.quick else None,
                          out=fam / f"eval_b{b}.json", **QUIET)
            check, fb = built["cost_check"], ev["from_bytes"]
            rows.append([run, b, _stages(plain), _stages(built),
                         f"{check['test']['predicted_ratio_decoded_inputs']:.3f}",
                         f"{check['test']['refined_ratio_decoded_inputs']:.3f}", f"{ev['measured_cost_ratio']:.3f}",
                         _error(check["test"]["predicted_ratio_decoded_inputs"], ev["measured_cost_ratio"]),
                         _error(check["test"]["refined_ratio_decoded_inputs"], ev["measured_cost_ratio"]),
                         f"{check['test']['predicted_ratio']:.3f}", f"{check['test']['refined_ratio']:.3f}",
                         f"{fb['measured_cost_ratio']:.3f}",
                         _error(check["test"]["refined_ratio"], fb["measured_cost_ratio"])])
        log(f"  run {run}: profiled, built, refined and measured in {time.perf_counter() - t0:.0f} s")
    return rows


def _stages(config: dict) -> str:
    return " -> ".join(f"r{s['resolution']}" for s in config["stages"])


def _error(predicted: float, measured: float) -> str:
    return f"{100 * (predicted / measured - 1):+.1f}%"


def reencode(fam: Path, size: tuple[int, int], n: int, quick: bool) -> Path:
    """n test photos of the family spread over the classes, stretched to `size` and saved as JPEG q90 in an image
    folder (class folders)."""
    out = fam.parent / f"photos_{size[0]}x{size[1]}"
    if (out / ".done").is_file():
        return out
    raw = load_data(f"shared-imagenette:{IMAGENETTE}", seed=0, label_space="native",
                    heldout_per_class=6 if quick else None).test
    keep = np.unique(np.linspace(0, len(raw) - 1, n).round().astype(np.int64))
    for i in keep:
        image = Image.fromarray(raw.read(int(i)).permute(1, 2, 0).numpy()).resize(size, Image.BICUBIC)
        folder = out / raw.class_names[raw.labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        (folder / Path(raw.ids[i]).with_suffix(".jpg").name).write_bytes(buf.getvalue())
    (out / ".done").write_text("")
    return out


def bytes_rows(fam: Path, args, log) -> list[list]:
    t0 = time.perf_counter()
    with_decoded_at(fam, log)
    profile(fam, args, decode_sizes=[f"{w}x{h}" for w, h in SIZES])
    rows, plans = [], []
    for size in SIZES:
        photos = reencode(fam, size, 8 if args.quick else args.photos, args.quick)
        for b in (1, 32):
            name = f"bytes_{size[0]}x{size[1]}_b{b}"
            built = run_build(fam, batch_size=b, batch_aware=b > 1, out=fam / f"{name}.json", plots=False,
                              source_size=size, refine=args.refine, **QUIET)
            compared = built["optimizer"]["decode_plans"]
            header = ["source", "batch"] + [p["plan"] for p in compared] + ["chosen"]
            plans.append([f"{size[0]}x{size[1]}", b] + [
                f"{p['cascade']} ({p['calib_cost_ms']:.2f} ms)" if p["cascade"] else "target not met"
                for p in compared] + [_plan(built)])
            builds = [(name, built)]
            if "decode" in built:  # decoded once: the per-stage plan's choice measured beside it
                builds.append((name + "_per_stage", run_build(
                    fam, batch_size=b, batch_aware=b > 1, out=fam / f"{name}_per_stage.json", plots=False,
                    source_size=size, refine=args.refine, decode_plan="stage", **QUIET)))
            for file, config in builds:
                ev = run_eval(fam / f"{file}.json", data=f"imagefolder:{photos}", batch_size=b,
                              repeats=1 if args.quick else 3, from_bytes=True, plot=False,
                              out=fam / f"eval_{file}.json", **QUIET)
                rows += _bytes_rows(size, b, config, ev)
    log(f"  bytes-in table in {time.perf_counter() - t0:.0f} s")
    return rows, [header] + plans


def _plan(config: dict) -> str:
    return f"once at r{config['decode']['resolution']}" if "decode" in config else "per stage"


def _bytes_rows(size, b: int, config: dict, ev: dict) -> list[list]:
    """The cascade's and the reference's rows of the bytes-in table from one `eval --from-bytes`."""
    fb, rows = ev["from_bytes"], []
    for who in ("cascade", "reference"):
        part = fb[who]
        st = part["stage_seconds"].values()
        n = ev["images"]
        ms = {k: 1000 * sum(s[k] for s in st) / n for k in ("decode_s", "preprocess_s", "inference_s")}
        name = f"cascade {_stages(config)}" if who == "cascade" else f"r{ev['reference']['resolution']}"
        rows.append([f"{size[0]}x{size[1]}", b, name, _plan(config) if who == "cascade" else "",
                     f"{ms['decode_s']:.2f}", f"{ms['preprocess_s']:.2f}", f"{ms['inference_s']:.2f}",
                     f"{part['ms_per_image']:.2f}", f"{fb['measured_cost_ratio']:.3f}" if who == "cascade" else "1.000",
                     f"{fb['predicted_cost_ratio']:.3f}" if who == "cascade" else "", f"{100 * part['accuracy']:.1f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few images: checks the pipeline only")
    ap.add_argument("--runs", type=int, default=3, help="fresh profile + builds + eval, this many times")
    ap.add_argument("--refine", type=int, default=200, help="calib images `build --refine` runs")
    ap.add_argument("--photos", type=int, default=100, help="test photos re-encoded per source size")
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, help="override the preset's epochs")
    ap.add_argument("--part", default="both", choices=["prediction", "bytes", "both"])
    ap.add_argument("--out", default=str(ROOT / ".bench" / "costs"))
    ap.add_argument("--fresh", action="store_true", help="retrain the family")
    args = ap.parse_args()
    if not IMAGENET_WEIGHTS.is_file() or not (IMAGENETTE / "manifest_val.csv").is_file():
        sys.exit(f"needs {IMAGENET_WEIGHTS} and {IMAGENETTE} (the shared real data beside the checkout)")
    if args.quick:
        args.runs, args.refine = 1, 8
    torch.manual_seed(0)
    t0 = time.perf_counter()
    fam = family(args, print)
    report = []
    if args.part in ("prediction", "both"):
        report += ["## Cost ratio vs the reference on the test half: predicted by the profile, refined by `build "
                   f"--refine {args.refine}`, measured by `eval --from-bytes` (ONNX Runtime CPU)", "",
                   table(["run", "batch", "cascade (profile)", "cascade (refined)", "decoded: profile", "refined",
                          "measured", "profile error", "refined error", "bytes: profile", "refined", "measured",
                          "refined error"], prediction_rows(fam, args, print))]
    if args.part in ("bytes", "both"):
        rows, plans = bytes_rows(fam, args, print)
        report += ["", "## From encoded bytes: cascade vs the single model end to end, ms per image (ONNX Runtime "
                   "CPU; decode plan chosen by `build`)", "",
                   table(["source", "batch", "model", "decode plan", "decode", "preprocessing", "inference", "total",
                          "cost vs reference", "predicted", "top-1 %"], rows),
                   "", "## Each decode plan's best cascade (predicted calib cost per image, refined costs)", "",
                   table(plans[0], plans[1:])]
    print("\n" + "\n".join(report))
    print(f"\ntotal {(time.perf_counter() - t0) / 60:.1f} min on {torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
