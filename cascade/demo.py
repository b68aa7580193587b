"""`rescascade demo`: the whole loop on the built-in synthetic data, on CPU, in minutes.

train a small family -> profile it with ONNX Runtime -> build the cascade -> evaluate it (measured), then print
one table: per-resolution accuracy and latency, the cascade's stages, its accuracy and cost vs the best model.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from rescascade.profiling.measure import Protocol
from rescascade.profiling.profile import read_profile
from rescascade.training.recipes import preset, split_options
from rescascade.training.run import run_train
from rescascade.training.config import TrainConfig

from .api import profile_family
from .build import run_build
from .evaluate import run_eval

# (epsilon, delta): thresholds matched to the best model on one calib set lose some of its accuracy on new
# images; the Learn-then-Test guarantee bounds that loss instead of hoping it is zero
GUARANTEE = (0.005, 0.1)


def run_demo(out: str = "demo_out", batch_size: int = 32, epochs: int | None = None, train_images: int | None = None,
             fresh: bool = False, log=print) -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    family = out / "family"
    p = preset("synthetic")
    data = f"synthetic:{train_images}" if train_images else p.pop("data")
    p.pop("data", None)
    if fresh or not (family / "family.json").is_file():
        log(f"[1/4] train: {data}, resolutions {p['resolutions']}, MobileNetV2 x{p['width_mult']} from scratch")
        cfg, fam_opts = split_options({**p, "epochs": epochs or p["epochs"], "workers": 1})
        # --fresh replaces the demo's own family files only (train --overwrite), never the rest of --out
        run_train(data, family, TrainConfig(**cfg), **fam_opts, preset="synthetic", log=log, overwrite=fresh,
                  resume=not fresh and (family / "checkpoints" / "last.pt").is_file())
    else:
        log(f"[1/4] train: reusing {family} (pass --fresh to retrain)")
    # the batch sizes a shrinking batch passes through, so batch-aware costs interpolate between measured rows
    sizes = sorted({1, *(batch_size >> k for k in range(0, 6) if batch_size >> k >= 2)})
    log(f"[2/4] profile: ONNX Runtime CPU, batch sizes {sizes}")
    profile_family(family, "onnxruntime", "fp32", sizes,
                   protocol=Protocol(warmup_iters=5, warmup_seconds=0.2, min_iters=20, min_seconds=0.5), log=log)
    log(f"[3/4] build: the cheapest cascade certified to lose at most {100 * GUARANTEE[0]:g} point against the best "
        f"single model with probability >= {1 - GUARANTEE[1]:g}, costs at batch {batch_size} (batch-aware: later "
        "stages run on the shrunken batch)")
    config = run_build(family, batch_size=batch_size, batch_aware=True, measure="auto", combine="auto",
                       guarantee=GUARANTEE, log=lambda s: None)
    log("[4/4] eval: measured on the test split, cascade vs the best single model")
    report = run_eval(family / "cascade.json", batch_size=batch_size, repeats=3, log=lambda s: None)
    summary = demo_table(family, config, report)
    log("\n" + summary)
    log(f"\ndemo took {time.perf_counter() - t0:.0f} s; artifacts in {out}/family "
        "(family.json, patches/, predictions/, profile.csv, cascade.json, plots, eval report)")
    return {"config": config, "eval": report}


def demo_table(family: Path, config: dict, report: dict) -> str:
    doc = json.loads((family / "family.json").read_text())
    df, _ = read_profile(family / "profile.csv")
    b = report["batch_size"]
    rows = df[(df.batch_size == b)].set_index("resolution")
    lines = [f"Per resolution (synthetic test split; ONNX Runtime CPU, batch {b}, ms per image incl. preprocessing):",
             "", "| resolution | top-1 | ms/image |", "|---|---|---|"]
    for r in doc["resolutions"]:
        row = rows.loc[r]
        lines.append(f"| r{r} | {100 * doc['top1']['test'][str(r)]:.2f}% | "
                     f"{(row.median_ms + row.preprocess_ms) / b:.3f} |")
    c, ref = report["cascade"], report["reference"]
    stages = " -> ".join(f"r{s['resolution']}" + (f" (conf >= {s['threshold']:.3g})" if s["threshold"] is not None else "")
                         for s in config["stages"])
    lines += ["", f"Cascade: {stages}; confidence {config['confidence']['measure']}"
                  f"{', combined stages' if config['confidence']['combine'] else ''}",
              "", "| | top-1 (test) | ms/image (measured) | cost vs best model | predicted |", "|---|---|---|---|---|",
              f"| cascade | {100 * c['accuracy']:.2f}% | {c['ms_per_image']:.3f} | {report['measured_cost_ratio']:.3f}x | "
              f"{report['predicted_cost_ratio']:.3f}x |",
              f"| best single model r{ref['resolution']} | {100 * ref['accuracy']:.2f}% | {ref['ms_per_image']:.3f} | "
              f"1.000x | |",
              "", f"exits per stage: {' / '.join(f'{100 * e:.1f}%' for e in c['exit_fractions'])}"]
    d = config["expected"]["test"]["paired_difference"]
    lines.append(f"test: cascade - best model = {100 * d['difference']:+.2f} points (95% CI "
                 f"{100 * d['ci95'][0]:+.2f} .. {100 * d['ci95'][1]:+.2f}; {d['wins']} images won, {d['losses']} lost)")
    if "guarantee" in config:
        lines.append(f"guarantee: {config['guarantee']['statement']} (Learn-then-Test on "
                     f"{config['guarantee']['n_certify']} calib images)")
    if report["measured_cost_ratio"] >= 1:
        lines.append("no cascade beats the single best model on this machine and batch size: serve the single model")
    return "\n".join(lines)
