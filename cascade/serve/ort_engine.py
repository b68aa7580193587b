"""The stage loop's engine on ONNX Runtime (`loop.Engine`): decoded pixels stay numpy arrays, each stage's input is
made by `preprocess_np` on a thread pool, and each stage runs in a session of the family's shared model made that
stage's model by its patch (`ort.stage_session`). `BundleRunner` runs a bundle with it, and `CascadeRunner` a
cascade.json on ONNX Runtime's CPU provider, so the two compute the same."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

import numpy as np

from .errors import ArtifactError
from .ort import WEIGHTS_KEY, session_options, shared_weights, stage_session
from .preprocess_np import preprocess_rows


class OrtEngine:
    """Stage sessions on ONNX Runtime and the numpy inputs they take.

    shared: the shared model's path. patches: resolution -> the bytes its session reads (`ort.unpack_patch`);
    patch_names: resolution -> where those bytes came from (for messages). crop_fraction, mean, std: the
    preprocessing (`preprocess_np.preprocess_pixels`). providers: ONNX Runtime execution providers in order of
    preference. threads: intra-op threads of each session and the preprocessing's threads (None: the CPUs this
    process may use). weights: "folded" (a session per stage with its BatchNorms folded into its own copy of the
    weights) or "shared" (one copy of the weights for every stage; `ort.stage_session`). weights_id, num_classes:
    what the shared model must hold and give (None: unchecked).
    Raises ArtifactError when ONNX Runtime cannot load a stage, or the model is another family's or gives another
    number of logits.
    """

    convert = None  # decoded images stay uint8 [H, W, 3] arrays

    def __init__(self, shared: str, patches: Mapping[int, bytes], patch_names: Mapping[int, str],
                 crop_fraction: float, mean: Sequence[float], std: Sequence[float], providers: Sequence[str],
                 threads: int | None = None, weights: str = "folded", weights_id: str | None = None,
                 num_classes: int | None = None):
        self.shared, self.providers, self.threads = shared, list(providers), threads
        self.weights_id, self.num_classes = weights_id, num_classes
        self.crop_fraction, self.mean, self.std = crop_fraction, tuple(mean), tuple(std)
        options = session_options(threads)
        self._pool = ThreadPoolExecutor(options.intra_op_num_threads, thread_name_prefix="rescascade-preprocess")
        self._weights = shared_weights(shared) if weights == "shared" else None  # one copy, alive with the sessions
        self._patches: dict[int, bytes] = {}  # alive as long as the sessions that read them
        self.sessions: dict[int, tuple] = {}
        for r, patch in patches.items():
            self.open(r, patch, patch_names[r])

    def open(self, resolution: int, patch: bytes, patch_name: str) -> None:
        """Add resolution's session: the shared model made resolution's model by its patch bytes (from
        patch_name). ArtifactError as the class says."""
        try:
            session = stage_session(self.shared, patch, resolution, session_options(self.threads), self.providers,
                                    self._weights)
        except Exception as e:  # onnxruntime's own exception types, whatever the damage
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ArtifactError(f"{self.shared} with {patch_name}: ONNX Runtime cannot load them ({first}); "
                                "export again") from None
        made_for = session.get_modelmeta().custom_metadata_map.get(WEIGHTS_KEY)
        if self.weights_id is not None and made_for is not None and made_for != self.weights_id:
            raise ArtifactError(f"{self.shared} holds the weights of another family ({made_for[:12]}) than "
                                f"{self.weights_id[:12]}; export again")
        classes = session.get_outputs()[0].shape[-1]
        if self.num_classes is not None and isinstance(classes, int) and classes != self.num_classes:
            raise ArtifactError(f"{self.shared} gives {classes} logits where {self.num_classes} classes are named; "
                                "export again")
        dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
        self._patches[resolution] = patch
        self.sessions[resolution] = (session, dtype)

    def inputs(self, pixels: list):
        """Stage inputs of one run: each made from the rows' decoded pixels (`stage_input`)."""
        return lambda rows, resolution, new_pixels: self.stage_input(pixels, rows, resolution)

    def stage_input(self, pixels: list[np.ndarray], rows: np.ndarray, resolution: int) -> np.ndarray:
        """The model input [len(rows), 3, r, r] float32 of `rows` (indices into pixels, uint8 [H, W, 3] arrays),
        made on the engine's threads (`preprocess_np.preprocess_rows`)."""
        return preprocess_rows(pixels, rows, resolution, self.crop_fraction, self.mean, self.std, self._pool)

    def infer(self, resolution: int, x: np.ndarray) -> np.ndarray:
        """Logits float32 [rows, C] of resolution's session on x [rows, 3, r, r]."""
        session, dtype = self.sessions[resolution]
        return session.run(None, {session.get_inputs()[0].name: x.astype(dtype, copy=False)})[0].astype(
            np.float32, copy=False)
