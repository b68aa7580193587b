"""A pool of three ImageNet-pretrained models, each at five resolutions, against one family alone (issue 33).

    python benchmarks/pool_realdata.py [--quick] [--batch-sizes 1,32] [--out .bench/pool]

Members, made without training (`run_train` with epochs 0: the pretrained weights, every resolution's patch the
model's own BatchNorm): MobileNetV2 1.0, ShuffleNetV2 x1.0 and EfficientNet-Lite0 (timm tf_efficientnet_lite0,
ImageNet mean/std folded in), the weights in ../shared/data. Data: the Imagenette validation photos with ImageNet's
1000 labels, split into calib and test as every member splits them (same seed). Each member is profiled with ONNX
Runtime on this CPU; the costs include no decode (decoded inputs).

Tables: every stage's test top-1 and cost; per batch size, the cheapest cascade at the best stage's calib
accuracy over the pool and over each member alone (`CascadeBuilder`, target best), and the pool's with
--guarantee 0.01,0.1: its cost ratio predicted from the profiles on calib and test, its test top-1 against the
reference's with the paired 95 % interval, and the oracle (each image at the cheapest stage agreeing with the
reference) with the share of its saving captured. The costs are the profiles' predictions: the runtime does not
run a pool yet. --quick: 100 held-out images, two resolutions, a smoke profile; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import IMAGENET_WEIGHTS, IMAGENETTE, ROOT, SHARED_DATA, table  # noqa: E402

from rescascade.builder import CascadeBuilder  # noqa: E402
from rescascade.costs import CostModel  # noqa: E402
from rescascade.optimizer import captured_share, paired_difference  # noqa: E402
from rescascade.pool import Pool  # noqa: E402
from rescascade.profiling.measure import QUICK, Protocol  # noqa: E402
from rescascade.profiling.profile import run_profile  # noqa: E402
from rescascade.runtime import decision_step  # noqa: E402
from rescascade.serve.errors import RescascadeError  # noqa: E402
from rescascade.target import Target  # noqa: E402
from rescascade.training.run import run_train  # noqa: E402
from rescascade.training.trainer import TrainConfig  # noqa: E402

MEMBERS = {  # name -> (arch, weights file)
    "mobilenet_v2": ("mobilenet_v2", IMAGENET_WEIGHTS),
    "shufflenet_v2_x1_0": ("shufflenet_v2_x1_0", SHARED_DATA / "shufflenet_v2_x1_0_imagenet_onnxzoo_int8_dequant" /
                           "shufflenet_v2_x1_0_imagenet_onnxzoo_int8_dequant.pth"),
    "tf_efficientnet_lite0": ("timm:tf_efficientnet_lite0", SHARED_DATA / "tf_efficientnet_lite0_imagenet_pypi" /
                              "tf_efficientnet_lite0_imagenet_pypi.pth"),
}
RES = (96, 128, 160, 192, 224)
QUICK_RES = (96, 128)
GUARANTEE = (0.01, 0.1)


def member(name: str, args, log) -> Path:
    """The member's family directory, made once (pretrained weights, no training) and profiled."""
    arch, weights = MEMBERS[name]
    out = Path(args.out) / ("quick" if args.quick else "full") / name
    res = QUICK_RES if args.quick else RES
    if not (out / "family.json").is_file():
        t0 = time.perf_counter()
        options = {"label_space": "imagenet", "train_per_class": 1, "heldout_per_class": 10 if args.quick else None}
        run_train(f"shared-imagenette:{IMAGENETTE}", str(out), TrainConfig(res, epochs=0, workers=0, seed=0),
                  arch=arch, weights=str(weights), data_options=options, log=lambda s: None, overwrite=True)
        log(f"  {name}: predicted in {time.perf_counter() - t0:.0f} s")
    if not (out / "profile.csv").is_file():
        t0 = time.perf_counter()
        protocol = QUICK if args.quick else Protocol(min_seconds=1.0, rounds=3)
        run_profile(out, "onnxruntime", "fp32", args.batch_sizes, protocol=protocol, log=lambda s: None,
                    decision_step=decision_step)
        log(f"  {name}: profiled in {time.perf_counter() - t0:.0f} s")
    return out


def choose(calib, test, costs: CostModel, **options) -> dict:
    """The cheapest cascade at the best stage's calib accuracy, and how it fares on test."""
    b = CascadeBuilder(Target.best(), exact="off", **options).fit(calib, costs)
    (casc, ref), (tcasc, tref) = b.simulate_calib(costs), b.simulate(test, costs)
    o_calib, o_test = b.oracle(costs), b.oracle(costs, test)
    return {"cascade": b.cascade_.describe(), "reference": b.reference_,
            "calib_ratio": casc.mean_cost / ref.mean_cost, "test_ratio": tcasc.mean_cost / tref.mean_cost,
            "test_top1": tcasc.accuracy, "ref_top1": tref.accuracy,
            "diff": paired_difference(tcasc.correct_mask, tref.correct_mask),
            "oracle": o_test.mean_cost / tref.mean_cost,
            "captured": captured_share(tcasc.mean_cost / tref.mean_cost, o_test.mean_cost / tref.mean_cost),
            "oracle_calib": o_calib.mean_cost / ref.mean_cost}


def row(what: str, c: dict) -> list:
    d = c["diff"]
    share = "-" if c["captured"] is None else f"{100 * c['captured']:.0f} %"
    return [what, c["cascade"], f"{c['calib_ratio']:.3f}", f"{c['test_ratio']:.3f}",
            f"{100 * c['test_top1']:.2f} vs {100 * c['ref_top1']:.2f}",
            f"{100 * d['difference']:+.2f} [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]",
            f"{c['oracle']:.3f}", share]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few images at two resolutions: checks the pipeline only")
    ap.add_argument("--batch-sizes", default="1,32", help="the serving batch sizes to profile and choose at")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "pool"))
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    missing = [str(p) for p in [IMAGENETTE / "manifest_val.csv"] + [w for _, w in MEMBERS.values()] if not p.is_file()]
    if missing:
        sys.exit(f"needs {', '.join(missing)} (the shared real data beside the checkout)")
    t0 = time.perf_counter()
    print("members (pretrained, no training; ONNX Runtime CPU profiles):")
    pool = Pool.load([member(name, args, print) for name in MEMBERS])
    calib, test = pool.predictions("calib"), pool.predictions("test")
    report = [f"## Every stage: test top-1 ({test.n} Imagenette val photos, 1000-way) and ms per image", ""]
    costs = {b: pool.costs(batch_size=b, batch_aware=b > 1) for b in args.batch_sizes}
    report.append(table(["stage", "test top-1 %"] + [f"ms/image, batch {b}" for b in args.batch_sizes], [
        [s, f"{100 * (test.column(s).argmax(-1) == test.labels).mean():.2f}"] +
        [f"{costs[b].expected([s], [1.0]):.2f}" for b in args.batch_sizes] for s in pool.stages]))
    for b in args.batch_sizes:
        rows = [row("pool", choose(calib, test, costs[b]))]
        try:
            rows.append(row(f"pool, guarantee {GUARANTEE[0]:g},{GUARANTEE[1]:g}",
                            choose(calib, test, costs[b], guarantee=GUARANTEE)))
        except RescascadeError as e:
            rows.append([f"pool, guarantee {GUARANTEE[0]:g},{GUARANTEE[1]:g}", str(e)] + [""] * 6)
        for m in pool.members:
            stages = m.stages
            rows.append(row(f"{m.model} alone", choose(calib.restrict(stages), test.restrict(stages), costs[b])))
        aware = " (batch-aware)" if b > 1 else ""
        report += ["", f"## Batch {b}{aware}: the cheapest cascade at the best stage's calib accuracy (predicted "
                   "from the profiles)", "",
                   table(["pool", "cascade", "cost ratio calib", "cost ratio test", "test top-1 vs reference",
                          "difference, 95% CI (points)", "oracle cost ratio (test)", "oracle's saving captured"],
                         rows)]
    print("\n".join(report))
    print(f"\ntook {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
