"""``metrics``: every step's metrics as one JSON line in ``<out>/metrics.jsonl`` (autoloaded)."""
from __future__ import annotations

import json
import math

from tuneforge.sdk import hookimpl, open_text

__all__ = ["MetricsFile"]


def _clean(value):
    # JSON has no NaN/inf; null keeps every line parseable by any reader.
    return value if not isinstance(value, float) or math.isfinite(value) else None


class MetricsFile:
    """Writes metrics.jsonl in the run folder; on resume it drops lines past the checkpoint's step.

    Each step's line is appended by its own open and close: nothing stays open when a run stops on an error (no
    hook follows one), and a line is on disk once its step ends."""

    autoload = True

    def __init__(self):
        self.path = None

    @hookimpl
    def tuneforge_run_start(self, run):
        if run.out is None or not run.is_main:
            return
        path = run.out / "metrics.jsonl"
        kept = []
        if run.resumed_from is not None and path.exists():
            # Steps after the checkpoint will be trained again; their old lines would be duplicates.
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= run.step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a line cut by the kill: everything after it is suspect
        with open_text(path, "w") as f:  # never through a link: the run folder may hold one someone else put
            f.writelines(line + "\n" for line in kept)
        self.path = path

    @hookimpl
    def tuneforge_step_end(self, step, metrics):
        if self.path is not None:
            record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
            with open_text(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    @hookimpl
    def tuneforge_run_end(self):
        self.path = None
