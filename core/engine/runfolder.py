"""The run folder (``--out``): owned by one process at a time, written without following links, and removed again
when a run that created it stops before saving anything.

- **One owner.** ``.lock`` in the folder is held with ``flock`` for the whole run, records the owner's pid, host
  and start time, and is removed when the run ends. The kernel drops the lock when its process dies, so a lock file
  whose lock is free was left by a dead run: it is taken over with a message. A second process on the same folder
  is refused and told who has it.
- **No links followed.** A run folder may have been prepared by someone else; every file tuneforge writes there
  is created afresh or replaced by rename (:func:`write_text`, :func:`open_text`), never written through a
  symbolic link, and a folder whose own entries are links is refused before anything is written.
- **Nothing half-made.** A run that created its folder and stops before the first checkpoint (bad input found late,
  the disk full at the first write) removes the folder again, so a failed command leaves nothing behind.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import IO

from tuneforge.errors import ConfigError, TuneforgeError

__all__ = ["RunFolder", "write_text", "open_text", "write_error"]

LOCK = ".lock"


def _no_follow_fd(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise ConfigError(f"{path} is a symbolic link; tuneforge writes only its own files in a run folder "
                              "and never through a link: remove the link, or choose another --out") from None
        raise


def open_text(path: Path, mode: str = "w") -> IO[str]:
    """``open(path, mode)`` for ``"w"`` or ``"a"``, refusing a symbolic link at ``path`` instead of following it."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    return os.fdopen(_no_follow_fd(Path(path), flags), mode, encoding="utf-8")


def write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, flushed, then renamed over it. The rename
    replaces a link at ``path`` rather than writing into its target."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.is_symlink():
        tmp.unlink()
    try:
        with os.fdopen(_no_follow_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_error(path: Path | str, exc: Exception, what: str) -> TuneforgeError:
    """An error of the operating system met while writing ``path`` as one clear error (what, where, what to do).
    ``exc`` is an ``OSError``, or a library's error that carries the system's "(os error N)" in its text."""
    code = getattr(exc, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    reason = os.strerror(code) if code else str(exc).splitlines()[0]
    hint = {
        errno.ENOSPC: "the disk is full: free space or choose another --out",
        errno.EDQUOT: "the disk quota is used up: free space or choose another --out",
        errno.EROFS: "the file system is read-only: choose another --out",
        errno.EACCES: "permission denied: choose a folder you can write to with --out",
        errno.EPERM: "permission denied: choose a folder you can write to with --out",
        errno.ENOTDIR: "a part of the path is a file, not a folder: choose another --out",
        errno.EEXIST: "it exists and is not a folder: choose another --out",
    }.get(code, "check the folder and try again")
    return ConfigError(f"cannot write {what} {path}: {reason}; {hint}")


class RunFolder:
    """``--out`` of one run, held from :meth:`acquire` to :meth:`release` (rank 0 only)."""

    def __init__(self, path: Path, log=None):
        self.path = Path(path)
        self.created = False
        self._fd: int | None = None
        self._log = log or (lambda message: None)

    def acquire(self) -> None:
        """Create the folder if needed, refuse links among its entries, and take the lock (or say who holds it)."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} is a file, not a folder: give a folder for the run (it is created "
                              "if missing)")
        if not self.path.exists():
            try:
                self.path.mkdir(parents=True)
            except FileExistsError:  # created meanwhile: by another run, which the lock below will tell
                pass
            except OSError as exc:
                raise write_error(self.path, exc, "the run folder") from None
            else:
                self.created = True
        self._refuse_links()
        while self._fd is None:
            self._fd = self._lock(self.path / LOCK)

    def _lock(self, lock: Path) -> int | None:
        """The locked file's descriptor, or None when the file was removed under us (its owner released it just
        then): the caller opens the new one."""
        try:
            fd = _no_follow_fd(lock, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            self._undo()
            raise write_error(lock, exc, "the run folder's lock") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = _read_owner(fd)
            os.close(fd)
            who = (f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}"
                   if owner else "another process")
            raise ConfigError(f"--out {self.path} is in use by {who}: two runs in one folder would mix their "
                              "checkpoints and metrics. Wait for it to finish, stop it, or choose another --out")
        try:
            same = os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # we locked a file its owner had just removed on release
            os.close(fd)
            return None
        stale = _read_owner(fd)
        if stale:  # the lock was free but the file names an owner: it died holding it
            self._log(f"{self.path}: taking over the lock of pid {stale.get('pid')} on {stale.get('host')} (since "
                      f"{stale.get('started')}), which is no longer running")
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        return fd

    def release(self, *, undo: bool = False) -> None:
        """Give the folder up; with ``undo`` (a run that failed having saved nothing), remove it again if this run
        created it."""
        if self._fd is None:
            return
        if undo and self.created:
            self._undo()
        else:
            # Removed while still held: a process that opened it meanwhile sees, once it has the lock, that the
            # path no longer leads to its file, and starts over with a new one (see _lock).
            (self.path / LOCK).unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def _refuse_links(self) -> None:
        for entry in self.path.iterdir():
            if entry.is_symlink():
                raise ConfigError(
                    f"{entry} is a symbolic link: tuneforge writes only its own files in a run folder and never "
                    f"through a link (it could overwrite the link's target). Remove it, or choose another --out")

    def _undo(self) -> None:
        """Remove the folder this run created, entry by entry, only as far as it holds what a run writes."""
        if not self.created:
            return
        for entry in self.path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        try:
            self.path.rmdir()
        except OSError:
            pass
        self.created = False


def _read_owner(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}
