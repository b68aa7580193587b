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
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from rescascade.training.errors import ConfigError, RescascadeError, check_int


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

    @classmethod
    def from_profile(cls, df: pd.DataFrame, resolutions=None, backend: str | None = None, precision: str | None = None,
                     batch_size: int = 1, batch_aware: bool = False, where: str = "profile") -> "CostModel":
        """Per-image stage costs (ms) at `batch_size` from a profile (a `Profile` or its table): inference +
        preprocessing + decision per stage, the upload charged once per cascade. resolutions None: every one
        profiled; backend/precision None: the profile's only one. batch_aware: keep every batch size, for a
        cascade whose later stages run on shrinking batches. Raises RescascadeError naming what is missing."""
        if hasattr(df, "table"):  # a Profile
            df, where = df.table, str(df.path)
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
            if not batch_aware and batch_size not in table[int(r)]:
                raise RescascadeError(f"{where} has no batch-size-{batch_size} row for resolution {r} "
                                      f"(has {sorted(table[int(r)])}); profile with --batch-sizes {batch_size} or pick "
                                      "one of those with --batch-size")
        return cls(backend, precision, int(batch_size), batch_aware, table, {b: ms / b for b, ms in once.items()})

    def per_image(self, resolution: int, batch: float | None = None) -> float:
        """Per-image ms of a stage at `resolution` run on `batch` images: the profiled row, or the batch
        latency interpolated between the two profiled sizes around it (the end rows' per-image cost outside)."""
        return _interpolate(self.table[resolution], self.batch_size if batch is None else batch)

    def once_per_image(self) -> float:
        """Per-image ms every cascade pays once at the serving batch: the upload, less the gather its first stage
        does not do."""
        return _interpolate(self.once, self.batch_size) if self.once else 0.0

    def unit_costs(self) -> dict[int, float]:
        """Per-image cost of each resolution at the serving batch size."""
        return {r: self.per_image(r) for r in self.table}

    def expected(self, resolutions: list[int], reach: list[float]) -> float:
        """Expected per-image ms of a cascade whose stage k runs on a fraction reach[k] of the inputs."""
        total = self.once_per_image()
        for r, frac in zip(resolutions, reach):
            if frac <= 0:
                continue
            if self.batch_aware:
                total += frac * self.per_image(r, max(1.0, frac * self.batch_size))
            else:
                total += frac * self.per_image(r)
        return total

    def describe(self) -> dict:
        return {"backend": self.backend, "precision": self.precision, "batch_size": self.batch_size,
                "batch_aware": self.batch_aware,
                "per_image_ms": {str(r): self.per_image(r) for r in sorted(self.table)},
                "once_per_image_ms": self.once_per_image()}


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
