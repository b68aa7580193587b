"""A user's mistakes, one table: every command with a bad value or a bad file stops with exit 2 and one line that
says what is wrong and what to do, and no file that existed before is changed (sha256 of each, before and after).
Plus: --help is fast (torch is not imported) and every option says what it does and its real default."""
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rescascade.cli import build_parser, main

TINY = ["--resolutions", "32,48", "--width-mult", "0.35", "--weights", "none", "--epochs", "1", "--batch-size", "16",
        "--optimizer", "adamw", "--lr", "0.003", "--workers", "0", "--heldout-per-class", "10"]


class Evil:  # a pickled class instance: what torch.load(weights_only=True) refuses
    pass


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(built, tmp_path_factory):
    """A directory with: fam/ (a finished family + profile + cascade.json, its profile marked as measured), user/
    (a folder of the user's own files), stopped/ (a run interrupted after epoch 1), and damaged copies."""
    import pandas as pd
    fam_src, cascade_json, _ = built
    root = tmp_path_factory.mktemp("mistakes")
    fam = root / "fam"
    shutil.copytree(fam_src, fam)
    shutil.copy(cascade_json, fam / "cascade.json")
    cfg = json.loads((fam / "cascade.json").read_text())
    cfg["family"]["path"] = "."
    cfg["stages"] = [{"resolution": 32, "threshold": 0.5}, {"resolution": 48, "threshold": None}]
    for split in ("calib", "test"):
        cfg["expected"][split]["exit_fractions"] = [0.5, 0.5]
    (fam / "cascade.json").write_text(json.dumps(cfg))
    profile = pd.read_csv(fam / "profile.csv")
    profile["smoke"] = False  # as if measured for real
    profile.to_csv(fam / "profile.csv", index=False)
    (root / "user").mkdir()
    (root / "user" / "notes.txt").write_text("my own notes")
    (root / "user" / "checkpoints").mkdir()
    (root / "user" / "checkpoints" / "mine.bin").write_bytes(b"precious")
    # an interrupted run: the trainer's checkpoint after one of two epochs, no family.json
    from rescascade.training.data import load_data
    from rescascade.training.family import ResolutionFamily
    from rescascade.training.trainer import TrainConfig, train
    splits = load_data("synthetic:64", seed=0, heldout_per_class=10, log=lambda s: None)
    torch.manual_seed(0)
    train(ResolutionFamily((32, 48), num_classes=8, width_mult=0.35), splits.train,
          TrainConfig((32, 48), epochs=1, batch_size=16, optimizer="adamw", lr=0.003, workers=0), root / "stopped",
          log=lambda s: None)
    # damaged or foreign files
    bad = root / "bad"
    shutil.copytree(fam, bad)
    test = dict(np.load(bad / "predictions" / "test.npz"))
    (bad / "predictions" / "calib.npz").write_bytes((fam / "predictions" / "calib.npz").read_bytes()[:500])
    np.savez(bad / "predictions" / "test.npz", **{k: v for k, v in test.items() if k != "weights_sha256"})
    for name, threshold in (("range", 1.5), ("text", "high")):
        c = json.loads((fam / "cascade.json").read_text())
        c["stages"][0]["threshold"] = threshold
        (bad / f"cascade_{name}.json").write_text(json.dumps(c))
    torch.save({"weight": torch.zeros(1), "extra": Evil()}, root / "evil.pth")
    (root / "list.json").write_text("[1, 2]")
    for name, edit in (("width", lambda d: d.update(width_mult="abc")),
                       ("crop", lambda d: d["preprocessing"].update(crop_fraction=0)),
                       ("mean", lambda d: d["preprocessing"].update(mean="abc"))):
        shutil.copytree(fam, root / f"fam_{name}")
        doc = json.loads((fam / "family.json").read_text())
        edit(doc)
        (root / f"fam_{name}" / "family.json").write_text(json.dumps(doc))
    for name, column, value in (("fast", "median_ms", "fast"), ("zero", "batch_size", 0), ("nan", "median_ms", "nan"),
                                ("negative", "preprocess_ms", -5)):
        shutil.copytree(fam, root / f"prof_{name}")
        rows = pd.read_csv(fam / "profile.csv")
        rows[column] = rows[column].astype(object)
        rows.loc[0, column] = value
        rows.to_csv(root / f"prof_{name}" / "profile.csv", index=False)
    shutil.copytree(fam, root / "indep")
    (root / "indep" / "family.json").rename(root / "indep" / "independent.json")
    (root / "afile").write_text("a file")
    return root


# (command with {root} for the workspace, expected message fragment); every case exits 2 and changes no file
CASES = [
    # lost user data
    ("train --data synthetic:64 --out {root}/user" + " " + " ".join(TINY), "not a rescascade run"),
    ("train --data synthetic:64 --out {root}/fam" + " " + " ".join(TINY), "already holds a finished family"),
    ("train --data synthetic:64 --out {root}/fam --resume --seed 5" + " " + " ".join(TINY), "other settings"),
    ("train --data synthetic:64 --out {root}/stopped" + " " + " ".join(TINY), "interrupted run"),
    ("train --data synthetic:96 --out {root}/stopped --resume" + " " + " ".join(TINY).replace(
        " --heldout-per-class 10", ""), "trained on other data"),
    ("profile {root}/fam --quick --batch-sizes 1,4 --threads 1", "--quick figures would replace them"),
    ("eval {root}/fam/cascade.json --repeats 0", "--repeats: must be an integer >= 1"),
    # flags read wrongly or not checked
    ("build {root}/fam --target 1.5", "is ambiguous"),
    ("build {root}/fam --target 150", "is ambiguous"),
    ("build {root}/fam --batch-size 0", "--batch-size: must be an integer from 1 to 65536"),
    ("build {root}/fam --batch-size 32 --batch-aware", "has no batch-size-32 row"),  # was priced by extrapolation
    ("build {root}/fam --out {root}/fam/family.json", "one of this command's inputs"),  # was replaced
    ("eval {root}/fam/cascade.json --out {root}/fam/cascade.json", "one of this command's inputs"),
    ("eval {root}/bad/cascade_range.json", "is not a max_prob confidence"),
    ("eval {root}/bad/cascade_text.json", "is not a max_prob confidence"),
    ("eval {root}/list.json", "not an object"),
    ("eval {root}/fam/cascade.json --batch-size -1", "--batch-size: must be an integer from 1 to 65536"),
    ("eval {root}/fam/cascade.json --limit -1", "--limit: must be an integer >= 1"),
    ("eval {root}/fam/cascade.json --limit 0", "--limit: must be an integer >= 1"),
    ("profile {root}/fam --threads -2", "--threads: must be an integer from 1 to 256"),
    ("profile {root}/fam --threads 0", "--threads: must be an integer from 1 to 256"),
    ("train --data synthetic:64 --out {root}/new --crop-scale 2,1", "--crop-scale: give MIN,MAX with 0 < MIN <= MAX <= 1"),
    ("train --data synthetic:64 --out {root}/new --workers -1", "--workers: must be an integer >= 0"),
    ("train --data synthetic:64 --out {root}/new --resolutions 32,20000", "above 1024"),
    ("train --data synthetic:64 --out {root}/new --lr -1", "--lr: must be a finite number >= 0"),
    ("train --data synthetic:64 --out {root}/new --lr nan", "--lr: must be a finite number >= 0"),
    ("train --data synthetic:64 --out {root}/new --val-fraction 1.5", "--val-fraction: must be a fraction"),
    ("build {root}/bad", "damaged or truncated"),
    ("build {root}/bad --profile {root}/fam/profile.csv", "damaged or truncated"),
    ("build {root}/fam --guarantee 0.01,1.5", "EPS and DELTA must both lie in (0, 1)"),
    ("train --data synthetic:64 --out {root}/new --weights {root}/evil.pth" + " " + " ".join(TINY).replace(
        "--weights none ", ""), "pickled Python objects"),
    ("info {root}/stopped", "unfinished run of `rescascade train`"),
    # found by trying: nothing is replaced before the new run's inputs are checked, no traceback for any value
    ("train --data imagefolder:{root}/nonexistent --out {root}/fam --overwrite", "not found"),
    ("train --data synthetic:64 --out {root}/fam --overwrite --batch-size 1000" + " " + " ".join(TINY).replace(
        "--batch-size 16 ", ""), "fewer than one batch"),
    ("train --data synthetic:64 --out {root}/afile" + " " + " ".join(TINY), "is a file"),
    ("train --data synthetic:64 --out {root}/afile/sub" + " " + " ".join(TINY), "is a file"),
    ("train --data synthetic:64 --out {root}/stopped --resume --width-mult 0.5" + " " + " ".join(TINY).replace(
        "--width-mult 0.35 ", ""), "holds another model"),
    ("train --data synthetic:64 --out {root}/fam --resume --width-mult 0.5" + " " + " ".join(TINY).replace(
        "--width-mult 0.35 ", ""), "--width-mult"),
    ("train --data synthetic:64 --out {root}/new --width-mult inf", "--width-mult: must be a number in (0, 4]"),
    ("train --data synthetic:64 --out {root}/new --lr inf", "--lr: must be a finite number >= 0"),
    ("train --data synthetic:64 --out {root}/new --momentum 1e30", "--momentum: must be a number in [0, 1)"),
    ("train --data synthetic:64 --out {root}/new --loss-weights nan,1", "--loss-weights: must be a finite number"),
    ("train --data synthetic:64 --out {root}/new --resolutions 16,32", "below 32"),
    ("train --data synthetic:99999999999 --out {root}/new" + " " + " ".join(TINY), "synthetic:N takes 1 to"),
    ("train --data synthetic:-5 --out {root}/new" + " " + " ".join(TINY), "synthetic:N takes 1 to"),
    ("train --data synthetic:64 --out {root}/new --lr 1e30" + " " + " ".join(TINY).replace("--lr 0.003 ", ""),
     "training diverged"),
    ("build {root}/fam --max-drop inf", "--max-drop: must be a finite number >= 0"),
    ("build {root}/fam --target abc", "--target: 'abc': use 'best' or an accuracy"),
    ("profile {root}/fam --batch-sizes 99999999", "--batch-sizes: must be an integer from 1 to 65536"),
    ("profile {root}/fam --threads 99999999", "--threads: must be an integer from 1 to 256"),
    ("eval {root}/fam/cascade.json --batch-size 99999999", "--batch-size: must be an integer from 1 to 65536"),
    ("info {root}/fam_width", "width_mult must be a positive number"),
    ("profile {root}/fam_crop --quick", "crop_fraction must be in (0, 1]"),
    ("build {root}/fam_mean", "preprocessing.mean must be 3 numbers"),
    ("build {root}/prof_fast", "median_ms fast in row 2 is not a number"),
    ("build {root}/prof_zero", "batch_size 0 in row 2 is not a number >= 1"),
    ("build {root}/prof_nan", "median_ms nan in row 2 is not a number"),
    ("build {root}/prof_negative", "preprocess_ms -5.0 in row 2 is not a number >= 0"),
    ("info {root}/indep", "K independent models"),
]


PROGRESS = re.compile(r"^[^:]+: \d+/\d+ \(\d+ %\), ")  # training/progress.py's plain line on a non-terminal


@pytest.mark.parametrize("command, fragment", CASES, ids=[c[0].split(" {root}")[0] + f"-{i}" for i, c in
                                                           enumerate(CASES)])
def test_a_mistake_stops_with_one_line_and_changes_nothing(workspace, command, fragment, capsys):
    before = snapshot(workspace)
    code = main(command.format(root=workspace).split())
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not PROGRESS.match(line)]  # a slow machine also shows progress: not an error
    assert code == 2, err
    assert len(err) == 1 and fragment in err[0], err
    assert "Traceback" not in "\n".join(err) and "weights_only=False" not in err[-1] and \
        "allow_pickle" not in err[-1]
    assert snapshot(workspace) == before
    assert not (workspace / "new").exists()


def test_a_prediction_file_without_weights_id_is_refused(workspace, capsys):
    bad = workspace / "bad"
    calib = workspace / "fam" / "predictions" / "calib.npz"
    saved = (bad / "predictions" / "calib.npz").read_bytes()
    try:
        shutil.copy(calib, bad / "predictions" / "calib.npz")
        assert main(["build", str(bad), "--batch-size", "4"]) == 2
        assert "records no weights id" in capsys.readouterr().err
    finally:
        (bad / "predictions" / "calib.npz").write_bytes(saved)


def test_an_unfinished_family_says_which_step_to_rerun(workspace, tmp_path, capsys):
    half = tmp_path / "half"
    shutil.copytree(workspace / "fam", half)
    (half / "family.json").unlink()  # stopped after the weights, before family.json (written last)
    for command in (["info", str(half)], ["profile", str(half), "--quick"], ["build", str(half)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "unfinished run of `rescascade train`" in err and "--resume" in err, command


def test_resume_of_a_finished_run_with_the_same_flags_changes_nothing(tmp_path, capsys):
    fam = tmp_path / "fam"
    assert main(["train", "--data", "synthetic:64", "--out", str(fam)] + TINY) == 0
    (fam / "my_notes.txt").write_text("beside the family")
    before = snapshot(fam)
    assert main(["train", "--data", "synthetic:64", "--out", str(fam), "--resume"] + TINY) == 0
    assert "nothing to resume" in capsys.readouterr().out and snapshot(fam) == before
    assert main(["train", "--data", "synthetic:64", "--out", str(fam), "--overwrite"] + TINY) == 0
    assert (fam / "my_notes.txt").read_text() == "beside the family"  # --overwrite replaced only its own files
    assert not (fam / "checkpoints").exists()


def test_overwrite_writes_beside_a_users_files_and_deletes_none(tmp_path, capsys):
    out = tmp_path / "mine"
    mine = {"checkpoints/mine.bin": b"precious", "notes.txt": b"mine", "cascade_experiments.json": b"{}",
            "cascade_diagram.png": b"png", "engines/mine/model.plan": b"plan", "metrics.csv": b"a,b"}
    for name, data in mine.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    for flags in ([], ["--resume"]):  # a folder of the user's files is not a run to continue
        assert main(["train", "--data", "synthetic:64", "--out", str(out)] + flags + TINY) == 2
        assert "not a rescascade run" in capsys.readouterr().err
    assert main(["train", "--data", "synthetic:64", "--out", str(out), "--overwrite"] + TINY) == 0
    assert main(["train", "--data", "synthetic:64", "--out", str(out), "--overwrite", "--seed", "1"] + TINY) == 0
    assert all((out / name).read_bytes() == data for name, data in mine.items() if name != "metrics.csv")
    assert (out / "family.json").is_file() and not (out / "checkpoints" / "last.pt").exists()


def test_demo_fresh_replaces_only_its_own_files(tmp_path, monkeypatch):
    import rescascade.demo as demo
    (tmp_path / "thesis.tex").write_text("mine")

    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(demo, "run_train", stop)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(str(tmp_path), fresh=True, log=lambda s: None)
    assert (tmp_path / "thesis.tex").read_text() == "mine"


def test_build_writes_into_a_directory_given_as_out(workspace, tmp_path):
    assert main(["build", str(workspace / "fam"), "--batch-size", "4", "--target", "5%", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "cascade.json").is_file()


def test_smoke_warning_only_for_the_rows_build_uses(workspace):
    import pandas as pd

    from rescascade.build import build_warnings
    from rescascade.costs import CostModel
    from rescascade.predictions import load_predictions
    calib = load_predictions(workspace / "fam" / "predictions" / "calib.npz")
    rows = pd.read_csv(workspace / "fam" / "profile.csv")
    rows["smoke"] = rows.batch_size == 4  # measured at batch 1, smoke figures at batch 4
    costs = CostModel.from_profile(rows, [32, 48], None, None, 1)
    assert not any("--quick" in w for w in build_warnings(calib, [(rows, [32, 48])], costs, [32, 48], None))
    costs = CostModel.from_profile(rows, [32, 48], None, None, 4)
    assert any("--quick" in w for w in build_warnings(calib, [(rows, [32, 48])], costs, [32, 48], None))


def test_help_is_fast_and_says_every_default():
    code = ("import sys\nfrom rescascade.cli import main\n"
            "for cmd in ([], ['train'], ['profile'], ['build'], ['eval'], ['demo'], ['info'], ['drift'], ['export']):\n"
            "    main(cmd + ['--help'])\n"
            "print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert run.stdout.strip().splitlines()[-1] == "False", run.stderr  # no torch import for --help
    assert "(default: None)" not in run.stdout
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.dest == "help" or not action.option_strings:
                continue
            assert action.help, (name, action.dest)
            if action.default not in (None, False) and not isinstance(action.default, bool):
                shown = ",".join(map(str, action.default)) if isinstance(action.default, tuple) else \
                    f"{action.default:g}" if isinstance(action.default, float) else str(action.default)
                assert f"default: {shown}" in action.help, (name, action.dest, action.help)


def test_info_prints_the_top1_table(workspace, capsys):
    assert main(["info", str(workspace / "fam")]) == 0
    out = capsys.readouterr().out
    assert "top-1 | calib" in out and "  r32 " in out and "%" in out.split("top-1 | calib")[1]


def test_python_errors_name_the_parameter_and_the_cli_its_flag(capsys):
    from rescascade.builder import CascadeBuilder
    from rescascade.serve.errors import ConfigError
    with pytest.raises(ConfigError) as caught:
        CascadeBuilder(guarantee=(2.0, 0.1))
    assert str(caught.value).startswith("`guarantee` EPS,DELTA") and isinstance(caught.value, ValueError)
    assert caught.value.cli_message.startswith("--guarantee EPS,DELTA")


def _api_cases(fam: Path):
    """(call, expected error type, fragment of str(error)): Python callers' mistakes, one typed error each."""
    import numpy as np

    import rescascade as rc
    calib = rc.load_predictions(fam / "predictions" / "calib.npz")
    costs = rc.CostModel.from_profile(rc.Profile.load(fam), batch_size=4)
    fitted = rc.CascadeBuilder(rc.Target.accuracy(0.05), exact="off")
    return [
        (lambda: rc.TrainConfig.preset("synthetic", epochs="3"), rc.ConfigError, "`epochs` '3' must be an integer"),
        (lambda: rc.TrainConfig.preset("synthetic", device="tpu"), rc.ConfigError, "`device` 'tpu'"),
        (lambda: rc.TrainConfig.preset("nope"), rc.ConfigError, "unknown `preset`"),
        (lambda: rc.TrainConfig(resolutions=(32.5,)), rc.ConfigError, "`resolutions` must be integers"),
        (lambda: rc.CascadeBuilder(guarantee=(0.01,)), rc.ConfigError, "`guarantee` (0.01,)"),
        (lambda: rc.CascadeBuilder(tolerances=5), rc.ConfigError, "`tolerances` 5"),
        (lambda: rc.CascadeBuilder(seed=1.5), rc.ConfigError, "`seed` 1.5 must be an integer"),
        (lambda: rc.CascadeBuilder().fit({}, costs), rc.ConfigError, "calib must be Predictions"),
        (lambda: rc.CascadeBuilder().fit(calib, None), rc.ConfigError, "costs must be a CostModel"),
        (lambda: rc.CascadeBuilder().fit(calib, rc.CostModel.from_profile(rc.Profile.load(fam), resolutions=[32],
                                                                           batch_size=4)),
         rc.ConfigError, "the costs lack resolution(s) [48]"),
        (lambda: rc.CascadeConfig.from_builder(fitted, fam, rc.Profile.load(fam), costs), rc.RescascadeError,
         "not fitted yet"),
        (lambda: rc.CostModel.from_profile(None), rc.ConfigError, "needs a Profile"),
        (lambda: rc.Target("foo"), rc.ConfigError, "Target kind 'foo'"),
        (lambda: rc.Target.max_drop(150), rc.ConfigError, "`max_drop` 150"),
        (lambda: rc.load_data(None), rc.ConfigError, "`data` None"),
        (lambda: rc.load_data("imagefolder"), rc.ConfigError, "needs a path"),
        (lambda: rc.register_source("synthetic", print), rc.ConfigError, "built-in source"),
        (lambda: rc.Profile.load(None), rc.ConfigError, "give the path of a profile.csv"),
        (lambda: rc.CascadeConfig.load(None), rc.ConfigError, "give the path of a cascade.json"),
        (lambda: rc.profile_family(fam, batch_sizes=(0,)), rc.ConfigError, "`batch_sizes` 0"),
        (lambda: rc.CascadeRunner(fam / "cascade.json", threads=0), rc.ConfigError, "`threads` 0"),
        (lambda: rc.CascadeRunner(fam / "cascade.json", warmup=False)(np.zeros((8, 8, 3), np.uint8)), rc.ConfigError,
         "got ndarray"),
        (lambda: rc.run_train("synthetic:64", fam / "x", None), rc.ConfigError, "cfg must be a TrainConfig"),
    ]


def test_python_api_mistakes_raise_one_typed_error_naming_the_parameter(workspace):
    fam = workspace / "fam"
    before = snapshot(workspace)
    for i, (call, kind, fragment) in enumerate(_api_cases(fam)):
        with pytest.raises(kind) as caught:
            call()
        assert fragment in str(caught.value), (i, str(caught.value))
    assert snapshot(workspace) == before
