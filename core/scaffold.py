"""``tuneforge new-plugin NAME``: a pip-installable package for a new mechanism (written by the scaffold helper)."""
from __future__ import annotations

__all__ = ["new_plugin"]


def new_plugin(name, dest=None, *, force=False):
    raise NotImplementedError("being written")
