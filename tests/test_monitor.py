"""Watching a deployed cascade: the runtime counts exits and confidences per stage, and `rescascade drift` tells
served traffic that exits like calibration from traffic that does not."""
import json
import subprocess
import sys

import numpy as np
import pytest

from rescascade.config import read_config
from rescascade.monitor import drift_report
from rescascade.optimizer import Cascade, Stage
from rescascade.runtime import CascadeRunner
from rescascade.serve.counts import ExitCounts, plan_identity
from rescascade.serve.errors import ArtifactError, ConfigError
from rescascade.training.synthetic import make_synthetic


def served_counts(config, fractions, n):
    """Counts of n inputs whose stages exit the given fractions of all inputs (the last answers the rest)."""
    stages = [int(s["resolution"]) for s in config.doc["stages"]]
    counts = ExitCounts.for_cascade(stages, config.measure, config.doc["family"]["num_classes"],
                                    plan_identity(config.doc))
    left = n
    for k in range(len(stages)):
        leave = left if k == len(stages) - 1 else int(round(n * fractions[k]))
        counts.add_stage(k, np.linspace(0.1, 0.9, left), np.arange(left) < leave)
        left -= leave
    counts.inputs = n
    return counts


def two_stages(cascade_json):
    """The built cascade.json's config made a two-stage cascade (whatever the build chose) expecting 60 % of the
    test images to exit at the first stage."""
    config = read_config(cascade_json)
    low, high = config.doc["family"]["resolutions"][0], config.doc["family"]["resolutions"][-1]
    config.doc["stages"] = [{"resolution": low, "threshold": 0.5}, {"resolution": high, "threshold": None}]
    config.doc["expected"]["test"].update(n=500, exit_fractions=[0.6, 0.4])
    config.doc["expected"]["calib"].update(exit_fractions=[0.6, 0.4])
    return config


def test_runtime_counts_what_the_served_cascade_saw(built, tmp_path):
    _, cascade_json, _ = built
    runner = CascadeRunner(two_stages(cascade_json))
    assert runner.counts.inputs == 0 and sum(runner.counts.reached) == 0  # warm-up is not traffic
    images, _ = make_synthetic(12, size=64, seed=3)  # uint8 [12, 3, 64, 64]
    res = runner(list(images) + [b"not an image"])
    c = runner.counts
    assert c.inputs == 13 and c.errors == 1 and c.reached[0] == 12
    assert c.exited == [int((res.exit_stage == k).sum()) for k in range(len(c.stages))]
    assert all(sum(h) == r for h, r in zip(c.histograms, c.reached))
    runner.use(Cascade([Stage(c.stages[-1], -np.inf)]))  # another cascade swapped in: not counted
    runner(list(images))
    assert runner.counts.inputs == 13
    c.save(tmp_path / "counts.json")
    assert ExitCounts.load(tmp_path / "counts.json") == c


def test_stages_are_named_by_model_and_resolution(built, tmp_path):
    """cascade.json names the model of every stage and of the reference; results, counts and the drift report name
    a stage "MODEL/rR"; a cascade.json from before the field names it "rR"; a model that is not a name is refused."""
    from rescascade.monitor import format_drift
    _, cascade_json, _ = built
    built_doc = json.loads(cascade_json.read_text())
    model = built_doc["reference"]["model"]
    assert model == "mobilenet_v2_x0.35" and {s["model"] for s in built_doc["stages"]} == {model}
    config = two_stages(cascade_json)  # stages written without their model: named by resolution alone
    low, high = [s["resolution"] for s in config.doc["stages"]]
    images, _ = make_synthetic(8, size=64, seed=3)
    assert CascadeRunner(config, warmup=False)(list(images)).stage_names == [f"r{low}", f"r{high}"]
    for s in config.doc["stages"]:
        s["model"] = model
    runner = CascadeRunner(config, warmup=False)
    want = [f"{model}/r{low}", f"{model}/r{high}"]
    res = runner(list(images) + [b"not an image"])
    assert res.stage_names == want == runner.counts.names
    assert res.exit_names == [want[k] for k in res.exit_stage[:8]] + [None]
    runner.counts.save(tmp_path / "counts.json")
    assert ExitCounts.load(tmp_path / "counts.json").names == want
    report = drift_report(config, runner.counts)
    assert [r["stage"] for r in report["stages"]] == want[:1] and f"| {want[0]} |" in format_drift(report)
    saved = json.loads((tmp_path / "counts.json").read_text())
    for names, message in ((want[:1], "names must be its 2 stages' names"), (["a\nb", "c"], "names must be"),
                           ([1, 2], "names must be")):
        (tmp_path / "edited.json").write_text(json.dumps({**saved, "names": names}))
        with pytest.raises(ArtifactError, match=message):
            ExitCounts.load(tmp_path / "edited.json")
    (tmp_path / "edited.json").write_text(json.dumps({**saved, "names": ["resnet50/r1", "resnet50/r2"]}))
    with pytest.raises(ConfigError, match="the counts name their stages resnet50/r1 -> resnet50/r2"):
        drift_report(config, ExitCounts.load(tmp_path / "edited.json"))
    for model in (7, "", "a/b", "two\nlines"):
        config.doc["stages"][0]["model"] = model
        with pytest.raises(ArtifactError, match="model must be a name"):
            config.save(tmp_path / "bad.json")


def test_drift_flags_traffic_that_exits_otherwise(built, tmp_path):
    _, cascade_json, _ = built
    config = two_stages(cascade_json)
    config.save(tmp_path / "two.json")
    same = drift_report(config, served_counts(config, [0.6, 0.4], 4000))
    assert not same["drifted"] and same["stages"][0]["p_value"] > 0.05
    assert drift_report(config, served_counts(config, [0.57, 0.43], 4000))["stages"][0]["p_value"] > 0.01
    moved = drift_report(config, served_counts(config, [0.45, 0.55], 4000))
    assert moved["drifted"] and moved["stages"][0]["p_value"] < 1e-6
    served_counts(config, [0.45, 0.55], 4000).save(tmp_path / "c.json")
    cli = [sys.executable, "-m", "rescascade", "drift", str(tmp_path / "two.json"), str(tmp_path / "c.json")]
    run = subprocess.run(cli + ["--check"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 3 and "traffic has drifted" in run.stdout, run.stderr
    assert subprocess.run(cli, capture_output=True, text=True, timeout=120).returncode == 0


def test_drift_refuses_counts_of_another_cascade_or_a_damaged_file(built, tmp_path):
    _, cascade_json, _ = built
    config = two_stages(cascade_json)
    other = ExitCounts.for_cascade([999], config.measure, 10, "another plan")
    with pytest.raises(ConfigError, match="compare counts with the cascade.json"):
        drift_report(config, other)
    with pytest.raises(ConfigError, match="alpha"):
        drift_report(config, served_counts(config, [0.6, 0.4], 10), alpha=1.5)
    (tmp_path / "bad.json").write_text(json.dumps({"schema_version": 2, "stages": [96], "measure": "max_prob",
                                                   "edges": [0, 1], "plan": "x", "ids": ["a"], "reached": [1],
                                                   "exited": [5], "histograms": [[1]]}))
    with pytest.raises(ArtifactError, match="more exits than arrivals"):
        ExitCounts.load(tmp_path / "bad.json")
    served = served_counts(config, [0.6, 0.4], 40)
    served.save(tmp_path / "served.json")
    doc = json.loads((tmp_path / "served.json").read_text())
    for edit, message in (({"reached": [99, 16]}, "histogram holds more inputs than reached it|more inputs reached"),
                          ({"reached": [40, 30]}, "more inputs reached a stage than went on"),
                          ({"inputs": 10}, "more inputs reached the first stage or failed than the 10"),
                          ({"errors": 41}, "or failed than the 40"), ({"inputs": -1}, "whole numbers"),
                          ({"histograms": [[99] + [0] * 19, [0] * 20]}, "histogram holds more inputs")):
        (tmp_path / "edited.json").write_text(json.dumps({**doc, **edit}))
        with pytest.raises(ArtifactError, match=message):
            ExitCounts.load(tmp_path / "edited.json")
    run = subprocess.run([sys.executable, "-m", "rescascade", "drift", str(cascade_json), str(tmp_path / "none.json")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
