"""Training on 2 processes (torchrun, gloo on CPU / nccl on GPU): tuneforge against a hand-written torchrun loop.

    python benchmarks/distributed.py [--steps 40] [--model tiny:n_layers=8,d_model=512,n_heads=8,max_seq_len=128]

Four jobs on the same model, batch and optimizer, each a real torchrun launch of N processes, run one after the
other in this one invocation:

- ``tuneforge train --nproc-per-node N`` with ``--strategy ddp`` and ``--strategy fsdp``;
- the loop a user would otherwise write: ``DistributedDataParallel`` (or ``fully_shard`` on every block and the
  model) around the same model, AdamW, clipping, the same micro-batches, nothing else.

Printed: tokens/s over all processes (median step after warm-up; tuneforge's from its own per-step timing, which
covers the whole step: hooks, metric agreement, logging) as a ratio tuneforge / hand loop; the peak resident
memory of the largest process; and, for tuneforge, the model state each process holds (parameters, gradients,
AdamW moments: what FSDP splits over the ranks; summary.json's model_state_mib_per_process).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = "tiny:n_layers=8,d_model=512,n_heads=8,max_seq_len=128"


def _worker(args) -> None:
    """One rank of the hand-written baseline (run under torchrun by this same file)."""
    import torch.distributed as dist

    from tuneforge.models.transformer import Transformer, model_config

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Transformer(model_config(args.model))
    if args.worker == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        wrapped = fully_shard(model)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(rank)
    vocab, T = model.config.vocab_size, args.seq_len
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        x = torch.randint(0, vocab, (args.batch_size, T + 1), generator=g)
        logits = wrapped(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)  # the loss a loop logs: one host sync, as tuneforge does
        times.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"step_seconds": times}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stderr.flush()
    os._exit(0)  # PyTorch's teardown at exit sometimes aborts after FSDP2 on gloo (see tuneforge/cli.py _train)


def _launch(command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``command`` in a child that reports the peak RSS (MiB) of its largest descendant (a torchrun rank)."""
    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr); "
             "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")
    proc = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True,
                          env={**os.environ, "TUNEFORGE_LOAD_PLUGINS": ""})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    rss = [line for line in proc.stdout.splitlines() if line.startswith("MAXRSS")][-1]
    return proc, int(rss.split()[1]) / 1024  # KiB on Linux


def _median_tokens_per_s(step_seconds: list[float], tokens_per_step: int, skip: int) -> float:
    return tokens_per_step / statistics.median(step_seconds[skip:])


def run_tuneforge(strategy: str, args, tokens_per_step: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "tuneforge", "train", "-m", "pretrain", "--model", args.model,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
               "--eval-every", "0", "--warmup", "1", "--lr", "1e-3", "--verify-frozen", "false",
               "--strategy", strategy, "--nproc-per-node", str(args.nproc), "--out", str(out), "--data", "builtin:text"]
        _, rss = _launch(cmd)
        seconds = [json.loads(line)["step_seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        state = json.loads((out / "summary.json").read_text())["model_state_mib_per_process"]
    return {"tokens_per_s": _median_tokens_per_s(seconds, tokens_per_step, args.skip), "max_rss_mib": rss,
            "model_state_mib": state}


def run_hand(strategy: str, args, tokens_per_step: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           __file__, "--worker", strategy, "--model", args.model, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    proc, rss = _launch(cmd)
    seconds = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")][-1]["step_seconds"]
    return {"tokens_per_s": _median_tokens_per_s(seconds, tokens_per_step, args.skip), "max_rss_mib": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch, per process")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a tiny model and a few steps (for the test suite)")
    ap.add_argument("--worker", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.model, args.steps, args.skip, args.batch_size, args.seq_len = \
            "tiny:n_layers=2,d_model=64,n_heads=2,max_seq_len=32", 6, 2, 4, 32
    if args.worker:
        return _worker(args)
    tokens_per_step = args.nproc * args.batch_size * args.seq_len
    print(f"# {args.nproc} processes x {args.batch_size} x {args.seq_len} tokens a step, {args.model}, "
          f"{args.steps} steps; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    rows = []
    for strategy in ("ddp", "fsdp"):
        ours, theirs = run_tuneforge(strategy, args, tokens_per_step), run_hand(strategy, args, tokens_per_step)
        rows.append({"strategy": strategy, "tuneforge": ours, "hand": theirs,
                     "speed_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
                     "memory_ratio": ours["max_rss_mib"] / theirs["max_rss_mib"]})
        print(f"{strategy:<5} tuneforge {ours['tokens_per_s']:>9,.0f} tok/s  {ours['max_rss_mib']:>6.0f} MiB | "
              f"hand loop {theirs['tokens_per_s']:>9,.0f} tok/s  {theirs['max_rss_mib']:>6.0f} MiB | "
              f"speed {rows[-1]['speed_ratio']:.2f}x  memory {rows[-1]['memory_ratio']:.2f}x")
    ddp, fsdp = rows[0]["tuneforge"], rows[1]["tuneforge"]
    print(f"fsdp / ddp (tuneforge): speed {fsdp['tokens_per_s'] / ddp['tokens_per_s']:.2f}x, "
          f"model state per process {fsdp['model_state_mib']:.0f} / {ddp['model_state_mib']:.0f} MiB = "
          f"{fsdp['model_state_mib'] / ddp['model_state_mib']:.2f}x, "
          f"peak RSS {fsdp['max_rss_mib'] / ddp['max_rss_mib']:.2f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
