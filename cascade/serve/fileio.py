"""Artifact file helpers every stage uses: atomic writes, JSON with a checked schema version, hashes.

Stages talk through files on disk (the artifacts table in README.md), so these few functions are the whole
contract for writing them safely: a crash mid-write never leaves a half file where a good one was.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import ArtifactError, ConfigError


def printable(name: str) -> str:
    """A name from the file system (a class folder, a file) as text that prints and stores as UTF-8: bytes that
    were not UTF-8 (e.g. Latin-1 names from older archives; Python holds them as lone surrogates, PEP 383) are
    written as \\xNN, so 'caf\\xe9' names the folder whose name ends in the byte 0xE9. Idempotent."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that do not stand for bytes
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def printable_streams() -> None:
    """Let stdout and stderr write any text (the commands call it first): a path given on the command line in
    bytes that are not UTF-8 prints as \\xNN instead of stopping the command with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def not_an_input(path, inputs, what: str = "--out") -> None:
    """ConfigError (naming `what`) when the output `path` (a link: its target) is one of a command's input files
    `inputs` (paths; those that do not exist are skipped): an output never replaces what the command reads."""
    target = os.path.realpath(path)
    if not os.path.exists(target):
        return
    for source in inputs:
        if os.path.exists(source) and os.path.samefile(target, source):
            raise ConfigError(f"{what} {path} is {source}, one of this command's inputs: writing there would replace "
                              "it; give another file")


def output_file(path, what: str = "--out") -> Path:
    """The file an output named `path` is written to: `path` itself, or the file a symbolic link there points to
    (written through: the link stays a link). Nothing is written here; every writer calls this first, and a command
    may call it before its work to fail early.

    Raises ConfigError (naming `what`) when `path` is not a path, names something that is not a regular file (a
    device such as /dev/null, a FIFO, a socket, a directory), or lies below something that is not a directory."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigError(f"{what} {path!r}: give a file path")
    target = Path(os.path.realpath(path))  # a link is written through: its target is the file replaced
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:
        mode = None  # a parent is a file: reported below
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot use it ({e.strerror})") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
            "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        shown = f"{path} (a link to {target})" if str(target) != os.path.abspath(path) else str(path)
        raise ConfigError(f"{what} {shown} is {kind}: an output replaces a regular file only; give a file path")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{what} {path}: {parent} is a file, not a directory; give a file path in a directory")
            break
    return target


@contextmanager
def atomic_path(path: str | os.PathLike, what: str = "--out"):
    """Yield a temporary path beside the output file `path`; on success rename it over that file (atomic on
    POSIX), so a crash mid-write never leaves a half file where a good one was. The one writer of every output:
    `output_file` decides the file (a link is written through, anything but a regular file refused)."""
    path = output_file(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
        output_file(path, what)  # still a regular file or nothing (not replaced meanwhile by a device or directory)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text: str, what: str = "--out") -> None:
    """Write `text` (UTF-8) to the output `path` atomically (`atomic_path`)."""
    with atomic_path(path, what) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj, what: str = "--out") -> None:
    """Write `obj` as indented JSON to the output `path` atomically (`atomic_path`)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", what)


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
        kind = {type(None): "null", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
        raise ArtifactError(f"{path} holds a JSON {kind.get(type(doc), type(doc).__name__)}, not an object; "
                            f"expected {what}")
    return doc


def check_schema(doc: dict, path, kind: str, supported: int, required: tuple[str, ...]) -> None:
    """Stop with one clear line on an unknown schema version or a missing field."""
    version = doc.get("schema_version")
    if version is None:
        raise ArtifactError(f"{path}: no schema_version; this is not a {kind} written by rescascade")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{path}: {kind} schema_version must be a whole number, got {version!r}; the file was "
                            "edited or damaged: re-create it")
    if version > supported:
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
