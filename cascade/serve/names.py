"""How outputs name a cascade's stages: by the model a stage runs and its resolution ("mobilenet_v2_x0.35/r96"),
not by the resolution alone, so that one cascade can hold stages of several models. A stage of a file written
before stages recorded their model is named by its resolution alone ("r96").

A plan keys its stages (thresholds, temperatures, engines) by a *stage key*: the resolution (an int) in a family's
plan, where one model runs every stage; the stage's name MODEL/rR in a pool's plan (a cascade.json with
"members"), where stages of several models may share a resolution."""
from __future__ import annotations


def stage_name(model: str | None, resolution: int) -> str:
    """The stage's name: MODEL/rR, or rR where the model is not known (None or empty)."""
    return f"{model}/r{int(resolution)}" if model else f"r{int(resolution)}"


def stage_label(key: int | str) -> str:
    """How text names a stage key: rR for a family's resolution R, the stage's name for a pool's (MODEL/rR)."""
    return key if isinstance(key, str) else f"r{key}"


def is_stage_name(key) -> bool:
    """Whether `key` is a pool's stage key, MODEL/rR (a family's stage key is its resolution, an int)."""
    if not isinstance(key, str) or "/r" not in key:
        return False
    model, _, r = key.rpartition("/r")
    return bool(model) and r.isdigit() and int(r) > 0


def key_resolution(key: int | str) -> int:
    """The input resolution of a stage key: the key itself (a family's), or R of MODEL/rR (a pool's)."""
    return int(key.rpartition("/r")[2]) if isinstance(key, str) else int(key)


def key_model(key: int | str) -> str | None:
    """The model of a pool's stage key MODEL/rR; None for a family's (its model is the family's)."""
    return key.rpartition("/r")[0] if isinstance(key, str) else None


def is_pool_doc(doc: dict) -> bool:
    """Whether a cascade.json's or bundle.json's content is a pool's plan (its stages keyed by name)."""
    return isinstance(doc, dict) and "members" in doc


def stage_key(entry: dict, pooled: bool) -> int | str:
    """The key of a plan's stage or reference entry ({"resolution": R, "model": M}): MODEL/rR in a pool's plan,
    R in a family's."""
    return stage_name(entry.get("model"), entry["resolution"]) if pooled else int(entry["resolution"])


def stage_names(doc: dict) -> dict:
    """stage key (`stage_key`) -> the name of that stage, for the stages and the reference of a cascade.json's or
    bundle.json's content (each entry's "resolution" and "model")."""
    pooled = is_pool_doc(doc)
    return {stage_key(e, pooled): stage_name(e.get("model"), e["resolution"])
            for e in [doc["reference"], *doc["stages"]]}  # a stage's own entry over the reference's
