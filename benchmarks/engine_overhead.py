"""Engine overhead: tokens/s of `tuneforge.train` (pretrain, tiny) against a minimal hand-written PyTorch loop on
the same model, data, optimizer and schedule, measured side by side in one run (interleaved repeats, median).

    python benchmarks/engine_overhead.py [--steps 60] [--repeats 3] [--model tiny]

Throughput is measured between the end of step `--skip` and the end of the last step, so setup (data
tokenisation, model build) and the final evaluation are excluded on both sides; everything the engine does per
step (hooks, metrics.jsonl, progress logging, non-finite checks, LR schedule) is included.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

import tuneforge
from tuneforge import hookimpl
from tuneforge.engine.loop import build_model, lr_at
from tuneforge.objectives.next_token import TokenWindows, next_token_loss
from tuneforge.models.tokenizer import ByteTokenizer
from tuneforge.data.world import builtin


class StepClock:
    """Timestamps at the end of every step (a lifecycle plugin; one perf_counter call per step)."""

    name = "step-clock"

    def __init__(self):
        self.times, self.tokens = [], []

    @hookimpl
    def tuneforge_step_end(self, metrics):
        self.times.append(time.perf_counter())
        self.tokens.append(metrics.get("tokens", 0.0))


def throughput(times, tokens, skip):
    """Tokens/s from the median interval between consecutive step ends (after ``skip`` warm-up steps).

    The interval from one step's end to the next covers everything done per step, the engine's hooks and
    files included; the median ignores the stalls a shared VM throws in at random, which the mean does not.
    """
    intervals = sorted(b - a for a, b in zip(times[skip:], times[skip + 1:]))
    return statistics.median(tokens[skip + 1:]) / statistics.median(intervals)


def run_engine(cfg, skip):
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        tuneforge.train(cfg.replace(mechanisms=["pretrain", clock], out=out))
    return throughput(clock.times, clock.tokens, skip)


def run_hand(cfg, skip):
    """What a user would write by hand: same model init, data order, AdamW groups, schedule and clipping."""
    model, mcfg, _ = build_model(cfg)
    seq_len = cfg.seq_len or mcfg.max_seq_len
    windows = TokenWindows([r["text"] for r in builtin("text")], ByteTokenizer(), seq_len)
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    model.train()
    times, tokens = [], []
    batches = windows.epoch(0, cfg.seed, cfg.batch_size)
    for step in range(cfg.steps):
        batch = next(batches)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = next_token_loss(model(batch["input"]), batch["target"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # a hand loop logs its loss too
        times.append(time.perf_counter())
        tokens.append(batch["target"].numel())
    return throughput(times, tokens, skip)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps excluded from timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    cfg = tuneforge.TrainConfig(model=args.model, data="builtin:text", steps=args.steps, batch_size=args.batch_size,
                                eval_every=0, log_every=10**9)
    engine, hand = [], []
    for r in range(args.repeats):
        hand.append(run_hand(cfg, args.skip))
        engine.append(run_engine(cfg, args.skip))
        print(f"repeat {r + 1}: hand {hand[-1]:,.0f} tok/s   tuneforge {engine[-1]:,.0f} tok/s")
    h, e = statistics.median(hand), statistics.median(engine)
    print(f"\nmachine: {platform.machine()} {platform.processor() or ''} torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model {args.model}, batch {args.batch_size}, {args.steps} steps")
    print(f"hand-written loop : {h:,.0f} tokens/s (median of {args.repeats})")
    print(f"tuneforge train   : {e:,.0f} tokens/s (median of {args.repeats})")
    print(f"ratio tuneforge/hand = {e / h:.3f}  (engine overhead {100 * (1 - e / h):+.1f}%; target < 5%)")


if __name__ == "__main__":
    main()
