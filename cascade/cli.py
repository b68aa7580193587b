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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rescascade",
        description="Cost-aware resolution cascades: train a resolution family, profile it on the target "
                    "device, build a cascade config, run and evaluate it.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="parameter table of a family directory (K models for the price of one)")
    s.add_argument("run_dir", help="family directory written by `rescascade train`")
    s.set_defaults(func=cmd_info)
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
