"""Outputs never replace what is not rescascade's: one writer (serve/fileio.output_file + atomic_path) refuses a
path that is not a regular file (a device, a FIFO, a directory) before any work, writes through a symbolic link
(the link kept), and exports replace only an earlier export of the same cascade, one export at a time."""
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from rescascade.cli import main
from rescascade.config import read_config
from rescascade.export import _export_lock, export_bundle
from rescascade.serve.bundle import Bundle, BundleRunner
from rescascade.serve.counts import ExitCounts
from rescascade.serve.errors import ConfigError
from rescascade.serve.fileio import output_file, write_json

QUIET = dict(log=lambda s: None)


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def is_fifo(path: Path) -> bool:
    return stat.S_ISFIFO(os.lstat(path).st_mode)


def test_the_writer_refuses_what_is_not_a_regular_file(tmp_path, fifo):
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    for path, kind in ((fifo, "a FIFO"), (tmp_path / "a_dir", "a directory"), ("/dev/null", "a device")):
        with pytest.raises(ConfigError, match=kind):
            output_file(path)  # only looks: nothing is written, so /dev/null is safe to ask about
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        output_file(tmp_path / "a_file" / "out.json")
    with pytest.raises(ConfigError, match="give a file path"):
        output_file(123)
    link = tmp_path / "to_pipe"
    link.symlink_to(fifo)
    with pytest.raises(ConfigError, match="a link to"):
        write_json(link, {"a": 1})
    assert is_fifo(fifo) and link.is_symlink() and not list(tmp_path.glob(".*.tmp"))


def test_a_symlinked_output_is_written_through_and_stays_a_link(tmp_path):
    target = tmp_path / "real" / "report.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "report.json"
    link.symlink_to(target)
    write_json(link, {"new": True})
    assert link.is_symlink() and json.loads(target.read_text()) == {"new": True}
    dangling = tmp_path / "later.json"
    dangling.symlink_to(tmp_path / "real" / "later.json")
    write_json(dangling, [1])
    assert dangling.is_symlink() and json.loads((tmp_path / "real" / "later.json").read_text()) == [1]


def test_commands_refuse_such_an_out_before_working(built, tmp_path, fifo, capsys):
    family, cascade_json, _ = built
    work = tmp_path / "fam"
    shutil.copytree(family, work)
    shutil.copy(cascade_json, work / "cascade.json")
    doc = json.loads((work / "cascade.json").read_text())
    doc["family"]["path"] = "."
    (work / "cascade.json").write_text(json.dumps(doc))
    (tmp_path / "a_dir").mkdir()
    for argv in (["build", str(work), "--out", str(fifo), "--refine", "0"],
                 ["profile", str(work), "--quick", "--batch-sizes", "1", "--out", str(fifo)],
                 ["eval", str(work / "cascade.json"), "--out", str(fifo), "--limit", "4"],
                 ["eval", str(work / "cascade.json"), "--out", str(tmp_path / "a_dir" / "x.json" / "y")]):
        (tmp_path / "a_dir" / "x.json").write_text("mine")
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], (argv, err)
        assert is_fifo(fifo) and (tmp_path / "a_dir" / "x.json").read_text() == "mine"
    assert not list(tmp_path.glob("pipe*.png")) and not list(work.glob("*.tmp"))
    # a link as --out: the config lands in its target, relative to where it really lies
    elsewhere = tmp_path / "configs" / "c.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text("{}")
    (tmp_path / "link.json").symlink_to(elsewhere)
    assert main(["build", str(work), "--target", "0.05", "--exact", "off", "--refine", "0",
                 "--out", str(tmp_path / "link.json")]) == 0
    assert (tmp_path / "link.json").is_symlink()
    assert read_config(elsewhere).family_dir == work.resolve()
    assert read_config(tmp_path / "link.json").family_dir == work.resolve()


def test_exit_counts_save_refuses_bad_paths_with_a_typed_error(built, tmp_path, fifo):
    counts = ExitCounts.for_cascade([32, 48], "max_prob", 8, "p")
    for bad, match in ((123, "give a file path"), (tmp_path, "a directory"), (fifo, "a FIFO")):
        with pytest.raises(ConfigError, match=match):
            counts.save(bad)
    counts.save(tmp_path / "c.json")
    assert ExitCounts.load(tmp_path / "c.json") == counts


def test_export_replaces_only_an_export_of_the_same_cascade(split_cascade, built, tmp_path):
    out = tmp_path / "bundle"
    export_bundle(split_cascade, out, **QUIET)
    first = Bundle(out).doc["created"]
    export_bundle(split_cascade, out, **QUIET)  # the same cascade.json again: replaced
    other = tmp_path / "other" / "cascade.json"  # another cascade (a copy elsewhere is another file)
    other.parent.mkdir()
    doc = json.loads(Path(split_cascade).read_text())
    other.write_text(json.dumps(doc))
    before = (out / "bundle.json").read_text()
    with pytest.raises(ConfigError, match="pass `overwrite`"):
        export_bundle(other, out, **QUIET)
    assert (out / "bundle.json").read_text() == before
    export_bundle(other, out, overwrite=True, **QUIET)
    assert Bundle(out).doc["source"]["cascade_json"] == str(other.resolve()) and first
    (out / "exit_counts.json").write_text("{}")  # drift data: never deleted, not even with --overwrite
    with pytest.raises(ConfigError, match="exit_counts.json"):
        export_bundle(split_cascade, out, overwrite=True, **QUIET)
    for bad in (None, 3):
        with pytest.raises(ConfigError, match="`out`"):
            export_bundle(split_cascade, bad, **QUIET)


def test_two_exports_into_one_directory_cannot_both_succeed(split_cascade, tmp_path):
    out = tmp_path / "new"
    with _export_lock(out):  # another export is writing `out`
        with pytest.raises(ConfigError, match="another export into"):
            export_bundle(split_cascade, out, **QUIET)
        assert not out.exists()
    export_bundle(split_cascade, out, **QUIET)  # the lock is gone with its holder
    assert not (tmp_path / ".new.lock").exists() and Bundle(out)


def test_configs_and_bundles_reached_through_links_find_their_files(split_cascade, tmp_path):
    bundle = tmp_path / "deploy" / "b"
    export_bundle(split_cascade, bundle, **QUIET)
    links = tmp_path / "links"
    links.mkdir()
    (links / "bundle.json").symlink_to(bundle / "bundle.json")
    assert BundleRunner(links / "bundle.json", warmup=False).bundle.dir == bundle.resolve()
    home = tmp_path / "home"
    home.mkdir()
    config = read_config(split_cascade)
    config.save(home / "cascade.json")  # the family recorded relative to home/
    (links / "cascade.json").symlink_to(home / "cascade.json")
    assert read_config(links / "cascade.json").family_dir == config.family_dir.resolve()
