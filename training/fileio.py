"""Artifact file helpers every stage uses: atomic writes, JSON with a checked schema version, hashes.

Stages talk through files on disk (the artifacts table in README.md), so these few functions are the whole
contract for writing them safely: a crash mid-write never leaves a half file where a good one was.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import ArtifactError


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; on success rename it over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path, what: str) -> dict:
    """Read a JSON artifact; a missing or unparsable file is a RescascadeError naming `what` it should be."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} not found: expected {what}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-create {what}") from None
    except UnicodeDecodeError:
        raise ArtifactError(f"{path} is not a text file; expected {what}") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{path} holds a JSON {type(doc).__name__}, not an object; expected {what}")
    return doc


def check_schema(doc: dict, path, kind: str, supported: int, required: tuple[str, ...]) -> None:
    """Stop with one clear line on an unknown schema version or a missing field."""
    version = doc.get("schema_version")
    if version is None:
        raise ArtifactError(f"{path}: no schema_version; this is not a {kind} written by rescascade")
    if not isinstance(version, int) or version > supported:
        raise ArtifactError(f"{path}: {kind} schema_version {version!r} is not supported by this rescascade "
                            f"(it reads up to {supported}); upgrade rescascade or re-create the file")
    missing = [k for k in required if k not in doc]
    if missing:
        raise ArtifactError(f"{path}: {kind} lacks field(s) {', '.join(missing)}; the file is incomplete, re-create it")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
