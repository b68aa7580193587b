"""The whole loop on real photos: Imagenette (../shared/data) from ImageNet MobileNetV2 weights, ONNX Runtime CPU.

Two tasks:
  10way    a new 10-way head trained on the 5,000-image train subset; calib/test = Imagenette val halves
  1000way  the ImageNet head kept, patches learned by distillation from the 224 model; evaluated on Imagenette
           val (1000-way argmax) and on the 1,000 ImageNet sample images (all 1,000 classes)

For each task, five ways to get per-resolution models from the same weights and the same training budget:
  unpatched          BatchNorm as pretrained (10way: a linear-probe head per resolution, nothing else trained)
  stats-only         BatchNorm statistics re-estimated per resolution, γ/β kept (AdaBN-style)
  patches            learned per resolution from the labels (transfer mode: convolutions frozen): γ, β (10way,
                     statistics kept) or γ, β and statistics (1000way)
  patches+distill    the `patches-distill*` presets of `rescascade train`: 10way: linear-probe heads, then the
                     lower resolutions' γ, β + heads with labels and distillation from the probed 224 model
                     (which stays as it is), on the eval crop + flip; 1000way: γ, β of
                     the lower resolutions learned by distillation from the frozen 224 model (labels unused,
                     statistics kept, L2-SP towards the start; also shown without L2-SP)
  independent        K separately fine-tuned torchvision models (same optimizer, steps and loss)
Then the most accurate family on calib (ties: the cheapest cascade on calib; 1000way: among those that leave
the labels unused) is profiled (ONNX Runtime CPU, batch 1..32), its cascade is built at batch 1 and 32
(target: the family's best single resolution's accuracy on calib) and measured on test against that single
model with the cascade runtime, three times (median and range: single measurements vary on shared CPUs). For
that family a second table shows each setting of the optimizer's levers (confidence measure, temperature, free
ensemble): its cheapest cascade chosen on calib, and what it costs and loses on test; a third, the same choice
with thresholds set on calib plus the training images the per-class budget left unused (no variant saw them).

    python benchmarks/cascade_realdata.py [--task 10way|1000way|both] [--quick] [--train-per-class N] [--epochs E]
                                          [--variants unpatched,patches+distill]

--quick runs the same pipeline on a few images per class, with three of the variants (unpatched, patches+distill,
independent), three small resolutions (64, 96, 128) and batch sizes 1 and 32 (the tests use it); its figures mean
nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import IMAGENET_WEIGHTS, IMAGENETTE, ROOT, SHARED_DATA, table  # noqa: E402
from _shared_data import shared_imagenet_samples  # noqa: E402

from rescascade.build import run_build  # noqa: E402
from rescascade.costs import CostModel  # noqa: E402
from rescascade.evaluate import run_eval  # noqa: E402
from rescascade.optimizer import (Cascade, Stage, StageViews, cheapest_meeting, paired_difference,  # noqa: E402
                                  reference_resolution, simulate, tolerance_sweep)
from rescascade.predictions import Predictions, load_predictions  # noqa: E402
from rescascade.profiling.engines import (family_predictors, independent_ids, onnx_predictors,  # noqa: E402
                                         onnxruntime_predictors)
from rescascade.profiling.measure import Protocol  # noqa: E402
from rescascade.profiling.profile import read_profile, run_profile  # noqa: E402
from rescascade.runtime import decision_step  # noqa: E402
from rescascade.temperature import fit_temperature  # noqa: E402
from rescascade.training.data import DataSplits, ImageSet, TensorReader, limit_per_class, load_data  # noqa: E402
from rescascade.training.predict import predict_logits, top1  # noqa: E402
from rescascade.training.probe import ProbeCache  # noqa: E402
from rescascade.training.recipes import preset, split_options  # noqa: E402
from rescascade.training.run import run_train  # noqa: E402
from rescascade.training.store import load_family, weights_id  # noqa: E402
from rescascade.training.trainer import TrainConfig  # noqa: E402

RES = (96, 128, 160, 192, 224)
QUICK_RES = (64, 96, 128)  # --quick: the same pipeline at three small resolutions (its figures mean nothing)
SAMPLES = SHARED_DATA / "imagenet_sample_images"


def in_memory(images: ImageSet) -> ImageSet:
    """Decode once: epochs then cost no JPEG decoding (Imagenette is 224x224; the sample images vary)."""
    decoded = [images.read(i) for i in range(len(images))]
    same = len({tuple(t.shape) for t in decoded}) == 1
    return ImageSet(images.class_names, images.labels, images.ids, TensorReader(torch.stack(decoded) if same else decoded))


def variants(task: str) -> dict[str, dict]:
    """name -> TrainConfig fields and family options. Everything not listed comes from the task's preset."""
    if task == "10way":
        base = {**preset("patches-distill"), "preset": "patches-distill"}
        return {
            # the linear probe alone (--epochs 0 --head-init probe): 2 more epochs on the heads moved top-1 <= 0.2
            # points
            "unpatched": {**base, "patches": "frozen", "distill": "none", "label_weight": 1.0, "epochs": 0},
            # one epoch: BatchNorm's running averages (momentum 0.1) keep 0.9^steps of the start, 3 % after the 32
            # steps of 100 images per class
            "stats-only": {**base, "patches": "stats", "distill": "none", "epochs": 1},
            "patches": {**base, "distill": "none", "label_weight": 1.0},
            "patches+distill": base,
            "independent": {**base, "independent": True, "shared": "train", "lr": 1e-4, "distill": "none",
                            "label_weight": 1.0, "freeze_top": False},
        }
    base = {**preset("patches-distill-keep-head"), "preset": "patches-distill-keep-head"}
    return {
        "unpatched": {**base, "epochs": 0},
        "stats-only": {**base, "patches": "stats", "distill": "none", "epochs": 1},
        "patches": {**base, "patches": "train", "distill": "none", "label_weight": 1.0, "patch_l2sp": 0.0},
        "patches+distill (no L2-SP)": {**base, "patch_l2sp": 0.0},
        "patches+distill": base,
        "independent": {**base, "independent": True, "shared": "train", "lr": 1e-4},
    }


PROBES = ProbeCache()  # the variants start from the same weights on the same splits: probe once


def train_variant(task, name, opts, splits, out: Path, args, log) -> Path:
    fam = out / name
    if (fam / ("independent.json" if opts.get("independent") else "family.json")).is_file() and not args.fresh:
        log(f"  {name}: reusing {fam}")
        return fam
    shutil.rmtree(fam, ignore_errors=True)
    cfg_opts, fam_opts = split_options(opts)
    cfg_opts.update(resolutions=QUICK_RES if args.quick else RES, workers=0, seed=0)
    if args.epochs is not None and cfg_opts.get("epochs", 1) > 0:
        cfg_opts["epochs"] = args.epochs
    if args.quick:
        cfg_opts.update(batch_size=8, epochs=min(cfg_opts.get("epochs", 1), 1))
    cfg = TrainConfig(**cfg_opts)
    t0 = time.perf_counter()
    fam_opts["weights"] = str(IMAGENET_WEIGHTS)
    run_train(f"shared-imagenette:{IMAGENETTE}", fam, cfg, **fam_opts, splits=splits, log=lambda s: None,
              predictors=onnxruntime_predictors, preset=opts.get("preset"), probe_cache=PROBES)
    log(f"  {name}: trained and predicted in {time.perf_counter() - t0:.0f} s")
    return fam


def predictors(fam: Path) -> dict:
    """resolution -> ONNX Runtime engine of a trained variant (a family or the independent models)."""
    if (fam / "independent.json").is_file():
        from safetensors.torch import load_file
        from torchvision.models import mobilenet_v2
        models = {}
        doc = json.loads((fam / "independent.json").read_text())
        for r in doc["resolutions"]:
            m = mobilenet_v2()
            m.load_state_dict(load_file(fam / "models" / f"r{r:03d}.safetensors"))
            models[r] = m
        return onnx_predictors(models, fam, independent_ids(doc))
    family, doc = load_family(fam)
    return family_predictors(family, fam, weights_id(doc), "onnxruntime")


def sample_top1(fam: Path, samples: ImageSet) -> dict[int, float]:
    """Per-resolution top-1 on the 1,000 ImageNet sample images (1000-way families only)."""
    return top1(predict_logits(predictors(fam), samples, batch_size=32, desc="sample images"))


def spare_train(task: str, per_class: int | None, quick: bool) -> ImageSet | None:
    """The training images the per-class budget left out: no variant saw them, so they can calibrate too."""
    if not per_class:
        return None
    every = load_data(f"shared-imagenette:{IMAGENETTE}", seed=0, label_space="native" if task == "10way" else
                      "imagenet").train
    used = set(limit_per_class(every, per_class, 0).ids)  # load_data's own choice (seed 0)
    idx = [i for i, x in enumerate(every.ids) if x not in used]
    if quick:
        idx = idx[::max(1, len(idx) // 20)]
    return in_memory(every.subset(idx)) if idx else None


def lever_outcomes(fam: Path, costs: CostModel, extra: dict | None = None) -> list[dict]:
    """The build's selection (target: the best single resolution's calib accuracy), simulated for every setting
    of the optimizer's levers (confidence measure x temperature x free ensemble): chosen on calib, scored on test.
    Simulated, so variants are compared on one profile (same architecture, same latency). extra: more held-out
    predictions (predict_logits' dict) that join calib."""
    calib, test = (load_predictions(fam / "predictions" / f"{s}.npz") for s in ("calib", "test"))
    if extra is not None:
        assert list(extra["resolutions"]) == calib.resolutions
        calib = Predictions(np.concatenate([calib.logits, extra["logits"]]),
                            np.concatenate([calib.labels, extra["labels"]]), calib.resolutions,
                            np.concatenate([calib.ids, extra["ids"]]), calib.weights_sha256)
    res = calib.resolutions
    fitted = {r: fit_temperature(calib.column(r), calib.labels) for r in res}
    out = []
    for measure in ("max_prob", "margin", "entropy"):
        for temperature in (True, False):
            temps = fitted if temperature else {}
            for comb in (False, True):
                views = StageViews(calib, measure, temps, comb)
                ref = reference_resolution(views, res)
                single = Cascade([Stage(ref, -math.inf)])
                ref_out = simulate(single, views, costs)
                pick = cheapest_meeting(tolerance_sweep(views, costs, res, [ref]), ref_out.accuracy)
                tviews = StageViews(test, measure, temps, comb)
                t, tr = simulate(pick.cascade, tviews, costs), simulate(single, tviews, costs)
                out.append({"measure": measure, "temperature": temperature, "combine": comb,
                            "cascade": pick.cascade.describe(), "calib_cost": pick.outcome.mean_cost / ref_out.mean_cost,
                            "test_cost": t.mean_cost / tr.mean_cost, "test_acc": t.accuracy, "ref_acc": tr.accuracy,
                            "ref": ref, "calib_ref_acc": ref_out.accuracy,
                            "diff": paired_difference(t.correct_mask, tr.correct_mask)})
    return out


def build_choice(levers: list[dict]) -> dict:
    """What `rescascade build --confidence auto --combine auto` picks: temperature on, the cheapest on calib."""
    return min((o for o in levers if o["temperature"]), key=lambda o: o["calib_cost"])


def ci(d: dict) -> str:
    return f"{100 * d['difference']:+.2f} [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]"


def outcome_cells(o: dict) -> list[str]:
    return [f"{o['cascade']} ({o['measure']}{', combined' if o['combine'] else ''})", f"{o['calib_cost']:.3f}",
            f"{o['test_cost']:.3f}", ci(o["diff"])]


def oracle_cells(o: dict) -> list[str]:
    """The oracle's predicted cost ratio on test (each image at the cheapest stage agreeing with the reference) and
    the share of its saving the cascade's predicted ratio captures."""
    return [f"{o['cost_vs_reference']:.3f}", "-" if o["captured"] is None else f"{100 * o['captured']:.0f} %"]


def run_task(task: str, args, log) -> str:
    t_task = time.perf_counter()
    budget = f"{args.train_per_class}-per-class" + (f"-{args.epochs}-epochs" if args.epochs is not None else "")
    out = Path(args.out) / task / ("quick" if args.quick else budget)  # trained variants are reused per budget
    label_space = "native" if task == "10way" else "imagenet"
    per_class = 4 if args.quick else args.train_per_class
    held = 6 if args.quick else None
    res = QUICK_RES if args.quick else RES
    log(f"\n=== {task}: loading Imagenette ({per_class or 500} train images per class) ===")
    raw = load_data(f"shared-imagenette:{IMAGENETTE}", seed=0, label_space=label_space, train_per_class=per_class,
                    heldout_per_class=held)
    splits = DataSplits(in_memory(raw.train), in_memory(raw.calib), in_memory(raw.test), raw.class_names,
                        {**raw.description, "source": f"shared-imagenette:{IMAGENETTE}"})
    samples = None
    if task == "1000way" and (SAMPLES / "labels.csv").is_file():
        samples = shared_imagenet_samples(str(SAMPLES))
        if args.quick:
            samples = samples.subset(np.arange(0, 1000, 100))
        samples = in_memory(samples)
    specs = variants(task)
    if args.quick and not args.variants:  # one variant of each kind of path: probed only, trained, independent
        wanted = {n: specs[n] for n in ("unpatched", "patches+distill", "independent")}
    else:
        wanted = specs if not args.variants else {n: specs[n] for n in args.variants}
    families = [n for n in wanted if not specs[n].get("independent")]  # the independent models have no family
    fams = {}
    for name, opts in wanted.items():
        fams[name] = train_variant(task, name, opts, splits, out, args, log)

    # per-resolution top-1 of every variant (test half of Imagenette val; 1000way: also the sample images)
    rows = []
    for name, fam in fams.items():
        doc = json.loads((fam / ("independent.json" if (fam / "independent.json").is_file() else "family.json"))
                         .read_text())
        acc = doc["top1"]["test"]
        row = [name] + [f"{100 * acc[str(r)]:.1f}" for r in res]
        if samples is not None:
            s = sample_top1(fam, samples)
            row.append(" / ".join(f"{100 * s[r]:.1f}" for r in res))
        rows.append(row)
    headers = ["variant"] + [f"r{r}" for r in res] + \
        ([f"sample images r{res[0]}..r{res[-1]}"] if samples is not None else [])
    report = [f"## {task}: per-resolution top-1 (%) on the Imagenette val test half ({len(splits.test)} images)",
              "", table(headers, rows)]

    # the chosen variant: the most accurate family on calib (its best single resolution), then the cheapest
    # cascade (a cheap cascade of a weaker family is no win for the user). Candidates: families (not the
    # independent models); 1000way: only those that leave the labels unused (the task: patches learned by
    # distillation; label-trained patches narrow the 1000-way model to 10 classes).
    fam_variants = [n for n in families
                    if not (task == "1000way" and specs[n].get("label_weight", 1.0) > 0)] or families

    def pick(choice: dict) -> str:
        return max(fam_variants, key=lambda n: (round(choice[n]["calib_ref_acc"], 4), -choice[n]["calib_cost"]))

    # Profile the family that will most likely be chosen: the choice with costs in proportion to the pixels
    # (all variants share the architecture, so one profile prices every variant's cascades; the chosen family is
    # profiled again only if measured costs choose another one).
    pixels = CostModel("pixels", "fp32", 32, False, {r: {32: (r / res[-1]) ** 2} for r in res})
    first = fams[pick({n: build_choice(lever_outcomes(fams[n], pixels)) for n in fam_variants})]
    sizes = [1, 32] if args.quick else [1, 2, 4, 8, 16, 32]
    protocol = Protocol(warmup_iters=3, warmup_seconds=0.1, min_iters=3, min_seconds=0.0, rounds=1) if args.quick \
        else Protocol(min_seconds=1.0, rounds=3)
    log(f"  profiling {first} (ONNX Runtime CPU, batch {sizes})")
    t0 = time.perf_counter()
    run_profile(first, "onnxruntime", "fp32", sizes, protocol=protocol, log=lambda s: None, decision_step=decision_step)
    log(f"  profiled in {time.perf_counter() - t0:.0f} s")
    df, _ = read_profile(first / "profile.csv")
    costs32 = CostModel.from_profile(df, res, "onnxruntime", "fp32", 32, batch_aware=True)
    crow, choice, levers = [], {}, {}
    for name, fam in fams.items():
        levers[name] = lever_outcomes(fam, costs32)
        c = choice[name] = build_choice(levers[name])
        crow.append([name, c["cascade"], f"{100 * c['test_acc']:.2f} vs {100 * c['ref_acc']:.2f} (r{c['ref']})",
                     ci(c["diff"]), f"{c['calib_cost']:.3f}", f"{c['test_cost']:.3f}"])
    report += ["", f"## {task}: cheapest cascade per variant (target: the variant's best single resolution on "
               "calib), predicted from the profile, batch 32 batch-aware", "",
               table(["variant", "cascade", "test top-1 vs best single", "difference, 95% CI (points)",
                      "cost ratio calib", "cost ratio test"], crow)]

    # the chosen variant: a real cascade.json at batch 1 and 32, measured by the runtime against its reference
    chosen = pick(choice)
    fam = fams[chosen]
    lrow = [[o["measure"], "yes" if o["temperature"] else "no", "yes" if o["combine"] else "no", o["cascade"],
             f"{o['calib_cost']:.3f}", f"{o['test_cost']:.3f}", ci(o["diff"])] for o in levers[chosen]]
    report += ["", f"## {task}: the optimizer's levers on the chosen family ({chosen}): each setting's cheapest "
               "cascade that matches the best single resolution on calib, scored on test (batch 32, predicted)", "",
               table(["confidence", "temperature", "free ensemble", "cascade", "cost calib", "cost test",
                      "test difference, 95% CI (points)"], lrow)]

    # The same choice with thresholds set on more held-out images: calib + the training images the budget left
    # unused. It shows how much of the calib-chosen cascade's saving is selection on too few images.
    spare = spare_train(task, per_class, args.quick)
    if spare is not None:
        t0 = time.perf_counter()
        more = build_choice(lever_outcomes(fam, costs32, predict_logits(predictors(fam), spare, batch_size=32,
                                                                        desc="unused training images")))
        n_calib = len(splits.calib)
        srow = [[f"{n_calib} (val half)", *outcome_cells(choice[chosen])],
                [f"{n_calib + len(spare)} (+ {len(spare)} unused training images)", *outcome_cells(more)]]
        report += ["", f"## {task}: the chosen family's cascade with its thresholds set on more images (batch 32, "
                   "predicted, scored on the same test half)", "",
                   table(["calib images", "cascade", "cost calib", "cost test", "test difference, 95% CI (points)"],
                         srow)]
        log(f"  thresholds on {n_calib + len(spare)} calib images in {time.perf_counter() - t0:.0f} s")
    t_measure = time.perf_counter()
    if fam != first:
        log(f"  profiling {fam} too: measured costs chose it")
        run_profile(fam, "onnxruntime", "fp32", sizes, protocol=protocol, log=lambda s: None,
                    decision_step=decision_step)
    mrow = []
    for b in (1, 32):
        path = fam / f"cascade_b{b}.json"
        config = run_build(fam, batch_size=b, batch_aware=b > 1, measure="auto", combine="auto", out=path,
                           log=lambda s: None)
        # three independent measurements (fresh sessions and threads each; cascade and reference alternate batch
        # by batch): on these shared CPUs one process now and then runs the cascade's sessions 10-30 % slow;
        # report the median and the range
        evs = sorted((run_eval(path, batch_size=b, repeats=1, log=lambda s: None, limit=16 if args.quick else None)
                      for _ in range(1 if args.quick else 3)), key=lambda e: e["measured_cost_ratio"])
        ev = evs[len(evs) // 2]
        spread = "" if len(evs) == 1 else \
            f" ({evs[0]['measured_cost_ratio']:.3f}-{evs[-1]['measured_cost_ratio']:.3f})"
        d = config["expected"]["test"]["paired_difference"]
        stages = " -> ".join(f"r{s['resolution']}" + (f"@{s['threshold']:.3g}" if s["threshold"] is not None else "")
                             for s in config["stages"])
        mrow.append([b, f"{stages} ({config['confidence']['measure']}"
                        f"{', combined' if config['confidence']['combine'] else ''})",
                     f"{100 * ev['cascade']['accuracy']:.2f} vs {100 * ev['reference']['accuracy']:.2f}",
                     ci(d), f"{config['expected']['test']['cost_vs_reference']:.3f}",
                     f"{ev['measured_cost_ratio']:.3f}{spread}",
                     f"{ev['cascade']['ms_per_image']:.2f} vs {ev['reference']['ms_per_image']:.2f}",
                     *oracle_cells(config["expected"]["test"]["oracle"])])
    log(f"  {chosen}: built and measured at batch 1 and 32 in {time.perf_counter() - t_measure:.0f} s")
    report += ["", f"## {task}: the chosen family ({chosen}), cascade.json at batch 1 and 32, measured on the test "
               "half with ONNX Runtime CPU", "",
               table(["batch", "cascade (stages @ thresholds)", "test top-1 vs reference (measured)",
                      "difference, 95% CI (points)", "cost ratio predicted", "cost ratio measured (median of 3, range)",
                      "ms/image cascade vs reference", "oracle cost ratio", "oracle's saving captured"], mrow),
               "", f"{task} took {(time.perf_counter() - t_task) / 60:.1f} min"]
    return "\n".join(report)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="both", choices=["10way", "1000way", "both"])
    ap.add_argument("--quick", action="store_true", help="a few images per class: checks the pipeline only")
    ap.add_argument("--train-per-class", type=int, default=100,
                    help="training images per class (of 500); 100 keeps a task near 30 min on 2 cores")
    ap.add_argument("--epochs", type=int, help="override the presets' epochs")
    ap.add_argument("--variants", help="comma-separated subset of the variants to train and compare (default: all)")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "realdata"))
    ap.add_argument("--fresh", action="store_true", help="retrain variants that already exist in --out")
    args = ap.parse_args()
    if not IMAGENET_WEIGHTS.is_file() or not (IMAGENETTE / "manifest_val.csv").is_file():
        sys.exit(f"needs {IMAGENET_WEIGHTS} and {IMAGENETTE} (the shared real data beside the checkout)")
    if args.variants:
        args.variants = [v.strip() for v in args.variants.split(",")]
        for t in (["10way", "1000way"] if args.task == "both" else [args.task]):
            unknown = [v for v in args.variants if v not in variants(t)]
            if unknown:
                sys.exit(f"unknown variant(s) {unknown} for {t}; choose from {list(variants(t))}")
            if all(variants(t)[v].get("independent") for v in args.variants):
                sys.exit("--variants needs at least one family variant (the independent models have no family)")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tasks = ["10way", "1000way"] if args.task == "both" else [args.task]
    reports = [run_task(t, args, print) for t in tasks]
    print("\n\n" + "\n\n".join(reports))
    print(f"\ntotal {(time.perf_counter() - t0) / 60:.1f} min on {torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
