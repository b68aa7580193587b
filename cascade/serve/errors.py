"""The errors rescascade raises for what a user can fix: one hierarchy to catch from Python, one line each on the
CLI (exit 2, no traceback). A message says what is wrong and how to fix it. It is written once, naming options as
the CLI spells them (--batch-size); `str(error)` names them as the Python parameter (`batch_size`), and the CLI
prints `error.cli_message`. Command lines quoted in backticks stay as they are."""
from __future__ import annotations

import math
import re

_FLAG = re.compile(r"--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")


def parameter_form(message: str) -> str:
    """The message with every --flag outside backticks written as its Python parameter, `flag_name`."""
    parts = message.split("`")
    for i in range(0, len(parts), 2):  # even parts lie outside backtick spans
        parts[i] = _FLAG.sub(lambda m: f"`{m.group(1).replace('-', '_')}`", parts[i])
    return "`".join(parts)


class RescascadeError(Exception):
    """Base of every error a user can fix: catch this one to handle them all.

    cli_message: the message as the CLI prints it (options as flags); str(): options as Python parameters."""

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.cli_message = message

    def __str__(self) -> str:
        return parameter_form(self.cli_message)


class ConfigError(RescascadeError, ValueError):
    """A bad value for a parameter or option (out of range, of the wrong kind, ambiguous, or contradicting another)."""


class ArtifactError(RescascadeError):
    """A file rescascade reads is missing, damaged, of an unknown version, or belongs to another family."""


class DataError(RescascadeError):
    """Images or a data source that cannot be used: not found, no readable image in a class, other classes."""


class BackendUnavailable(RescascadeError):
    """An inference backend that cannot run here (a package or a GPU missing)."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int within [low, high]; ConfigError naming the parameter otherwise (bools and 2.5 too)."""
    ok = hasattr(value, "__index__") and not isinstance(value, bool)  # int, numpy integers
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        bounds = f" from {low} to {high}" if high is not None else f" >= {low}" if low is not None else ""
        raise ConfigError(f"{_flag(name)} {value!r} must be an integer{bounds}")
    return int(value)


def check_number(name: str, value, low: float | None = None, high: float | None = None) -> float:
    """`value` as a finite float within [low, high]; ConfigError naming the parameter otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        bounds = f" in [{low:g}, {high:g}]" if low is not None and high is not None else \
            f" >= {low:g}" if low is not None else ""
        raise ConfigError(f"{_flag(name)} {value!r} must be a finite number{bounds}")
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{_flag(name)} {value!r} must be True or False")
    return value
