"""A pool of two tiny architectures on the same synthetic data: one cascade chosen over the stages of both."""
import json
import shutil

import numpy as np
import pytest

from rescascade.builder import CascadeBuilder
from rescascade.config import CascadeConfig
from rescascade.optimizer import stage_order
from rescascade.pool import Pool
from rescascade.serve.errors import ArtifactError, ConfigError, RescascadeError
from rescascade.target import Target

from .conftest import TINY_RES


@pytest.fixture(scope="module")
def second_member(tmp_path_factory):
    """timm's test_efficientnet trained on the tiny family's data, seed and splits (~11 s with its profile)."""
    from rescascade.profiling.measure import QUICK
    from rescascade.profiling.profile import run_profile
    from rescascade.runtime import decision_step
    from rescascade.training.run import run_train
    from rescascade.training.trainer import TrainConfig

    out = tmp_path_factory.mktemp("member") / "effnet"
    cfg = TrainConfig(TINY_RES, epochs=4, batch_size=16, optimizer="adamw", lr=0.003, workers=0, seed=0)
    run_train("synthetic:384", out, cfg, arch="timm:test_efficientnet", weights="none", log=lambda s: None,
              data_options={"heldout_per_class": 20})
    run_profile(out, "onnxruntime", "fp32", (1, 4), protocol=QUICK, threads=1, log=lambda s: None,
                decision_step=decision_step)
    return out


def test_a_pool_chooses_over_the_stages_of_every_member(tiny_family, second_member):
    pool = Pool.load([tiny_family, second_member])
    names = [f"mobilenet_v2_x0.35/r{r}" for r in TINY_RES] + [f"test_efficientnet/r{r}" for r in TINY_RES]
    assert pool.stages == names
    calib, test = pool.predictions("calib"), pool.predictions("test")
    assert calib.resolutions == names and calib.logits.shape[1] == 4 and test.n == pool.members[0].predictions["test"].n
    for k, name in enumerate(names):  # each stage's logits are its member's, as predicted
        member, r = pool.stage(name)
        assert np.array_equal(calib.logits[:, k], member.predictions["calib"].column(r))
    costs = pool.costs(batch_size=4)
    assert sorted(costs.table) == sorted(names)
    assert costs.per_image(names[2]) == pytest.approx(pool.members[1].profile.table.query(
        "resolution == 32 and batch_size == 4").eval("(median_ms + preprocess_ms + overhead_ms) / 4").iloc[0]
        - costs.once_per_image(), rel=1e-6)
    # the choice: among every member's stages, run cheapest first, finished by the most accurate stage on calib
    builder = CascadeBuilder(Target.best(), exact="on").fit(calib, costs)
    accuracy = {s: float((calib.column(s).argmax(-1) == calib.labels).mean()) for s in names}
    assert accuracy[builder.reference_] == max(accuracy.values())
    order = stage_order(costs, names)
    for c in builder.candidates_:
        assert set(c.cascade.resolutions) <= set(names)
        assert c.cascade.resolutions[:-1] == sorted(c.cascade.resolutions[:-1], key=order.index)
    assert builder.chosen_.outcome.accuracy >= builder.reference_outcome_.accuracy - 1e-12
    assert " -> " in builder.cascade_.describe() or builder.cascade_.describe() == builder.reference_
    assert builder.exact_ is not None and builder.exact_["greedy_gap"] >= -1e-9
    o = builder.oracle_
    assert sorted(o.stages) == sorted(names) and sum(o.exit_fractions) == pytest.approx(1)
    # the oracle pays, per image, the cheapest stage agreeing with the reference: never more than the reference
    single = {s: costs.expected([s], [1.0]) for s in names}
    assert single[o.stages[0]] <= o.mean_cost <= single[builder.reference_] + 1e-12
    casc_test, ref_test = builder.simulate(test, costs)  # scored on the pool's test images
    assert casc_test.n == test.n and 0 <= casc_test.accuracy <= 1
    with pytest.raises(ConfigError, match="give the Pool it was fitted on"):
        CascadeConfig.from_builder(builder, tiny_family, pool.members[0].profile, costs)
    # a reference given by its stage name; a sub-pool by stage names
    only = CascadeBuilder(Target.best(), reference=names[3], resolutions=[names[0], names[3]]).fit(calib, costs)
    assert only.reference_ == names[3] and set(only.cascade_.resolutions) <= {names[0], names[3]}


def test_the_pool_journey_build_run_eval_drift(tiny_family, second_member, tmp_path, capsys):
    """`build RUN_DIR RUN_DIR` writes a pool's cascade.json (members, stages keyed by model and resolution); the
    runtime runs it on both backends with the exits and answers the optimizer simulated on the stored logits;
    eval measures it, drift reads its counts; export writes each member's shared model once with its patches, and
    the bundle answers as the runtime; moved with its members the cascade.json still runs, one edited or with a
    member changed is refused, as is a bundle with a member's patch changed."""
    import math

    from rescascade.cli import main
    from rescascade.optimizer import Cascade, Stage, StageViews, simulate
    from rescascade.runtime import CascadeRunner
    from rescascade.serve.bundle import BundleRunner
    from rescascade.serve.counts import ExitCounts
    from rescascade.training.data import load_data
    work = tmp_path / "work"  # the members and the pool's cascade.json side by side, to be moved together
    tiny_family, second_member = (shutil.copytree(d, work / name) for d, name in ((tiny_family, "mv2"),
                                                                                    (second_member, "effnet")))
    pool = Pool.load([tiny_family, second_member])
    out = work / "pool" / "cascade.json"
    out.parent.mkdir()
    assert main(["build", str(tiny_family), str(second_member), "--batch-size", "4", "--refine", "0",
                 "--exact", "off", "--target", "0.05", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == 3 and "family" not in doc
    assert [m["model"] for m in doc["members"]] == ["mobilenet_v2_x0.35", "test_efficientnet"]
    assert [m["weights_sha256"] for m in doc["members"]] == [m.weights_sha256 for m in pool.members]
    assert set(doc["confidence"]["temperatures"]) <= set(pool.stages)
    config = CascadeConfig.load(out)
    assert config.pooled and all(s.resolution in pool.stages for s in config.cascade.stages)
    assert f"reference {config.reference} top-1" in printed and "wrote" in printed
    # the runtime: a two-stage cascade across both members with about half exiting, against simulate()
    test = pool.predictions("test")
    views = StageViews(test, config.measure, config.temperatures, config.combined)
    first, last = "test_efficientnet/r32", "mobilenet_v2_x0.35/r48"
    two = Cascade([Stage(first, float(np.median(views.view((), first)[0]))), Stage(last, -math.inf)])
    sim = simulate(two, views, pool.costs(batch_size=4))
    expected = np.where(sim.exit_stage == 0, test.column(first).argmax(-1), test.column(last).argmax(-1))
    heldout = load_data("synthetic:384", seed=0, heldout_per_class=20).test
    images = [heldout.read(i) for i in range(test.n)]
    for backend in ("onnxruntime", "torch"):
        res = CascadeRunner(out, backend=backend, stages=two, warmup=False)(images)
        assert np.mean(res.exit_stage == sim.exit_stage) > 0.97 and 0 < (res.exit_stage == 0).mean() < 1
        assert np.mean(res.labels == expected) > 0.97
        assert res.stage_names == [first, last] and [t.stage for t in res.stage_timings] == [first, last]
    # the cascade served, its counts and drift; eval against the pool's reference
    runner = CascadeRunner(out)
    runner(images[:16])
    runner.counts.save(tmp_path / "counts.json")
    assert ExitCounts.load(tmp_path / "counts.json").names == [f"{s.resolution}" for s in config.cascade.stages]
    assert main(["drift", str(out), str(tmp_path / "counts.json")]) == 0
    assert main(["eval", str(out), "--repeats", "1", "--limit", "16", "--out", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["reference"]["stage"] == config.reference
    assert report["cascade"]["stage_names"] == [s.resolution for s in config.cascade.stages]
    # the bundle of a two-member cascade: each member's shared model once, its patches beside it; the bundle's
    # answers are the runtime's bit for bit, its counts of the same plan
    two_doc = json.loads(out.read_text())
    two_doc["stages"] = [{"resolution": 32, "model": "test_efficientnet", "threshold": two.stages[0].threshold},
                         {"resolution": 48, "model": "mobilenet_v2_x0.35", "threshold": None}]
    for split in ("calib", "test"):
        two_doc["expected"][split]["exit_fractions"] = [0.5, 0.5]
    two_json = out.with_name("two.json")
    two_json.write_text(json.dumps(two_doc))
    capsys.readouterr()
    assert main(["export", str(two_json), "--out", str(work / "bundle")]) == 0, capsys.readouterr().err
    bundle = json.loads((work / "bundle" / "bundle.json").read_text())
    assert bundle["schema_version"] == 5 and sorted(m["model"] for m in bundle["members"]) == \
        sorted({"test_efficientnet", "mobilenet_v2_x0.35", doc["reference"]["model"]})
    for m in bundle["members"]:
        assert m["shared"]["file"] == f"{m['model']}/model.fp32.onnx"
        assert all(e["file"].startswith(f"{m['model']}/patches/") for e in m["models"].values())
    served = CascadeRunner(two_json, backend="onnxruntime", warmup=False)
    deployed = BundleRunner(work / "bundle", warmup=False)
    arrays = [im.permute(1, 2, 0).numpy() for im in images]  # the bundle's layout, uint8 [H, W, 3]
    a, b = served(images), deployed(arrays)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.exit_stage, b.exit_stage)
    assert np.array_equal(a.probs, b.probs) and b.stage_names == [first, last] and 0 < (b.exit_stage == 0).mean() < 1
    assert deployed.counts.plan == served.counts.plan
    # moved with its members: still runs; a member changed since the build: refused
    moved = work.rename(tmp_path / "moved")
    assert CascadeRunner(moved / "pool" / "cascade.json", warmup=False)(images[:4]).labels.min() >= 0
    assert np.array_equal(BundleRunner(moved / "bundle", warmup=False)(arrays[:4]).labels, b.labels[:4])
    patch = next((moved / "bundle" / "test_efficientnet" / "patches").iterdir())
    patch.write_bytes(patch.read_bytes()[:-1] + b"x")
    with pytest.raises(ArtifactError, match="test_efficientnet's resolution 32's patch"):
        BundleRunner(moved / "bundle", warmup=False)
    family_json = moved / "effnet" / "family.json"
    family_json.write_text(family_json.read_text().replace('"epochs"', '"epochs" ', 1))
    with pytest.raises(RescascadeError, match="changed since"):
        CascadeRunner(moved / "pool" / "cascade.json", warmup=False)
    edited = json.loads((moved / "pool" / "cascade.json").read_text())
    edited["stages"][0]["model"] = "resnet18"
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(ArtifactError, match="stage 1's stage"):
        CascadeConfig.load(tmp_path / "edited.json")


def test_a_pool_build_refuses_what_it_cannot_do_in_one_line(tiny_family, second_member, tmp_path, capsys):
    from rescascade.cli import main
    cases = [([str(tiny_family), str(second_member)], "give --out"),
             ([str(tiny_family), str(second_member), "--profile", str(tiny_family / "profile.csv"), "--out",
               str(tmp_path / "c.json")], "leave --profile out"),
             ([str(tiny_family), str(tiny_family), "--out", str(tmp_path / "c.json")], "the same family twice"),
             ([str(tiny_family), str(second_member), "--reference", "resnet18/r32", "--out", str(tmp_path / "c.json")],
              "resnet18/r32"),
             ([str(tiny_family), "--reference", "mobilenet_v2_x0.35/r32"], "resolution")]
    cases += [([str(tiny_family), str(second_member), "--out", str(second_member / name)], "one of this command's "
               "inputs") for name in ("family.json", "profile.csv", "predictions/calib.npz")]
    before = {f: f.read_bytes() for f in second_member.rglob("*") if f.is_file()}
    for argv, message in cases:
        assert main(["build", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "c.json").exists()
    assert {f: f.read_bytes() for f in second_member.rglob("*") if f.is_file()} == before  # nothing replaced


def test_two_families_of_one_model_and_stages_not_in_the_pool_are_one_line(tiny_family, second_member, tmp_path):
    """Two trainings of one model cannot share a pool (its stage names, cascade.json and bundle name members by
    model): refused up front, not at save. A runner asked for a stage the cascade lacks is a ConfigError."""
    import dataclasses
    import math

    from rescascade.optimizer import Cascade, Stage
    from rescascade.pool import Member, check_members
    from rescascade.runtime import CascadeRunner
    a = Member.load(second_member)
    other = dataclasses.replace(a, run_dir=tmp_path / "eff40", doc={**a.doc, "files": {"other.safetensors": "0" * 64}})
    with pytest.raises(RescascadeError, match="are both test_efficientnet"):
        check_members([Member.load(tiny_family), a, other])
    pool = Pool.load([tiny_family, second_member])
    costs = pool.costs(batch_size=4)
    builder = CascadeBuilder(Target.best()).fit(pool.predictions("calib"), costs)
    path = CascadeConfig.from_builder(builder, pool, None, costs).save(tmp_path / "pool.json")
    for stage in (48, "resnet18/r32", "test_efficientnet/r99"):
        with pytest.raises(ConfigError, match="a pool's stages are named MODEL/rR"):
            CascadeRunner(path, stages=Cascade([Stage(stage, -math.inf)]), warmup=False)


def test_members_that_cannot_be_compared_are_one_line_naming_both(tiny_family, second_member, tmp_path):
    with pytest.raises(ConfigError, match="at least two members"):
        Pool.load([tiny_family])
    with pytest.raises(ConfigError, match="list of family directories"):
        Pool.load(str(tiny_family))
    with pytest.raises(RescascadeError, match="the same family twice"):
        Pool.load([tiny_family, tiny_family])
    with pytest.raises(RescascadeError, match="profile.csv not found|not found"):
        Pool.load([tiny_family, tmp_path / "nothing"])

    def edited(name, edit):  # a copy of the second member with one file edited
        copy = tmp_path / name
        shutil.copytree(second_member, copy)
        edit(copy)
        return copy

    def family_json(copy, change):
        doc = json.loads((copy / "family.json").read_text())
        change(doc)
        (copy / "family.json").write_text(json.dumps(doc))

    def test_ids(copy):  # the same weights id, another test image at index 3
        with np.load(copy / "predictions" / "test.npz") as z:
            arrays = dict(z)
        arrays["ids"] = arrays["ids"].copy()
        arrays["ids"][3] = "another.png"
        np.savez(copy / "predictions" / "test.npz", **arrays)

    def device(copy):
        doc = json.loads((copy / "profile.json").read_text())
        doc["device"]["cpu"] = "another CPU"
        (copy / "profile.json").write_text(json.dumps(doc))

    def calib_r48(copy):  # calib predictions of r48 only, test of both
        with np.load(copy / "predictions" / "calib.npz") as z:
            arrays = dict(z)
        arrays["logits"], arrays["resolutions"] = arrays["logits"][:, 1:], arrays["resolutions"][1:]
        np.savez(copy / "predictions" / "calib.npz", **arrays)

    def threads(copy):  # the same device, timed on another thread count
        import pandas as pd
        df = pd.read_csv(copy / "profile.csv")
        df["threads"] = df["threads"] + 1
        df.to_csv(copy / "profile.csv", index=False)

    with pytest.raises(ArtifactError, match="calib and test predictions cover different resolutions"):
        Pool.load([tiny_family, edited("res", calib_r48)])
    with pytest.raises(RescascadeError, match="has no batch-size-32 row"):
        Pool.load([tiny_family, second_member]).costs(batch_size=32, batch_aware=True)
    with pytest.raises(RescascadeError, match="the same family twice"):  # a copy, third in the pool
        Pool.load([tiny_family, second_member, edited("copy", lambda c: None)])
    with pytest.raises(ConfigError, match="a Pool holds Members, got str"):
        Pool(["a", "b"])
    pool = Pool.load([tiny_family, second_member])
    for bad in ({"reference": "r48"}, {"resolutions": ["test_efficientnet/r32", 48]}):
        with pytest.raises(ConfigError, match="stage name"):
            CascadeBuilder(**bad)
    fitted = CascadeBuilder(Target.best()).fit(pool.predictions("calib"), pool.costs(batch_size=4))
    with pytest.raises(ConfigError, match="hold no logits of .*another family or pool"):
        fitted.simulate(pool.members[0].predictions["test"], pool.costs(batch_size=4))
    for name, edit, message in (
            ("classes", lambda c: family_json(c, lambda d: d["class_names"].reverse()), "predict different classes"),
            ("crop", lambda c: family_json(c, lambda d: d["preprocessing"].update(crop_fraction=0.5)),
             "preprocess differently \\(crop_fraction"),
            ("images", test_ids, "hold different test images: image ids differ from image 3 on"),
            ("device", device, "were profiled on different devices"),
            ("threads", threads, "were profiled on different devices .*threads")):
        copy = edited(name, edit)
        with pytest.raises(RescascadeError, match=message) as e:
            Pool.load([tiny_family, copy])
        assert str(tiny_family) in str(e.value) and str(copy) in str(e.value)


@pytest.mark.slow
def test_triton_serves_a_pools_cascade_as_its_bundle(tiny_family, second_member, tmp_path):
    """A two-member cascade exported as a Triton model repository, served by a real tritonserver: its answers,
    exit stages and stage names are the bundle's. Skipped, with one line, where the server cannot run."""
    from benchmarks._triton import TritonServer, TritonUnavailable, classify, server_environment
    from rescascade.export import export_triton
    from rescascade.serve.bundle import BundleRunner

    from .conftest import encode, photo
    pool = Pool.load([tiny_family, second_member])
    costs = pool.costs(batch_size=4)
    builder = CascadeBuilder(Target.best()).fit(pool.predictions("calib"), costs)
    doc = CascadeConfig.from_builder(builder, pool, None, costs).doc
    doc["stages"] = [{"resolution": 32, "model": "test_efficientnet", "threshold": 0.5},
                     {"resolution": 48, "model": "mobilenet_v2_x0.35", "threshold": None}]
    for split in ("calib", "test"):
        doc["expected"][split]["exit_fractions"] = [0.5, 0.5]
    path = CascadeConfig(doc).save(tmp_path / "two.json")
    repo = export_triton(path, tmp_path / "models", max_batch_size=8, log=lambda s: None)
    images = [encode(photo(60 + 13 * i, 140 - 5 * i, 300 + i), "JPEG") for i in range(8)]
    want = BundleRunner(repo / "cascade" / "1" / "bundle", threads=1, warmup=False)(images)
    try:
        server_environment(log=lambda s: None)
        server = TritonServer(repo, log=lambda s: None).start()
    except TritonUnavailable as e:
        pytest.skip(f"Triton cannot run here: {e}")
    try:
        got = classify(server.url, "cascade", images)
    finally:
        server.stop()
    assert got["LABEL"].tolist() == want.labels.tolist() and got["EXIT_STAGE"].tolist() == want.exit_stage.tolist()
    assert [b.decode() for b in got["STAGE"]] == want.exit_names
    assert got["RESOLUTION"].tolist() == [[32, 48][s] for s in want.exit_stage]
