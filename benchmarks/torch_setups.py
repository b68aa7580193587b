"""Which torch build to install here: CPU inference speed of MobileNetV2 under each working set-up.

Candidates (see ../shared/SETUP.md):
  * chosen:      `pip install torch torchvision` -> torch 2.14.x (CUDA build) + torchvision 0.29.x from the local
                 disk; both import and run on a GPU-less machine. Measured eager NCHW and channels_last.
  * alternative: torch 2.13.0+cpu (the CPU-only file on disk). No torchvision imports beside it, so it runs
                 the *same* network as TorchScript traced from the chosen environment.
  * reference:   ONNX Runtime CPU on the same network (what the profiler and the runtime use on CPU).

The alternative lives in its own virtual environment under .bench/ (made on first use, ~1 minute). Every
figure comes from the same run, side by side: medians of timed iterations after warm-up, 2 threads.

    python benchmarks/torch_setups.py [--iters 10]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALT_VENV = ROOT / ".bench" / "torch-2.13-cpu"
SHAPES = [(1, 224), (32, 96), (32, 224)]


def time_fn(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return 1000 * ts[len(ts) // 2]


def worker(model_path: str, iters: int, channels_last: bool) -> dict:
    """Runs inside any of the environments: times a TorchScript model or a torchvision one."""
    import torch
    torch.set_num_threads(2)
    if model_path == "torchvision":
        import torchvision
        model = torchvision.models.mobilenet_v2().eval()
    else:
        model = torch.jit.load(model_path).eval()
    out = {"torch": torch.__version__}
    with torch.inference_mode():
        for b, r in SHAPES:
            x = torch.randn(b, 3, r, r)
            m = model
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
                m = model.to(memory_format=torch.channels_last)
            n = max(3, iters if b * r * r < 32 * 224 * 224 else iters // 2)
            out[f"b{b}@{r}"] = time_fn(lambda: m(x), n)
    return out


def ensure_alt_venv() -> Path:
    py = ALT_VENV / "bin" / "python"
    if not py.exists():
        print(f"making {ALT_VENV} with torch==2.13.0 (+cpu file on disk) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(ALT_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", "numpy"], check=True)
    return py


def run_worker(python: str, model: str, iters: int, channels_last: bool = False) -> dict:
    cmd = [python, __file__, "--worker", model, "--iters", str(iters)] + (["--channels-last"] if channels_last else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def onnxruntime_row(iters: int, tmp: Path) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch
    import torchvision
    model = torchvision.models.mobilenet_v2().eval()
    out = {"torch": f"onnxruntime {ort.__version__}"}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    for b, r in SHAPES:
        path = tmp / f"m{b}_{r}.onnx"
        torch.onnx.export(model, (torch.randn(b, 3, r, r),), str(path), dynamo=False, input_names=["input"])
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        x = np.random.randn(b, 3, r, r).astype(np.float32)
        n = max(3, iters if b * r * r < 32 * 224 * 224 else iters // 2)
        out[f"b{b}@{r}"] = time_fn(lambda: sess.run(None, {"input": x}), n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--worker")
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.iters, args.channels_last)))
        return

    import torch
    import torchvision
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scripted = tmp / "mobilenet_v2.pt"
        traced = torch.jit.trace(torchvision.models.mobilenet_v2().eval(), torch.randn(1, 3, 224, 224))
        traced.save(str(scripted))
        alt = str(ensure_alt_venv())
        rows = [
            ("chosen: torch+torchvision from `pip install` (eager, NCHW)", run_worker(sys.executable, "torchvision", args.iters)),
            ("chosen, channels_last", run_worker(sys.executable, "torchvision", args.iters, channels_last=True)),
            ("chosen, same TorchScript file", run_worker(sys.executable, str(scripted), args.iters)),
            ("alternative: torch 2.13.0+cpu, TorchScript (no torchvision)", run_worker(alt, str(scripted), args.iters)),
            ("alternative, channels_last", run_worker(alt, str(scripted), args.iters, channels_last=True)),
            ("ONNX Runtime CPU (what profile/runtime use on CPU)", onnxruntime_row(args.iters, tmp)),
        ]
    cols = [f"b{b}@{r}" for b, r in SHAPES]
    print(f"\nMobileNetV2 1.0 CPU inference, median ms, 2 threads, {args.iters} iterations ({os.cpu_count()} cores)\n")
    print("| set-up | torch | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name, r in rows:
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:80]} |" + " |" * len(cols))
            continue
        print(f"| {name} | {r['torch']} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
