"""Real-world files decode, and one bad file fails alone: a phone's MPO decodes as the JPEG it holds (reduced DCT
scale included), any exception from decoding one image (EXIF Pillow cannot write back: struct.error) is that
image's error in every runtime and in training, the pixel limit holds whatever another library set Pillow's global
to, names that are not UTF-8 are stored and printed safely, and the runtimes hold one batch of images at a time."""
import io
import json
import os
import struct
import subprocess
import sys
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from rescascade.cli import main
from rescascade.export import export_bundle
from rescascade.runtime import CascadeRunner
from rescascade.serve.bundle import BundleRunner, main as deploy_main
from rescascade.serve.images import Encoded, ImageError, decode_pixels

from .conftest import encode, photo

QUIET = dict(log=lambda s: None)


def mpo_and_jpeg(pixels: np.ndarray) -> tuple[bytes, bytes]:
    """The same picture as a phone's MPO (the photo + a second, smaller image) and as a plain JPEG."""
    first = Image.fromarray(pixels)
    second = first.resize((first.width // 4, first.height // 4))
    mpo, jpeg = io.BytesIO(), io.BytesIO()
    first.save(mpo, "MPO", save_all=True, append_images=[second], quality=90)
    first.save(jpeg, "JPEG", quality=90)
    return mpo.getvalue(), jpeg.getvalue()


def bad_exif_jpeg(pixels: np.ndarray) -> bytes:
    """A JPEG whose EXIF holds Orientation 6 and an XResolution of (-1, 0) as a signed rational: Pillow reads it,
    but its exif_transpose raises struct.error writing it back (python-pillow/Pillow#8965)."""
    n, data_at = 2, 8 + 2 + 12 * 2 + 4
    entries = struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack("<HHII", 0x011A, 10, 1, data_at)
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", n) + entries + struct.pack("<I", 0) + \
        struct.pack("<ii", -1, 0)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", exif=b"Exif\x00\x00" + tiff)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels (a decompression bomb's header; its data is never reached)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_an_mpo_decodes_as_the_jpeg_it_holds():
    mpo, jpeg = mpo_and_jpeg(photo(600, 800, 1))
    a, b = Encoded(mpo), Encoded(jpeg)
    assert a.format == "MPO" and a.jpeg and a.scale(37) == b.scale(37) == 8
    for side in (37, 150, None):
        assert np.array_equal(a.pixels(side), b.pixels(side))
    assert np.array_equal(decode_pixels(mpo, min_side=55), decode_pixels(jpeg, min_side=55))


def test_runtimes_answer_an_mpo_as_its_jpeg_and_fail_a_bad_exif_alone(split_cascade, tmp_path):
    mpo, jpeg = mpo_and_jpeg(photo(600, 800, 2))
    bad = bad_exif_jpeg(photo(60, 80, 3))
    with pytest.raises(ImageError, match="struct.error|error"):
        decode_pixels(bad)
    good = encode(photo(90, 120, 4), "PNG")
    export_bundle(split_cascade, tmp_path / "bundle", **QUIET)
    for runner in (CascadeRunner(split_cascade, warmup=False), BundleRunner(tmp_path / "bundle", warmup=False)):
        res = runner([mpo, jpeg, bad, good])
        assert list(res.errors) == [2] and res.labels[2] == -1 and (res.labels[[0, 1, 3]] >= 0).all()
        assert res.labels[0] == res.labels[1] and np.array_equal(res.probs[0], res.probs[1])
        assert res.stage_timings[0].decoded == 3  # the MPO decoded at its stage's reduced scale, like the JPEG


def test_the_pixel_limit_holds_when_another_library_turned_pillows_off(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header_only(20000, 20000))
    code = ("import PIL.Image; PIL.Image.MAX_IMAGE_PIXELS = None\n"  # another library, imported first
            "from rescascade.serve.images import ImageError, decode_pixels\n"
            "try:\n    decode_pixels(open('bomb.png', 'rb').read())\nexcept ImageError as e:\n    print('refused:', e)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "refused: 20000x20000 = 400,000,000 pixels exceeds the limit" in run.stdout, \
        run.stdout + run.stderr


def test_runtimes_hold_one_batch_of_images_at_a_time(split_cascade, tmp_path):
    """Peak memory set by the batch size, not by the number of files: 12 large PNGs at batch 2 take about what
    2 take (each decodes to 3 MB)."""
    files = []
    for i in range(12):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(photo(1000, 1000, 10 + i)).save(files[-1])
    export_bundle(split_cascade, tmp_path / "bundle", **QUIET)
    for runner in (BundleRunner(tmp_path / "bundle", warmup=[2], batch_size=2),
                   CascadeRunner(split_cascade, warmup=[2], batch_size=2)):
        peaks = []
        for n in (2, 12):
            tracemalloc.start()
            res = runner(files[:n])
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            assert not res.errors and len(res.labels) == n
        assert peaks[1] < 1.5 * peaks[0] + (1 << 20), peaks
    whole = BundleRunner(tmp_path / "bundle", warmup=False, batch_size=12)(files)
    assert np.array_equal(whole.labels, res.labels) and np.allclose(whole.probs, res.probs, atol=1e-6)


def test_names_that_are_not_utf8_are_stored_and_printed_safely(tmp_path, capsys):
    """A Latin-1 class folder (bytes that are not UTF-8), with a photo whose EXIF Pillow cannot write back, a
    truncated JPEG and an MPO among its images: train, build, export and the bundle's command all finish, the
    name stored and printed as caf\\xe9."""
    root = tmp_path / "photos"
    names = [os.fsdecode(b"caf\xe9"), "plain"]
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(14):
            Image.fromarray(photo(64, 80, 100 * c + i)).save(root / name / f"{i}.jpg", quality=90)
    (root / names[0] / "exif.jpg").write_bytes(bad_exif_jpeg(photo(64, 80, 7)))
    (root / names[1] / "phone.jpg").write_bytes(mpo_and_jpeg(photo(64, 80, 8))[0])
    whole = (root / names[1] / "0.jpg").read_bytes()
    (root / names[1] / os.fsdecode(b"tronqu\xe9.jpg")).write_bytes(whole[:len(whole) // 2])
    fam = tmp_path / "fam"
    assert main(["train", "--data", f"imagefolder:{root}", "--val-fraction", "0.5", "--out", str(fam),
                 "--resolutions", "32,48", "--width-mult", "0.35", "--weights", "none", "--epochs", "1",
                 "--batch-size", "4", "--workers", "0"]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    doc = json.loads((fam / "family.json").read_text())
    assert doc["class_names"] == ["caf\\xe9", "plain"]
    assert main(["profile", str(fam), "--quick", "--batch-sizes", "1"]) == 0
    assert main(["build", str(fam), "--target", "0.05", "--exact", "off", "--refine", "0"]) == 0
    assert main(["export", str(fam / "cascade.json"), "--out", str(tmp_path / "bundle")]) == 0
    capsys.readouterr()
    images = [str(root / names[0] / f) for f in ("0.jpg", "exif.jpg", "1.jpg")] + [str(root / names[1] / "0.jpg")]
    assert deploy_main([str(tmp_path / "bundle"), *images]) == 1  # the EXIF photo fails, alone
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and sum("error:" in line for line in lines) == 1 and "caf\\xe9" in lines[0]
    assert all(line.split("\t")[1] in ("caf\\xe9", "plain") for line in lines if "error:" not in line)
