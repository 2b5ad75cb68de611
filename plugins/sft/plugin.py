"""``sft``: supervised fine-tuning on instructions and chats, the loss on the answers only.

Records are ``{"prompt", "completion"}`` or ``{"messages": [...]}``, rendered with the model's chat template (see
:mod:`tuneforge.data.chat`); the loss is taken on every assistant turn (``train_on=assistant``, the default), the
last one (``completion``) or every token (``all``). It is an objective: beside ``lora``, ``adapter``,
``prompt-tuning``, ``ia3`` or ``finetune:layers=N`` those choose what trains; alone it trains the whole model
(``layers=N``: the last N blocks and the head). ``packing=true`` lays records back to back in full rows, attention
never crossing a record. Evaluation: the held-out answers' loss and greedy exact match, per ``kind`` when the
records have one; the starting model's exact match (zero-shot) is measured once before training.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from tuneforge.sdk import (ConfigError, check_layers, check_range, block_parameters, held_out_source, holdout_cut,
                           hookimpl, next_token_loss_of, others_choose_params, resolve_layers, untie_head)

from .evaluate import exact_match, heldout_loss
from .examples import IGNORE, packed_batches, padded_batches, read_examples

__all__ = ["Sft"]


class Sft:
    """Instruction tuning on prompt/completion and chat records, through the chat template; loss on the answers."""

    @dataclasses.dataclass
    class Options:
        train_on: Literal["assistant", "completion", "all"] = "assistant"  # which tokens the loss is taken on
        packing: bool = False  # records back to back in full rows (no padding), attention never crossing them
        truncate: Literal["left", "error"] = "left"  # a record longer than the context: cut its prompt's left, or stop
        layers: str = "auto"  # alone: all (or the last N blocks + head); beside lora/adapter/soft prompts: theirs
        holdout: float = 0.05  # share of a file held out for evaluation when there is no --eval-data
        eval_records: int = 100  # held-out records answered (greedy) per evaluation; 0 = the loss only
        zero_shot: bool = True  # answer them once with the starting model, before training (summary: sft.zero_shot)
        kind_field: str = "kind"  # the record field that groups exact match (eval/exact_match/KIND)

        def __post_init__(self):
            check_layers(self.layers)
            check_range(self, "holdout", "[0, 0.5)", " (a share of the file)")
            if self.eval_records < 0:
                raise ValueError(f"eval_records must be >= 0, got {self.eval_records}")

    def __init__(self, options: Options):
        self.options = options
        self.train = self.held_out = None
        self.zero_shot: dict[str, float] | None = None

    # -- data --------------------------------------------------------------------------------------------------

    def _room(self, run) -> int:
        context = run.model_config.max_seq_len - run.prefix_tokens
        seq_len = run.config.seq_len or context
        if seq_len > context:
            room = f" minus {run.prefix_tokens} prefix tokens" if run.prefix_tokens else ""
            raise ConfigError(f"sft: seq_len {seq_len} exceeds the model's context of {run.model_config.max_seq_len}"
                              f"{room}; lower --seq-len")
        return seq_len

    def _setup(self, run) -> None:
        if self.train is not None:
            return
        o, cfg = self.options, run.config
        room = self._room(run)

        def read(spec, split):
            return read_examples(spec, split, run.tokenizer, train_on=o.train_on, room=room, truncate=o.truncate,
                                 kind_field=o.kind_field)

        train = read(cfg.data, "train")
        source = held_out_source(cfg)
        if source is not None:
            self.train, self.held_out = train.examples, read(*source).examples
        else:  # one file: its last records are held out and never train
            cut = holdout_cut(len(train.examples), o.holdout)
            self.train, self.held_out = train.examples[:cut], train.examples[cut:]
        tokens = sum(len(e) for e in self.train)
        learnt = sum(e.trained for e in self.train)
        cut_note = (f"; {train.truncated} cut from the left to fit {room} tokens ({train.cut_tokens:,} tokens lost)"
                    if train.truncated else "")
        run.log(f"sft: {len(self.train):,} records, {tokens:,} tokens of which {learnt:,} are answers "
                f"(train_on={o.train_on}){cut_note}; {len(self.held_out):,} held out")
        run.summary["sft"] = {"records": len(self.train), "tokens": tokens, "answer_tokens": learnt,
                              "truncated": train.truncated, "held_out": len(self.held_out)}
        if not o.packing and len(self.train) < cfg.batch_size:
            raise ConfigError(f"sft: {cfg.data} holds {len(self.train)} training records, fewer than one batch of "
                              f"{cfg.batch_size}; lower --batch-size or add records")

    # -- hooks -------------------------------------------------------------------------------------------------

    def _layers(self, run) -> str | None:
        """The blocks sft trains (``all`` or a number, with the head), or None when the parameterisation beside it
        chooses what trains (``layers=auto`` beside lora, adapters, soft prompts, ``finetune:layers=N``)."""
        if self.options.layers == "auto" and others_choose_params(run, self):
            return None
        return resolve_layers(self.options.layers, run, self)

    @hookimpl
    def tuneforge_modify_model(self, model, run):
        if self._layers(run) not in (None, "all"):
            untie_head(model)  # the head trains, the input embedding it was tied to stays frozen

    @hookimpl
    def tuneforge_trainable_params(self, model, run):
        layers = self._layers(run)
        return None if layers is None else block_parameters(model, layers, head=True)

    @hookimpl
    def tuneforge_validate(self, run, model):
        head = model.lm_head
        if getattr(head, "out_features", model.config.vocab_size) != model.config.vocab_size:
            raise ConfigError(f"sft: the model's head has {head.out_features} outputs, not the vocabulary of "
                              f"{model.config.vocab_size}: instruction tuning needs the LM head (drop "
                              "finetune:head=classify / reward-model from the run)")
        if self.options.packing and run.prefix_tokens:
            raise ConfigError("sft: packing=true cannot be combined with soft prompts (prompt-tuning): the soft prompt "
                              "comes once per row, so every packed record after the first would not see it; set "
                              "packing=false")

    @hookimpl
    def tuneforge_data(self, run):
        self._setup(run)
        cfg, o = run.config, self.options
        pad = run.tokenizer.pad_id
        if o.packing:
            return packed_batches(self.train, batch_size=cfg.batch_size, width=self._room(run), pad_id=pad,
                                  seed=run.seed, epoch=run.epoch)
        return padded_batches(self.train, batch_size=cfg.batch_size, pad_id=pad, seed=run.seed, epoch=run.epoch)

    @hookimpl
    def tuneforge_loss(self, model, batch):
        target = batch["target"]
        packed = {k: batch[k] for k in ("positions", "cu_seqlens") if k in batch}
        loss = next_token_loss_of(model, batch["input"], target, ignore_index=IGNORE, **packed)
        # tokens/s counts the records' tokens the model read (not padding); the answer tokens are reported beside
        return loss, {"tokens": batch["tokens"], "trained_tokens": batch["trained_tokens"]}

    def _evaluate(self, model, run, records: int) -> dict[str, float]:
        held = self.held_out[:max(records, 32)]
        out = heldout_loss(model, held, batch_size=run.config.batch_size, device=run.device)
        if records:
            out.update(exact_match(model, self.held_out[:records], batch_size=max(run.config.batch_size, 16),
                                   device=run.device))
        return out

    @hookimpl
    def tuneforge_run_start(self, run, model):
        if not (run.is_objective(self) and self.options.zero_shot and self.options.eval_records and run.step == 0):
            return
        self._setup(run)
        if not self.held_out:
            return
        was_training = model.training
        model.eval()  # exact_match runs under no_grad
        self.zero_shot = exact_match(model, self.held_out[:self.options.eval_records],
                                     batch_size=max(run.config.batch_size, 16), device=run.device)
        model.train(was_training)
        run.summary.setdefault("sft", {})["zero_shot"] = self.zero_shot
        run.log(f"sft: zero-shot exact match {self.zero_shot['exact_match']:.3f} on "
                f"{min(len(self.held_out), self.options.eval_records)} held-out records")

    @hookimpl
    def tuneforge_evaluate(self, model, run):
        if not run.is_objective(self):
            return None
        self._setup(run)
        if not self.held_out:
            return None
        return self._evaluate(model, run, self.options.eval_records)
