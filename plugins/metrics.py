"""``metrics``: every step's metrics as one JSON line in ``<out>/metrics.jsonl`` (autoloaded)."""
from __future__ import annotations

import json
import math

from tuneforge import hookimpl
from tuneforge.runfolder import open_text

__all__ = ["MetricsFile"]


def _clean(value):
    # JSON has no NaN/inf; null keeps every line parseable by any reader.
    return value if not isinstance(value, float) or math.isfinite(value) else None


class MetricsFile:
    """Writes metrics.jsonl in the run folder; on resume it drops lines past the checkpoint's step."""

    autoload = True

    def __init__(self):
        self.file = None

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
        self.file = open_text(path, "w")  # never through a link: the run folder may hold one someone else put
        self.file.writelines(line + "\n" for line in kept)
        self.file.flush()

    @hookimpl
    def tuneforge_step_end(self, step, metrics):
        if self.file is not None:
            record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    @hookimpl
    def tuneforge_run_end(self):
        if self.file is not None:
            self.file.close()
            self.file = None
