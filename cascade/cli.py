"""The `rescascade` command: train, info, profile, build, eval, demo."""
from __future__ import annotations

import argparse
import sys

from training.fileio import UserError


def cmd_info(args) -> None:
    from training.params import format_parameter_table
    from training.store import load_family

    family, doc = load_family(args.run_dir)
    rs = ", ".join(str(r) for r in family.resolutions)
    stats = "statistics shared" if family.patch_kind == "scale_bias" else "running mean/var private"
    print(f"Resolution family {args.run_dir}: {doc['arch']} x{doc['width_mult']:g}, {doc['num_classes']} classes, "
          f"{len(family.resolutions)} resolutions ({rs})")
    print(f"patch: {family.patch_kind} (BatchNorm γ, β; {stats}); classifier {family.classifier_kind}\n")
    print(format_parameter_table(doc["parameters"]))
    top1 = doc.get("top1")
    if top1:
        print("\ntop-1 (%s split):" % doc.get("top1_split", "held-out"))
        for r in family.resolutions:
            if str(r) in top1:
                print(f"  r{r:<5}{100 * top1[str(r)]:6.2f} %")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# train options whose default may come from a --preset (argparse default None = "not given")
TRAIN_DEFAULTS = {"data": None, "resolutions": (96, 128, 160, 192, 224), "weights": "imagenet", "width_mult": 1.0,
                  "patch": "scale_bias_stats"}


def cmd_train(args) -> None:
    from training.recipes import preset, split_options
    from training.run import run_train
    from training.trainer import TrainConfig

    chosen = {**TRAIN_DEFAULTS, **preset(args.preset)}
    given = {k: v for k, v in vars(args).items() if v is not None}
    opts = {**chosen, **given}
    if opts.get("data") is None:
        raise UserError("no --data given; e.g. --data imagefolder:PATH, --data synthetic, or pick a --preset")
    cfg, family = split_options(opts)
    run_train(opts["data"], opts["out"], TrainConfig(**cfg), **family, resume=args.resume, preset=args.preset,
              predict_backend=opts.get("predict_backend", "torch"),
              data_options={"calib_fraction": opts.get("calib_fraction", 0.5),
                            "val_fraction": opts.get("val_fraction", 0.2),
                            "label_space": opts.get("label_space", "native"),
                            "data_root": opts.get("data_root", "data"), "download": args.download,
                            "train_per_class": opts.get("train_per_class"),
                            "heldout_per_class": opts.get("heldout_per_class"),
                            **({"max_image_pixels": opts["max_image_pixels"]} if "max_image_pixels" in opts else {})})


def add_train_parser(sub) -> None:
    from training.recipes import PRESETS
    s = sub.add_parser("train", help="train a resolution family and write its predictions",
                       description="Train a resolution family (shared MobileNetV2 + one BatchNorm patch per "
                                   "resolution) and write the family directory with predictions on calib/test. "
                                   "Presets: " + "; ".join(f"{k}: {v['doc']}" for k, v in PRESETS.items()),
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--data", help="synthetic[:N] | imagefolder:PATH | cifar10 | cifar100 | imagenette | "
                                  "shared-imagenette:DIR | shared-imagenet-samples:DIR")
    s.add_argument("--out", required=True, help="family directory to write")
    s.add_argument("--preset", help=f"named recipe: {', '.join(PRESETS)}")
    s.add_argument("--resolutions", type=_ints, help="e.g. 96,128,160,192,224")
    s.add_argument("--weights", help="imagenet[:TAG] | none | PATH to a torchvision state dict")
    s.add_argument("--width-mult", type=float)
    s.add_argument("--patch", choices=["scale_bias_stats", "scale_bias"],
                   help="patch = γ, β and BN statistics (default) or γ, β only (statistics shared)")
    s.add_argument("--shared", choices=["train", "frozen"], help="frozen = transfer mode (only patches learn)")
    s.add_argument("--classifier", choices=["shared", "per-resolution", "frozen"])
    s.add_argument("--patches", choices=["train", "affine", "stats", "frozen"],
                   help="train: learn γ, β and statistics; affine: learn γ, β, keep statistics; stats: "
                        "re-estimate statistics only; frozen: keep all")
    s.add_argument("--distill", choices=["none", "top", "ensemble", "teacher"],
                   help="top: top resolution teaches the others; ensemble: RS-Nets; teacher: frozen start at top r")
    s.add_argument("--head-init", choices=["none", "probe"],
                   help="probe: fit each new head on frozen features (logistic regression) before training")
    s.add_argument("--distill-weight", type=float)
    s.add_argument("--distill-temperature", type=float)
    s.add_argument("--label-weight", type=float, help="weight of the label loss (0 = distillation only)")
    s.add_argument("--loss-weights", type=_floats, help="one weight per resolution (label and distillation loss)")
    s.add_argument("--patch-l2sp", type=float, help="penalty on the patches' distance from their start (L2-SP)")
    s.add_argument("--freeze-top", action="store_true", default=None,
                   help="keep the top resolution's patch and own head as they start (e.g. the distillation teacher)")
    s.add_argument("--independent", action="store_true", default=None,
                   help="train K separate torchvision models instead (the baseline)")
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--optimizer", choices=["sgd", "rmsprop", "adamw"])
    s.add_argument("--lr", type=float, help="learning rate of the shared weights")
    s.add_argument("--patch-lr", type=float, help="learning rate of the patches")
    s.add_argument("--head-lr", type=float, help="learning rate of the classifier")
    s.add_argument("--weight-decay", type=float)
    s.add_argument("--momentum", type=float)
    s.add_argument("--schedule", choices=["cosine", "step", "constant"])
    s.add_argument("--warmup-epochs", type=float)
    s.add_argument("--label-smoothing", type=float)
    s.add_argument("--dropout", type=float, help="the classifier's dropout while training (default: the model's, 0.2)")
    s.add_argument("--crop", choices=["same", "independent", "center"],
                   help="one random crop for all resolutions, one each, or the eval crop (+ flip) for all")
    s.add_argument("--crop-scale", type=_floats, help="RandomResizedCrop scale range, e.g. 0.25,1")
    s.add_argument("--label-space", choices=["native", "imagenet"], help="shared-imagenette: 10-way or 1000-way labels")
    s.add_argument("--calib-fraction", type=float, help="share of held-out images used for calib (rest: test)")
    s.add_argument("--val-fraction", type=float, help="imagefolder without train/val: held-out share")
    s.add_argument("--train-per-class", type=int, help="use at most N training images per class")
    s.add_argument("--heldout-per-class", type=int, help="use at most N held-out images per class")
    s.add_argument("--max-image-pixels", type=int,
                   help="images with more pixels are left out, checked from the header before decoding "
                        "(default: Pillow's Image.MAX_IMAGE_PIXELS)")
    s.add_argument("--data-root", help="root for torchvision datasets")
    s.add_argument("--download", action="store_true", help="let torchvision download the dataset (needs network)")
    s.add_argument("--seed", type=int)
    s.add_argument("--workers", type=int, help="data-loading processes")
    s.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its checkpoint")
    s.add_argument("--predict-backend", choices=["torch", "onnxruntime"],
                   help="what writes predictions/ after training (onnxruntime: 4-8x faster on CPU)")
    s.set_defaults(func=cmd_train)


def cmd_profile(args) -> None:
    from profiling.measure import QUICK, Protocol
    from profiling.profile import format_profile, run_profile

    protocol = QUICK if args.quick else Protocol(
        warmup_iters=args.warmup_iters, warmup_seconds=args.warmup_seconds, min_iters=args.min_iters,
        min_seconds=args.min_seconds, rounds=args.rounds)
    df = run_profile(args.run_dir, args.backend, args.precision, args.batch_sizes, args.resolutions, args.threads,
                     protocol, args.out, args.source_size)
    print(format_profile(df, args.backend, args.precision))
    print(f"wrote {args.out or args.run_dir + '/profile.csv'}")


def add_profile_parser(sub) -> None:
    from profiling.backends import BACKEND_NAMES
    s = sub.add_parser("profile", help="measure each resolution's latency on this device",
                       description="Measure each resolution's real inference latency (and the cost of resizing a "
                                   "decoded image to it) on this device; writes profile.csv and profile.json.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("run_dir", help="family directory")
    s.add_argument("--backend", default="onnxruntime", choices=BACKEND_NAMES)
    s.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    s.add_argument("--batch-sizes", type=_ints, default=(1,), help="e.g. 1,32,256")
    s.add_argument("--resolutions", type=_ints, help="subset of the family's resolutions (default: all)")
    s.add_argument("--threads", type=int, help="CPU threads (default: the cores this process may use)")
    s.add_argument("--source-size", type=int, help="side of the decoded source image the preprocessing cost is "
                                                    "measured on (default: round(top resolution / 0.875))")
    s.add_argument("--warmup-iters", type=int, default=10)
    s.add_argument("--warmup-seconds", type=float, default=0.5)
    s.add_argument("--min-iters", type=int, default=30)
    s.add_argument("--min-seconds", type=float, default=2.0)
    s.add_argument("--rounds", type=int, default=5, help="round-robin passes the minimums are spread over")
    s.add_argument("--quick", action="store_true", help="a few iterations only (smoke runs, not figures)")
    s.add_argument("--out", help="profile.csv to write or update (default: RUN_DIR/profile.csv)")
    s.set_defaults(func=cmd_profile)


def _guarantee(text: str) -> tuple[float, float]:
    try:
        eps, delta = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected EPS,DELTA such as 0.01,0.05, got {text!r}") from None
    return eps, delta


def cmd_build(args) -> None:
    from cascade.build import run_build
    run_build(args.run_dir, profile=args.profile, backend=args.backend, precision=args.precision,
              batch_size=args.batch_size, target=args.target, max_drop=args.max_drop, budget=args.budget,
              guarantee=args.guarantee, measure=args.confidence, temperature=not args.no_temperature,
              combine=args.combine, batch_aware=args.batch_aware, exact=args.exact, reference=args.reference,
              resolutions=args.resolutions, out=args.out, seed=args.seed)


def add_build_parser(sub) -> None:
    s = sub.add_parser("build", help="choose a cascade (stages, thresholds) and write cascade.json",
                       description="Choose which resolutions run in which order and the confidence threshold at "
                                   "which each stops, from the calib predictions and the measured profile; "
                                   "writes cascade.json, a Pareto plot and an exit histogram.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("run_dir", help="family directory (with predictions/)")
    s.add_argument("--profile", help="profile.csv (default: RUN_DIR/profile.csv)")
    s.add_argument("--backend", help="backend rows of the profile to cost with (default: its only backend)")
    s.add_argument("--precision", help="precision rows of the profile (default: its only precision)")
    s.add_argument("--batch-size", type=int, default=1, help="serving batch size the costs are read at")
    s.add_argument("--batch-aware", action="store_true",
                   help="throughput serving: each stage runs on the shrunken batch that reaches it")
    s.add_argument("--target", help="'best' (>= the reference's accuracy, default) or an accuracy, e.g. 0.712")
    s.add_argument("--max-drop", type=float, help="accuracy points the cascade may lose against the reference")
    s.add_argument("--budget", type=float, help="most accurate cascade with expected cost <= this many ms")
    s.add_argument("--guarantee", type=_guarantee, metavar="EPS,DELTA",
                   help="certify accuracy drop <= EPS with probability >= 1-DELTA (Learn-then-Test)")
    s.add_argument("--confidence", default="max_prob", choices=["max_prob", "margin", "entropy", "auto"])
    s.add_argument("--no-temperature", action="store_true", help="do not fit per-resolution temperatures")
    s.add_argument("--combine", default="off", choices=["off", "on", "auto"],
                   help="a later stage averages its log-probabilities with the stages already run")
    s.add_argument("--exact", default="auto", choices=["auto", "on", "off"],
                   help="exact search over threshold grids (auto: pools of <= 6 resolutions)")
    s.add_argument("--reference", type=int, help="reference resolution (default: the most accurate on calib)")
    s.add_argument("--resolutions", type=_ints, help="restrict the pool to these resolutions")
    s.add_argument("--seed", type=int, default=0, help="seed of the guarantee's calib split")
    s.add_argument("--out", help="cascade.json to write (default: RUN_DIR/cascade.json)")
    s.set_defaults(func=cmd_build)


def cmd_eval(args) -> None:
    from cascade.evaluate import run_eval
    run_eval(args.cascade_json, data=args.data, backend=args.backend, batch_size=args.batch_size, split=args.split,
             repeats=args.repeats, threads=args.threads, limit=args.limit, out=args.out)


def add_eval_parser(sub) -> None:
    s = sub.add_parser("eval", help="measure a cascade against the best single model (accuracy and latency)",
                       description="Run the cascade and its reference model on the same backend, batch size and "
                                   "test images; report measured accuracy, latency and throughput, and predicted "
                                   "vs measured cost. Writes a JSON report and a plot.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("cascade_json")
    s.add_argument("--data", help="data source (default: the one recorded in family.json, same split)")
    s.add_argument("--split", default="test", choices=["test", "calib"])
    s.add_argument("--backend", help="default: the backend the cascade was costed on")
    s.add_argument("--batch-size", type=int, help="default: the batch size the cascade was costed at")
    s.add_argument("--repeats", type=int, default=3, help="timed passes over the data (median per batch)")
    s.add_argument("--threads", type=int)
    s.add_argument("--limit", type=int, help="evaluate on the first N images only")
    s.add_argument("--out", help="report path (default: next to cascade.json)")
    s.set_defaults(func=cmd_eval)


def cmd_demo(args) -> None:
    from cascade.demo import run_demo
    run_demo(args.out, batch_size=args.batch_size, epochs=args.epochs, train_images=args.train_images,
             fresh=args.fresh)


def add_demo_parser(sub) -> None:
    s = sub.add_parser("demo", help="the whole pipeline on built-in synthetic data (CPU, minutes)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--out", default="demo_out")
    s.add_argument("--batch-size", type=int, default=32, help="serving batch size")
    s.add_argument("--epochs", type=int, help="training epochs (default: the synthetic preset's)")
    s.add_argument("--train-images", type=int, help="synthetic training images (default: the preset's)")
    s.add_argument("--fresh", action="store_true", help="retrain even if --out holds a family")
    s.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rescascade",
        description="Cost-aware resolution cascades: train a resolution family, profile it on the target "
                    "device, build a cascade config, run and evaluate it.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="parameter table of a family directory (K models for the price of one)")
    s.add_argument("run_dir", help="family directory written by `rescascade train`")
    s.set_defaults(func=cmd_info)

    add_train_parser(sub)
    add_profile_parser(sub)
    add_build_parser(sub)
    add_eval_parser(sub)
    add_demo_parser(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        args.func(args)
    except UserError as e:
        print(f"rescascade {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rescascade {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
