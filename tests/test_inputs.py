"""Real photos in, right figures out: one decode for every stage (EXIF orientation, bit depth, pixel limit,
multi-frame, every format Pillow reads), torchvision's ImageFolder listing, evaluation of exactly the images the
family predicted, class names matched by name, and a runner that is warm from its first request."""
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rescascade.build import run_build
from rescascade.config import read_config
from rescascade.evaluate import images_to_score, run_eval
from rescascade.profiling.measure import QUICK
from rescascade.profiling.profile import run_profile
from rescascade.runtime import CascadeRunner, decision_step
from rescascade.serve.errors import RescascadeError
from rescascade.serve.images import Encoded, ImageError, _draft_request, jpeg_scale, probe
from rescascade.training.data import list_image_folder, load_data
from rescascade.training.images import decode, decode_encoded
from rescascade.training.preprocess import bound_aspect, resize_center_crop
from rescascade.training.run import run_train
from rescascade.training.synthetic import class_names, make_synthetic
from rescascade.training.trainer import TrainConfig

QUIET = dict(log=lambda s: None)


# ---- small inputs, made here ------------------------------------------------------------------------------
def encode(array: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16(values: np.ndarray) -> bytes:
    """uint16 [H, W] (grey) or [H, W, 3] (RGB) -> a 16-bit PNG (Pillow cannot write 16-bit RGB itself)."""
    h, w = values.shape[:2]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0 if values.ndim == 2 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw)) + \
        png_chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A valid 1-bit black PNG of side x side pixels: tens of KB on disk, side^2 bytes once Pillow decodes it."""
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


def synthetic_photos(n: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Portrait crops [n, 112, 80, 3] of the synthetic set (the tiny family's classes), and their labels."""
    images, labels = make_synthetic(n, num_classes=8, seed=seed)
    return images.permute(0, 2, 3, 1).numpy()[:, :, 16:96].copy(), labels.numpy()


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array)).permute(2, 0, 1)


def exif_rotated(array: np.ndarray, fmt: str = "PNG") -> bytes:
    """The pixels stored sideways with EXIF Orientation=6 (what a portrait phone photo looks like on disk)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer rotates 90 degrees clockwise to show it upright
    buf = io.BytesIO()
    Image.fromarray(array).transpose(Image.Transpose.ROTATE_90).save(buf, fmt, exif=exif.tobytes())
    return buf.getvalue()


# ---- 1. EXIF orientation -------------------------------------------------------------------------------------
def test_exif_orientation_gives_the_upright_image():
    photos, _ = synthetic_photos(2)
    for photo in photos:
        tagged = exif_rotated(photo)
        assert Image.open(io.BytesIO(tagged)).size == (112, 80)  # stored landscape: sideways
        assert torch.equal(decode(tagged), as_tensor(photo))  # decoded upright, pixel for pixel
        assert decode(exif_rotated(photo, "JPEG")).shape == (3, 112, 80)


def test_a_jpeg_decodes_at_the_smallest_dct_scale_that_covers_min_side():
    """libjpeg's 1/2, 1/4, 1/8 scales (Pillow's draft): the shorter side stays >= min_side, the orientation is
    applied after, other formats decode in full, and the pixels are an area-average of the full decode's."""
    photos, _ = synthetic_photos(1)
    big = np.array(Image.fromarray(photos[0]).resize((640, 896), Image.BICUBIC))  # portrait 640 x 896
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "JPEG", quality=95)
    jpeg = buf.getvalue()
    full = decode(jpeg)
    assert full.shape == (3, 896, 640) and decode(jpeg, min_side=1000).shape == (3, 896, 640)
    for min_side, want in ((321, (3, 896, 640)), (320, (3, 448, 320)), (200, (3, 448, 320)), (160, (3, 224, 160)),
                           (80, (3, 112, 80)), (10, (3, 112, 80))):  # 1/8 is libjpeg's smallest scale
        assert decode(jpeg, min_side=min_side).shape == want
    quarter = decode(jpeg, min_side=160).float()
    pooled = torch.nn.functional.avg_pool2d(full.float()[None], 4)[0]
    assert (quarter - pooled).abs().mean() < 3  # the same picture, up to the DCT's rounding
    assert decode(exif_rotated(big, "JPEG"), min_side=160).shape == (3, 224, 160)  # upright after the scale
    png = io.BytesIO()
    Image.fromarray(big).save(png, "PNG")
    assert torch.equal(decode(png.getvalue(), min_side=160), as_tensor(big))


def test_jpeg_scale_predicts_pillows_choice_and_encoded_shares_one_decode_per_scale():
    """The cost model tells from the header alone which scale a stage decodes at: jpeg_scale must agree with what
    Pillow's draft does, at odd sizes and at every boundary; Encoded decodes each scale once."""
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(8, 1200, (60, 2))] + [(500, 375), (224, 224), (4000, 3000)]
    for w, h in sizes:
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (90, 120, 30)).save(buf, "JPEG")
        for min_side in (1, 37, 110, 146, 183, 219, 256, min(w, h), min(w, h) + 1):
            with Image.open(io.BytesIO(buf.getvalue())) as im:
                im.draft("RGB", _draft_request(w, h, min_side))
                got = im.size
            s = jpeg_scale(w, h, min_side)
            assert got == (-(-w // s), -(-h // s)), (w, h, min_side, s, got)
            assert min(got) >= min(min_side, min(w, h))
    buf = io.BytesIO()
    Image.new("RGB", (500, 375), (90, 120, 30)).save(buf, "JPEG")
    enc = Encoded(buf.getvalue())
    a, b = decode_encoded(enc, 110), decode_encoded(enc, 146)   # both 1/2: one decode
    assert a is b and a.shape == (3, 188, 250) and enc.scale(110) == 2
    assert decode_encoded(enc, 256).shape == (3, 375, 500) and decode_encoded(enc).shape == (3, 375, 500)
    png = io.BytesIO()
    Image.new("RGB", (500, 375)).save(png, "PNG")
    assert Encoded(png.getvalue()).scale(110) == 1 and decode_encoded(Encoded(png.getvalue()), 110).shape == (3, 375, 500)
    with pytest.raises(ImageError, match="not an image"):
        Encoded(b"not an image at all")


def test_runner_and_training_read_tagged_files_upright(built, tmp_path):
    _, out, _ = built
    photos, _ = synthetic_photos(6)
    (tmp_path / "up").mkdir()
    (tmp_path / "tagged").mkdir()
    for i, photo in enumerate(photos):
        (tmp_path / "up" / f"{i}.png").write_bytes(encode(photo))
        (tmp_path / "tagged" / f"{i}.png").write_bytes(exif_rotated(photo))
    runner = CascadeRunner(out, backend="onnxruntime")
    up = runner(sorted((tmp_path / "up").iterdir()))
    tagged = runner(sorted((tmp_path / "tagged").iterdir()))
    assert not up.errors and not tagged.errors
    assert np.array_equal(up.labels, tagged.labels) and np.array_equal(up.probs, tagged.probs)
    splits = load_data(f"imagefolder:{tmp_path}", val_fraction=0.5, **QUIET)  # class folders "tagged" and "up"
    for images in (splits.train, splits.calib, splits.test):
        assert all(images.read(i).shape == (3, 112, 80) for i in range(len(images)))


# ---- 2. bit depth --------------------------------------------------------------------------------------------
def test_16_bit_images_decode_to_their_8_bit_values():
    photo = synthetic_photos(1)[0][0]
    eight = decode(encode(photo))
    assert decode(png16(photo.astype(np.uint16) * 257)).dtype == torch.uint8
    assert torch.equal(decode(png16(photo.astype(np.uint16) * 257)), eight)
    grey = photo[..., 1]
    assert torch.equal(decode(png16(grey.astype(np.uint16) * 257)), decode(encode(grey)))
    assert torch.equal(decode(encode(grey.astype(np.uint16) * 257, "TIFF")), decode(encode(grey)))


def test_mixed_bit_depths_train_and_answer_alike(built, tmp_path):
    _, out, _ = built
    photos, labels = synthetic_photos(32)
    names = class_names(8)
    for i, (photo, y) in enumerate(zip(photos, labels)):
        folder = tmp_path / "imgs" / names[y]
        folder.mkdir(parents=True, exist_ok=True)
        data = png16(photo.astype(np.uint16) * 257) if i % 2 else encode(photo)
        (folder / f"{i}.png").write_bytes(data)
    runner = CascadeRunner(out, backend="onnxruntime")
    files = sorted((tmp_path / "imgs").rglob("*.png"))
    eight = runner([as_tensor(p) for p in photos[[int(f.stem) for f in files]]])
    assert np.array_equal(runner(files).labels, eight.labels)
    cfg = TrainConfig((32, 48), epochs=1, batch_size=4, optimizer="adamw", lr=0.003, workers=0)
    doc = run_train(f"imagefolder:{tmp_path / 'imgs'}", tmp_path / "fam", cfg, width_mult=0.35, weights="none",
                    data_options={"val_fraction": 0.5}, **QUIET)  # 8- and 16-bit files in one batch
    assert doc["provenance"]["data"]["train_images"] > 0 and not doc["provenance"]["data"]["unreadable"]


# ---- 3. size -------------------------------------------------------------------------------------------------
def test_pixel_limit_is_checked_from_the_header():
    bomb = png_bomb(10_000)  # 100 M pixels, ~12 KB
    assert len(bomb) < 20_000
    with pytest.raises(ImageError, match="exceeds the limit of 89,478,485"):
        decode(bomb)
    assert probe(bomb, max_pixels=None).width == 10_000  # the header alone: nothing decoded
    small = encode(np.zeros((60, 60, 3), np.uint8))
    with pytest.raises(ImageError, match="max_image_pixels"):
        decode(small, max_pixels=3_000)
    assert decode(small, max_pixels=3_600).shape == (3, 60, 60)


def test_extreme_aspect_ratios_cost_bounded_work():
    import torchvision.transforms.v2.functional as TF
    thin = torch.randint(0, 255, (3, 1, 20_000), dtype=torch.uint8)
    assert bound_aspect(thin).shape == (3, 1, 4)
    assert resize_center_crop(thin, 224).shape == (3, 224, 224)
    wide = torch.randint(0, 255, (3, 50, 200), dtype=torch.uint8)  # 4:1 and below: the very same pixels
    exact = TF.center_crop(TF.resize(wide, [110], antialias=True), [96, 96])
    assert bound_aspect(wide) is wide and torch.equal(resize_center_crop(wide, 96), exact)


RUNNER_MEMORY = """
import json, resource, sys
from rescascade.runtime import CascadeRunner
runner = CascadeRunner(sys.argv[1], backend="onnxruntime")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res = runner(sys.argv[2:])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mib": (after - before) / 1024, "errors": {str(k): v for k, v in res.errors.items()},
                  "labels": res.labels.tolist()}))
"""


@pytest.mark.slow
def test_runner_refuses_a_bomb_and_answers_the_rest_in_bounded_memory(built, tmp_path):
    _, out, _ = built
    (tmp_path / "bomb.png").write_bytes(png_bomb(20_000))  # 400 M pixels: 1.2 GB as RGB
    (tmp_path / "thin.png").write_bytes(encode(np.full((1, 20_000, 3), 90, np.uint8)))  # 118 bytes of PNG
    (tmp_path / "good.png").write_bytes(encode(synthetic_photos(1)[0][0]))
    run = subprocess.run([sys.executable, "-c", RUNNER_MEMORY, str(out)] +
                         [str(tmp_path / f) for f in ("bomb.png", "thin.png", "good.png")],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    res = json.loads(run.stdout.splitlines()[-1])
    assert list(res["errors"]) == ["0"] and "exceeds the limit" in res["errors"]["0"]
    assert res["labels"][0] == -1 and res["labels"][1] >= 0 and res["labels"][2] >= 0
    assert res["growth_mib"] < 100, res


# ---- 4. multi-frame ------------------------------------------------------------------------------------------
def test_animations_give_their_first_frame(built, tmp_path):
    _, out, _ = built
    frames = [Image.fromarray(np.full((40, 30, 3), v, np.uint8)) for v in (30, 220, 120)]
    for fmt in ("GIF", "PNG", "WEBP"):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP"
                                                                              else {}))
        assert abs(int(decode(buf.getvalue())[0, 5, 5]) - 30) <= 1, fmt
    gif = tmp_path / "anim.gif"
    gif.write_bytes(buf.getvalue())
    res = CascadeRunner(out, backend="onnxruntime")([gif])
    assert not res.errors and res.labels[0] >= 0


# ---- 5. formats and listing ----------------------------------------------------------------------------------
def test_every_format_pillow_reads_decodes_to_pillows_pixels():
    photo = synthetic_photos(1)[0][0]
    for fmt, kw in [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("PPM", {}), ("WEBP", {"lossless": True}),
                    ("JPEG", {"quality": 90}), ("GIF", {})]:
        data = encode(photo, fmt, **kw)
        pillow = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert torch.equal(decode(data), as_tensor(pillow)), fmt
        if fmt in ("PNG", "BMP", "TIFF", "PPM", "WEBP"):  # lossless
            assert torch.equal(decode(data), as_tensor(photo)), fmt
    with pytest.raises(ImageError, match="not an image"):
        decode(b"GIF89a but not really")


def test_listing_is_torchvisions_image_folder(tmp_path):
    from torchvision.datasets import ImageFolder
    photo = synthetic_photos(1)[0][0]
    for cls, files in {"b_bmp": ["x.bmp", "y.TIF", "z.tiff"], "a_mixed": ["1.png", "2.JPG", "sub/3.jpeg", "4.webp",
                                                                       "anim.gif", "notes.txt"]}.items():
        for f in files:
            path = tmp_path / "root" / cls / f
            path.parent.mkdir(parents=True, exist_ok=True)
            fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".txt": "PNG"}.get(
                path.suffix.lower(), path.suffix[1:].upper())
            path.write_bytes(encode(photo, fmt))
    images, not_listed = list_image_folder(tmp_path / "root", tmp_path / "root", None)
    tv = ImageFolder(tmp_path / "root")
    assert images.ids == [os.path.relpath(p, tmp_path / "root") for p, _ in tv.samples]
    assert list(images.labels) == [y for _, y in tv.samples] and images.class_names == tv.classes
    assert not_listed == {".gif": 1, ".txt": 1}
    assert all(images.read(i).shape == (3, 112, 80) for i in range(len(images)))  # .bmp and .tif decode


def test_a_class_without_readable_images_stops_with_one_line(tmp_path):
    photo = synthetic_photos(1)[0][0]
    for i in range(6):
        (tmp_path / "imgs" / "good").mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / "good" / f"{i}.png").write_bytes(encode(photo))
        (tmp_path / "imgs" / "broken").mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / "broken" / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(RescascadeError, match="broken have no readable images"):
        load_data(f"imagefolder:{tmp_path / 'imgs'}", **QUIET)
    (tmp_path / "split" / "train" / "a").mkdir(parents=True)
    (tmp_path / "split" / "train" / "b").mkdir(parents=True)
    (tmp_path / "split" / "val" / "a").mkdir(parents=True)
    (tmp_path / "split" / "val" / "b").mkdir(parents=True)
    for cls in ("a", "b"):
        (tmp_path / "split" / "train" / cls / "0.png").write_bytes(encode(photo))
    (tmp_path / "split" / "val" / "a" / "0.png").write_bytes(encode(photo))
    with pytest.raises(RescascadeError, match=r"held-out images\): class\(es\) b have no readable images"):
        load_data(f"imagefolder:{tmp_path / 'split'}", **QUIET)


# ---- 6, 7. evaluation: exactly the predicted images, classes by name ------------------------------------------
def write_photo_folder(root: Path, n: int = 240, seed: int = 0) -> None:
    images, labels = make_synthetic(n, num_classes=8, seed=seed)
    names = class_names(8)
    for i, (img, y) in enumerate(zip(images, labels)):
        (root / names[y]).mkdir(parents=True, exist_ok=True)
        (root / names[y] / f"{seed}_{i:03d}.png").write_bytes(encode(img.permute(1, 2, 0).numpy()))


@pytest.fixture(scope="module")
def folder_cascade(tmp_path_factory):
    """A tiny family trained on an image folder with --val-fraction 0.3 given as a relative path, and its
    cascade.json; -> (base dir, family dir, cascade.json)."""
    base = tmp_path_factory.mktemp("folder")
    write_photo_folder(base / "photos")
    cfg = TrainConfig((32, 48), epochs=2, batch_size=16, optimizer="adamw", lr=0.003, workers=0)
    cwd = os.getcwd()
    os.chdir(base)
    try:
        run_train("imagefolder:photos", base / "fam", cfg, width_mult=0.35, weights="none",
                  data_options={"val_fraction": 0.3}, **QUIET)
    finally:
        os.chdir(cwd)
    run_profile(base / "fam", "onnxruntime", "fp32", (4,), protocol=QUICK, threads=1, **QUIET,
                decision_step=decision_step)
    run_build(base / "fam", batch_size=4, target="0.05", out=base / "fam" / "cascade.json", exact="off", plots=False,
              **QUIET)
    return base, base / "fam", base / "fam" / "cascade.json"


def test_eval_scores_exactly_the_predicted_test_images(folder_cascade, tmp_path, monkeypatch):
    base, fam, cascade_json = folder_cascade
    doc = json.loads((fam / "family.json").read_text())
    data = doc["provenance"]["data"]
    assert data["val_fraction"] == 0.3 and data["resolved_source"] == f"imagefolder:{base / 'photos'}"
    assert data["test_images"] + data["calib_images"] == 72 and data["train_images"] == 168  # 30 % of 240 held out
    ids = [str(i) for i in np.load(fam / "predictions" / "test.npz")["ids"]]
    # from another directory whose own photos/ holds other images: the recorded (resolved) folder is read
    write_photo_folder(tmp_path / "photos", n=64, seed=9)
    monkeypatch.chdir(tmp_path)
    images, spec, digests, own = images_to_score(read_config(cascade_json), None, "test", None, **QUIET)
    assert own and images.ids == ids and spec == f"imagefolder:{base / 'photos'}" and len(digests) == len(ids)
    report = run_eval(cascade_json, batch_size=4, repeats=1, plot=False, out=tmp_path / "e.json", **QUIET)
    assert report["images"] == len(ids)


def test_eval_stops_when_the_data_changed(folder_cascade, tmp_path):
    base, fam, cascade_json = folder_cascade
    ids = [str(i) for i in np.load(fam / "predictions" / "test.npz")["ids"]]
    victim = base / "photos" / ids[0]
    saved = victim.read_bytes()
    try:
        victim.write_bytes(encode(np.zeros((112, 112, 3), np.uint8)))
        with pytest.raises(RescascadeError, match="decode to other pixels"):
            run_eval(cascade_json, batch_size=4, repeats=1, plot=False, out=tmp_path / "e.json", **QUIET)
        victim.write_bytes(saved[:len(saved) // 2])  # the header still reads
        with pytest.raises(RescascadeError, match="no longer decodes"):
            run_eval(cascade_json, batch_size=4, repeats=1, plot=False, out=tmp_path / "e.json", **QUIET)
        victim.unlink()
        with pytest.raises(RescascadeError, match="are not in"):
            run_eval(cascade_json, batch_size=4, repeats=1, plot=False, out=tmp_path / "e.json", **QUIET)
    finally:
        victim.write_bytes(saved)
    assert not (tmp_path / "e.json").exists()


def test_eval_finds_its_images_when_the_folder_grows_or_loses_training_images(folder_cascade, tmp_path):
    base, fam, cascade_json = folder_cascade
    held = {str(i) for split in ("calib", "test") for i in np.load(fam / "predictions" / f"{split}.npz")["ids"]}
    trained = next(p for p in sorted((base / "photos").rglob("*.png")) if str(p.relative_to(base / "photos"))
                   not in held)
    saved = trained.read_bytes()
    new = trained.with_name("zz_new.png")
    try:
        trained.unlink()
        shutil.copy(sorted((base / "photos").rglob("*.png"))[0], new)
        report = run_eval(cascade_json, batch_size=4, repeats=1, plot=False, out=tmp_path / "e.json", limit=6,
                          **QUIET)
        assert report["images"] == 6
    finally:
        trained.write_bytes(saved)
        new.unlink(missing_ok=True)


def test_eval_other_data_matches_classes_by_name(folder_cascade, tmp_path):
    _, fam, cascade_json = folder_cascade
    names = json.loads((fam / "family.json").read_text())["class_names"]  # the folders' sorted names
    write_photo_folder(tmp_path / "new", n=160, seed=5)
    config = read_config(cascade_json)
    full = images_to_score(config, f"imagefolder:{tmp_path / 'new'}", "test", None, **QUIET).images
    assert len(full) == 160  # other data is scored whole
    # the same images with half the classes gone: the remaining classes keep the family's indices
    shutil.copytree(tmp_path / "new", tmp_path / "part")
    for name in names[:4]:
        shutil.rmtree(tmp_path / "part" / name)
    part, _, digests, own = images_to_score(config, f"imagefolder:{tmp_path / 'part'}", "test", None, **QUIET)
    assert not own and digests is None and part.class_names == names
    assert set(part.labels) <= set(range(4, 8))
    by_id = dict(zip(full.ids, full.labels))
    assert all(by_id[i] == y for i, y in zip(part.ids, part.labels) if i in by_id)
    (tmp_path / "part" / names[5]).rename(tmp_path / "part" / "zebra")
    with pytest.raises(RescascadeError, match=r"classes the family does not know \(zebra\).*the family's \["):
        images_to_score(config, f"imagefolder:{tmp_path / 'part'}", "test", None, **QUIET)


# ---- 10. a warm first request ----------------------------------------------------------------------------
def test_runner_warms_every_stage_at_load(built, monkeypatch):
    import rescascade.runtime as rt
    from rescascade.serve.ort_engine import OrtEngine
    _, out, config = built
    calls = []
    infer = OrtEngine.infer
    monkeypatch.setattr(OrtEngine, "infer", lambda self, r, x: calls.append((r, len(x))) or infer(self, r, x))
    rt.CascadeRunner(out, backend="onnxruntime", warmup=False)
    assert calls == []
    rt.CascadeRunner(out, backend="onnxruntime")
    built_batch = config["profile"]["batch_size"]
    assert built_batch > 1 and sorted(calls) == sorted((s["resolution"], b) for s in config["stages"]
                                                       for b in (1, built_batch))
    calls.clear()
    rt.CascadeRunner(out, backend="onnxruntime", warmup=[8])
    assert sorted(calls) == [(s["resolution"], 8) for s in config["stages"]]


def test_runner_takes_one_input_or_many_and_names_the_classes(built, tmp_path):
    _, out, _ = built
    runner = CascadeRunner(out, backend="onnxruntime", warmup=False)
    photo = synthetic_photos(1)[0][0]
    path = tmp_path / "a.png"
    path.write_bytes(encode(photo))
    one = runner(str(path))  # one path: one answer, not one per character
    assert len(one.labels) == 1 and not one.errors and one.labels[0] >= 0
    same = [runner(path), runner(path.read_bytes()), runner(Image.open(path)), runner(as_tensor(photo)),
            runner(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)), runner(next(os.scandir(tmp_path)))]
    assert all(r.labels.tolist() == one.labels.tolist() and not r.errors for r in same)
    res = runner([as_tensor(photo), torch.zeros(3, 0, 60, dtype=torch.uint8), torch.zeros(3, 40, 60)])
    assert sorted(res.errors) == [1, 2] and res.labels[0] == one.labels[0]  # the bad ones fail alone
    assert "empty image" in res.errors[1] and "torch.float32 tensor [3, 40, 60]" in res.errors[2]
    assert res.names[0] == runner.class_names[res.labels[0]] and res.names[1] is None
    with pytest.raises(RescascadeError, match="H, W >= 1"):
        runner(torch.zeros(2, 3, 0, 0, dtype=torch.uint8))
    assert len(runner([]).labels) == 0
