"""The errors rescascade raises for what a user can fix: one hierarchy to catch from Python, one line each on the
CLI (exit 2, no traceback). Messages say what is wrong and how to fix it, naming the parameter (the CLI's flag of
the same name, with - for _)."""
from __future__ import annotations


class RescascadeError(Exception):
    """Base of every error a user can fix: catch this one to handle them all."""


class ConfigError(RescascadeError, ValueError):
    """A bad value for a parameter or option (out of range, of the wrong kind, ambiguous, or contradicting another)."""


class ArtifactError(RescascadeError):
    """A file rescascade reads is missing, damaged, of an unknown version, or belongs to another family."""


class DataError(RescascadeError):
    """Images or a data source that cannot be used: not found, no readable image in a class, other classes."""


class BackendUnavailable(RescascadeError):
    """An inference backend that cannot run here (a package or a GPU missing)."""
