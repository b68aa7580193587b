"""A pool of members: several families (any architecture, each at its resolutions) whose stages one cascade
chooses among, the way one family's resolutions are chosen among.

    pool = Pool.load(["runs/mv2", "runs/shufflenet"])
    calib, costs = pool.predictions("calib"), pool.costs(batch_size=32, batch_aware=True)
    builder = CascadeBuilder(Target.best()).fit(calib, costs)   # stages "mobilenet_v2/r96", "shufflenet_v2_x1_0/r224"

Every large published saving at equal accuracy comes from a pool of different models (Streeter, ICML 2018;
Wisdom of Committees, ICLR 2022; Lebovitz et al., TMLR 2023): one network at several resolutions stalls near
0.85-0.9x of its best model's cost. A pool's stage is named by its model and resolution (`serve.names`), the key
its predictions and costs are stored under, so the optimizer orders and prices stages of several models at once.

Members must have predicted the same held-out images the same way: class names, image ids, labels, pixel digests
and preprocessing are checked, and the first difference stops with one line naming both members. Their profiles
must come from one device and backend.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rescascade.profiling.measure import device_key
from rescascade.profiling.profile import Profile
from rescascade.serve.errors import ArtifactError, ConfigError, RescascadeError
from rescascade.serve.names import stage_name
from rescascade.serve.plan import pool_weights_id
from rescascade.training.store import model_name, read_family_json, weights_id

from .costs import CostModel
from .predictions import Predictions, load_predictions

SPLITS = ("calib", "test")
PREPROCESSING = ("mean", "std", "crop_fraction", "decode_scale")  # what every member must feed its model alike


@dataclass
class Member:
    """One family of a pool: its directory, family.json, model name, calib/test predictions and profile."""
    run_dir: Path
    doc: dict
    model: str
    predictions: dict[str, Predictions]
    profile: Profile

    @property
    def weights_sha256(self) -> str:
        return weights_id(self.doc)

    @property
    def stages(self) -> list[str]:
        """Its stages' names in the pool, by resolution: MODEL/rR."""
        return [stage_name(self.model, r) for r in self.predictions["calib"].resolutions]

    @classmethod
    def load(cls, run_dir) -> "Member":
        """A family directory as a member: family.json, predictions/{calib,test}.npz and profile.csv, each checked
        to be of this family's weights. RescascadeError naming the file otherwise."""
        if not isinstance(run_dir, (str, os.PathLike)) or not str(run_dir):
            raise ConfigError(f"a pool member is a family directory, got {run_dir!r}")
        run_dir = Path(run_dir)
        doc = read_family_json(run_dir)
        wid = weights_id(doc)
        preds = {s: load_predictions(run_dir / "predictions" / f"{s}.npz") for s in SPLITS}
        if preds["calib"].resolutions != preds["test"].resolutions:
            raise ArtifactError(f"{run_dir}: calib and test predictions cover different resolutions "
                                f"({preds['calib'].resolutions} vs {preds['test'].resolutions}); re-run prediction")
        for p in preds.values():
            if p.weights_sha256 != wid:
                raise RescascadeError(f"{p.path} was predicted by another family (weights {p.weights_sha256[:12]}, "
                                      f"{run_dir} has {wid[:12]}); re-run prediction for this family")
        profile = Profile.load(run_dir / "profile.csv")
        if profile.meta.get("weights_sha256") != wid:
            raise RescascadeError(f"{profile.path} measured another family (weights "
                                  f"{str(profile.meta.get('weights_sha256'))[:12]}, {run_dir} has {wid[:12]}); "
                                  f"profile this family: `rescascade profile {run_dir}`")
        return cls(run_dir, doc, model_name(doc), preds, profile)


@dataclass
class Pool:
    """The members (at least two) of a pool, checked to be comparable (see the module). `predictions(split)` and
    `costs(...)` give what `CascadeBuilder.fit` takes, keyed by stage name."""
    members: list[Member]
    _stage_of: dict = field(default_factory=dict, repr=False)  # stage name -> (member, resolution)

    def __post_init__(self):
        check_members(self.members)
        self._stage_of = {stage_name(m.model, r): (m, r) for m in self.members
                          for r in m.predictions["calib"].resolutions}

    @classmethod
    def load(cls, run_dirs) -> "Pool":
        """The pool of these family directories (each `Member.load`). ConfigError for fewer than two or the same
        member twice, RescascadeError for members that are not comparable."""
        if isinstance(run_dirs, (str, os.PathLike)) or not hasattr(run_dirs, "__iter__"):
            raise ConfigError(f"a pool is a list of family directories, got {type(run_dirs).__name__}")
        run_dirs = list(run_dirs)
        if len(run_dirs) < 2:
            raise ConfigError(f"a pool needs at least two members (family directories), got {len(run_dirs)}: "
                              "for one family, build it alone")
        return cls([Member.load(d) for d in run_dirs])

    @property
    def stages(self) -> list[str]:
        """Every stage of the pool, member by member: MODEL/rR."""
        return list(self._stage_of)

    def stage(self, name: str) -> tuple[Member, int]:
        """The member and resolution of a stage name. ConfigError for a name not in the pool."""
        if name not in self._stage_of:
            raise ConfigError(f"stage {name!r} is not in the pool (it has {', '.join(self._stage_of)})")
        return self._stage_of[name]

    @property
    def weights_sha256(self) -> str:
        """The pool's identity: a sha256 over its members' weights ids, in order."""
        return pool_weights_id(m.weights_sha256 for m in self.members)

    def predictions(self, split: str = "calib") -> Predictions:
        """Every member's logits of `split` side by side: logits [N, S, C] over the pool's S stages (keyed by stage
        name), the labels, ids and pixel digests the members share."""
        if split not in SPLITS:
            raise ConfigError(f"split {split!r}: use calib or test")
        first = self.members[0].predictions[split]
        logits = np.concatenate([m.predictions[split].logits for m in self.members], axis=1)
        return Predictions(logits, first.labels, self.stages, first.ids, self.weights_sha256,
                           f"the pool's {split} predictions", first.pixel_digests)

    def costs(self, backend: str | None = None, precision: str | None = None, batch_size: int = 1,
              batch_aware: bool = False, source_size=None) -> CostModel:
        """Per-stage costs (ms per image) of every stage from its member's profile (`CostModel.from_profile`, same
        arguments), keyed by stage name. What a cascade pays once per image (the upload) is the first member's.
        RescascadeError naming the member whose profile lacks a row."""
        parts = []
        for m in self.members:
            try:
                parts.append(CostModel.from_profile(m.profile, m.predictions["calib"].resolutions, backend, precision,
                                                    batch_size, batch_aware, source_size=source_size,
                                                    decode_scale=m.doc.get("preprocessing", {}).get("decode_scale")))
            except RescascadeError as e:
                raise type(e)(f"pool member {m.run_dir}: {e.cli_message}") from None
        kinds = {(c.backend, c.precision) for c in parts}
        if len(kinds) > 1:
            raise RescascadeError(f"the members' profiles price different backends/precisions ({sorted(kinds)}); give "
                                  "backend= and precision= that every member was profiled on")
        first = parts[0]
        merged = CostModel(first.backend, first.precision, first.batch_size, first.batch_aware, {}, dict(first.once),
                           source_size=first.source_size)
        for m, c in zip(self.members, parts):
            for r in c.table:
                key = stage_name(m.model, r)
                merged.table[key] = c.table[r]
                if c.decode_ms:
                    merged.decode_ms[key], merged.decode_scale[key] = c.decode_ms[r], c.decode_scale[r]
                    merged.preprocess_delta[key] = c.preprocess_delta.get(r, 0.0)
        return merged


def check_members(members: list[Member]) -> None:
    """The checks that make a pool's stages comparable: distinct members with distinct stage names, the same
    classes, preprocessing, held-out images (ids, labels, pixel digests) and profiling device. RescascadeError
    naming the first difference and both members."""
    if len(members) < 2:
        raise ConfigError(f"a pool needs at least two members, got {len(members)}")
    bad = [type(m).__name__ for m in members if not isinstance(m, Member)]
    if bad:
        raise ConfigError(f"a Pool holds Members, got {bad[0]}: use Pool.load([run_dir, ...])")
    models = {}  # model name -> the member of it: a pool's stages, cascade.json and bundle name members by model
    for m in members:
        if m.model in models and models[m.model].weights_sha256 != m.weights_sha256:
            raise RescascadeError(f"{models[m.model].run_dir} and {m.run_dir} are both {m.model}: two families of one "
                                  "model cannot be told apart in a pool's stage names; keep one of them")
        models.setdefault(m.model, m)
    holder = {}  # stage name -> the member holding it
    for m in members:
        for s in m.stages:
            if s in holder:
                other = holder[s]
                raise RescascadeError(f"{other.run_dir} and {m.run_dir} both hold stage {s}: " + (
                    "the same family twice" if other.weights_sha256 == m.weights_sha256 else
                    "two families of one model at one resolution cannot be told apart; keep one of them"))
            holder[s] = m
    first = members[0]
    for m in members[1:]:
        pair = f"{first.run_dir} and {m.run_dir}"
        if list(m.doc["class_names"]) != list(first.doc["class_names"]):
            raise RescascadeError(f"{pair} predict different classes ({len(first.doc['class_names'])} vs "
                                  f"{len(m.doc['class_names'])} names, or another order): a pool's members share "
                                  "their label space")
        for key in PREPROCESSING:
            a, b = (x.doc.get("preprocessing", {}).get(key) for x in (first, m))
            if a != b:
                raise RescascadeError(f"{pair} preprocess differently ({key} {a} vs {b}): a pool's members read the "
                                      "same pixels")
        for split in SPLITS:
            p, q = first.predictions[split], m.predictions[split]
            _check_same_images(p, q, f"{pair} hold different {split} images")
        devices = [device_key(x.profile.meta["device"]) + _threads(x.profile) for x in (first, m)]
        if devices[0] != devices[1]:
            raise RescascadeError(f"{pair} were profiled on different devices ({devices[0]} vs {devices[1]}): profile "
                                  "every member where the cascade will run")


def _threads(profile: Profile) -> str:
    """The threads a profile's rows ran on, as device_key's suffix: members timed on other thread counts are
    priced unlike each other."""
    if "threads" not in profile.table.columns:
        return ""
    return f", threads {sorted({int(t) for t in profile.table.threads.dropna()})}"


def _check_same_images(p: Predictions, q: Predictions, what: str) -> None:
    if p.n != q.n:
        raise RescascadeError(f"{what}: {p.n} vs {q.n} images; train (or predict) every member on the same data, "
                              "seed and splits")
    for field_name, a, b in (("image ids", p.ids, q.ids), ("labels", p.labels, q.labels),
                             ("pixel digests", p.pixel_digests, q.pixel_digests)):
        if a is None or b is None:
            continue
        diff = np.flatnonzero(np.asarray(a) != np.asarray(b))
        if len(diff):
            i = int(diff[0])
            raise RescascadeError(f"{what}: {field_name} differ from image {i} on ({p.ids[i]} vs {q.ids[i]}); train "
                                  "(or predict) every member on the same data, seed and splits")
