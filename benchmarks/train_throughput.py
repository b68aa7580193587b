"""Training throughput: one multitask step of a resolution family against a plain torchvision training step
doing the same forward/backward work (one MobileNetV2 run at every resolution on the same batch, losses summed,
one optimizer step). Target: family >= 0.9x the plain step's images/s. Interleaved, medians.

    python benchmarks/train_throughput.py [--resolutions 96,128,160,192,224] [--batch-size 16] [--steps 6]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from _common import table

from rescascade.training.family import ResolutionFamily
from rescascade.training.trainer import MultiResolutionForward, _inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolutions", default="96,128,160,192,224")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--width-mult", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    res = tuple(int(r) for r in args.resolutions.split(","))
    torch.manual_seed(0)
    plain = torchvision.models.mobilenet_v2(width_mult=args.width_mult).to(memory_format=torch.channels_last)
    family = ResolutionFamily(res, width_mult=args.width_mult).to(memory_format=torch.channels_last)
    family.load_plain_state_dict(plain.state_dict())
    wrapper = MultiResolutionForward(family, res, ensemble=False)
    opts = {"plain": torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9),
            "family": torch.optim.SGD(wrapper.parameters(), lr=0.01, momentum=0.9)}
    crop = torch.randint(0, 256, (args.batch_size, 3, max(res), max(res)), dtype=torch.uint8)
    y = torch.randint(0, 1000, (args.batch_size,))

    def step(name: str) -> float:
        t = time.perf_counter()
        xs = _inputs([crop], res, "cpu", channels_last=True)  # the same on-device resize for both
        if name == "plain":
            loss = sum(F.cross_entropy(plain(x), y) for x in xs)
        else:
            loss = sum(F.cross_entropy(l, y) for l in wrapper(xs))
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()
        return time.perf_counter() - t

    plain.train()
    wrapper.train()
    step("plain"), step("family")  # warm-up
    times = {"plain": [], "family": []}
    for i in range(args.steps):
        for name in (("plain", "family") if i % 2 == 0 else ("family", "plain")):
            times[name].append(step(name))
    med = {k: float(np.median(v)) for k, v in times.items()}
    ips = {k: args.batch_size / v for k, v in med.items()}
    ratio = ips["family"] / ips["plain"]
    print(f"\nMobileNetV2 x{args.width_mult}, resolutions {res}, batch {args.batch_size}, CPU "
          f"{torch.get_num_threads()} threads, {args.steps} interleaved steps each (median)\n")
    print(table(["step", "s/step", "images/s", "vs plain"],
                [["plain torchvision (same forward/backward at every resolution)", f"{med['plain']:.3f}",
                  f"{ips['plain']:.2f}", "1.00x"],
                 ["resolution family (patched BN, multitask)", f"{med['family']:.3f}", f"{ips['family']:.2f}",
                  f"{ratio:.2f}x"]]))
    print(f"\ntarget >= 0.90x: {'PASS' if ratio >= 0.9 else 'FAIL'}")


if __name__ == "__main__":
    main()
