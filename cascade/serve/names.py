"""How outputs name a cascade's stages: by the model a stage runs and its resolution ("mobilenet_v2_x0.35/r96"),
not by the resolution alone, so that one cascade can hold stages of several models. A stage of a file written
before stages recorded their model is named by its resolution alone ("r96")."""
from __future__ import annotations


def stage_name(model: str | None, resolution: int) -> str:
    """The stage's name: MODEL/rR, or rR where the model is not known (None or empty)."""
    return f"{model}/r{int(resolution)}" if model else f"r{int(resolution)}"


def stage_names(doc: dict) -> dict[int, str]:
    """resolution -> the name of that stage, for the stages and the reference of a cascade.json's or bundle.json's
    content (each entry's "resolution" and "model")."""
    return {int(e["resolution"]): stage_name(e.get("model"), e["resolution"])
            for e in [doc["reference"], *doc["stages"]]}  # a stage's own entry over the reference's
