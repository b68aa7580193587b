"""The exported Triton model repository, served by a real tritonserver (nvidia-pytriton's binary, Python backend)
on 127.0.0.1: the served cascade answers as the bundle's runtime does, the reference model too, a bad image
fails alone, exits are counted (metrics, counts file), and a killed server restarted on the same repository
answers the same. Skipped, with one line, where the server cannot run."""
import json

import numpy as np
import pytest

from benchmarks._triton import TritonServer, TritonUnavailable, classify, server_environment
from rescascade.cli import main as cli_main
from rescascade.export import export_triton
from rescascade.serve.bundle import BundleRunner
from rescascade.serve.counts import ExitCounts
from rescascade.serve.errors import ConfigError

from .conftest import encode, photo
from .test_real_files import bad_exif_jpeg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(split_cascade, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "models"
    assert cli_main(["export", str(split_cascade), "--out", str(out), "--format", "triton", "--max-batch-size",
                     "16", "--max-queue-delay-us", "2000"]) == 0
    return out


def test_repository_layout_and_arguments(repo, split_cascade, tmp_path):
    for model in ("cascade", "reference"):
        assert (repo / model / "1" / "model.py").is_file() and (repo / model / "1" / "bundle" / "bundle.json").is_file()
        pbtxt = (repo / model / "config.pbtxt").read_text()
        assert "max_batch_size: 16" in pbtxt and "max_queue_delay_microseconds: 2000" in pbtxt
    assert 'string_value: "true"' in (repo / "reference" / "config.pbtxt").read_text()
    with pytest.raises(ConfigError, match="max_batch_size"):
        export_triton(split_cascade, tmp_path / "x", max_batch_size=0, log=lambda s: None)
    with pytest.raises(ConfigError, match="device"):
        export_triton(split_cascade, tmp_path / "x", device="tpu", log=lambda s: None)
    assert cli_main(["export", str(split_cascade), "--out", str(tmp_path / "y"), "--format", "triton",
                     "--instances", "0"]) == 2


def _serve(repo):
    try:
        server_environment(log=lambda s: None)
        return TritonServer(repo, log=lambda s: None).start()
    except TritonUnavailable as e:
        pytest.skip(f"Triton cannot run here: {e}")


def test_served_cascade_answers_as_the_bundle(repo, split_cascade, capsys):
    images = [encode(photo(60 + 13 * i, 140 - 5 * i, 300 + i), "JPEG" if i % 3 else "PNG") for i in range(12)]
    images.insert(5, b"not an image")
    images.insert(9, bad_exif_jpeg(photo(50, 70, 9)))  # Pillow raises struct.error on its EXIF: it fails alone
    want = BundleRunner(repo / "cascade" / "1" / "bundle", threads=1, warmup=False)(images)
    want_ref = BundleRunner(repo / "cascade" / "1" / "bundle", reference=True, threads=1, warmup=False)(images)
    server = _serve(repo)
    try:
        got = classify(server.url, "cascade", images)
        ok = want.labels >= 0
        assert got["LABEL"].tolist() == want.labels.tolist() and got["EXIT_STAGE"].tolist() == want.exit_stage.tolist()
        assert np.abs(got["PROBABILITY"][ok] - want.probs[ok].max(1)).max() <= 1e-5
        assert [b.decode() for b in got["CLASS_NAME"][ok]] == [n for n in want.names if n is not None]
        assert got["ERROR"][5].decode().startswith("not an image Pillow can read") and not any(got["ERROR"][ok])
        assert got["ERROR"][9] and int(got["LABEL"][9]) == -1 and ok.sum() == len(images) - 2
        assert set(got["EXIT_STAGE"][ok]) == {0, 1}, "the test needs rows answered by each stage"
        assert [b.decode() for b in got["STAGE"][ok]] == [n for n in want.exit_names if n is not None]
        assert all("/r" in n for n in want.stage_names)  # the model it runs and its resolution
        ref = classify(server.url, "reference", images)
        assert ref["LABEL"].tolist() == want_ref.labels.tolist() and set(ref["EXIT_STAGE"][ok]) == {0}
        # concurrent single-image requests: the dynamic batcher groups them, each gets its own row back
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(8) as pool:
            singles = list(pool.map(lambda im: classify(server.url, "cascade", [im]), images))
        assert [int(s["LABEL"][0]) for s in singles] == want.labels.tolist()
        import re
        import urllib.request
        metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        exits = re.findall(r'rescascade_stage_exits_total\{model="cascade",stage="[^"]+/r\d+"\} (\d+)', metrics)
        assert len(exits) == 2 and sum(map(int, exits)) == 2 * int(ok.sum()), metrics  # two passes of the images
        # killed mid-service: requests fail (no answer at all), and after a restart the answers are the same
        server.stop(kill=True)
        with pytest.raises(Exception):
            classify(server.url, "cascade", images[:2])
        server.start()
        again = classify(server.url, "cascade", images)
        assert again["LABEL"].tolist() == got["LABEL"].tolist()
        assert np.array_equal(again["PROBABILITY"][ok], got["PROBABILITY"][ok])
    finally:
        server.stop()
    files = sorted((repo / "cascade").glob("exit_counts.*.json"))  # one per instance, written at unload
    assert len(files) == 1, files
    assert not list((repo / "reference").glob("exit_counts.*"))  # one stage: nothing to count
    counts = ExitCounts.load(files[0])  # the traffic since the restart (and since the last save before the kill)
    assert counts.inputs >= len(images) and counts.errors >= 2 and len(counts.stages) == 2
    server = _serve(repo)  # restarted (or reloaded): the instance goes on counting into its file, losing nothing
    try:
        classify(server.url, "cascade", images)
    finally:
        server.stop()
    assert sorted((repo / "cascade").glob("exit_counts.*.json")) == files
    more = ExitCounts.load(files[0])
    assert more.inputs == counts.inputs + len(images) and more.ids == counts.ids
    assert cli_main(["drift", str(repo / "cascade" / "1" / "bundle"), *map(str, files)]) == 0
    assert cli_main(["drift", str(repo / "cascade" / "1" / "bundle"), *map(str, files), *map(str, files)]) == 2
    assert "given twice" in capsys.readouterr().err
    # the counts are the user's drift data: exporting again over the repository refuses, and deletes nothing
    assert cli_main(["export", str(split_cascade), "--out", str(repo), "--format", "triton"]) == 2
    assert "exit_counts" in capsys.readouterr().err
    assert files[0].is_file() and json.loads(files[0].read_text())["schema_version"] == 2
