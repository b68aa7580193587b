"""What a family directory holds, as far as `train` is concerned: new, a user's own folder, an interrupted run or a
finished one. `train` writes only into the first (or, told to, beside a user's files), says how to continue or
replace the others, and deletes only files it writes itself (never a user's)."""
from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from rescascade.serve.errors import ConfigError, RescascadeError

# what train, profile, build and eval write into a family directory by default (glob patterns, relative to it)
OWN_FILES = ("family.json", "independent.json", "shared.safetensors", "patches/r[0-9][0-9][0-9].safetensors",
             "models/r[0-9][0-9][0-9].safetensors", "predictions/calib.npz", "predictions/test.npz", "metrics.csv",
             "checkpoints/last.pt", "onnx/r[0-9][0-9][0-9].fp*.onnx", "onnx/r[0-9][0-9][0-9].fp*.json",
             "onnx/shared.fp*.onnx", "onnx/shared.fp*.json", "onnx/r[0-9][0-9][0-9].fp*.patch",
             "engines/ort-tensorrt/**", "engines/tensorrt/*.plan", "profile.csv", "profile.json", "cascade.json",
             "cascade_pareto.png", "cascade_exits.png", "cascade_eval_*.json", "cascade_eval_*.png")
OWN_DIRS = ("checkpoints", "patches", "models", "predictions", "onnx", "engines/ort-tensorrt", "engines/tensorrt",
            "engines")
WEIGHTS = ("shared.safetensors", "checkpoints/last.pt", "models", "patches")  # a run's own, once training ran
CHECKPOINT = "checkpoints/last.pt"


def own_files(run_dir: Path) -> list[Path]:
    """The files in run_dir that rescascade writes (by name), deepest first."""
    found = {Path(p) for pattern in OWN_FILES for p in glob.glob(str(run_dir / pattern), recursive=True)}
    return sorted((p for p in found if p.is_file() or p.is_symlink()), key=lambda p: -len(p.parts))


def some_entries(run_dir: Path, n: int = 3) -> list[str]:
    """The names of up to n entries of run_dir (not a walk: run_dir may be a whole file system)."""
    names = []
    for entry in run_dir.iterdir():
        names.append(entry.name)
        if len(names) == n:
            break
    return names


@dataclass
class RunState:
    kind: str                      # new | foreign | interrupted | complete
    doc: dict | None = None        # family.json / independent.json of a complete run
    checkpoint_epoch: int | None = None


def _checkpoint_epoch(path: Path) -> int | None:
    import torch
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001 (a damaged checkpoint: the trainer says so on --resume)
        return None


def run_state(run_dir: Path) -> RunState:
    try:
        if not run_dir.exists():
            if run_dir.parent.exists() and not run_dir.parent.is_dir():
                raise ConfigError(f"--out {run_dir}: {run_dir.parent} is a file; give a directory for the family")
            return RunState("new")
        if not run_dir.is_dir():
            raise ConfigError(f"--out {run_dir} is a file; give a directory for the family")
        if not any(run_dir.iterdir()):
            return RunState("new")
    except OSError as e:
        raise ConfigError(f"--out {run_dir} cannot be used ({e.strerror}); give a directory you can write") from None
    for name in ("family.json", "independent.json"):  # written last: a run with it is complete
        if (run_dir / name).is_file():
            try:
                return RunState("complete", json.loads((run_dir / name).read_text()))
            except json.JSONDecodeError:
                raise RescascadeError(f"{run_dir / name} is damaged; train into a new --out, or --overwrite") from None
    if (run_dir / CHECKPOINT).is_file():
        return RunState("interrupted", checkpoint_epoch=_checkpoint_epoch(run_dir / CHECKPOINT))
    weights = set(own_files(run_dir)) & {p for w in WEIGHTS for p in [run_dir / w, *(run_dir / w).glob("*")]}
    if weights:  # weights without family.json: stopped after training, before the end
        return RunState("interrupted")
    return RunState("foreign")


def remove_own_files(run_dir: Path) -> list[Path]:
    """Delete what rescascade wrote in run_dir (by name) and its emptied folders; never anything else."""
    removed = own_files(run_dir)
    for path in removed:
        path.unlink()
    for folder in sorted((run_dir / d for d in OWN_DIRS), key=lambda p: -len(p.parts)):
        for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            if not any(sub.iterdir()):
                sub.rmdir()
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed


def remove_checkpoint(run_dir: Path) -> None:
    """The finished run's checkpoint, and its folder if nothing else is in it."""
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
    folder = run_dir / "checkpoints"
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def prepare(run_dir: Path, resume: bool, overwrite: bool, same_run, log) -> RunState | dict:
    """Check --out before anything is read or trained. Returns the finished run's doc when --resume meets a complete
    run that the same settings made (nothing to do), else the directory's state (go on; with overwrite, call
    `replace` once the new run's inputs are checked). same_run(doc) -> list of what differs.
    Raises RescascadeError with what to do in every other case."""
    state = run_state(run_dir)
    if overwrite:
        return state
    if state.kind == "foreign":
        shown = ", ".join(some_entries(run_dir))
        raise ConfigError(f"--out {run_dir} is not empty and not a rescascade run (it holds {shown}); train into a new "
                          "or empty directory, or pass --overwrite to write the family beside these files")
    if state.kind == "complete":
        if not resume:
            raise RescascadeError(f"{run_dir} already holds a finished family; --resume with the same settings uses it "
                                  "as it is; choose a new --out, or --overwrite to replace it (its profile and cascade "
                                  "files go with it)")
        differ = same_run(state.doc)
        if differ:
            raise RescascadeError(f"{run_dir} holds a finished family trained with other settings ({', '.join(differ)} "
                                  "differ); --resume continues the same run only: train into a new --out, or --overwrite")
        log(f"{run_dir} is complete (family.json written): nothing to resume")
        return state.doc
    if state.kind == "interrupted" and not resume:
        where = f"a checkpoint after epoch {state.checkpoint_epoch}" if state.checkpoint_epoch else \
            "weights but no family.json"
        raise RescascadeError(f"{run_dir} holds an interrupted run ({where}); continue it with --resume (same flags), or "
                              "start over with --overwrite")
    return state


def replace(run_dir: Path, state: RunState, log) -> None:
    """--overwrite, once the new run is about to write: remove the earlier run's own files (none of a user's)."""
    if state.kind in ("complete", "interrupted"):
        removed = remove_own_files(run_dir)
        log(f"--overwrite: removed {len(removed)} file(s) of the earlier run in {run_dir}")
