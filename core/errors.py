"""The exceptions a user can meet. Each message says what was wrong, where, and what to do."""
from __future__ import annotations

__all__ = ["TuneforgeError", "ConfigError", "PluginError", "DataError", "CheckpointError", "NonFiniteLossError"]


class TuneforgeError(Exception):
    """Base class: the CLI prints these as one clear message instead of a traceback."""

    exit_code = 2


class ConfigError(TuneforgeError, ValueError):
    """A bad option, config key or command-line value."""


class PluginError(TuneforgeError):
    """A plugin that cannot be loaded, registered or combined with the others."""


class DataError(TuneforgeError, ValueError):
    """Malformed input data; the message names ``file:line`` and the field."""


class CheckpointError(TuneforgeError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


class NonFiniteLossError(TuneforgeError):
    """Too many non-finite losses in a row; the last good checkpoint was kept."""

    exit_code = 3
