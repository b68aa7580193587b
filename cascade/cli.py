"""The `rescascade` command: train, info, profile, build, eval, drift, export, demo."""
from __future__ import annotations

import argparse
import math
import sys
import textwrap

from rescascade.serve.errors import RescascadeError
from rescascade.serve.fileio import printable_streams
from rescascade.serve.limits import MAX_BATCH, MAX_THREADS
from rescascade.training.config import parse_size


def cmd_info(args) -> None:
    from rescascade.training.params import format_parameter_table
    from rescascade.training.store import load_family

    family, doc = load_family(args.run_dir)
    rs = ", ".join(str(r) for r in family.resolutions)
    stats = "statistics shared" if family.patch_kind == "scale_bias" else "running mean/var private"
    arch = str(family.arch_) + (f" x{family.width_mult:g}" if family.width_mult != 1.0 else "")
    print(f"Resolution family {args.run_dir}: {arch} ({family.arch_.source} {doc.get('source_version', '?')}), "
          f"{doc['num_classes']} classes, "
          f"{len(family.resolutions)} resolutions ({rs})")
    print(f"patch: {family.patch_kind} (BatchNorm γ, β; {stats}); classifier {family.classifier_kind}\n")
    print(format_parameter_table(doc["parameters"]))
    top1 = doc.get("top1", {})
    splits = [split for split in ("calib", "test") if split in top1]
    if splits:
        counts = doc.get("provenance", {}).get("data", {})
        print("\ntop-1 | " + " | ".join(f"{split} ({counts.get(f'{split}_images', '?')} images)" for split in splits))
        for r in family.resolutions:
            print(f"  r{r:<5}" + " | ".join(f"{100 * top1[split][str(r)]:6.2f} %" for split in splits))


def _number(kind, low=None, high=None, what: str = "a number", low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite number within [low, high] (open ends where asked); argparse then prints the
    message as one line and exits 2, before anything heavy is imported."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = math.isfinite(value) and (low is None or (value > low if low_open else value >= low)) and \
            (high is None or (value < high if high_open else value <= high))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


def _list(item):
    """Comma-separated values, each checked by `item`."""
    def parse(text: str) -> tuple:
        return tuple(item(v.strip()) for v in text.split(","))
    return parse


_positive_int = _number(int, 1, what="an integer >= 1")
_count = _number(int, 0, what="an integer >= 0")
_nonnegative = _number(float, 0.0, what="a finite number >= 0")
_positive = _number(float, 0.0, what="a finite number > 0", low_open=True)
_fraction = _number(float, 0.0, 1.0, what="a fraction between 0 and 1", low_open=True, high_open=True)
_unit_interval = _number(float, 0.0, 1.0, what="a number in [0, 1)", high_open=True)
_batch = _number(int, 1, MAX_BATCH, what=f"an integer from 1 to {MAX_BATCH}")
_threads = _number(int, 1, MAX_THREADS, what=f"an integer from 1 to {MAX_THREADS}")
_ints = _list(_number(int, what="comma-separated integers"))
_batches = _list(_batch)


# what every file output accepts (serve/fileio.output_file)
OUT_FILES = ("a new or regular file, replaced atomically; a symbolic link is written through (its target "
             "replaced, the link kept); a device, FIFO or directory is refused")


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except RescascadeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_sizes = _list(_size)


def _resolutions(text: str) -> tuple[int, ...]:
    from rescascade.training.config import check_resolutions
    try:
        return check_resolutions(_ints(text))
    except RescascadeError as e:
        raise argparse.ArgumentTypeError(e.cli_message) from None


def _stage(text: str) -> int | str:
    """A family's resolution (an integer >= 1) or a pool's stage name (MODEL/rR)."""
    from rescascade.serve.names import is_stage_name
    if is_stage_name(text.strip()):
        return text.strip()
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a resolution (an integer >= 1) or a pool's stage name MODEL/rR, "
                                         f"got {text!r}") from None


_stages = _list(_stage)


def _crop_scale(text: str) -> tuple[float, float]:
    scale = _list(_number(float, what="numbers"))(text)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise argparse.ArgumentTypeError(f"give MIN,MAX with 0 < MIN <= MAX <= 1, e.g. 0.25,1; got {text}")
    return scale


def _refine(text: str) -> int | str:
    return text if text == "auto" else _count(text)


def _target(text: str) -> str:
    from .target import Target
    try:
        Target.parse(text, None, None)
    except RescascadeError as e:
        raise argparse.ArgumentTypeError(e.cli_message.replace(f"--target {text!r}", repr(text))
                                         .replace(f"--target {text}", text)) from None
    return text


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line (what is wrong, where the options are), not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks and each line is wrapped to the terminal; each option's help states
    its own default."""

    def _fill_text(self, text, width, indent):
        # a line that starts with a space is laid out already (the presets' list); the others are prose
        return "\n".join(indent + line if not line or line[0] == " " else
                         textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())


# train options whose default may come from a --preset (argparse default None = "not given")
TRAIN_DEFAULTS = {"data": None, "arch": "mobilenet_v2", "resolutions": (96, 128, 160, 192, 224), "weights": "imagenet",
                  "width_mult": 1.0, "patch": "scale_bias_stats"}


def cmd_train(args) -> None:
    from rescascade.training.recipes import preset, split_options
    from rescascade.training.run import run_train
    from rescascade.training.trainer import TrainConfig

    chosen = {**TRAIN_DEFAULTS, **preset(args.preset)}
    given = {k: v for k, v in vars(args).items() if v is not None}
    opts = {**chosen, **given}
    if opts.get("data") is None:
        raise RescascadeError("no --data given; e.g. --data imagefolder:PATH, --data synthetic, or pick a --preset")
    cfg, family = split_options(opts)
    predictors = None
    if opts.get("predict_backend") == "onnxruntime":
        from rescascade.profiling.engines import onnxruntime_predictors as predictors
    run_train(opts["data"], opts["out"], TrainConfig(**cfg), **family, resume=args.resume, overwrite=args.overwrite,
              preset=args.preset,
              predictors=predictors, decode_scale=opts.get("decode_scale", "stage"),
              data_options={"calib_fraction": opts.get("calib_fraction", 0.5),
                            "val_fraction": opts.get("val_fraction", 0.2),
                            "label_space": opts.get("label_space", "native"),
                            "data_root": opts.get("data_root", "data"), "download": args.download,
                            "train_per_class": opts.get("train_per_class"),
                            "heldout_per_class": opts.get("heldout_per_class"),
                            **({"max_image_pixels": opts["max_image_pixels"]} if "max_image_pixels" in opts else {})})


def _train_default(name: str) -> str:
    """'default: X' for a TrainConfig field (presets set their own)."""
    from rescascade.training.config import TrainConfig
    value = TrainConfig.__dataclass_fields__[name].default
    if isinstance(value, tuple):
        value = ",".join(f"{v:g}" for v in value)
    return f"default: {value}, or the preset's"


def add_train_parser(sub) -> None:
    from rescascade.training.recipes import PRESETS
    s = sub.add_parser("train", help="train a resolution family and write its predictions", formatter_class=_Formatter,
                       usage="%(prog)s --out DIR [--data SPEC] [--preset NAME] [options]",
                       description="Train a resolution family (one shared BatchNorm CNN, MobileNetV2 unless --arch names "
                                   "another, + one BatchNorm patch per resolution) and write the family directory "
                                   "with predictions on calib/test.\n\n"
                                   "Presets (--preset NAME; flags given explicitly win):\n" +
                                   "\n".join(textwrap.fill(f"{k}: {v['doc']}", 100, initial_indent="  ",
                                                            subsequent_indent="    ") for k, v in PRESETS.items()))
    d = _train_default
    g = s.add_argument_group("data and output")
    g.add_argument("--data", metavar="SPEC", help="synthetic[:N] | imagefolder:PATH | cifar10 | cifar100 | imagenette, or a "
                                  "source added in Python with rescascade.training.data.register_source "
                                  "(required unless the preset names its data)")
    g.add_argument("--out", required=True, metavar="DIR", help="the family directory to write: new or empty, or an interrupted run "
                                                 "of rescascade (--resume)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the family in --out (removes rescascade's own files there, never others)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its checkpoint")
    g.add_argument("--preset", metavar="NAME", help=f"a named recipe: {', '.join(PRESETS)} (default: none)")
    g.add_argument("--label-space", choices=["native", "imagenet"],
                   help="sources that have both: their own classes (native) or ImageNet's 1000 (default: native)")
    g.add_argument("--calib-fraction", type=_fraction,
                   help="share of the held-out images used for calib; the rest is test (default: 0.5)")
    g.add_argument("--val-fraction", type=_fraction,
                   help="imagefolder without train/ and val/: the share held out (default: 0.2)")
    g.add_argument("--train-per-class", type=_positive_int, help="use at most N training images per class "
                                                                  "(default: all)")
    g.add_argument("--heldout-per-class", type=_positive_int, help="use at most N held-out images per class "
                                                                    "(default: all)")
    g.add_argument("--max-image-pixels", type=_positive_int,
                   help="images with more pixels are left out, checked from the header before decoding "
                        "(default: 89,478,485, Pillow's default limit, whatever another library set its global to)")
    g.add_argument("--data-root", help="where torchvision datasets live (default: ./data)")
    g.add_argument("--download", action="store_true", help="let torchvision download the dataset (needs network)")
    g = s.add_argument_group("model")
    g.add_argument("--resolutions", type=_resolutions, metavar="R,R,...", help="input resolutions, e.g. 96,128,160,192,224 (default: those, "
                                                     "or the preset's)")
    g.add_argument("--arch", metavar="NAME", help="any torchvision classification model with BatchNorm (resnet50, "
                                                  "efficientnet_b0, mobilenet_v3_large, regnet_y_800mf, ...) or, with "
                                                  "the timm extra, timm:NAME (a bare name torchvision lacks is looked "
                                                  "up in timm; torchvision:NAME forces torchvision) "
                                                  "(default: mobilenet_v2)")
    g.add_argument("--weights", help="imagenet[:TAG] (torchvision's weights enum for --arch, or timm's pretrained tag) "
                                     "| none | PATH to a state dict of the plain model, .pth or .safetensors "
                                     "(default: imagenet, or the preset's)")
    g.add_argument("--width-mult", type=_number(float, 0.0, 4.0, "a number in (0, 4]", low_open=True),
                   help="width multiplier of torchvision's MobileNets (default: 1.0, or the preset's)")
    g.add_argument("--patch", choices=["scale_bias_stats", "scale_bias"],
                   help="the patch: γ, β and BN statistics, or γ, β only with statistics shared "
                        "(default: scale_bias_stats)")
    g.add_argument("--classifier", choices=["shared", "per-resolution", "frozen"],
                   help="one head for all resolutions, one per resolution (needs a Linear classifier), or the "
                        "starting head kept frozen (default: shared, or the preset's)")
    g.add_argument("--independent", action="store_true", default=None,
                   help="train K separate plain models instead (the baseline)")
    g = s.add_argument_group("what learns")
    g.add_argument("--shared", choices=["train", "frozen"],
                   help=f"the shared convolutions; frozen = transfer mode ({d('shared')})")
    g.add_argument("--patches", choices=["train", "affine", "stats", "frozen"],
                   help="train: learn γ, β and statistics; affine: learn γ, β, keep statistics; stats: re-estimate "
                        f"statistics only; frozen: keep all ({d('patches')})")
    g.add_argument("--head-init", choices=["none", "probe"],
                   help="probe: fit each new head on frozen features (logistic regression) first; needs a Linear "
                        f"classifier ({d('head_init')})")
    g.add_argument("--freeze-top", action="store_true", default=None,
                   help="keep the top resolution's patch and own head as they start (e.g. the distillation teacher)")
    g.add_argument("--distill", choices=["none", "top", "ensemble", "teacher"],
                   help="top: the top resolution teaches the others; ensemble: RS-Nets; teacher: the frozen start at "
                        f"the top resolution ({d('distill')})")
    g.add_argument("--distill-weight", type=_nonnegative, help=f"weight of the distillation loss ({d('distill_weight')})")
    g.add_argument("--distill-temperature", type=_positive, help=f"distillation temperature "
                                                                 f"({d('distill_temperature')})")
    g.add_argument("--label-weight", type=_nonnegative,
                   help=f"weight of the label loss, 0 = distillation only ({d('label_weight')})")
    g.add_argument("--loss-weights", type=_list(_nonnegative), help="one weight per resolution on its losses (default: 1 each)")
    g.add_argument("--patch-l2sp", type=_nonnegative,
                   help=f"penalty on the patches' distance from their start, L2-SP ({d('patch_l2sp')})")
    g = s.add_argument_group("optimization")
    g.add_argument("--epochs", type=_count, help=f"passes over the training images; 0 packages the start "
                                                 f"({d('epochs')})")
    g.add_argument("--batch-size", type=_number(int, 2, MAX_BATCH, f"an integer from 2 to {MAX_BATCH}"),
                   help=f"images per step ({d('batch_size')})")
    g.add_argument("--optimizer", choices=["sgd", "rmsprop", "adamw"], help=d("optimizer"))
    g.add_argument("--lr", type=_nonnegative, help=f"learning rate of the shared weights ({d('lr')})")
    g.add_argument("--patch-lr", type=_nonnegative, help="learning rate of the patches (default: --lr, or the "
                                                         "preset's)")
    g.add_argument("--head-lr", type=_nonnegative, help="learning rate of the classifier (default: --lr, or the "
                                                        "preset's)")
    g.add_argument("--weight-decay", type=_nonnegative, help=f"not applied to patches or biases ({d('weight_decay')})")
    g.add_argument("--momentum", type=_unit_interval, help=f"SGD / RMSProp momentum ({d('momentum')})")
    g.add_argument("--schedule", choices=["cosine", "step", "constant"], help=f"learning-rate schedule "
                                                                              f"({d('schedule')})")
    g.add_argument("--warmup-epochs", type=_nonnegative, help=f"linear warm-up of the rates ({d('warmup_epochs')})")
    g.add_argument("--label-smoothing", type=_unit_interval, help=d("label_smoothing"))
    g.add_argument("--dropout", type=_unit_interval, help="the classifier's dropout layers while training "
                                                        "(default: the model's own)")
    g.add_argument("--crop", choices=["same", "independent", "center"],
                   help="one random crop for all resolutions, one each, or the eval crop (+ flip) for all "
                        f"({d('crop')})")
    g.add_argument("--crop-scale", type=_crop_scale, help=f"RandomResizedCrop scale range MIN,MAX ({d('crop_scale')})")
    g = s.add_argument_group("running")
    g.add_argument("--seed", type=_count, help=f"seeds the splits, the head's init and the augmentation "
                                               f"({d('seed')})")
    g.add_argument("--workers", type=_count, help=f"data-loading processes; 0 loads in this one ({d('workers')})")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: auto: cuda when there is one)")
    g.add_argument("--predict-backend", choices=["torch", "onnxruntime"],
                   help="what writes predictions/ after training; onnxruntime is 4-8x faster on CPU (default: torch)")
    g.add_argument("--decode-scale", choices=["stage", "full"],
                   help="how predictions and the cascade runtime decode a JPEG for each resolution: stage: at the "
                        "smallest DCT scale (1/2, 1/4, 1/8) that still covers its resize, far cheaper for large "
                        "photos (pixels differ slightly from a full decode); full: every resolution from the full "
                        "decode. Held-out images given decoded (built-in synthetic data) are predicted as they are "
                        "(full) (default: stage)")
    s.set_defaults(func=cmd_train)


def cmd_profile(args) -> None:
    from rescascade.profiling.measure import QUICK, Protocol
    from rescascade.profiling.profile import format_decode, format_profile

    from .api import profile_family

    protocol = QUICK if args.quick else Protocol(
        warmup_iters=args.warmup_iters, warmup_seconds=args.warmup_seconds, min_iters=args.min_iters,
        min_seconds=args.min_seconds, rounds=args.rounds)
    profile = profile_family(args.run_dir, args.backend, args.precision, args.batch_sizes, args.resolutions,
                             args.threads, protocol, args.out, args.source_size, decode_sizes=args.decode_sizes)
    print(format_profile(profile.table, args.backend, args.precision))
    if profile.decode is not None:
        print(format_decode(profile.decode))
    print(f"wrote {profile.path}")


def add_profile_parser(sub) -> None:
    from rescascade.profiling.backends import BACKEND_NAMES
    s = sub.add_parser("profile", help="measure each resolution's latency on this device", formatter_class=_Formatter,
                       description="Measure each resolution's real inference latency (and the cost of resizing a "
                                   "decoded image to it) on this device; writes profile.csv and profile.json.")
    s.add_argument("run_dir", help="family directory")
    s.add_argument("--backend", default="onnxruntime", choices=BACKEND_NAMES, help="default: onnxruntime")
    s.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="default: fp32")
    s.add_argument("--batch-sizes", type=_batches, default=(1,), help="e.g. 1,32,256 (default: 1)")
    s.add_argument("--resolutions", type=_ints, help="a subset of the family's resolutions (default: all)")
    s.add_argument("--threads", type=_threads, help="CPU threads (default: the cores this process may use)")
    s.add_argument("--source-size", type=_size, metavar="WxH",
                   help="size of the images to be served: each stage's preprocessing and JPEG decode are timed "
                        "on it (default: the held-out images' typical size)")
    s.add_argument("--decode-sizes", type=_sizes, metavar="WxH,...",
                   help="more JPEG sizes whose decode each stage times, e.g. 1600x1200,4000x3000; `build "
                        "--source-size` picks one of them or the source size")
    s.add_argument("--warmup-iters", type=_count, default=10, help="default: 10")
    s.add_argument("--warmup-seconds", type=_nonnegative, default=0.5, help="default: 0.5")
    s.add_argument("--min-iters", type=_positive_int, default=30, help="timed iterations at least (default: 30)")
    s.add_argument("--min-seconds", type=_nonnegative, default=2.0, help="timed seconds at least (default: 2)")
    s.add_argument("--rounds", type=_positive_int, default=5,
                   help="round-robin passes the minimums are spread over (default: 5)")
    s.add_argument("--quick", action="store_true",
                   help="a few iterations only: smoke figures, which never replace measured rows")
    s.add_argument("--out", help="profile.csv to write or update, or its directory (default: RUN_DIR/profile.csv); "
                                 f"{OUT_FILES}")
    s.set_defaults(func=cmd_profile)


def _guarantee(text: str) -> tuple[float, float]:
    try:
        eps, delta = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected EPS,DELTA such as 0.01,0.05, got {text!r}") from None
    if not (0 < eps < 1 and 0 < delta < 1):
        raise argparse.ArgumentTypeError(f"EPS and DELTA must both lie in (0, 1), got {text}")
    return eps, delta


def cmd_build(args) -> None:
    from rescascade.build import run_build
    run_build(args.run_dir if len(args.run_dir) > 1 else args.run_dir[0], profile=args.profile, backend=args.backend, precision=args.precision,
              batch_size=args.batch_size, target=args.target, max_drop=args.max_drop, budget=args.budget,
              guarantee=args.guarantee, measure=args.confidence, temperature=not args.no_temperature,
              combine=args.combine, batch_aware=args.batch_aware, exact=args.exact, reference=args.reference,
              resolutions=args.resolutions, out=args.out, seed=args.seed,
              source_size=None if args.decoded_inputs else (args.source_size or "auto"), refine=args.refine,
              decode_plan=args.decode_plan)


def add_build_parser(sub) -> None:
    s = sub.add_parser("build", help="choose a cascade (stages, thresholds) and write cascade.json",
                       formatter_class=_Formatter,
                       description="Choose which resolutions run in which order and the confidence threshold at "
                                   "which each stops, from the calib predictions and the measured profile; "
                                   "writes cascade.json, a Pareto plot and an exit histogram. Several family "
                                   "directories make a pool: the cascade chooses among every stage (MODEL/rR) of "
                                   "all of them, each priced by its own profile.csv.")
    s.add_argument("run_dir", nargs="+", help="family directory (with predictions/ and profile.csv), or several: a "
                                              "pool of families predicting the same images (then --out is needed)")
    s.add_argument("--profile", help="profile.csv (default: RUN_DIR/profile.csv; a pool: each member's own)")
    s.add_argument("--backend", help="backend rows of the profile to cost with (default: its only backend)")
    s.add_argument("--precision", help="precision rows of the profile (default: its only precision)")
    s.add_argument("--batch-size", type=_batch, default=1,
                   help="serving batch size the costs are read at (default: 1)")
    s.add_argument("--batch-aware", action="store_true",
                   help="throughput serving: each stage runs on the shrunken batch that reaches it")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--source-size", type=_size, metavar="WxH",
                   help="size of the JPEGs to be served, whose per-stage decode the profile timed (profile "
                        "--decode-sizes); the costs include it (default: the profile's source size)")
    g.add_argument("--decoded-inputs", action="store_true",
                   help="count no decode: the service is given decoded images")
    s.add_argument("--decode-plan", default="auto", choices=["auto", "stage"],
                   help="auto: where the costs count the decode, also weigh decoding each JPEG once at a larger "
                        "stage's scale against decoding it at each stage's own; stage: per stage only (default: auto)")
    s.add_argument("--target", type=_target, help="'best' (>= the reference's calib accuracy; the default) or an accuracy: 0.712 "
                                    "or 71.2%%")
    s.add_argument("--max-drop", type=_nonnegative, help="accuracy points the cascade may lose against the reference")
    s.add_argument("--budget", type=_positive, help="the most accurate cascade with expected cost <= this many ms "
                                                    "per image")
    s.add_argument("--guarantee", type=_guarantee, metavar="EPS,DELTA",
                   help="certify an accuracy drop <= EPS with probability >= 1-DELTA (Learn-then-Test), "
                        "e.g. 0.01,0.05")
    s.add_argument("--confidence", default="max_prob", choices=["max_prob", "margin", "entropy", "auto"],
                   help="confidence measure; auto picks the cheapest (default: max_prob)")
    s.add_argument("--no-temperature", action="store_true", help="do not fit per-resolution temperatures")
    s.add_argument("--combine", default="off", choices=["off", "on", "auto"],
                   help="a later stage averages its log-probabilities with the stages already run (default: off)")
    s.add_argument("--exact", default="auto", choices=["auto", "on", "off"],
                   help="exact search over threshold grids (default: auto: pools of <= 6 resolutions)")
    s.add_argument("--reference", type=_stage, help="reference resolution, or a pool's stage MODEL/rR (default: the "
                                                    "most accurate on calib)")
    s.add_argument("--resolutions", type=_stages, help="restrict the choice to these resolutions, or a pool's stages "
                                                       "MODEL/rR,... (default: all)")
    s.add_argument("--refine", type=_refine, default="auto", metavar="N",
                   help="check the costs with the real runtime on N calib images (this machine, the profile's "
                        "backend): the choice, its closest alternatives and the reference; re-estimate each "
                        "stage's cost from its timings and choose again; 0: off (default: auto: 200 calib images "
                        "where they are at hand, since the profile alone can be 10-50 %% off)")
    s.add_argument("--seed", type=_count, default=0, help="seed of the guarantee's calib split (default: 0)")
    s.add_argument("--out", help=f"cascade.json to write, or its directory (default: RUN_DIR/cascade.json); {OUT_FILES}")
    s.set_defaults(func=cmd_build)


def cmd_eval(args) -> None:
    from rescascade.evaluate import run_eval
    run_eval(args.cascade_json, data=args.data, backend=args.backend, batch_size=args.batch_size, split=args.split,
             repeats=args.repeats, threads=args.threads, limit=args.limit, out=args.out, from_bytes=args.from_bytes)


def add_eval_parser(sub) -> None:
    s = sub.add_parser("eval", help="measure a cascade against the best single model (accuracy and latency)",
                       formatter_class=_Formatter,
                       description="Run the cascade and its reference model on the same backend, batch size and "
                                   "test images; report measured accuracy, latency and throughput, and predicted "
                                   "vs measured cost. Writes a JSON report and a plot.")
    s.add_argument("cascade_json", help="the cascade.json written by `rescascade build` (its family directory where "
                                        "it records it)")
    s.add_argument("--data", help="other images to score (default: exactly the family's own test images)")
    s.add_argument("--from-bytes", action="store_true",
                   help="also run both from the encoded files, decode included (what a service receiving JPEGs "
                        "pays): the end-to-end ratio next to the decoded-tensor one")
    s.add_argument("--split", default="test", choices=["test", "calib"], help="default: test")
    s.add_argument("--backend", help="default: the backend the cascade was costed on")
    s.add_argument("--batch-size", type=_batch, help="default: the batch size the cascade was costed at")
    s.add_argument("--repeats", type=_positive_int, default=3, help="timed passes over the data, median per batch "
                                                                    "(default: 3)")
    s.add_argument("--threads", type=_threads, help="CPU threads (default: the backend's)")
    s.add_argument("--limit", type=_positive_int, help="score N images spread over the split (default: all)")
    s.add_argument("--out", help="report JSON to write (its plot beside it, .png), or its directory (default: next to "
                                 f"cascade.json); {OUT_FILES}")
    s.set_defaults(func=cmd_eval)


def cmd_drift(args) -> None:
    from pathlib import Path

    from .config import read_config
    from .monitor import drift_report, format_drift
    from .serve.counts import ExitCounts
    path = Path(args.cascade_json)
    if path.name == "bundle.json" or (path / "bundle.json").is_file():  # an exported bundle carries its cascade
        from .serve.bundle import Bundle
        config = Bundle(path)
    else:
        config = read_config(path)
    counts = [ExitCounts.load(c) for c in args.counts]
    report = drift_report(config, sum(counts[1:], counts[0]), args.alpha)
    print(format_drift(report))
    if report["drifted"] and args.check:
        raise SystemExit(3)


def add_drift_parser(sub) -> None:
    s = sub.add_parser("drift", help="has served traffic drifted from what the thresholds were fitted on?",
                       formatter_class=_Formatter,
                       description="Compare the exits per stage a serving runtime counted (runner.counts.save(PATH)) "
                                   "with the ones cascade.json expects: a two-proportion test per stage; a "
                                   "difference means the thresholds should be re-fitted on recent labelled images.")
    s.add_argument("cascade_json", help="the cascade.json (or the bundle `rescascade export` wrote; in a Triton "
                                        "repository MODEL/1/bundle) that served the traffic")
    s.add_argument("counts", nargs="+", help="the counts JSON saved by the runtime (several: added up, e.g. one "
                                             "per Triton instance: MODEL/exit_counts.*.json)")
    s.add_argument("--alpha", type=_fraction, default=0.01, help="family-wise false-alarm rate (default: 0.01)")
    s.add_argument("--check", action="store_true", help="exit with status 3 when traffic has drifted (for alerts)")
    s.set_defaults(func=cmd_drift)


def cmd_export(args) -> None:
    from .export import export_bundle, export_triton
    if args.format == "triton":
        export_triton(args.cascade_json, args.out, args.precision, args.max_batch_size, args.instances,
                      args.max_queue_delay_us, args.device, args.threads, args.overwrite)
    else:
        export_bundle(args.cascade_json, args.out, args.precision, args.overwrite)


def add_export_parser(sub) -> None:
    s = sub.add_parser("export", help="write a bundle that runs the cascade without torch (ONNX Runtime, numpy, "
                                      "Pillow)", formatter_class=_Formatter,
                       description="Write a self-contained bundle of a cascade: the family's shared weights once (one "
                                   "ONNX model) and a small patch file per stage and for the reference, bundle.json "
                                   "(stages, thresholds, preprocessing, class names, sha256 of every file) and the "
                                   "runtime's modules. Run it where only onnxruntime, "
                                   "numpy and Pillow are installed: PYTHONPATH=DIR python -m rescascade.serve DIR "
                                   "IMAGE... (or rescascade.serve.bundle.BundleRunner). It gives the labels, exit stages "
                                   "and probabilities rescascade's own runtime gives on CPU.")
    s.add_argument("cascade_json", help="cascade.json written by `rescascade build` (its family where it says)")
    s.add_argument("--out", required=True, help="the bundle directory: new, empty, or an earlier export of the same "
                                                "cascade.json (replaced)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export of another cascade in --out (files an export did not write, such "
                        "as exit counts, are never deleted: the export stops instead)")
    s.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="the ONNX models' precision (default: fp32; fp16 for GPUs, on CPU fp32 is faster)")
    s.add_argument("--format", choices=("bundle", "triton"), default="bundle",
                   help="bundle: the directory above (default: bundle); triton: a Triton model repository serving "
                        "the bundle with its Python backend, models `cascade` and `reference`")
    t = s.add_argument_group("--format triton")
    t.add_argument("--max-batch-size", type=_number(int, 1, MAX_BATCH, f"an integer 1..{MAX_BATCH}"), default=32,
                   help="the largest batch the dynamic batcher forms (default: 32)")
    t.add_argument("--instances", type=_number(int, 1, 64, "an integer 1..64"), default=1,
                   help="model instances (default: 1)")
    t.add_argument("--max-queue-delay-us", type=_number(int, 0, 10_000_000, "microseconds 0..10000000"),
                   default=1000, help="how long the batcher waits to fill a batch (default: 1000)")
    t.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="cpu instances, or gpu instances on ONNX Runtime's CUDA provider (default: cpu)")
    t.add_argument("--threads", type=_threads,
                   help="CPU threads per instance (default: every CPU; with --instances N give CPUs / N)")
    s.set_defaults(func=cmd_export)


def cmd_demo(args) -> None:
    from rescascade.demo import run_demo
    run_demo(args.out, batch_size=args.batch_size, epochs=args.epochs, train_images=args.train_images,
             fresh=args.fresh)


def add_demo_parser(sub) -> None:
    s = sub.add_parser("demo", help="the whole pipeline on built-in synthetic data (CPU, minutes)",
                       formatter_class=_Formatter)
    s.add_argument("--out", default="demo_out", help="default: demo_out")
    s.add_argument("--batch-size", type=_batch, default=32, help="serving batch size (default: 32)")
    s.add_argument("--epochs", type=_positive_int, help="training epochs (default: the synthetic preset's, 12)")
    s.add_argument("--train-images", type=_positive_int, help="synthetic training images (default: the preset's, "
                                                              "2400)")
    s.add_argument("--fresh", action="store_true", help="retrain even if --out holds a family")
    s.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="rescascade",
        description="Cost-aware resolution cascades: train a resolution family, profile it on the target "
                    "device, build a cascade config, run and evaluate it.")
    from importlib.metadata import PackageNotFoundError, version
    try:
        v = version("rescascade")
    except PackageNotFoundError:  # run from a checkout that is not installed
        v = "unknown"
    p.add_argument("--version", action="version", version=f"rescascade {v}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="parameter table of a family directory (K models for the price of one)")
    s.add_argument("run_dir", help="family directory written by `rescascade train`")
    s.set_defaults(func=cmd_info)

    add_train_parser(sub)
    add_profile_parser(sub)
    add_build_parser(sub)
    add_eval_parser(sub)
    add_drift_parser(sub)
    add_export_parser(sub)
    add_demo_parser(sub)
    return p


def main(argv=None) -> int:
    printable_streams()
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as e:  # --help (0) or an argument error already printed (2): a code, like every other exit
        return e.code if isinstance(e.code, int) else 2
    if unknown:  # said by the command's own parser, so the line names the command and its --help
        where = f"rescascade {args.command}" if getattr(args, "command", None) else "rescascade"
        print(f"{where}: error: unrecognized arguments: {' '.join(unknown)} (see {where} --help)", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        args.func(args)
    except RescascadeError as e:
        print(f"rescascade {args.command}: error: {e.cli_message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`rescascade info DIR | head`): nothing more to say
        sys.stdout = None  # Python would otherwise report the pipe again when it flushes stdout at exit
        return 0
    except OSError as e:  # the machine's answer (read-only, full disk, no permission), not a bug: one line
        where = f" {e.filename}" if e.filename else ""
        print(f"rescascade {args.command}: error: cannot use{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; the same command with --resume continues it" if args.command == "train" else ""
        print(f"rescascade {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
