"""Decoding at the scale a stage needs: JPEG decoders side by side, and what a reduced-scale decode does to top-1.

1. Speed: real photos (the ImageNet sample images) re-encoded as JPEG q90 at ~500x375, 1600x1200 and 4000x3000
   (bicubic up-scaling), decoded in full and at the smallest DCT scale whose shorter side covers r96's and r224's
   resize (round(r / 0.875)), by Pillow (`draft`), torchvision's `decode_jpeg` (full only) and, when installed,
   simplejpeg (`min_width`/`min_height`); median ms per image over the same images, decoders round-robin.
2. Top-1: the ImageNet MobileNetV2 (../shared/data) at r96..r224 on the 1,000 sample images (1000-way), each image
   decoded in full and at the reduced scale for that resolution, then the same resize + center crop, on the stored
   files (shorter side <= 256) and on their 1600x1200 re-encodings.

    python benchmarks/decode_scale.py [--images 40] [--accuracy-images 1000]
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import time

import numpy as np
import torch
from _common import IMAGENET_WEIGHTS, SHARED_DATA, table
from _shared_data import shared_imagenet_samples
from PIL import Image

from rescascade.training.family import ResolutionFamily
from rescascade.training.images import decode
from rescascade.training.preprocess import eval_resize_size, preprocess
from rescascade.training.progress import progress

SIZES = {"500x375": (500, 375), "1600x1200": (1600, 1200), "4000x3000": (4000, 3000)}
RESOLUTIONS = (96, 128, 160, 192, 224)


def reencode(data: bytes, size: tuple[int, int] | None, quality: int = 90) -> bytes:
    """A photo's JPEG at another size (the aspect kept: `size` is the landscape box), quality q."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    if size is not None:
        w, h = size if im.width >= im.height else size[::-1]
        im = im.resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def decoders() -> dict:
    """name -> (fn(bytes, min_side or None) -> decoded image, whether it decodes at a reduced scale)."""
    from torchvision.io import decode_jpeg
    out = {"Pillow": (lambda b, s: decode(b, None, min_side=s), True),
           "torchvision decode_jpeg": (lambda b, s: decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8)),
                                       False)}
    if importlib.util.find_spec("simplejpeg"):
        import simplejpeg

        def sj(b, s):
            if s is None:
                return simplejpeg.decode_jpeg(b)
            w, h = simplejpeg.decode_jpeg_header(b)[:2]
            scale = s / min(w, h)
            return simplejpeg.decode_jpeg(b, min_width=int(np.ceil(w * scale)), min_height=int(np.ceil(h * scale)))
        out["simplejpeg"] = (sj, True)
    return out


def speed(photos: list[bytes], rounds: int = 3) -> list[list]:
    rows = []
    decs = decoders()
    for size_name, size in progress(SIZES.items(), desc="decode speed", unit="size"):
        files = [reencode(p, size) for p in photos]
        cases = [(name, s) for name, (_, reduces) in decs.items()
                 for s in ((None, eval_resize_size(96), eval_resize_size(224)) if reduces else (None,))]
        times = {c: [] for c in cases}
        for _ in range(rounds):  # round-robin: noise lands on every decoder a little
            for c in cases:
                fn = decs[c[0]][0]
                fn(files[0], c[1])  # warm
                for f in files:
                    t0 = time.perf_counter()
                    fn(f, c[1])
                    times[c].append(1e3 * (time.perf_counter() - t0))
        full = {name: np.median(times[(name, None)]) for name in decs}
        for (name, s), ts in times.items():
            shape = tuple(decode(files[0], None, min_side=s).shape[1:]) if name == "Pillow" else ""
            rows.append([size_name, name, "full" if s is None else f">= {s} px", f"{np.median(ts):.2f}",
                         f"{np.median(ts) / full[name]:.2f}",
                         "x".join(map(str, shape)) if shape else ""])
    return rows


@torch.no_grad()
def accuracy(photos: list[bytes], labels: np.ndarray, size, family: ResolutionFamily) -> list[list]:
    """Top-1 per resolution with the full decode and with the reduced-scale decode, same resize and crop."""
    files = [reencode(p, size) if size else p for p in photos]
    rows = []
    for r in RESOLUTIONS:
        model = family.plain_model(r)
        logits = {}
        for how, side in (("full", None), ("reduced", eval_resize_size(r))):
            out = []
            for s in range(0, len(files), 50):
                batch = torch.stack([preprocess(decode(f, None, min_side=side)[None], r)[0] for f in files[s:s + 50]])
                out.append(model(batch))
            logits[how] = torch.cat(out).numpy()
        acc = {how: 100 * float((lg.argmax(1) == labels).mean()) for how, lg in logits.items()}
        same = 100 * float((logits["full"].argmax(1) == logits["reduced"].argmax(1)).mean())
        rows.append([f"{size[0]}x{size[1]}" if size else "stored (<= 256 px)", r, f"{acc['full']:.1f}",
                     f"{acc['reduced']:.1f}", f"{acc['reduced'] - acc['full']:+.1f}", f"{same:.1f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=40, help="photos per size for the speed table")
    ap.add_argument("--accuracy-images", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    samples = shared_imagenet_samples(str(SHARED_DATA / "imagenet_sample_images"))
    pick = np.linspace(0, len(samples) - 1, args.accuracy_images).astype(int)
    photos = [samples.reader.encoded(int(i)) for i in pick]
    labels = np.asarray(samples.labels)[pick]
    print("\nJPEG q90 decode, median ms per image, reduced = the smallest DCT scale covering the side\n")
    print(table(["source", "decoder", "decode", "ms", "vs its full", "Pillow's H x W"],
                speed(photos[:: max(1, len(photos) // args.images)][:args.images])))
    family = ResolutionFamily(RESOLUTIONS)
    family.load_plain_state_dict(torch.load(IMAGENET_WEIGHTS, weights_only=True))
    rows = []
    for size in (None, (1600, 1200)):
        rows += accuracy(photos, labels, size, family.eval())
    print(f"\nImageNet MobileNetV2, {len(photos)} ImageNet sample images (1000-way), top-1 %: full decode vs reduced "
          "decode, then the same resize + center crop\n")
    print(table(["source", "r", "full", "reduced", "difference", "same label %"], rows))


if __name__ == "__main__":
    main()
