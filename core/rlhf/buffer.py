"""The rows an online objective trains on between two rollouts, and how a checkpoint keeps them.

An online objective (PPO and its kind) draws a **rollout** once per data epoch: sampled responses and what was
computed about them then (their log-probabilities, values, advantages...). It trains on minibatches of those rows
for several passes, so a checkpoint taken in the middle has to keep them: a resumed run replays the same rows in
the same order instead of drawing a new rollout, and ends where an uninterrupted run ends.

On disk a buffer is one safetensors file of its columns; its epoch and summary statistics go into the caller's
own JSON state under ``rollout_epoch`` and ``stats`` (:meth:`RolloutBuffer.save` returns them), so the plugin
keeps one state file with its other fields.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tuneforge.errors import CheckpointError

__all__ = ["RolloutBuffer"]


class RolloutBuffer:
    """The rows of one rollout: columns of equal first size ``n``, the epoch they were drawn in and their stats.

    The columns follow the layout of :class:`tuneforge.rlhf.rollout.Samples`: ``input`` (n, T) holds the token
    rows, right-padded, and ``last`` (n,) the index of each row's last real token; any other 2-D column is per
    predicted token, (n, T-1) in the shifted frame of :func:`tuneforge.rlhf.policy.token_logprobs`; 1-D columns
    are per row. ``stats`` (floats) describe the whole rollout and go with every minibatch.
    """

    def __init__(self, rows: dict[str, torch.Tensor], *, epoch: int, stats: dict[str, float] | None = None,
                 where: str = "a rollout buffer"):
        missing = [k for k in ("input", "last") if k not in rows]
        if missing:
            raise ValueError(f"{where}: the rows lack the column(s) {missing}; a rollout needs 'input' (n, T) and "
                             "'last' (n,), as tuneforge.sdk.sample returns them")
        n = rows["input"].size(0)
        uneven = {k: tuple(v.shape) for k, v in rows.items() if v.dim() == 0 or v.size(0) != n}
        if uneven:
            raise ValueError(f"{where}: every column needs {n} rows, as 'input' has; these differ: {uneven}")
        self.rows = rows
        self.epoch = int(epoch)
        self.stats = dict(stats or {})

    def __len__(self) -> int:
        return self.rows["input"].size(0)

    def minibatch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``idx`` of every column, without the token columns that are padding in all of them."""
        width = int(self.rows["last"][idx].max()) + 1
        out = {}
        for key, value in self.rows.items():
            value = value[idx]
            if value.dim() == 2:  # "input" is (n, T); the per-token columns are (n, T-1), one per predicted token
                value = value[:, :width] if key == "input" else value[:, :width - 1]
            out[key] = value
        return out

    def minibatches(self, batch_size: int, *, passes: int = 1,
                    generator: torch.Generator | int = 0) -> Iterator[dict]:
        """``passes`` passes over the rows in minibatches of ``batch_size`` (a last short one is dropped), each pass
        in its own order drawn from ``generator`` (a seed or a CPU generator: the same one gives the same order).
        Each minibatch carries the rollout's stats beside its columns."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        g = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator
        n, device = len(self), self.rows["input"].device
        for _ in range(passes):
            order = torch.randperm(n, generator=g).to(device)
            for b in range(n // batch_size):
                yield {**self.minibatch(order[b * batch_size:(b + 1) * batch_size]), **self.stats}

    # -- in a checkpoint ---------------------------------------------------------------------------------------

    def save(self, folder: str | Path, file: str) -> dict:
        """Write the columns to ``folder/file``; return ``{"rollout_epoch", "stats"}`` for the caller's JSON state
        (give both to :meth:`load` to read the buffer back)."""
        save_file({k: v.contiguous().cpu() for k, v in self.rows.items()}, str(Path(folder) / file))
        return {"rollout_epoch": self.epoch, "stats": self.stats}

    @classmethod
    def load(cls, folder: str | Path, file: str, state: dict, *,
             device: torch.device | str = "cpu") -> RolloutBuffer | None:
        """The buffer a checkpoint ``folder`` holds, given the caller's JSON ``state`` that :meth:`save`'s fields
        went into; None when it saved none (no ``rollout_epoch``, or no ``file``): the run draws a new rollout."""
        path = Path(folder) / file
        if "rollout_epoch" not in state or not path.is_file():
            return None
        try:
            rows = load_file(str(path))
        except (OSError, SafetensorError) as exc:  # cut short, not safetensors
            raise CheckpointError(f"{path}: unreadable rollout ({exc}); resume from an older checkpoint of the run, "
                                  f"or delete {file} to draw the rollout again") from None
        try:
            return cls({k: v.to(device) for k, v in rows.items()}, epoch=int(state["rollout_epoch"]),
                       stats=state.get("stats"), where=str(path))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a rollout this version can resume ({exc}); resume from an older "
                                  f"checkpoint of the run, or delete {file} to draw the rollout again") from None
