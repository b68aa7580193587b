"""The cascade runtime: execute cascade.json on a backend, really skipping the stages an input does not need.

Stage 1 runs on the whole batch; rows whose confidence reaches the stage's threshold exit; only the rest are
resized to the next stage's resolution and sent on. Outputs come back in input order with the exit stage.
The confidence is computed by the same functions the optimizer used on stored logits.

The stage loop is the kernel's (`serve.loop.run_plan`); the engine is the backend's. On ONNX Runtime's CPU provider
it is the bundle's own (`serve.ort_engine.OrtEngine`: the family's shared model and patches, numpy inputs), so a
cascade runs and is timed here exactly as its exported bundle runs; on the other backends it is `TorchStages`
(the backend's engines, torch inputs on the backend's device: the same pixels).
"""
from __future__ import annotations

import io
import math
import os
from functools import partial
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from rescascade.profiling.backends import get_backend
from rescascade.profiling.export import cached_shared, export_shared
from rescascade.profiling.measure import torch_threads
from rescascade.serve.errors import ConfigError, RescascadeError, check_int
from rescascade.serve.fileio import sha256_file
from rescascade.serve.images import DEFAULT_MAX_PIXELS, Encoded, ImageError
from rescascade.serve.limits import MAX_BATCH, MAX_THREADS
from rescascade.serve.ort import unpack_patch
from rescascade.serve.ort_engine import OrtEngine
from rescascade.serve.preprocess_np import IMAGENET_MEAN, IMAGENET_STD
from rescascade.training.images import as_tensor, from_pil
from rescascade.training.preprocess import channels_last_batch, eval_resize_size, preprocess
from rescascade.training.store import load_family, model_name, read_family_json, verify_files, weights_id

from .config import CascadeConfig, read_config
from .optimizer import Cascade, Stage
from .serve.counts import ExitCounts, plan_identity
from .serve.exits import CascadeResult, StageTiming, decision_step, exit_step, in_batches, load_inputs, warmup_sizes
from .serve.loop import MemberEngines, run_plan
from .serve.names import key_model, key_resolution
from .serve.plan import Plan

__all__ = ["CascadeRunner", "CascadeResult", "StageTiming", "decision_step", "exit_step"]


def check_member(config: CascadeConfig, k: int = 0) -> dict:
    """The family.json doc of the k-th family a cascade.json runs (the family, or a pool's k-th member), with its
    hashes and every weight file's checked, without loading the weights. Raises RescascadeError when the family is
    not where cascade.json says or its files changed since the build."""
    fam_dir, entry = config.member_dirs[k], config.members[k]
    if not (fam_dir / "family.json").is_file():
        raise RescascadeError(f"the family {fam_dir} named by {config.path} is not there; copy the family "
                              "directory next to cascade.json as recorded, or re-run build")
    if sha256_file(fam_dir / "family.json") != entry["family_json_sha256"]:
        raise RescascadeError(f"{fam_dir}/family.json changed since {config.path} was built; "
                              "re-run `rescascade build` for this family")
    doc = read_family_json(fam_dir)
    if weights_id(doc) != entry["weights_sha256"]:
        raise RescascadeError(f"the weights in {fam_dir} are not the ones {config.path} was built for")
    verify_files(fam_dir, doc)
    if config.pooled and model_name(doc) != entry["model"]:
        raise RescascadeError(f"{fam_dir} holds model {model_name(doc)!r}, {config.path} runs {entry['model']!r} "
                              "from it; re-run `rescascade build`")
    return doc


def _tensor_pixels(item, max_pixels: int) -> torch.Tensor | Encoded:
    """A decoded input (a PIL image or a uint8 [3, H, W] tensor) -> uint8 [3, H, W]; a uint8 [L] tensor of
    encoded bytes (torchvision's `read_file`) -> `Encoded`; ImageError (a ValueError) otherwise."""
    if isinstance(item, torch.Tensor) and item.dim() == 1 and item.dtype == torch.uint8:
        return Encoded(item, max_pixels)
    if isinstance(item, Image.Image):
        item = from_pil(item)
    if not (isinstance(item, torch.Tensor) and item.dim() == 3 and item.shape[0] == 3 and item.dtype == torch.uint8):
        got = f"a {item.dtype} tensor {list(item.shape)}" if isinstance(item, torch.Tensor) else type(item).__name__
        raise ImageError(f"not an image: got {got}; give a file path, encoded bytes, a PIL image or a uint8 [3, H, W] "
                         "tensor")
    if 0 in item.shape[1:]:
        raise ImageError(f"an empty image ({item.shape[1]}x{item.shape[2]} pixels)")
    return item


class CascadeRunner:
    """Load cascade.json + its family (hashes verified) and run the cascade on `backend`.

    config: a cascade.json path (or its directory) or a CascadeConfig. backend, precision: default the ones the
    cascade was built for. threads: CPU threads (1..MAX_THREADS). stages: a Cascade to run instead of the
    config's (e.g. the reference alone). Raises ArtifactError when the family is missing or its files changed,
    ConfigError for bad arguments, BackendUnavailable when the backend cannot run here.

    runner(images) accepts a uint8 tensor [N, 3, H, W], or a list of inputs (or one input), each a uint8
    [3, H, W] tensor, a PIL image, an image file path or the encoded bytes of an image file. Files and bytes are decoded by
    training.images.decode, the decode training and prediction used (EXIF orientation applied, any bit depth to
    8 bits, first frame of an animation, at most max_image_pixels pixels, checked from the header before
    decoding), each stage at the scale the family's predictions used (family.json's preprocessing.decode_scale:
    "stage" decodes a JPEG at the smallest DCT scale that covers that stage's resize, again for the rows that go
    on only where the next stage needs a larger scale, or, for a cascade decoded once (cascade.json's "decode"),
    every stage from one decode at that resolution's scale; "full" once in full). Give encoded images to get the
    pixels, and the cost, the cascade was built for; decoded ones skip the decode. An input that fails (missing,
    not an image, damaged, too large, empty) gets an error of its own in the result; the others are answered.
    The result holds class indices and, as `names`, the class names.

    counts: an `ExitCounts` of what the served cascade saw (inputs, exits and confidence histogram per stage);
    `runner.counts.save(path)` and `rescascade drift CASCADE_JSON COUNTS_JSON` tell whether traffic has drifted.

    batch_size: the most inputs run at once (default: the batch size the cascade was built for); a call with more
    runs them in batches of this size, one after the other, so memory is set by it, not by the number of inputs.
    warmup: run every stage at load on batches of these sizes (True, the default: 1 and batch_size; False: none),
    so that the first request is not the slow one: sessions allocate and plan on their first run at each batch
    size. Give the batch sizes you serve.
    """

    def __init__(self, config, backend: str | None = None, precision: str | None = None,
                 threads: int | None = None, stages=None, max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
                 warmup: bool | Sequence[int] = True, batch_size: int | None = None):
        if threads is not None:
            check_int("threads", threads, 1, MAX_THREADS)
        if max_image_pixels is not None:
            check_int("max_image_pixels", max_image_pixels, 1)
        if stages is not None and not isinstance(stages, Cascade):
            raise ConfigError(f"stages must be a Cascade (e.g. Cascade([Stage(224, -math.inf)])), got "
                              f"{type(stages).__name__}")
        warmup = warmup_sizes(warmup)
        self.config: CascadeConfig = config if isinstance(config, CascadeConfig) else read_config(config)
        self._docs = [check_member(self.config, k) for k in range(len(self.config.members))]
        doc = self._docs[0]  # a pool's members share classes and preprocessing (checked at build)
        self.backend_name = backend or self.config.doc["profile"]["backend"]
        self.precision = precision or self.config.doc["profile"]["precision"]
        prep = doc.get("preprocessing", {})
        self.crop_fraction = prep.get("crop_fraction", 0.875)
        self.decode_scale = prep.get("decode_scale", "full")  # families from before the field decoded in full
        self.mean, self.std = prep.get("mean"), prep.get("std")
        self.cascade = self.config.cascade if stages is None else stages
        self._served = self.cascade  # what `counts` counts: not warm-up runs, not cascades swapped in by `use`
        self._plan = Plan.from_doc(self.config.doc, doc["class_names"], self.crop_fraction, self.decode_scale,
                                   self.mean, self.std)
        plan = self._plan
        self.temperatures, self.measure, self.combined = plan.temperatures, plan.measure, plan.combined
        served = self._plan.running([(st.resolution, st.threshold) for st in self.cascade.stages],
                                    self.cascade.decode_at)
        self.counts = ExitCounts.for_cascade(served.keys, self.measure, doc["num_classes"], plan_identity(
            self.config.doc, served.stages, served.decode_at), served.stage_names)
        self.num_classes = doc["num_classes"]
        self.class_names = list(doc["class_names"])
        self.max_image_pixels = max_image_pixels
        self._backend = be = get_backend(self.backend_name)
        self.device = be.device
        self._thread_count = threads
        if be.numpy_inputs:
            be.check_precision(self.precision)
        self._openers: dict = {}  # model (None: the family's) -> open(resolution) of its engine
        self._opened: set = set()  # the stage keys whose engines are open
        if self.config.pooled:  # each member's engine made when a stage of it is first opened
            self.engine = MemberEngines({})
        else:
            self.engine, self._openers[None] = self._member_engine(0)
        self.use(self.cascade)
        built = int(self.config.doc["profile"].get("batch_size", 1))
        self.batch_size = built if batch_size is None else check_int("batch_size", batch_size, 1, MAX_BATCH)
        sizes = sorted({1, self.batch_size}) if warmup is True else warmup or []
        for b in sizes:
            self.warmup(b, doc.get("provenance", {}).get("data", {}).get("source_size"))

    def _member_engine(self, k: int):
        """(engine, open(resolution)) of the k-th family the cascade runs, on the runner's backend. On ONNX
        Runtime's CPU provider: the bundle's engine (`OrtEngine`) on the checked export of its weights where there
        is one (no model to build, no weights to load), the same sessions and numpy inputs; elsewhere the
        backend's engines (`TorchStages`)."""
        fam_dir, doc, be = self.config.member_dirs[k], self._docs[k], self._backend
        wid = weights_id(doc)
        if be.numpy_inputs:
            shared, patches, _ = cached_shared(fam_dir, wid, doc["resolutions"]) or \
                export_shared(load_family(fam_dir, verify=False)[0], fam_dir, wid, "fp32")
            engine = OrtEngine(str(shared), {}, {}, self.crop_fraction, self.mean or IMAGENET_MEAN,
                               self.std or IMAGENET_STD, ["CPUExecutionProvider"], self._thread_count, weights_id=wid,
                               num_classes=doc["num_classes"])
            return engine, lambda r: engine.open(r, unpack_patch(patches[r].read_bytes(), str(patches[r])),
                                                 str(patches[r]))
        family, _ = load_family(fam_dir, verify=False)
        engine = TorchStages(be.device, self.crop_fraction, self.mean, self.std)
        return engine, lambda r: engine.add(r, be.open(family, fam_dir, wid, r, self.precision, self._thread_count))

    def _open(self, key) -> None:
        """Open the engine of the stage keyed `key` (its resolution; a pool's MODEL/rR)."""
        have = self.config.stage_keys
        if key not in have:
            raise ConfigError(f"stage {key!r} is not one of this cascade's (it has {', '.join(map(str, have))}): "
                              + ("a pool's stages are named MODEL/rR" if self.config.pooled else
                                 "a family's stages are its resolutions"))
        model = key_model(key)
        if model not in self._openers:  # a pool member's first stage: its engine
            k = [m["model"] for m in self.config.members].index(model)
            self.engine.engines[model], self._openers[model] = self._member_engine(k)
        self._openers[model](key_resolution(key))
        self._opened.add(key)

    def use(self, cascade: Cascade) -> None:
        """Run `cascade` from now on (same family or pool, confidence setting and backend): its stages' engines
        are opened where not open yet. For comparing cascades on one runner (`build --refine`)."""
        for s in cascade.stages:
            if s.resolution not in self._opened:
                self._open(s.resolution)
        self.cascade = cascade

    def warmup(self, batch_size: int = 1, source_size=None) -> None:
        """Run every stage (decode, preprocessing, inference, decision) on a batch of grey JPEGs of source_size
        [H, W] (default: the top stage's resize size): what a first request would otherwise pay alone (Pillow
        loads its format plugins on the first decode, sessions allocate on their first run at a batch size)."""
        side = eval_resize_size(max(key_resolution(s.resolution) for s in self.cascade.stages), self.crop_fraction)
        h, w = source_size or (side, side)
        jpeg = io.BytesIO()
        Image.new("RGB", (w, h), (128, 128, 128)).save(jpeg, "JPEG")
        every = Cascade([Stage(s.resolution, math.inf) for s in self.cascade.stages],  # no row exits early
                        decode_at=self.cascade.decode_at)
        # not counted; requests meanwhile unaffected
        self._run([jpeg.getvalue()] * check_int("batch_size", batch_size, 1, MAX_BATCH), every)

    # ---- inputs --------------------------------------------------------------------------------------------
    def _inputs(self, images) -> list:
        """The inputs as a list, one per image (a single input, or a uint8 tensor [N, 3, H, W], split);
        ConfigError / RescascadeError for a container of the wrong kind."""
        if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)) or \
                (isinstance(images, torch.Tensor) and images.dim() in (1, 3)):
            return [images]  # one input, not a sequence of characters, bytes or rows
        if isinstance(images, np.ndarray) or not isinstance(images, (Sequence, torch.Tensor)):
            raise ConfigError(f"images: give a uint8 tensor [N, 3, H, W], or a list of paths, bytes, PIL images or "
                              f"uint8 [3, H, W] tensors; got {type(images).__name__} (a numpy array: "
                              "torch.from_numpy(a).permute(2, 0, 1) for one H x W x 3 image)")
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8 or 0 in images.shape[2:]:
                raise RescascadeError(f"images tensor must be uint8 [N, 3, H, W] with H, W >= 1, got {images.dtype} "
                                      f"{list(images.shape)}")
        return list(images)

    def _load(self, images: list) -> tuple[list[torch.Tensor | Encoded | None], dict[int, str]]:
        """Inputs -> decoded tensors, or `Encoded` images (header checked, decoded stage by stage), or None
        where an input failed, with its error."""
        pixels = partial(_tensor_pixels, max_pixels=self.max_image_pixels)
        if self.engine.convert is None:  # a numpy engine: uint8 [H, W, 3] arrays over the same memory
            return load_inputs(images, self.max_image_pixels, lambda item: _array_view(pixels(item)))
        return load_inputs(images, self.max_image_pixels, pixels)

    # ---- running -------------------------------------------------------------------------------------------
    def __call__(self, images) -> CascadeResult:
        """Classify `images` (see the class): -> CascadeResult with labels [N] (int64, -1 for a failed input),
        names, probs [N, C] float32, exit_stage [N], confidence [N], errors {index: message}, wall_s and
        per-stage timings. ConfigError for a container of the wrong kind (one bad input fails only itself)."""
        return in_batches(partial(self._run, cascade=self.cascade), self._inputs(images), self.batch_size)

    def _run(self, images, cascade: Cascade) -> CascadeResult:
        """Run `cascade` on `images` (counted where it is the cascade served)."""
        items, errors = self._load(images)
        plan = self._plan.running([(st.resolution, st.threshold) for st in cascade.stages], cascade.decode_at)
        return run_plan(items, errors, plan, self.engine, self.counts if cascade is self._served else None)


def _array_view(item):
    """A uint8 [3, H, W] tensor as the uint8 [H, W, 3] array over its memory (on the CPU); `Encoded` as it is."""
    return item if isinstance(item, Encoded) else item.permute(1, 2, 0).cpu().numpy()


class TorchStages:
    """The stage loop's engine (`serve.loop.Engine`) on a backend's engines (torch, TensorRT, ONNX Runtime's GPU
    providers: `profiling.backends`): decoded images as uint8 [3, H, W] tensors, the rows' pixels copied to the
    device as one channels-last batch when they are new (stage 1, or rows decoded again), each stage's input
    resized from it by torch (`training.preprocess.preprocess`: the same pixels as `serve.preprocess_np`, which the
    ONNX Runtime CPU engine uses), run with the torch threads the backend preprocesses with.

    device: "cpu" or "cuda". crop_fraction, mean, std: the family's preprocessing (mean/std None: ImageNet's)."""

    convert = staticmethod(as_tensor)  # decoded images become uint8 [3, H, W] tensors over the same memory

    def __init__(self, device: str, crop_fraction: float, mean=None, std=None):
        self.device = device
        self.kwargs = dict(crop_fraction=crop_fraction) if mean is None else \
            dict(crop_fraction=crop_fraction, mean=mean, std=std)
        self.sessions: dict[int, object] = {}  # resolution -> the backend's engine

    def add(self, resolution: int, engine) -> None:
        """Run resolution's stage on `engine` (a backend's `open`)."""
        self.sessions[resolution] = engine

    def _threads(self):
        return torch_threads(next(iter(self.sessions.values())).preprocess_threads)

    def inputs(self, pixels: list):
        """Stage inputs of one run: the rows' pixels copied to the device as one batch when they are new, each
        stage resized from it (one resize call for the rows still running)."""
        source_row = np.full(len(pixels), -1, dtype=np.int64)
        source = None

        def make(rows: np.ndarray, resolution: int, new_pixels: bool) -> torch.Tensor:
            nonlocal source
            with self._threads():
                if new_pixels:
                    same_size = len(rows) and len({tuple(pixels[i].shape) for i in rows}) == 1
                    source = channels_last_batch([pixels[i] for i in rows], self.device) if same_size else None
                    source_row[rows] = np.arange(len(rows))
                if source is None:  # images of several sizes: one at a time
                    return torch.stack([preprocess(pixels[i].to(self.device), resolution, **self.kwargs)
                                        for i in rows])
                pick = source_row[rows]
                batch = source if len(pick) == len(source) else \
                    source.index_select(0, torch.from_numpy(pick).to(source.device))
                return preprocess(batch.permute(0, 3, 1, 2), resolution, **self.kwargs)
        return make

    def infer(self, resolution: int, x: torch.Tensor) -> np.ndarray:
        """Logits float32 [rows, C] of resolution's engine on x [rows, 3, r, r]."""
        with self._threads():
            return self.sessions[resolution].run(x).detach().float().cpu().numpy()
