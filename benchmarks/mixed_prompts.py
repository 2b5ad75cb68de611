"""Soft prompts for many tasks on one frozen model: one mixed batch against looping task by task.

    python benchmarks/mixed_prompts.py [--tasks 8] [--rows 64] [--tokens 16] [--repeats 7] [--model tiny]

Baseline: what a user does without per-row routing, i.e. split the batch by task and run one forward/backward
per task. Measured side by side in one run (interleaved repeats, median), for a training step (forward +
backward into the prompts) and for inference (forward only). Memory: what serving N tasks costs, soft prompts
on one shared model against one fine-tuned copy of the model per task.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from tuneforge.models import routing
from tuneforge.models.transformer import Transformer, model_config
from tuneforge.plugins.prompt_tuning import SoftPrompts


def timed(fn, repeats):
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--model", default="tiny")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Transformer(model_config(args.model))
    for p in model.parameters():
        p.requires_grad_(False)
    sp = SoftPrompts(model.config.d_model)
    names = [f"task{i}" for i in range(args.tasks)]
    for n in names:
        sp.add(n, torch.randn(args.tokens, model.config.d_model) * 0.02)
    model.prefix = sp
    x = torch.randint(0, 256, (args.rows, args.seq))
    tasks = [names[i % args.tasks] for i in range(args.rows)]  # rows interleaved across tasks
    groups = {n: [i for i, t in enumerate(tasks) if t == n] for n in names}

    def mixed(train):
        with torch.set_grad_enabled(train), routing.rows(tasks):
            out = model(x)
        if train:
            out.float().pow(2).mean().backward()

    def looped(train):
        for n, rows in groups.items():
            with torch.set_grad_enabled(train), routing.rows([n] * len(rows)):
                out = model(x[rows])
            if train:
                (out.float().pow(2).mean() * len(rows) / args.rows).backward()

    results = {}
    for label, train in (("train step", True), ("inference", False)):
        a, b = [], []
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
            a += timed(lambda: mixed(train), 1)
            b += timed(lambda: looped(train), 1)
        results[label] = (statistics.median(a), statistics.median(b))

    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("prefix"))
    prompt_bytes = sum(p.numel() * p.element_size() for p in sp.parameters())
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"model {args.model}: {args.tasks} tasks x {args.tokens}-token prompts, batch {args.rows} x {args.seq} tokens, "
          "rows interleaved")
    for label, (m, l) in results.items():
        print(f"{label:11s} mixed batch {m * 1e3:8.1f} ms   looped per task {l * 1e3:8.1f} ms   speed-up {l / m:5.2f}x")
    print(f"memory to serve {args.tasks} tasks: one model + prompts {(base_bytes + prompt_bytes) / 2**20:.2f} MiB vs "
          f"{args.tasks} fine-tuned copies {args.tasks * base_bytes / 2**20:.2f} MiB "
          f"({args.tasks * base_bytes / (base_bytes + prompt_bytes):.1f}x less)")


if __name__ == "__main__":
    main()
