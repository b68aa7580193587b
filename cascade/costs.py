"""Per-stage costs from a profile table: measured, not counted.

A stage at resolution r costs its inference, plus the preprocessing of the source image to r, plus the
runtime's decision step (confidence, exit mask), per image, at the serving batch size. The runtime uploads a
batch (stacks the decoded images on the device) once, in the first stage's preprocessing, and later stages
gather their rows from it instead: so a stage's cost here carries the gather, not the upload, and every cascade
(a single model too) pays upload - gather once. On a GPU the upload includes the host-to-device copy.
Expected cost of a cascade = (upload - gather) + Σ_k P(reach stage k) · cost_k.
In batch-aware mode (throughput serving) stage k runs on the shrunken batch that reaches it: its cost is the
profile row at that batch size, or, between profiled sizes, the batch latency interpolated linearly between the
two nearest rows (small batches cost more per image; measured on CPU, picking the single nearest row
underestimated a stage run on 4 of 32 images by 2x). Profile the batch sizes you serve at, and a few below.

With decode costs (a profile's decode rows for one source size), a cascade served encoded images also pays the
JPEG decode: the first stage decodes at its scale, a later stage again only where it needs a larger DCT scale
than the stage before it (the runtime keeps the last decode). A single model pays its own decode. A cascade
decoded once (`Cascade.decode_at` R) pays R's decode at its first stage and none later, and each stage's
preprocessing from that larger decode (the profile's decode rows with decoded_for R).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from rescascade.serve.errors import ConfigError, RescascadeError, check_int
from rescascade.training.config import parse_size


NEEDED = {"backend", "precision", "resolution", "batch_size", "median_ms", "preprocess_ms"}


@dataclass
class CostModel:
    """Per-image cost (ms) of each cascade stage on one backend, precision and batch size, from a measured
    profile: table[resolution][batch size] = inference + preprocessing + decision per image (with the gather, not
    the upload); once[batch size] = what every cascade pays once per image (upload - gather). Build one with
    `CostModel.from_profile`; `per_image(r, batch)` interpolates between profiled batch sizes."""
    backend: str
    precision: str
    batch_size: int
    batch_aware: bool
    # resolution -> {batch_size: per-image ms: inference + preprocessing + decision, with the gather, not the upload}
    table: dict[int, dict[int, float]]
    # batch_size -> per-image ms that every cascade pays once: upload - gather (0 for profiles without them)
    once: dict[int, float] = field(default_factory=dict)
    # resolution -> per-image ms of that stage's JPEG decode, and its DCT scale denominator (empty: not counted)
    decode_ms: dict[int, float] = field(default_factory=dict)
    decode_scale: dict[int, int] = field(default_factory=dict)
    source_size: tuple[int, int] | None = None  # (width, height) of the JPEGs the decode costs are for
    # resolution -> per-image ms the preprocessing from source_size's decode costs more than from the profiled one
    preprocess_delta: dict[int, float] = field(default_factory=dict)
    # (r, R) -> the same for r's preprocessing from the decode at R's scale (R > r: a cascade decoded once at R)
    preprocess_delta_at: dict[tuple[int, int], float] = field(default_factory=dict)

    @classmethod
    def from_profile(cls, df: pd.DataFrame, resolutions=None, backend: str | None = None, precision: str | None = None,
                     batch_size: int = 1, batch_aware: bool = False, where: str = "profile",
                     source_size: tuple[int, int] | str | None = None, decode_scale: str | None = None) -> "CostModel":
        """Per-image stage costs (ms) at `batch_size` from a profile (a `Profile` or its table): inference +
        preprocessing + decision per stage, the upload charged once per cascade. resolutions None: every one
        profiled; backend/precision None: the profile's only one. batch_aware: keep every batch size, for a
        cascade whose later stages run on shrinking batches. source_size: (width, height) or "WxH" of the encoded
        images served, whose decode the profile timed ("auto": the Profile's only size, or the one its
        preprocessing was timed on; None: decode not counted, as for decoded inputs). decode_scale: the family's
        (family.json preprocessing.decode_scale): only decode rows timed that way are read. Raises RescascadeError
        naming what is missing."""
        decode = default_size = None
        if hasattr(df, "table"):  # a Profile
            df, where, decode, default_size = df.table, str(df.path), df.decode, df.meta.get("source_size")
        if not isinstance(df, pd.DataFrame) or df.empty or not NEEDED <= set(df.columns):
            raise ConfigError(f"CostModel.from_profile needs a Profile (Profile.load(path)) or its table, with rows "
                              f"and the columns {', '.join(sorted(NEEDED))}; got {type(df).__name__}")
        batch_size = check_int("batch_size", batch_size, 1)
        if resolutions is None:
            resolutions = sorted(int(r) for r in df.resolution.unique())
        if backend is None:
            backends = sorted(df.backend.unique())
            if len(backends) != 1:
                raise RescascadeError(f"{where} holds backends {backends}; choose one with --backend")
            backend = backends[0]
        sel = df[df.backend == backend]
        if sel.empty:
            raise RescascadeError(f"{where} has no rows for backend {backend!r} (it has {sorted(df.backend.unique())}); "
                                  f"profile it with `rescascade profile RUN_DIR --backend {backend}`")
        if precision is None:
            precisions = sorted(sel.precision.unique())
            if len(precisions) != 1:
                raise RescascadeError(f"{where} holds precisions {precisions} for {backend}; choose one with --precision")
            precision = precisions[0]
        sel = sel[sel.precision == precision]
        if sel.empty:
            raise RescascadeError(f"{where} has no {precision} rows for backend {backend}")
        if "served_size" in sel.columns and sel.served_size.notna().any():
            sizes = sorted(set(sel.served_size.dropna().astype(str)))
            if len(sizes) > 1:  # preprocessing timed from other images per row: no one source size to price
                raise RescascadeError(f"{where} holds {backend} {precision} rows timed for images of several sizes "
                                      f"({', '.join(sizes)}); re-run `rescascade profile` for every batch size at the "
                                      "size you serve (--source-size WxH)")
            default_size = list(parse_size(sizes[0]))  # the decode rows' base: the size these rows were timed for
        # per batch size: what a cascade's first stage pays and later stages do not (upload - gather), measured apart
        # from preprocess_ms (which includes the upload), so never more than the smallest preprocessing
        once = {}
        if {"upload_ms", "gather_ms"} <= set(sel.columns) and sel[["upload_ms", "gather_ms"]].notna().all().all():
            once = {int(b): min(float(g.upload_ms.iloc[0] - g.gather_ms.iloc[0]), float(g.preprocess_ms.min()))
                    for b, g in sel.groupby("batch_size")}
        table = {}
        for r in resolutions:
            rows = sel[sel.resolution == r]
            if rows.empty:
                raise RescascadeError(f"resolution {r} is missing from {where} ({backend}, {precision}); profile it: "
                                      f"`rescascade profile RUN_DIR --backend {backend} --precision {precision}`")
            table[int(r)] = {
                int(row.batch_size): float(row.median_ms + row.preprocess_ms + getattr(row, "overhead_ms", 0.0)
                                           - once.get(int(row.batch_size), 0.0)) / int(row.batch_size)
                for row in rows.itertuples()}
            if batch_size not in table[int(r)]:  # batch-aware too: the first stage runs the full serving batch
                raise RescascadeError(f"{where} has no batch-size-{batch_size} row for resolution {r} "
                                      f"(has {sorted(table[int(r)])}); profile with --batch-sizes {batch_size} or pick "
                                      "one of those with --batch-size")
        model = cls(backend, precision, int(batch_size), batch_aware, table, {b: ms / b for b, ms in once.items()})
        if source_size is not None:
            if decode is not None and decode_scale is not None:
                decode = decode[decode.decode_scale == decode_scale]
            model._add_decode(decode, source_size, default_size, where)
        return model

    def _add_decode(self, decode, source_size, default_size, where: str) -> None:
        """Per-resolution decode ms and DCT scale for source_size from a profile's decode rows ("auto": the only
        size there, else default_size, the size the profile's preprocessing was timed on)."""
        where = where.replace("profile.csv", "profile_decode.csv") if where.endswith("profile.csv") else where
        if decode is None or decode.empty:
            raise RescascadeError(f"{where} has no decode rows for this family's decode: time the decode of the images "
                                  "you serve with `rescascade profile RUN_DIR --source-size WxH`, or count no decode "
                                  "with `build --decoded-inputs` (source_size=None)")
        sizes = sorted({(int(w), int(h)) for w, h in zip(decode.source_width, decode.source_height)})
        if source_size == "auto":
            if len(sizes) != 1 and tuple(default_size or ()) not in sizes:
                raise RescascadeError(f"{where} times decoding at several source sizes "
                                      f"({', '.join(f'{w}x{h}' for w, h in sizes)}); choose one with --source-size")
            source_size = sizes[0] if len(sizes) == 1 else tuple(default_size)
        elif isinstance(source_size, str):
            source_size = parse_size(source_size)
        if not isinstance(source_size, (tuple, list)) or len(source_size) != 2:
            raise ConfigError(f"source_size {source_size!r}: give (width, height), 'WxH' or 'auto'")
        source_size = tuple(check_int("source_size", v, 1) for v in source_size)
        sel = decode[(decode.source_width == source_size[0]) & (decode.source_height == source_size[1])]
        if sel.empty:
            raise RescascadeError(f"{where} has no decode rows for {source_size[0]}x{source_size[1]} (it has "
                                  f"{', '.join(f'{w}x{h}' for w, h in sizes)}); profile it with `rescascade profile "
                                  f"RUN_DIR --decode-sizes {source_size[0]}x{source_size[1]}` or pick one of those")
        if "decoded_for" not in sel.columns:  # profiles from before the column timed each stage's own decode only
            sel = sel.assign(decoded_for=sel.resolution)
        own, at = sel[sel.decoded_for == sel.resolution], sel[sel.decoded_for > sel.resolution]
        base = decode[(decode.source_width == (default_size or [0])[0]) &
                      (decode.source_height == (default_size or [0, 0])[1])]
        base = base[base.decoded_for == base.resolution] if "decoded_for" in base.columns else base
        sel = own
        for row in at.itertuples() if "preprocess_ms" in at.columns else ():
            r, R = int(row.resolution), int(row.decoded_for)
            ref = base[base.resolution == r]
            if r in self.table and R in self.table and len(ref) and np.isfinite([row.preprocess_ms,
                                                                                 ref.preprocess_ms.iloc[-1]]).all():
                self.preprocess_delta_at[r, R] = float(row.preprocess_ms - ref.preprocess_ms.iloc[-1])
        for r in self.table:
            row = sel[sel.resolution == r]
            if row.empty:
                raise RescascadeError(f"{where} has no decode row for resolution {r} at {source_size[0]}x"
                                      f"{source_size[1]}; re-run `rescascade profile` with every resolution")
            self.decode_ms[r], self.decode_scale[r] = float(row.median_ms.iloc[-1]), int(row.scale.iloc[-1])
            ref = base[base.resolution == r]
            if "preprocess_ms" in decode.columns and len(ref) and np.isfinite(
                    [row.preprocess_ms.iloc[-1], ref.preprocess_ms.iloc[-1]]).all():
                self.preprocess_delta[r] = float(row.preprocess_ms.iloc[-1] - ref.preprocess_ms.iloc[-1])
        self.source_size = source_size

    def per_image(self, resolution: int, batch: float | None = None) -> float:
        """Per-image ms of a stage at `resolution` run on `batch` images: the profiled row, or the batch
        latency interpolated between the two profiled sizes around it (the end rows' per-image cost outside)."""
        return _interpolate(self.table[resolution], self.batch_size if batch is None else batch)

    def once_per_image(self) -> float:
        """Per-image ms every cascade pays once at the serving batch: the upload, less the gather its first stage
        does not do."""
        return _interpolate(self.once, self.batch_size) if self.once else 0.0

    def decode_plans(self) -> list[int]:
        """The resolutions R at which these costs price a cascade decoded once (`Cascade.decode_at`): the decode
        is counted and the profile timed every lower stage's preprocessing from R's decode."""
        if not self.decode_ms:
            return []
        return [R for R in sorted(self.table)[1:]
                if all((r, R) in self.preprocess_delta_at for r in self.table if r < R)]

    def _check_plan(self, resolution: int, decode_at: int) -> float:
        """The preprocessing delta of `resolution` in a cascade decoded once at `decode_at`'s scale; RescascadeError
        where these costs do not price that plan (see decode_plans)."""
        if decode_at not in self.decode_plans() or resolution not in self.table or resolution > decode_at:
            raise RescascadeError(f"these costs do not price r{resolution} decoded once at r{decode_at!r}'s scale "
                                  f"(they price decoding once at {self.decode_plans() or 'no resolution'}, each stage "
                                  "at or below it); profile with --decode-sizes to time it, or decode per stage")
        return self.preprocess_delta_at.get((resolution, decode_at), self.preprocess_delta.get(resolution, 0.0))

    def decode_cost(self, resolution: int, prev: int | None = None, decode_at: int | None = None) -> float:
        """Per-image ms a stage at `resolution` pays to decode, after a stage at `prev` (None: it comes first):
        nothing where decode is not counted or prev's decode already has its scale; decoded once (decode_at R):
        R's decode at the first stage, nothing later."""
        if not self.decode_ms:
            return 0.0
        if decode_at is not None:
            self._check_plan(resolution, decode_at)
            return self.decode_ms[decode_at] if prev is None else 0.0
        if prev is not None and self.decode_scale[prev] == self.decode_scale[resolution]:
            return 0.0
        return self.decode_ms[resolution]

    def stage_cost(self, resolution: int, prev: int | None = None, batch: float | None = None,
                   decode_at: int | None = None) -> float:
        """Per-image ms of a stage at `resolution` run on `batch` images (default: the serving batch size) right
        after a stage at `prev` (None: first), in a cascade decoded per `decode_at` (`Cascade.decode_at`):
        inference, preprocessing, decision and any decode."""
        if decode_at is not None and self.decode_ms:
            delta = self._check_plan(resolution, decode_at)
        else:
            delta = self.preprocess_delta.get(resolution, 0.0)
        work = self.per_image(resolution, batch) + delta
        return max(work, 0.0) + self.decode_cost(resolution, prev, decode_at)

    def unit_costs(self) -> dict[int, float]:
        """Per-image cost of each resolution at the serving batch size, as a first stage (its decode included)."""
        return {r: self.stage_cost(r) for r in self.table}

    def expected(self, resolutions: list[int], reach: list[float], decode_at: int | None = None) -> float:
        """Expected per-image ms of a cascade whose stage k runs on a fraction reach[k] of the inputs, decoded per
        `decode_at` (`Cascade.decode_at`)."""
        total, prev = self.once_per_image(), None
        for r, frac in zip(resolutions, reach):
            if frac > 0:
                total += frac * self.stage_cost(r, prev, max(1.0, frac * self.batch_size) if self.batch_aware else None,
                                                decode_at)
            prev = r
        return total

    def describe(self) -> dict:
        out = {"backend": self.backend, "precision": self.precision, "batch_size": self.batch_size,
               "batch_aware": self.batch_aware,
               "per_image_ms": {str(r): self.per_image(r) for r in sorted(self.table)},
               "once_per_image_ms": self.once_per_image()}
        if self.decode_ms:
            out["decode"] = {"source_size": list(self.source_size),
                             "per_image_ms": {str(r): self.decode_ms[r] for r in sorted(self.table)},
                             "scale": {str(r): self.decode_scale[r] for r in sorted(self.table)},
                             "preprocess_delta_ms": {str(r): self.preprocess_delta.get(r, 0.0)
                                                     for r in sorted(self.table)},
                             "preprocess_delta_ms_decoded_at": {f"{r}@{R}": v for (r, R), v in
                                                                sorted(self.preprocess_delta_at.items())}}
        return out

    def without_decode(self) -> "CostModel":
        """The same costs for decoded inputs (no decode counted)."""
        return replace(self, decode_ms={}, decode_scale={}, source_size=None, preprocess_delta={},
                       preprocess_delta_at={})


def _interpolate(rows: dict[int, float], b: float) -> float:
    """Per-image cost at batch b from per-image costs at profiled batch sizes: linear in the batch latency between
    the two sizes around b, the end rows' per-image cost outside."""
    if b in rows:
        return rows[b]
    sizes = sorted(rows)
    if b <= sizes[0]:
        return rows[sizes[0]]
    if b >= sizes[-1]:
        return rows[sizes[-1]]
    hi = next(s for s in sizes if s > b)
    lo = max(s for s in sizes if s < b)
    lat_lo, lat_hi = rows[lo] * lo, rows[hi] * hi
    return (lat_lo + (lat_hi - lat_lo) * (b - lo) / (hi - lo)) / b
