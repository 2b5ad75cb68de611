"""``pretrain``: next-token cross-entropy from random initialisation; every weight trains."""
from __future__ import annotations

import dataclasses
import math

from tuneforge import hookimpl
from tuneforge.data import read_records
from tuneforge.errors import ConfigError
from tuneforge.lm import TokenWindows, next_token_loss

__all__ = ["Pretrain"]


class Pretrain:
    """Next-token prediction on raw text (labels are the input shifted by one); all weights train."""

    @dataclasses.dataclass
    class Options:
        field: str = "text"  # the .jsonl field holding the text
        eval_batches: int = 8  # held-out batches per evaluation
        holdout: float = 0.05  # share of a file's windows held out when no eval data is given

        def __post_init__(self):
            if not 0 <= self.holdout < 0.5:
                raise ValueError(f"holdout must be within [0, 0.5), got {self.holdout}")
            if self.eval_batches < 1:
                raise ValueError(f"eval_batches must be at least 1, got {self.eval_batches}")

    def __init__(self, options: Options):
        self.options = options
        self.train = self.held_out = None

    def _windows(self, run):
        """Tokenise the data once per run (validating every record first)."""
        if self.train is None:
            cfg, seq_len = run.config, run.config.seq_len or run.model_config.max_seq_len
            if seq_len > run.model_config.max_seq_len:
                raise ConfigError(
                    f"pretrain: seq_len {seq_len} exceeds the model's context of {run.model_config.max_seq_len}"
                )
            fields = {self.options.field: str}
            texts = [r[self.options.field] for r in read_records(cfg.data, split="train", fields=fields)]
            self.train = TokenWindows(texts, run.tokenizer, seq_len)
            held_spec = cfg.eval_data or (cfg.data if cfg.data.startswith("builtin:") else None)
            if held_spec is not None:
                split = "test" if held_spec.startswith("builtin:") else "train"
                held = [r[self.options.field] for r in read_records(held_spec, split=split, fields=fields)]
                self.held_out = TokenWindows(held, run.tokenizer, seq_len)
            else:  # one file: hold out its last windows, which then never train
                self.held_out = self.train.split_tail(int(len(self.train) * self.options.holdout))
            if self.train.batches_per_epoch(cfg.batch_size) == 0:
                raise ConfigError(
                    f"pretrain: {cfg.data} holds {len(self.train)} windows of {seq_len} tokens, fewer than one "
                    f"batch of {cfg.batch_size}; lower --batch-size or seq_len, or add text"
                )
        return self.train, self.held_out

    @hookimpl
    def tuneforge_trainable_params(self, model):
        return list(model.parameters())

    @hookimpl
    def tuneforge_data(self, run):
        train, _ = self._windows(run)
        return train.epoch(run.epoch, run.seed, run.config.batch_size)

    @hookimpl
    def tuneforge_loss(self, model, batch):
        logits = model(batch["input"])  # (B, T, V)
        loss = next_token_loss(logits, batch["target"])
        return loss, {"tokens": batch["target"].numel()}

    @hookimpl
    def tuneforge_evaluate(self, model, run):
        _, held = self._windows(run)
        if held is None or len(held) == 0:
            return None
        total, count = 0.0, 0
        for batch in held.in_order(run.config.batch_size, limit=self.options.eval_batches):
            logits = model(batch["input"].to(run.device))
            n = batch["target"].numel()
            total += float(next_token_loss(logits, batch["target"].to(run.device))) * n
            count += n
        loss = total / count
        return {"loss": loss, "bits_per_token": loss / math.log(2), "perplexity": math.exp(min(loss, 50.0))}
