"""Reading predictions/{calib,test}.npz with every check a user's mistake needs."""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rescascade.serve.errors import ArtifactError, ConfigError

SUPPORTED = 1


@dataclass
class Predictions:
    logits: np.ndarray        # [N, R, C] float32
    labels: np.ndarray        # [N] int64
    resolutions: list[int]    # [R]
    ids: np.ndarray           # [N]
    weights_sha256: str
    path: str = ""
    pixel_digests: np.ndarray | None = None   # [N] training.images.pixel_digest of each image (None: not recorded)
    # (r, R) -> logits [N, C] of resolution r from a JPEG decoded at the scale resolution R's stage needs (R > r),
    # the pixels a cascade decoded once (`Cascade.decode_at` R) gives r; empty where not predicted
    decoded_at: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.labels)

    def decode_plans(self) -> list[int]:
        """The resolutions R whose decode-once plan these predictions cover: every lower resolution predicted
        from R's decode."""
        return [R for R in sorted(self.resolutions)[1:]
                if all((r, R) in self.decoded_at for r in self.resolutions if r < R)]

    def decode_key(self, resolution: int, at: int | None) -> int | None:
        """The decode a column of resolution under plan `at` comes from: None (its own), or `at`."""
        return at if at is not None and resolution < at else None

    def column(self, resolution: int, at: int | None = None) -> np.ndarray:
        """Logits [N, C] of `resolution`, from its own decode, or (at: a Cascade.decode_at) from `at`'s decode.
        ConfigError for a resolution not predicted, ArtifactError when that decode was not predicted."""
        for r in (resolution, at):
            if r is not None and r not in self.resolutions:
                raise ConfigError(f"resolution {r!r} is not predicted here (the predictions cover {self.resolutions})")
        at = self.decode_key(resolution, at)
        if at is None:
            return self.logits[:, self.resolutions.index(resolution)]
        if (resolution, at) not in self.decoded_at:
            raise ArtifactError(f"{self.path or 'these predictions'} hold no logits of r{resolution} decoded at "
                                f"r{at}'s scale (a cascade decoded once); re-run `rescascade train` to predict them, "
                                "or build with --decode-plan stage")
        return self.decoded_at[resolution, at]

    def subset(self, idx) -> "Predictions":
        digests = None if self.pixel_digests is None else self.pixel_digests[idx]
        return Predictions(self.logits[idx], self.labels[idx], self.resolutions, self.ids[idx], self.weights_sha256,
                           self.path, digests, {k: v[idx] for k, v in self.decoded_at.items()})

    def restrict(self, resolutions) -> "Predictions":
        """These predictions at `resolutions` only (or a pool's stage names), in that order. ConfigError naming
        what they lack."""
        missing = [r for r in resolutions if r not in self.resolutions]
        if missing:
            raise ConfigError(f"{self.path or 'these predictions'} hold no logits of {missing} (they cover "
                              f"{self.resolutions}): they come from another family or pool")
        k = [self.resolutions.index(r) for r in resolutions]
        return Predictions(self.logits[:, k], self.labels, list(resolutions), self.ids, self.weights_sha256, self.path,
                           self.pixel_digests, {p: v for p, v in self.decoded_at.items() if set(p) <= set(resolutions)})


def validate(logits, labels, resolutions, where: str) -> None:
    if logits.ndim != 3 or labels.ndim != 1 or logits.shape[0] != labels.shape[0] or \
            logits.shape[1] != len(resolutions):
        raise ArtifactError(f"{where}: logits {list(logits.shape)}, labels {list(labels.shape)} and "
                            f"{len(resolutions)} resolutions do not fit [N, R, C] / [N] / [R]")
    if logits.shape[0] == 0:
        raise ArtifactError(f"{where} holds no examples")
    bad = ~np.isfinite(logits)
    if bad.any():
        n_rows = int(bad.any(axis=(1, 2)).sum())
        r = resolutions[int(np.argwhere(bad)[0][1])]
        raise ArtifactError(f"{where}: {n_rows} example(s) have NaN or inf logits (first at resolution {r}); the model "
                            "diverged or the file is damaged: retrain or re-run prediction")
    c = logits.shape[2]
    if labels.min() < 0 or labels.max() >= c:
        raise ArtifactError(f"{where}: labels range {labels.min()}..{labels.max()} falls outside the {c} classes of the "
                            "logits; predictions and labels come from different label spaces")
    if len(set(resolutions)) != len(resolutions):
        raise ArtifactError(f"{where}: resolutions {resolutions} repeat")


def load_predictions(path) -> Predictions:
    """predictions/{calib,test}.npz as written by train: logits [N, R, C] float32 (R resolutions, ascending),
    labels [N] int64, ids, pixel digests and the family's weights id; where predicted, decoded_at_logits
    [N, P, C] of the pairs decoded_at_pairs [P, 2] (r, R): r from R's decode (`Predictions.decoded_at`). Loaded
    without pickles; ArtifactError for a missing, truncated, pickled or inconsistent file."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"give the path of a predictions .npz, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} not found; `rescascade train` writes predictions/calib.npz and test.npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            version = int(z["schema_version"]) if "schema_version" in z else None
            if version is None or version > SUPPORTED:
                raise ArtifactError(f"{path}: predictions schema_version {version} is not supported (reads up to "
                                    f"{SUPPORTED}); upgrade rescascade or re-run prediction")
            missing = [k for k in ("logits", "labels", "resolutions") if k not in z]
            if missing:
                raise ArtifactError(f"{path} lacks {', '.join(missing)}; it is not a predictions file from train")
            logits = z["logits"].astype(np.float32, copy=False)
            labels = z["labels"].astype(np.int64)
            resolutions = [int(r) for r in z["resolutions"]]
            ids = z["ids"] if "ids" in z else np.arange(len(labels)).astype(str)
            wid = str(z["weights_sha256"]) if "weights_sha256" in z else ""
            digests = z["pixel_digests"] if "pixel_digests" in z and len(z["pixel_digests"]) == len(labels) else None
            pairs = z["decoded_at_pairs"] if "decoded_at_pairs" in z else np.zeros((0, 2), dtype=np.int64)
            if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.issubdtype(pairs.dtype, np.integer) or \
                    (len(pairs) and "decoded_at_logits" not in z):
                raise ArtifactError(f"{path}: decoded_at_pairs ({pairs.dtype} {list(pairs.shape)}) is not integers "
                                    "[P, 2] with its decoded_at_logits; re-create it with `rescascade train`")
            pairs = [(int(r), int(R)) for r, R in pairs]
            at = z["decoded_at_logits"].astype(np.float32, copy=False) if pairs else None
    except ValueError as e:
        if "allow_pickle" in str(e):  # never unpickle a file: it could run code
            raise ArtifactError(f"{path} holds pickled Python objects, which rescascade does not load; re-create it "
                                "with `rescascade train`") from None
        raise ArtifactError(f"{path} is not a readable .npz ({e}); re-create it with `rescascade train`") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{path} is not a readable .npz ({type(e).__name__}: the file is damaged or truncated); "
                            "re-create it with `rescascade train`") from None
    if not wid:
        raise ArtifactError(f"{path} records no weights id, so it cannot be matched to its family; re-create it with "
                            "`rescascade train`")
    validate(logits, labels, resolutions, str(path))
    decoded_at = {}
    if pairs:
        if at.shape[:2] != (len(labels), len(pairs)) or at.shape[2:] != logits.shape[2:] or \
                any(not (r < R and {r, R} <= set(resolutions)) for r, R in pairs):
            raise ArtifactError(f"{path}: decoded_at_logits {list(at.shape)} and pairs {pairs} do not fit logits "
                                f"{list(logits.shape)} (pairs (r, R) of predicted resolutions, r < R); re-run "
                                "`rescascade train`")
        validate(at, labels, [f"r{r}@{R}" for r, R in pairs], str(path))
        decoded_at = {p: at[:, k] for k, p in enumerate(pairs)}
    return Predictions(logits, labels, resolutions, ids, wid, str(path), digests, decoded_at)
