"""The ``run`` object every hook receives: what the run is, where it writes, and where it stands."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from tuneforge.engine.config import TrainConfig
from tuneforge.models.tokenizer import ByteTokenizer

__all__ = ["Run", "say", "STOP_REASONS"]

#: Why a run ends, as ``run.stop_reason`` says it (None while it trains). Evaluation hooks read it: the final
#: evaluation of a run stopping on a signal comes after its checkpoint, within a scheduler's grace period, so a
#: hook skips what is slow there (sampling) when ``run.stop_reason == "signal"``.
STOP_REASONS = {
    "steps": "it did the steps it was asked for (--steps; or it trains nothing)",
    "signal": "SIGINT or SIGTERM (Ctrl-C, a scheduler's preemption), on this process or another rank",
    "early-stop": "a plugin called run.request_stop(reason), on this process or another rank",
    "non-finite": "too many non-finite losses in a row (--max-nonfinite); the run raises after its summary",
}


def say(message: str) -> None:
    """One ``[tuneforge]`` line on stderr (``Run.log`` is this, on the main process only)."""
    print(f"[tuneforge] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Run:
    """State of one training run, shared by the engine and the plugins.

    Plugins read the configuration (``config``, ``seed``, ``device``, ``tokenizer``), the counters
    (``step``, ``epoch``) and the folder (``out``, None when the run writes nothing); they may keep their own
    entries in ``summary`` (written to ``summary.json``). ``plugins`` maps each registered plugin's name to its
    instance, so a mechanism can find another (e.g. a policy finding its reward model).

    ``stop_reason`` is None while the run trains, then says why it ends, one of :data:`STOP_REASONS`: ``"steps"``,
    ``"signal"``, ``"early-stop"`` or ``"non-finite"``. It is set before the final checkpoint, evaluation and
    ``tuneforge_run_end``; a signal that arrives during them sets ``"signal"`` then. ``stop_message`` says it in
    words (summary.json's ``status``, e.g. ``"interrupted by SIGTERM"``).
    """

    config: TrainConfig
    model_config: Any
    tokenizer: ByteTokenizer
    device: torch.device
    plugins: dict[str, Any]
    hook: Any  # pluggy's hook relay: run.hook.tuneforge_evaluate(model=..., run=...)
    out: Path | None = None
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current data epoch
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch (for exact resume)
    resumed_from: Path | None = None  # the checkpoint a resumed run started from
    rank: int = 0  # process rank under torchrun (0 when not distributed)
    world_size: int = 1
    summary: dict = dataclasses.field(default_factory=dict)
    stop_reason: str | None = None  # why the run ends (a key of STOP_REASONS); None while it trains
    stop_message: str | None = None  # why, in words: request_stop's reason, "interrupted by SIGTERM"
    objective: str | None = None  # the plugin whose data and loss the run uses; None when nothing trains
    trainable: dict[str, int] = dataclasses.field(default_factory=dict)  # plugin -> parameters it asked to train
    # The checkpoint whose weights will be loaded into the model right after tuneforge_modify_model (on resume,
    # and when a saved model is rebuilt): plugins that size their modules from saved state read it there.
    checkpoint: Path | None = None
    # Context positions the model's prefix (soft prompts) takes before each row's tokens, whichever mechanism
    # brings the objective: windows of text and labelled rows leave this much room (models.protocol.prefix_length).
    prefix_tokens: int = 0

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def is_main(self) -> bool:
        """Only the main process logs, draws progress bars and writes files."""
        return self.rank == 0

    def log(self, message: str) -> None:
        """One line on stderr, from the main process only."""
        if self.is_main:
            say(message)

    def is_objective(self, plugin) -> bool:
        """Whether ``plugin`` (an instance) is this run's objective: default objectives check it in evaluate."""
        return self.objective is not None and self.plugins.get(self.objective) is plugin

    def request_stop(self, reason: str, *, kind: str = "early-stop") -> None:
        """Ask the engine to save and stop after the current step (e.g. early stopping from a plugin): ``reason`` in
        words becomes summary.json's ``status``, ``kind`` (a key of :data:`STOP_REASONS`) ``stop_reason``."""
        if kind not in STOP_REASONS:
            raise ValueError(f"request_stop: kind {kind!r} is not one of {', '.join(STOP_REASONS)}")
        self.stop_reason, self.stop_message = kind, reason
