"""Names that become folder names, and paths that must stay inside a folder tuneforge owns.

A part's name (LoRA, adapter), a task, a soft prompt's task and ``load=PATH@NAME`` all come from options or from
files someone else may have written (``manifest.json``, safetensors metadata). Each becomes one folder or file name
inside a checkpoint, so a name is checked as a name (:func:`check_name`) wherever it enters, at load and at save,
and every path built from one is checked to stay under its folder (:func:`inside`) before anything is written or
deleted there.

Folders tuneforge writes whole (a part, an export) go through :func:`replace_folder`: built in a fresh temporary
sibling and swapped in, and an existing folder is replaced only when it is tuneforge's own (an export carries
:data:`EXPORT_MARKER`), so a path that happens to name someone's project folder is refused, never emptied.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tuneforge.common.version import __version__
from tuneforge.errors import ConfigError

__all__ = ["NAME_RULE", "MAX_NAME", "EXPORT_MARKER", "is_name", "check_name", "inside", "replace_folder",
           "write_export", "check_export", "is_export"]

MAX_NAME = 64
# Letters, digits, '-', '_' and '.', not starting with '.' (no hidden files, no '.' or '..'), at most MAX_NAME.
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,%d}" % (MAX_NAME - 1))
NAME_RULE = f"letters, digits, '-', '_' and '.' (not first), at most {MAX_NAME} characters"

#: The file every export folder holds (JSON: what wrote it, when, which tuneforge): the proof that replacing the
#: folder destroys nothing but an earlier export.
EXPORT_MARKER = ".tuneforge-export"
_EXPORT_FORMAT = "tuneforge.export"


def is_name(name: object) -> bool:
    """Whether ``name`` is safe as one folder or file name."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_name(name: object, *, what: str, where: str) -> str:
    """``name`` if it is a safe name, else a :class:`ConfigError` saying what it names and where it came from.

    :param what: what the name names, e.g. ``"lora part name"``.
    :param where: where it was read, e.g. ``"/x/lora/a/manifest.json"`` or ``"-m lora:tasks=..."``.
    """
    if not is_name(name):
        raise ConfigError(f"{where}: {what} {name!r} is not a valid name: use {NAME_RULE}; it names a folder, "
                          "so it can contain no path")
    return name  # type: ignore[return-value]


def inside(root: Path | str, *parts: str) -> Path:
    """``root / parts...``, refused unless it stays inside ``root`` once symlinks and ``..`` are resolved.

    Every write or deletion whose path is built from something not tuneforge's own goes through this.
    """
    root = Path(root)
    path = root.joinpath(*parts)
    base = root.resolve()
    if not path.resolve().is_relative_to(base) or path.resolve() == base and parts:
        raise ConfigError(f"{path} leaves {root}: refused (a name read from a file or option may not be a path)")
    return path


def is_export(folder: Path | str) -> bool:
    """Whether ``folder`` holds the marker of a tuneforge export (so replacing it loses no one's files)."""
    marker = Path(folder) / EXPORT_MARKER
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == _EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, or not an object: not ours
        return False


def _mark_export(folder: Path, command: str) -> None:
    record = {"format": _EXPORT_FORMAT, "what": command, "written_by": f"tuneforge {__version__}",
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (Path(folder) / EXPORT_MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _export_refusal(command: str, out: Path) -> str:
    return (f"{command}: {out} is not empty and is not an earlier tuneforge export (no {EXPORT_MARKER} in it): "
            "nothing was written or deleted. Give a new or empty folder, or --force to replace that folder and "
            "everything in it")


def check_export(out: Path | str, *, command: str, force: bool = False) -> Path:
    """Refuse now what :func:`write_export` would refuse, before an export does its expensive work."""
    out = Path(out)
    _check_target(out, ours=lambda folder: force or is_export(folder), refusal=_export_refusal(command, out),
                  owner=command)
    return out


def write_export(out: Path | str, fill: Callable[[Path], None], *, command: str, force: bool = False) -> Path:
    """An export folder (``export-peft``, ``export-hf``): ``fill`` writes its files, :data:`EXPORT_MARKER` is added.

    ``out`` may be new, empty or an earlier export, which is replaced; any other folder is refused with nothing
    changed unless ``force``, which replaces that folder and everything in it. A file is always refused.
    """
    out = Path(out)

    def filled(tmp: Path) -> None:
        fill(tmp)
        _mark_export(tmp, command)

    return replace_folder(out, filled, ours=lambda folder: force or is_export(folder),
                          refusal=_export_refusal(command, out), owner=command)


def _check_target(folder: Path, *, ours: Callable[[Path], bool], refusal: str, owner: str) -> bool:
    """Whether ``folder`` exists (as a folder that may be replaced); a :class:`ConfigError` when it may not be."""
    if folder.is_symlink():
        raise ConfigError(f"{owner}: {folder} is a symbolic link: nothing was written; give the path of a real "
                          "folder")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{owner}: {folder} is a file, not a folder: nothing was written; give a folder path")
    if folder.is_dir() and any(folder.iterdir()) and not ours(folder):
        raise ConfigError(refusal)
    return folder.is_dir()


def replace_folder(folder: Path | str, fill: Callable[[Path], None], *, ours: Callable[[Path], bool],
                   refusal: str, owner: str = "tuneforge") -> Path:
    """Write ``folder`` whole: ``fill`` writes into a fresh temporary sibling, which then takes ``folder``'s place.

    An existing ``folder`` that is not empty is replaced only when ``ours(folder)`` says tuneforge wrote it;
    otherwise ``refusal`` is raised as a :class:`ConfigError` and nothing on disk changes. A file or a symbolic
    link at ``folder`` is always refused (``owner`` starts those messages). The only folders this deletes are the
    temporary one it created and the old ``folder`` it has itself renamed aside.
    """
    folder = Path(folder)
    existing = _check_target(folder, ours=ours, refusal=refusal, owner=owner)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # mkdtemp creates a new, unique folder beside the target: never an existing path someone else could own
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        fill(tmp)
        if not existing:
            os.replace(tmp, folder)
            return folder
        old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:12]}")
        os.rename(folder, old)  # aside first, so a failure below can put it back
        try:
            os.rename(tmp, folder)
        except BaseException:
            os.rename(old, folder)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)  # the previous folder, which ours() accepted and we renamed aside
    return folder
