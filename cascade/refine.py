"""`build --refine N`: check the cost model against the real runtime and choose again with what it measured.

The profile times each stage alone, round-robin; a cascade runs a stage right after another one, on the rows
that reach it, with Python around it. At batch 1 that differs measurably (cold caches after a larger model, a
per-call overhead the profile does not see), so a choice made on profile costs can be off by more than the
margins between candidates. The loop:

1. run the chosen cascade, its closest Pareto alternatives and the reference with the cascade runtime on N
   calibration images (encoded bytes when the costs count the decode), round-robin per batch, `repeats` passes;
2. re-estimate each stage's per-image cost from the runtime's own stage timings (inference, preprocessing,
   decision; the decode per decoded row), scale the profile's rows by it (at batch > 1 the serving batch's row by
   the full calls, the smaller rows by the smaller calls; resolutions never run take the median factor), and
   charge the per-image time outside the stages once per cascade;
3. choose again with the refined costs; a new choice is measured too, and its timings refine the costs again
   (at most ROUNDS choices): a stage first timed on the few rows a later stage gets is priced at full batches
   from its own full-batch calls once it leads a cascade.

cascade.json records, per cascade run, the cost ratio to the reference predicted by the profile, by the refined
costs and measured, on the same N images.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from rescascade.serve.errors import ConfigError, RescascadeError, check_int
from rescascade.serve.images import Encoded
from rescascade.training.progress import progress

from .costs import CostModel
from .optimizer import Cascade, Stage, StageViews, simulate
from .scoring import decode_all, encoded_all, images_to_score

ALTERNATIVES = 3       # Pareto candidates measured beside the chosen cascade
NEAR_ACCURACY = 0.01   # ... among those within this much calib accuracy of it
ROUNDS = 3             # refine-and-choose rounds at most (each new choice is measured and refines the next)


def calibration_inputs(config, calib, n: int, encoded: bool, log) -> tuple[list, np.ndarray]:
    """N calib images spread over the split, as the runtime will get them (bytes, or decoded tensors), and their
    rows in `calib` (a Predictions). Raises DataError when the images are gone or changed since prediction."""
    images, spec, digests, _ = images_to_score(config, None, "calib", n, log)
    decoded, _, kept = decode_all(images, digests, log)
    if encoded and kept and images.encoded(kept[0]) is None:
        raise ConfigError(f"--refine: the calib images of {spec} are held decoded, so there are no files to time the "
                          "decode on; build with --decoded-inputs")
    position = {str(i): k for k, i in enumerate(calib.ids)}
    rows = np.array([position[str(images.ids[i])] for i in kept], dtype=np.int64)
    return (encoded_all(images, kept, spec) if encoded else decoded), rows


def measure_cascades(runner, cascades: list[Cascade], inputs: list, batch_size: int, repeats: int) -> list[dict]:
    """Run each cascade on `inputs` with `runner` (a CascadeRunner; `runner.use` switches cascades), batch by batch
    in rotating order, `repeats` passes after one warm-up pass. -> per cascade: ms_per_image (the sum over batches
    of each batch's median wall time, / N) and, summed over the passes, per resolution the rows and seconds of the
    stage's work ("stages"), per resolution whose scale was decoded at the decoded rows and seconds ("decode"),
    and the wall seconds outside every stage."""
    batches = [inputs[s:s + batch_size] for s in range(0, len(inputs), batch_size)]
    wall = np.zeros((len(cascades), len(batches), repeats))
    stats = [{"stages": {}, "decode": {}, "outside_s": 0.0, "images": 0} for _ in cascades]
    for rep in range(-1, repeats):  # -1: the warm-up pass, untimed
        for j, batch in enumerate(progress(batches, desc=f"refine pass {rep + 2}/{repeats + 1}", unit="batch")):
            for k in np.roll(np.arange(len(cascades)), j + rep):
                runner.use(cascades[k])
                res = runner(batch)
                if rep < 0:
                    continue
                wall[k, j, rep] = res.wall_s
                inside = 0.0
                for t in res.stage_timings:
                    s = stats[k]["stages"].setdefault(t.stage, {"rows": 0, "work_s": 0.0, "calls": []})
                    # a decode belongs to the scale it decodes at: a cascade decoded once decodes at decode_at's
                    # (keyed as costs.decode_ms is: by stage key)
                    d = stats[k]["decode"].setdefault(cascades[k].decode_at or t.stage,
                                                      {"decoded": 0, "decode_s": 0.0})
                    s["rows"] += t.rows
                    d["decoded"] += t.decoded
                    d["decode_s"] += t.decode_s
                    s["work_s"] += t.preprocess_s + t.inference_s + t.decide_s
                    if t.rows:  # (rows, batch, seconds) of each call: the cost model prices calls by their rows
                        s["calls"].append((t.rows, len(batch), t.preprocess_s + t.inference_s + t.decide_s))
                    inside += t.decode_s + t.preprocess_s + t.inference_s + t.decide_s
                stats[k]["outside_s"] += res.wall_s - inside
                stats[k]["images"] += len(batch)
    for k, st in enumerate(stats):
        st["ms_per_image"] = 1000 * float(np.median(wall[k], axis=1).sum()) / len(inputs)
    return stats


def refined_costs(costs: CostModel, runs: list[dict], decode: bool = True) -> CostModel:
    """The profile's costs re-estimated from the runtime's stage timings (see the module): each resolution's rows
    scaled by measured / priced time of its calls (batch-aware costs price a call by its rows: the row at the
    serving batch is scaled by the calls at it, the smaller rows by the smaller calls; the others price every call
    at the serving batch, so only full-batch calls are compared), decode per decoded row (decode False: the profile's
    decode costs kept, for images of another size than the costs are for), and the time outside the stages as
    the once-per-image cost."""
    calls, dec_s, decoded = {}, {}, {}
    for run in runs:
        for r, s in run["stages"].items():
            calls.setdefault(r, []).extend(s.get("calls") or [(s["rows"], s["rows"], s["work_s"])])
        for r, d in run["decode"].items():
            dec_s[r] = dec_s.get(r, 0.0) + d["decode_s"]
            decoded[r] = decoded.get(r, 0) + d["decoded"]
    full, partial = {}, {}  # per resolution: measured / priced time of its full-batch calls, of its smaller ones
    for r, cs in calls.items():
        if r not in costs.table:
            continue
        if costs.batch_aware:  # calls priced by their rows: at the serving batch, and below it
            groups = ((full, [c for c in cs if c[0] >= costs.batch_size]),
                      (partial, [c for c in cs if c[0] < costs.batch_size]))
        else:  # the costs price every stage at the full serving batch: compare full calls
            groups = ((full, [c for c in cs if c[0] == c[1]] or cs),)
        for factor, some in groups:
            priced = sum(n * costs.per_image(r, n if costs.batch_aware else None) for n, _, _ in some if n)
            if priced > 0:
                factor[r] = 1000 * sum(seconds for _, _, seconds in some) / priced
    if not full and not partial:
        raise RescascadeError("the refinement ran no stage: no calibration image was answered")
    typical = float(np.median(list(full.values()) + list(partial.values())))

    def scale(r: int, b: int) -> float:
        # a profile row can be off on its own (a noisy row): the serving batch's row is scaled by the full-batch
        # calls, the smaller rows (the later stages' shrinking batches) by the smaller calls, each where measured
        first, second = (full, partial) if b >= costs.batch_size else (partial, full)
        return first.get(r, second.get(r, typical))

    table = {r: {b: v * scale(r, b) for b, v in by_batch.items()} for r, by_batch in costs.table.items()}
    decode_ms = dict(costs.decode_ms)
    if decode_ms and decode:
        measured = {r: 1000 * dec_s[r] / decoded[r] for r in dec_s if decoded.get(r)}
        ratio = float(np.median([measured[r] / costs.decode_ms[r] for r in measured if costs.decode_ms[r] > 0]
                                or [1.0]))
        decode_ms = {r: measured.get(r, ms * ratio) for r, ms in decode_ms.items()}
    outside = 1000 * sum(run["outside_s"] for run in runs) / sum(run["images"] for run in runs)
    return replace(costs, table=table, decode_ms=decode_ms, once={costs.batch_size: outside})


def _typical_size(inputs: list[bytes]) -> tuple[int, int]:
    """The median (width, height) of encoded images, read from their headers."""
    sizes = np.array([(e.width, e.height) for e in map(Encoded, inputs)])
    return tuple(int(v) for v in np.median(sizes, axis=0))


def _ratios(cascades: list[Cascade], reference: int, views: StageViews, costs: CostModel) -> list[float]:
    ref = simulate(Cascade([Stage(reference, -math.inf)]), views, costs).mean_cost
    return [simulate(c, views, costs).mean_cost / ref for c in cascades]


def _alternatives(builder) -> list[Cascade]:
    """The chosen cascade and the cheapest few Pareto candidates near its accuracy."""
    chosen = builder.chosen_
    near = [c for c in builder.front_ if c.outcome.accuracy >= chosen.outcome.accuracy - NEAR_ACCURACY
            and c.cascade.key() != chosen.cascade.key() and len(c.cascade.stages) > 1]
    near.sort(key=lambda c: c.outcome.mean_cost)
    return [chosen.cascade] + [c.cascade for c in near[:ALTERNATIVES]]


def refine(builder, calib, costs: CostModel, make_runner, n: int, repeats: int = 3, log=print,
           inputs: tuple[list, np.ndarray] | None = None) -> dict:
    """The loop of the module docstring on a fitted CascadeBuilder (refitted in place with the refined costs).
    make_runner(builder, costs) -> a CascadeRunner of the builder's current choice; n: calibration images;
    repeats: timed passes; inputs: `calibration_inputs` of n images already read. -> the record cascade.json
    keeps, with the refined CostModel under "costs"."""
    check_int("refine", n, 1)
    check_int("repeats", repeats, 1)
    runner = make_runner(builder, costs)
    inputs, rows = inputs or calibration_inputs(runner.config, calib, n, bool(costs.decode_ms), log)
    reference = Cascade([Stage(builder.reference_, -math.inf)])
    cascades = _alternatives(builder)
    runs = measure_cascades(runner, cascades + [reference], inputs, costs.batch_size, repeats)
    size = _typical_size(inputs) if costs.decode_ms else None
    same_size = size == costs.source_size
    if costs.decode_ms and not same_size:
        log(f"refine: the calib images are {size[0]}x{size[1]}, the decode costs are for {costs.source_size[0]}x"
            f"{costs.source_size[1]}: the profile's decode costs are kept")
    first = builder.cascade_
    ref_runs = runs[-1:]
    runs = runs[:-1]
    for _ in range(ROUNDS):
        refined = refined_costs(costs, runs + ref_runs, decode=same_size)
        builder.fit(calib, refined)
        if builder.cascade_.key() in {c.key() for c in cascades}:
            break
        # a new choice: measure it beside the reference; its stages' timings refine the costs of the next round
        # (a stage first run at another batch than the new choice runs it can be priced off by the profile's row)
        more = measure_cascades(make_runner(builder, refined), [builder.cascade_, reference], inputs,
                                costs.batch_size, repeats)
        cascades.append(builder.cascade_)
        runs.append(more[0])
        ref_runs.append(more[1])
    ref_ms = float(np.mean([run["ms_per_image"] for run in ref_runs]))
    views = StageViews(calib.subset(rows).restrict(builder.resolutions_), builder.measure_, builder.temperatures_,
                       builder.combine_)
    predicted = _ratios(cascades, builder.reference_, views, costs)
    after = _ratios(cascades, builder.reference_, views, refined)
    measured = [run["ms_per_image"] / ref_ms for run in runs]
    record = {"images": len(inputs), "repeats": repeats, "batch_size": costs.batch_size,
              "inputs": "encoded" if costs.decode_ms else "decoded",
              "decode_refined": bool(costs.decode_ms) and same_size,
              "first_choice": first.describe(), "chosen": builder.cascade_.describe(),
              "reference_ms_per_image": ref_ms,
              "cascades": [{"cascade": c.describe(), "predicted_ratio": p, "refined_ratio": q, "measured_ratio": m,
                            "measured_ms_per_image": run["ms_per_image"]}
                           for c, p, q, m, run in zip(cascades, predicted, after, measured, runs)]}
    mine = next(c for c in record["cascades"] if c["cascade"] == builder.cascade_.describe())
    record.update(predicted_ratio=mine["predicted_ratio"], refined_ratio=mine["refined_ratio"],
                  measured_ratio=mine["measured_ratio"], costs=refined)
    return record
