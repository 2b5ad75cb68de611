"""Causal language modelling shared by the objectives that predict the next token (pretrain, fine-tuning on
domain text, prompt tuning on text): token windows for an epoch, the shifted cross-entropy, and
:class:`TextTask`, the whole objective (data, loss, held-out evaluation) that plugins delegate to.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from tuneforge.data.batching import epoch_generator
from tuneforge.data.records import held_out_source, read_records
from tuneforge.errors import ConfigError
from tuneforge.models.lm_loss import next_token_loss_of

__all__ = ["TokenWindows", "TextTask", "next_token_loss", "unigram_entropy"]


class TokenWindows:
    """A token stream cut into windows of ``seq_len + 1`` tokens (input and its shift by one).

    Documents are encoded between the begin- and end-of-text tokens (so generation can start a document with
    ``bos`` as training saw it) and concatenated; the stream is cut with
    stride ``seq_len`` so every token is predicted once per epoch. An epoch visits the windows in a random
    order drawn from (seed, epoch), in batches of ``batch_size`` (the last incomplete batch is dropped so
    every step has the same shape).
    """

    def __init__(self, texts: list[str], tokenizer, seq_len: int):
        ids: list[int] = []
        for text in texts:
            ids.extend(tokenizer.encode(text, bos=True, eos=True))
        self.tokens = torch.tensor(ids, dtype=torch.long)  # (N,)
        self.seq_len = seq_len

    @property
    def n_windows(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __len__(self) -> int:
        return self.n_windows

    def split_tail(self, n: int) -> "TokenWindows":
        """Move the last ``n`` windows into a new TokenWindows (held-out data that then never trains)."""
        cut = (self.n_windows - min(n, self.n_windows)) * self.seq_len
        tail = TokenWindows([], None, self.seq_len)
        tail.tokens, self.tokens = self.tokens[cut:], self.tokens[:cut + 1]  # window edges share one token
        return tail

    def window(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The windows numbered ``idx`` (K,) as ``{"input": (K, T), "target": (K, T)}``."""
        starts = idx * self.seq_len  # (K,)
        offsets = torch.arange(self.seq_len + 1)  # (T+1,)
        chunk = self.tokens[starts[:, None] + offsets[None, :]]  # (K, T+1)
        return {"input": chunk[:, :-1], "target": chunk[:, 1:]}

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.n_windows // batch_size

    def epoch(self, epoch: int, seed: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Yield the batches of one epoch, in an order that depends only on (seed, epoch)."""
        order = torch.randperm(self.n_windows, generator=epoch_generator(seed, epoch))
        for b in range(self.batches_per_epoch(batch_size)):
            yield self.window(order[b * batch_size:(b + 1) * batch_size])

    def in_order(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in stream order (for evaluation: the same windows every time)."""
        n = self.n_windows if limit is None else min(self.n_windows, limit * batch_size)
        for b in range(0, n, batch_size):
            yield self.window(torch.arange(b, min(b + batch_size, n)))


def next_token_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (B, T, V) against ``target`` (B, T), already shifted by one."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1), ignore_index=ignore_index)


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Entropy in nats/token of the token frequencies: the loss of a model that learned only which tokens are
    common, the bar any sequence model must clear."""
    p = torch.bincount(tokens.flatten()).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


class TextTask:
    """Next-token prediction on the run's text: tokenised once, validated before training, held-out data from
    ``--eval-data``, the builtin test split, or the tail of the file (which then never trains).

    :param owner: the plugin's name, for messages.
    :param reserve: context positions kept free for tokens a model prepends (soft prompts).
    """

    def __init__(self, owner: str, *, field: str = "text", holdout: float = 0.05, eval_batches: int = 8,
                 reserve: int = 0):
        self.owner, self.field, self.holdout, self.eval_batches, self.reserve = owner, field, holdout, eval_batches, reserve
        self.train = self.held_out = None

    def setup(self, run) -> "TextTask":
        if self.train is not None:
            return self
        reserve = max(self.reserve, getattr(run, "prefix_tokens", 0))
        cfg, context = run.config, run.model_config.max_seq_len - reserve
        seq_len = cfg.seq_len or context
        if seq_len > context:
            room = f" minus {reserve} prefix tokens" if reserve else ""
            raise ConfigError(f"{self.owner}: seq_len {seq_len} exceeds the model's context of "
                              f"{run.model_config.max_seq_len}{room}; lower --seq-len")
        fields = {self.field: str}
        texts = [r[self.field] for r in read_records(cfg.data, split="train", fields=fields)]
        self.train = TokenWindows(texts, run.tokenizer, seq_len)
        source = held_out_source(cfg)
        if source is not None:
            held = [r[self.field] for r in read_records(source[0], split=source[1], fields=fields)]
            self.held_out = TokenWindows(held, run.tokenizer, seq_len)
        else:  # one file: hold out its last windows, which then never train
            self.held_out = self.train.split_tail(int(len(self.train) * self.holdout))
        if self.train.batches_per_epoch(cfg.batch_size) == 0:
            raise ConfigError(
                f"{self.owner}: {cfg.data} holds {len(self.train)} windows of {seq_len} tokens, fewer than one "
                f"batch of {cfg.batch_size}; lower --batch-size or --seq-len, or add text"
            )
        return self

    def epoch(self, run) -> Iterator[dict[str, torch.Tensor]]:
        return self.setup(run).train.epoch(run.epoch, run.seed, run.config.batch_size)

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        # the head's logits are computed a chunk of rows at a time, never all (B, T, V) at once (models/lm_loss.py)
        return next_token_loss_of(model, batch["input"], batch["target"]), {"tokens": batch["target"].numel()}

    def evaluate(self, model, run) -> dict[str, float] | None:
        held = self.setup(run).held_out
        if held is None or len(held) == 0:
            return None
        total, count = 0.0, 0
        for batch in held.in_order(run.config.batch_size, limit=self.eval_batches):
            n = batch["target"].numel()
            total += float(next_token_loss_of(model, batch["input"].to(run.device), batch["target"].to(run.device))) * n
            count += n
        loss = total / count
        return {"loss": loss, "bits_per_token": loss / math.log(2), "perplexity": math.exp(min(loss, 50.0))}
