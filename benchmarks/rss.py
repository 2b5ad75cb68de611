"""Peak resident memory of a step on the CPU, the one method every benchmark here uses: run the measured variant in a
fresh process with glibc mapping every block of 64 KiB or more on its own (freed tensors leave the resident set at
once instead of staying as heap slack), reset the kernel's high-water mark just before the step, and read VmHWM
minus VmRSS after it."""
from __future__ import annotations

import ctypes
import gc
import os

__all__ = ["MMAP_BYTES", "child_env", "status_bytes", "reset_peak", "trim_heap"]

MMAP_BYTES = "65536"


def child_env(**extra: str) -> dict:
    """The environment of a measuring child process (``extra``: more variables, e.g. OMP_NUM_THREADS)."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_BYTES, **extra}


def status_bytes(field: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS: resident now; VmHWM: the peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Give freed heap back to the OS, so the resident set before a step counts live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
