"""Load test: the cascade served by Triton against the reference model served by the same server.

On the 10-way real-data family (benchmarks/cost_prediction.py's) and a cascade built for batch 32: `rescascade
export --format triton` (dynamic batching up to 32, one CPU instance per model), a real tritonserver on 127.0.0.1
(benchmarks/_triton.py), and clients sending the test photos as encoded JPEG bytes, one image per request, at
concurrency 1, 8 and 32 (bounded: --requests per point). Per point: throughput, p50 and p99 latency, errors (must
be 0) and whether every answer equals the bundle runtime's (label and exit stage). Then the server is killed
(SIGKILL) in the middle of a load at concurrency 8 and restarted on the same repository: clients must get errors,
never a wrong answer, and the answers after the restart must be the same.

    python benchmarks/triton_load.py [--quick] [--requests 600]

The clients run on the same 2 cores as the server: the figures compare the two models, not absolute capacity.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402
from _triton import TritonServer, classify  # noqa: E402
from cost_prediction import QUIET  # noqa: E402
from deploy_bundle import batch32_cascade, family_options  # noqa: E402

from rescascade.config import read_config  # noqa: E402
from rescascade.export import export_triton  # noqa: E402
from rescascade.scoring import encoded_all, images_to_score  # noqa: E402
from rescascade.serve.bundle import BundleRunner  # noqa: E402

CONCURRENCY = (1, 8, 32)


def load(url: str, model: str, files: list[bytes], requests: int, concurrency: int, stop=None):
    """`requests` one-image requests (files round-robin) from `concurrency` threads -> (latencies ms of the
    answered ones, {file index: (label, exit stage)} answered, errors, wall seconds). With a `stop` event: requests
    go on (up to `requests`) until it is set, then 2 x concurrency more tries, not a flood."""
    latencies, answers, errors, after_stop = [], [], 0, 0
    lock = threading.Lock()

    def one(k: int):
        nonlocal errors, after_stop
        if stop is not None and stop.is_set():
            with lock:
                after_stop += 1
                if after_stop > 2 * concurrency:
                    return
        i = k % len(files)
        t0 = time.perf_counter()
        try:
            out = classify(url, model, [files[i]])
            ms = 1000 * (time.perf_counter() - t0)
            with lock:
                latencies.append(ms)
                answers.append((i, int(out["LABEL"][0]), int(out["EXIT_STAGE"][0])))
        except Exception:  # noqa: BLE001 (a refused or broken connection: what clients of a dead server get)
            with lock:
                errors += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    return np.array(latencies), answers, errors, time.perf_counter() - t0


def wrong(answers, want: dict) -> int:
    return sum(1 for i, label, stage in answers if (label, stage) != want[i])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    family_options(ap)
    ap.add_argument("--requests", type=int, default=600, help="requests per (model, concurrency)")
    args = ap.parse_args()
    log = print
    fam, cascade_json = batch32_cascade(args, log)
    config = read_config(cascade_json)
    repo = fam / "triton_b32"
    shutil.rmtree(repo, ignore_errors=True)  # this script's own repository: its last run's exit counts are not kept
    export_triton(cascade_json, repo, max_batch_size=32, max_queue_delay_us=2000, **QUIET)
    scored = images_to_score(config, None, "test", 64 if args.quick else 512, QUIET["log"])
    files = encoded_all(scored.images, list(range(len(scored.images))), scored.source)
    bundle = BundleRunner(repo / "cascade" / "1" / "bundle", warmup=False)
    reference = BundleRunner(repo / "reference" / "1" / "bundle", reference=True, warmup=False)
    want = {}
    for who, runner in (("cascade", bundle), ("reference", reference)):
        res = runner(files)
        want[who] = {i: (int(res.labels[i]), int(res.exit_stage[i])) for i in range(len(files))}
    n = 40 if args.quick else args.requests
    stages = " -> ".join(f"r{s.resolution}" for s in config.cascade.stages)
    log(f"# Triton load test: {stages} vs r{config.reference}, {len(files)} test photos as JPEG bytes, {n} "
        "one-image requests per point\n")
    rows = []
    with TritonServer(repo, log=log) as server:
        for c in CONCURRENCY:
            for model in ("cascade", "reference"):
                load(server.url, model, files, min(n, 2 * c), c)  # warm-up: connections, the batcher's shapes
                lat, answers, errors, wall = load(server.url, model, files, n, c)
                rows.append([model, c, n, f"{len(answers) / wall:.1f}", f"{np.percentile(lat, 50):.1f}",
                             f"{np.percentile(lat, 99):.1f}", errors,
                             "yes" if not wrong(answers, want[model]) and len(answers) == n else "NO"])
        log(table(["model", "concurrency", "requests", "images/s", "p50 ms", "p99 ms", "errors",
                   "answers = runtime's"], rows))
        # a crash in the middle of a load, then a restart on the same repository
        stop = threading.Event()
        killer = threading.Timer(1.0 if args.quick else 3.0, lambda: (stop.set(), server.stop(kill=True)))
        killer.start()
        lat, answers, errors, wall = load(server.url, "cascade", files, 1000 * n, 8, stop)  # until the kill
        killer.join()
        bad = wrong(answers, want["cascade"])
        server.start()
        lat2, answers2, errors2, _ = load(server.url, "cascade", files, n, 8)
        bad2 = wrong(answers2, want["cascade"])
    log(f"\nkilled (SIGKILL) during a load at concurrency 8: {len(answers)} answered before, {errors} requests "
        f"failed, {bad} wrong answers; after the restart: {len(answers2)} answered, {errors2} errors, {bad2} wrong")
    failed = [r for r in rows if r[6] or r[7] != "yes"]
    if failed or bad or bad2 or errors2 or not errors:
        raise SystemExit("the served answers or the crash behaviour are not as required (see above)")


if __name__ == "__main__":
    main()
