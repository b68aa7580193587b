"""Run an exported cascade without torch: ONNX Runtime, numpy and Pillow alone.

`rescascade export CASCADE_JSON --out DIR` writes a bundle: the family's shared weights once as one ONNX model,
and per stage (and for the reference) its patch file, the BatchNorm scale and shift that make the shared model that
resolution's model (packed losslessly, `ort.pack_patch`; each checked against PyTorch), bundle.json (the cascade: stages, thresholds,
temperatures, confidence measure; the preprocessing; the class names; every model's sha256), and a copy of this
folder, the runtime kernel (DIR/rescascade/serve/), so the bundle runs where only onnxruntime, numpy and Pillow are
installed:

    import sys; sys.path.insert(0, "DIR")            # or install rescascade without its dependencies
    from rescascade.serve.bundle import BundleRunner
    result = BundleRunner("DIR")(["a.jpg", open("b.png", "rb").read()])
    result.names, result.probs, result.exit_stage

or `python -m rescascade.serve DIR a.jpg b.png` from DIR's parent with DIR on PYTHONPATH. It runs the stage loop
(`loop.run_plan`) with the ONNX Runtime engine (`ort_engine.OrtEngine`), as `CascadeRunner` does on ONNX Runtime's
CPU provider, so the two give the same labels, exit stages and probabilities bit for bit, at the same cost; on
torch backends `CascadeRunner` computes the same pixels with torch (`preprocess_np` reproduces torch's resize
exactly; tests/test_deploy.py).
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import sys
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

from .counts import ExitCounts, plan_identity
from .errors import ArtifactError, BackendUnavailable, ConfigError, RescascadeError, check_bool, check_int
from .exits import CascadeResult, in_batches, load_inputs, warmup_sizes
from .fileio import check_schema, printable_streams, read_json, sha256_file
from .images import DECODE_SCALES, DEFAULT_MAX_PIXELS, Encoded, ImageError, pil_pixels
from .limits import MAX_BATCH, MAX_THREADS
from .loop import MemberEngines, run_plan
from .names import is_pool_doc, key_model, key_resolution, stage_name
from .ort import patch_identity, unpack_patch
from .ort_engine import OrtEngine
from .plan import Plan, plan_decode_at, plan_problem, plan_reference, plan_stages
from .preprocess_np import eval_resize_size

BUNDLE_FORMAT = "rescascade-bundle"
BUNDLE_SCHEMA = 5  # 2: the cascade's "decode" plan; 3: one shared model + a patch per stage (1-2: a model per
# stage); 4: the patches packed (`ort.pack_patch`); 5: a pool's bundle ("members"; a family's is still written as 4)
FAMILY_SCHEMA = 4  # what a family's bundle is written as: readers of version 4 run it
RESIZE = "torch-uint8-antialias-bilinear"  # the only resize this runtime implements (preprocess_np)
PRECISIONS = ("fp32", "fp16")
WEIGHT_FORMS = ("folded", "shared")  # a session per stage with its BatchNorms folded; one copy of the weights


def _inside(file) -> bool:
    """Whether a bundle.json file entry names a file inside the bundle: a relative path that does not climb out."""
    return isinstance(file, str) and bool(file) and "\\" not in file and not PurePosixPath(file).is_absolute() \
        and ".." not in PurePosixPath(file).parts


def bundle_members(doc: dict) -> list[dict]:
    """The families a bundle.json's content holds, each {"model", "weights_sha256", "shared", "models"}: a pool's
    "members", or the one family ("shared", "models" and source.weights_sha256)."""
    if is_pool_doc(doc):
        return doc["members"]
    return [{"model": (doc.get("shared") or {}).get("model"), "shared": doc.get("shared"),
             "models": doc.get("models"), "weights_sha256": (doc.get("source") or {}).get("weights_sha256")}]


def _member_problem(shared, models) -> str | None:
    """What is wrong with one family's files in bundle.json (its shared model and patches), None if nothing."""
    if not (isinstance(models, dict) and models and all(
            str(r).isdigit() and isinstance(m, dict) and isinstance(m.get("file"), str) and
            isinstance(m.get("sha256"), str) for r, m in models.items())):
        return "models must map resolutions to their patch {file, sha256}"
    if not (isinstance(shared, dict) and isinstance(shared.get("file"), str) and isinstance(shared.get("sha256"), str)):
        return "shared must be the shared model's {file, sha256}"
    if not all(_inside(entry["file"]) for entry in [shared, *models.values()]):
        return "every file must be a relative path inside the bundle (no /, .. or \\ at its start or in it)"
    if shared.get("input") != "input" or shared.get("output") != "logits" or shared.get("precision") not in PRECISIONS:
        return f'shared must name input "input", output "logits" and a precision of {", ".join(PRECISIONS)}'
    size = shared.get("patch_bytes")  # every patch unpacks to this many bytes (before the field: unchecked)
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        return "shared.patch_bytes must be a positive whole number"
    return None


def _bundle_problem(doc: dict) -> str | None:
    """What is wrong with a bundle.json's content (beyond its schema version and keys), None if nothing."""
    prep, names = doc["preprocessing"], doc["class_names"]
    pooled = is_pool_doc(doc)
    if pooled and not (isinstance(doc["members"], list) and doc["members"] and
                       all(isinstance(m, dict) for m in doc["members"])):
        return "members must list the pool's families it runs, each {model, weights_sha256, shared, models}"
    members = bundle_members(doc)
    for m in members:
        problem = _member_problem(m.get("shared"), m.get("models"))
        if problem:
            return f"member {m.get('model')!r}: {problem}" if pooled else problem
        if pooled and not (isinstance(m.get("model"), str) and m["model"] == m["shared"].get("model") and
                           isinstance(m.get("weights_sha256"), str)):
            return "each member must name its model (its shared model's) and weights_sha256"
    if pooled and len({m["model"] for m in members}) != len(members):
        return "two members name the same model"
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)):
        return "class_names must be a list of at least 2 names"
    allowed = [stage_name(m["model"], r) for m in members for r in m["models"]] if pooled else \
        {int(r) for r in members[0]["models"]}
    problem = plan_problem(doc, allowed, len(names))
    if problem:
        return problem
    model = members[0]["shared"].get("model")  # the model the shared weights are (before the field: unchecked)
    if not pooled and model is not None:
        other = next((e["model"] for e in [*doc["stages"], doc["reference"]] if e.get("model", model) != model), None)
        if other is not None:
            return f"the plan runs model {other!r}, but the bundle's shared weights are {model!r}'s"
    if not isinstance(prep, dict) or prep.get("resize") != RESIZE:
        return f"preprocessing.resize must be {RESIZE}, the one this runtime implements"
    crop, mean, std = prep.get("crop_fraction"), prep.get("mean"), prep.get("std")
    if not (isinstance(crop, (int, float)) and 0.05 <= crop <= 1):
        return "preprocessing.crop_fraction must be a number in [0.05, 1]"
    for name, values in (("mean", mean), ("std", std)):
        if not (isinstance(values, list) and len(values) == 3 and all(isinstance(v, (int, float)) and
                                                                       math.isfinite(v) for v in values)):
            return f"preprocessing.{name} must be 3 numbers"
    if min(std) <= 0:
        return "preprocessing.std must be positive"
    if prep.get("decode_scale") not in DECODE_SCALES:
        return f"preprocessing.decode_scale must be one of {', '.join(DECODE_SCALES)}"
    return None


class Bundle:
    """bundle.json, read and checked: every model file present with the sha256 it was exported with.

    path: the bundle directory or its bundle.json. Raises ArtifactError when it is missing, of an unknown
    version, or a model file is missing or changed."""

    def __init__(self, path):
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ConfigError(f"bundle {path!r}: give the bundle's directory or its bundle.json")
        path = Path(path)
        self.path = path if path.name == "bundle.json" else path / "bundle.json"
        self.dir = self.path.resolve().parent  # the models lie next to the file itself, not to a link to it
        doc = read_json(self.path, "a bundle written by `rescascade export`")
        if doc.get("format") != BUNDLE_FORMAT:
            raise ArtifactError(f"{self.path} is not a rescascade bundle (format {doc.get('format')!r})")
        old = doc.get("schema_version")
        if isinstance(old, int) and not isinstance(old, bool) and old < FAMILY_SCHEMA:
            source = (doc.get("source") or {}).get("cascade_json") or "CASCADE_JSON"
            holds = "one model per stage" if old < 3 else "unpacked patches"
            raise ArtifactError(f"{self.path} holds {holds} (bundle schema {old}), which this rescascade no longer "
                                f"runs; export it again: `rescascade export {source} --out {self.dir}`")
        files = ("members",) if is_pool_doc(doc) else ("shared", "models")
        check_schema(doc, self.path, "bundle", BUNDLE_SCHEMA, (*files, "stages", "reference", "confidence",
                                                                 "preprocessing", "class_names"))
        problem = _bundle_problem(doc)
        if problem:
            raise ArtifactError(f"{self.path}: {problem}; the file was edited or damaged: export the bundle again")
        self.doc = doc
        self._patches: dict = {}  # stage key -> its patch's bytes: read once here, handed to the sessions
        for member in bundle_members(doc):
            self._check_member(member)

    def _check_member(self, member: dict) -> None:
        """Every file of one family (its shared model and patches) present with its exported sha256, each patch
        of this family and resolution; the patches read into `_patches`. ArtifactError otherwise."""
        shared, weights, pooled = member["shared"], member["weights_sha256"], self.pooled
        size = shared.get("patch_bytes")  # bundles from before the field: unchecked
        of = f"{member['model']}'s " if pooled else ""
        for r, what, entry in [(None, f"{of}shared model" if pooled else "the shared model", shared)] + \
                [(int(r), f"{of}resolution {r}'s patch", m) for r, m in member["models"].items()]:
            file = self.dir / entry["file"]
            if file.is_dir():
                raise ArtifactError(f"{file} ({what}) is a directory where bundle.json names a file; export the "
                                    "bundle again")
            if not file.is_file():
                raise ArtifactError(f"{file} ({what}) is missing from the bundle; copy the whole directory")
            data = None if r is None else file.read_bytes()  # a patch: read once, hashed and kept
            digest = sha256_file(file) if data is None else hashlib.sha256(data).hexdigest()
            if digest != entry["sha256"]:
                raise ArtifactError(f"{file} ({what}) is not the file exported with this bundle.json (sha256 "
                                    "differs: changed, or from another export); export the bundle again")
            if data is None:
                continue
            named = patch_identity(data)
            if named is not None and named != (r, weights):
                raise ArtifactError(f"{file} is the patch of resolution {named[0]} of the family with weights "
                                    f"{named[1][:12]}, not of resolution {r} of this bundle's family "
                                    f"({str(weights)[:12]}); export the bundle again")
            data = unpack_patch(data, f"{file} ({what})")
            if size is not None and len(data) != size:
                raise ArtifactError(f"{file} ({what}) holds {len(data)} bytes where the shared model reads {size}: it "
                                    "is not a patch of this model; export the bundle again")
            self._patches[stage_name(member["model"], r) if pooled else r] = data

    @property
    def pooled(self) -> bool:
        """Whether this is a pool's bundle (several families' shared models, stages keyed MODEL/rR)."""
        return is_pool_doc(self.doc)

    @property
    def stages(self) -> list[tuple[int | str, float]]:
        """[(stage key, threshold)] in order (a family's: its resolution; a pool's: MODEL/rR); the last stage's
        threshold is -inf (it answers everything)."""
        return plan_stages(self.doc)

    @property
    def reference(self) -> int | str:
        """The reference model's stage key."""
        return plan_reference(self.doc)

    @property
    def decode_at(self) -> int | None:
        """The resolution whose JPEG scale every stage decodes at (the cascade is decoded once), or None (each
        stage at its own scale)."""
        return plan_decode_at(self.doc)

    @property
    def shared_path(self) -> Path:
        """The shared model (the family's weights, once; a pool's first member's)."""
        return self.shared_path_of(None)

    def _member(self, model: str | None) -> dict:
        members = bundle_members(self.doc)
        return members[0] if model is None else next(m for m in members if m["model"] == model)

    def shared_path_of(self, model: str | None) -> Path:
        """The shared model of `model` (a pool's member; None: the family's)."""
        return self.dir / self._member(model)["shared"]["file"]

    def patch_path(self, key: int | str) -> Path:
        """The patch that makes its shared model the model of the stage keyed `key` (a resolution, or a pool's
        MODEL/rR)."""
        return self.dir / self._member(key_model(key))["models"][str(key_resolution(key))]["file"]

    def patch(self, key: int | str) -> bytes:
        """The bytes its shared model reads for the stage keyed `key` (its patch file unpacked), as checked when the
        bundle was read."""
        return self._patches[key]


def _array_pixels(item) -> np.ndarray:
    """A decoded input (a PIL image or a uint8 [H, W, 3] array) -> uint8 [H, W, 3]; ImageError (a ValueError)
    otherwise."""
    if isinstance(item, Image.Image):
        item = pil_pixels(item)
    if not (isinstance(item, np.ndarray) and item.ndim == 3 and item.shape[2] == 3 and item.dtype == np.uint8):
        got = f"a {item.dtype} array {list(item.shape)}" if isinstance(item, np.ndarray) else type(item).__name__
        raise ImageError(f"not an image: got {got}; give a file path, encoded bytes, a PIL image or a uint8 [H, W, 3] "
                         "array")
    if 0 in item.shape[:2]:
        raise ImageError(f"an empty image ({item.shape[0]}x{item.shape[1]} pixels)")
    return item


class BundleRunner:
    """Run an exported cascade (a `Bundle`) with ONNX Runtime, numpy and Pillow: no torch.

    bundle: the bundle directory (or its bundle.json, or a Bundle). providers: ONNX Runtime execution providers in
    order of preference (default CPU; ("CUDAExecutionProvider", "CPUExecutionProvider") on an NVIDIA GPU with
    onnxruntime-gpu). threads: ONNX Runtime's intra-op threads and the preprocessing's (default: the CPUs this
    process may use; the sessions are set up as the profiler's, `serve.ort.session_options`). reference: run the
    reference model alone instead of the cascade (to compare costs). max_image_pixels: refuse larger images
    (None: no limit). batch_size: the most inputs run at once (default: the batch size the cascade was built for);
    a call with more runs them in batches of this size, one after the other, so memory is set by it, not by the
    number of inputs. warmup: run every stage at load on batches of these sizes (True: 1; False: none).
    weights: "folded" (default: a session per stage, each with its patch folded into its own copy of the weights,
    the fastest) or "shared" (one copy of the weights in memory for every stage, each stage's BatchNorms applied
    as they are: MobileNetV2's five stages in ~40 % less memory, 2-4x slower per image on CPU; needs the onnx
    package; `serve.ort.stage_session`, benchmarks/bundle_storage.py).
    Raises ArtifactError for a missing or changed bundle, BackendUnavailable for a provider that is not there,
    ConfigError for bad arguments.

    runner(images) takes a list of inputs (or one input), each an image file path, the encoded bytes of an image
    file, a PIL image or a uint8 array [H, W, 3]; or one uint8 array [N, H, W, 3]. Like `CascadeRunner`: files
    and bytes are decoded stage by stage at the scale the family's predictions used (or once, at the scale of
    bundle.json's "decode" resolution), an input that fails gets an error of its own, and `counts` holds what the cascade saw (`rescascade drift BUNDLE_DIR/bundle.json COUNTS`).
    The numpy resize costs 2-3x torch's from sources under about 2x a stage's resize side (JPEGs decoded at the
    stage's scale are) and up to ~12x from far larger decoded arrays or full-size PNGs (benchmarks/README).
    Returns a CascadeResult: labels [N] int64 (-1 where failed), names, probs [N, C] float32, exit_stage [N],
    confidence [N], errors {index: message}, stage_timings, wall_s.
    """

    def __init__(self, bundle, providers: Sequence[str] | None = None, threads: int | None = None,
                 reference: bool = False, max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
                 warmup: bool | Sequence[int] = True, batch_size: int | None = None, weights: str = "folded"):
        if threads is not None:
            check_int("threads", threads, 1, MAX_THREADS)
        if max_image_pixels is not None:
            check_int("max_image_pixels", max_image_pixels, 1)
        if batch_size is not None:
            check_int("batch_size", batch_size, 1, MAX_BATCH)
        warmup = warmup_sizes(warmup)
        check_bool("reference", reference)
        if weights not in WEIGHT_FORMS:
            raise ConfigError(f"weights {weights!r}: choose {' or '.join(map(repr, WEIGHT_FORMS))}")
        if isinstance(providers, str) or not (providers is None or all(isinstance(p, str) for p in providers)):
            raise ConfigError(f"providers {providers!r}: give a list such as ['CUDAExecutionProvider', "
                              "'CPUExecutionProvider']")
        if not isinstance(bundle, (Bundle, str, os.PathLike)):
            raise ConfigError(f"bundle: give the bundle's directory, got {type(bundle).__name__}")
        providers = list(providers or ["CPUExecutionProvider"])
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise BackendUnavailable(f"ONNX Runtime here has no {', '.join(missing)} (it has "
                                     f"{', '.join(ort.get_available_providers())}); for CUDA install onnxruntime-gpu")
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        doc = self.bundle.doc
        prep = doc["preprocessing"]
        plan = Plan.from_doc(doc, doc["class_names"], prep["crop_fraction"], prep["decode_scale"], prep["mean"],
                             prep["std"])
        self.plan = plan.running([(self.bundle.reference, -math.inf)], None) if reference else plan
        self.stages, self.class_names = list(self.plan.stages), list(self.plan.class_names)
        self.num_classes = len(self.class_names)
        self.max_image_pixels = max_image_pixels
        self.batch_size = batch_size or int(doc.get("profile", {}).get("batch_size") or 1)
        self.counts = ExitCounts.for_cascade(self.plan.keys, self.plan.measure, self.num_classes,
                                             plan_identity(doc, self.stages, self.plan.decode_at),
                                             self.plan.stage_names)
        engines = {}  # model (None: the family's) -> the engine of its stages, keyed by resolution
        for member in bundle_members(doc):
            model = member["model"] if self.bundle.pooled else None
            keys = [key for key, _ in self.stages if key_model(key) == model]
            if keys:
                engines[model] = OrtEngine(
                    str(self.bundle.shared_path_of(model)), {key_resolution(k): self.bundle.patch(k) for k in keys},
                    {key_resolution(k): str(self.bundle.patch_path(k)) for k in keys}, prep["crop_fraction"],
                    prep["mean"], prep["std"], providers, threads, weights, member["weights_sha256"], self.num_classes)
        self.engine = MemberEngines(engines) if self.bundle.pooled else engines[None]
        for b in ([1] if warmup is True else warmup or []):
            self.warmup(b)

    def warmup(self, batch_size: int = 1) -> None:
        """Run every stage on a batch of grey JPEGs (the top stage's resize size), not counted: what a first
        request would otherwise pay alone (sessions allocate and plan on their first run at a batch size)."""
        side = eval_resize_size(max(map(key_resolution, self.plan.keys)), self.plan.crop_fraction)
        jpeg = io.BytesIO()
        Image.new("RGB", (side, side), (128, 128, 128)).save(jpeg, "JPEG")
        every = self.plan.running([(key, math.inf) for key in self.plan.keys], self.plan.decode_at)  # none exits
        self._run([jpeg.getvalue()] * check_int("batch_size", batch_size, 1, MAX_BATCH), every, None)

    # ---- inputs --------------------------------------------------------------------------------------------
    def _inputs(self, images) -> list:
        """The inputs as a list, one per image (a single input, or a uint8 array [N, H, W, 3], split);
        ConfigError / RescascadeError for a container of the wrong kind."""
        if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)) or \
                (isinstance(images, np.ndarray) and images.ndim == 3):
            return [images]  # one input
        if isinstance(images, np.ndarray):
            if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8 or 0 in images.shape[1:3]:
                raise RescascadeError(f"images array must be uint8 [N, H, W, 3] with H, W >= 1, got {images.dtype} "
                                      f"{list(images.shape)}")
        elif not isinstance(images, Sequence):
            raise ConfigError(f"images: give a list of paths, bytes, PIL images or uint8 [H, W, 3] arrays, or a "
                              f"uint8 array [N, H, W, 3]; got {type(images).__name__}")
        return list(images)

    def _load(self, images: list) -> tuple[list[np.ndarray | Encoded | None], dict[int, str]]:
        """Inputs -> decoded uint8 [H, W, 3] arrays or `Encoded` images (header checked), or None where an
        input failed, with its error."""
        return load_inputs(images, self.max_image_pixels, _array_pixels)

    # ---- running -------------------------------------------------------------------------------------------
    def __call__(self, images) -> CascadeResult:
        """Classify `images` (see the class) -> CascadeResult. ConfigError for a container of the wrong kind (one
        bad input fails only itself)."""
        return in_batches(lambda part: self._run(part, self.plan, self.counts), self._inputs(images),
                          self.batch_size)

    def _run(self, images, plan: Plan, counts: ExitCounts | None) -> CascadeResult:
        """Run `plan` on `images`, recording into `counts` (None: not counted)."""
        items, errors = self._load(images)
        return run_plan(items, errors, plan, self.engine, counts)


def _one_field(name: str) -> str:
    """A file name as one field of a tab-separated line: control characters (tab, newline) written as escapes."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode() for c in name)


def main(argv=None) -> int:
    """`python -m rescascade.serve BUNDLE_DIR IMAGE...`: one line per image (label, probability, exit stage)."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m rescascade.serve",
                                     description="Classify images with an exported cascade (no torch needed).")
    parser.add_argument("bundle", help="the directory `rescascade export` wrote")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--reference", action="store_true", help="run the reference model alone")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"refuse larger images (default: {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--batch-size", type=int, help="images run at once; memory grows with it (default: the "
                                                       "batch size the cascade was built for)")
    args = parser.parse_args(argv)
    printable_streams()
    try:
        runner = BundleRunner(args.bundle, reference=args.reference, max_image_pixels=args.max_image_pixels,
                              batch_size=args.batch_size)
    except RescascadeError as e:
        print(f"error: {e.cli_message}", file=sys.stderr)
        return 2
    failed = False
    for start in range(0, len(args.images), runner.batch_size):  # answers printed batch by batch, as they come
        paths = args.images[start:start + runner.batch_size]
        result = runner(paths)
        failed = failed or bool(result.errors)
        for i, path in enumerate(paths):
            if i in result.errors:
                print(f"{_one_field(path)}\terror: {result.errors[i]}")
            else:
                print(f"{_one_field(path)}\t{result.names[i]}\t{result.probs[i].max():.4f}\t"
                      f"{_one_field(result.exit_names[i])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
