"""LoRA and bottleneck adapters: tuneforge against the eager baselines a user would otherwise write.

    python benchmarks/adapters.py [--model tiny] [--batch 16] [--rows 64] [--seq 128] [--repeats 7] [--threads N]
    python benchmarks/adapters.py --quick   # tiny sizes, 2 repeats: a smoke test, a few seconds

Three comparisons, each measured side by side in one run (one warm-up call each, then interleaved repeats
A, B, A, B..., median):

1. LoRA training step (rank 8 on q,v, alpha 16; forward, cross-entropy on shifted targets, backward, AdamW):
   tuneforge's ``LoRALinear`` against a PEFT-style eager module (``base_layer(x) + lora_B(lora_A(x)) * scaling``,
   written here) on a copy of the same base model, starting from the same A and B. Ratio eager / tuneforge.
2. 8 LoRAs on one model, rows interleaved (row i uses task i % 8): one mixed batch routed per row
   (``tuneforge.models.routing.rows``) against looping task by task (``tuneforge.parts.modules.using`` on that task's rows,
   outputs scattered back into the full batch), for inference (forward under no_grad) and a training step
   (forward + backward into the LoRA parameters). Ratio looped / mixed.
3. The same for 8 serial bottleneck adapters (``add_adapter``, reduction 16).

Targets (once the fused kernels land): LoRA step >= 1.3x, mixed batch >= 4x. Today every op runs the pure-torch
reference (``tuneforge.kernels.backend()``), so about 1.0x is what to expect. The last line printed is one JSON
object with every figure.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneforge import kernels

from tuneforge.parts import modules as adapters

from tuneforge.models import routing
from tuneforge.models.transformer import Transformer, model_config
from tuneforge.plugins.adapter import add_adapter
from tuneforge.plugins.lora import add_lora

VOCAB = 256  # random byte tokens
RANK, ALPHA, LR = 8, 16.0, 1e-3
LORA_TARGET, MIXED_TARGET = 1.3, 4.0


class EagerLoraLinear(nn.Module):
    """A linear layer with one LoRA the way PEFT's eager path computes it: two nn.Linear beside the frozen base."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False)  # (r, in)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False)  # (out, r)
        self.lora_dropout = nn.Identity()
        self.scaling = alpha / r
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def part_params(model: nn.Module) -> list[nn.Parameter]:
    """The per-task parameters (LoRA A/B, adapter weights) of a tuneforge model; everything else is frozen."""
    return [p for _, m in adapters.task_modules(model) for p in m.all_part_parameters()]


def freeze_all_but(model: nn.Module, params: list[nn.Parameter]) -> None:
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def next_token_loss(logits, x):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1))


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function: one warm-up call each, then A, B, A, B... ``repeats`` times."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits every contender alike
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_lora_step(base: Transformer, x, repeats: int) -> dict:
    eager = copy.deepcopy(base)  # before add_lora: the plain model
    tf = copy.deepcopy(base)
    paths = add_lora(tf, "a", targets=["q", "v"], rank=RANK, alpha=ALPHA)
    for n, p in tf.named_parameters():
        p.requires_grad_("lora_" in n)
    for path in paths:  # the same layers, starting from tuneforge's very A and B
        src = tf.get_submodule(path)
        m = EagerLoraLinear(eager.get_submodule(path), RANK, ALPHA)
        with torch.no_grad():
            m.lora_A.weight.copy_(src.lora_a["a"])
            m.lora_B.weight.copy_(src.lora_b["a"])
        set_module(eager, path, m)
    for n, p in eager.named_parameters():
        p.requires_grad_("lora_" in n)
    n_tf = sum(p.numel() for p in tf.parameters() if p.requires_grad)
    n_eager = sum(p.numel() for p in eager.parameters() if p.requires_grad)
    assert n_tf == n_eager, (n_tf, n_eager)

    def stepper(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

        def step():
            loss = next_token_loss(model(x), x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.item()
        return step

    step_tf, step_eager = stepper(tf), stepper(eager)
    # Sanity: the same numbers on both sides. Step 1 runs with B = 0; step 2 with the B that step 1 trained.
    diffs, losses = [], []
    for _ in range(2):
        lt, le = step_tf(), step_eager()
        losses.append(lt)
        diffs.append(abs(lt - le))
        assert diffs[-1] < 1e-4, f"LoRA losses differ: tuneforge {lt:.6f} vs eager {le:.6f}"
    t = interleaved({"eager": step_eager, "tuneforge": step_tf}, repeats)
    return {"tuneforge_ms": t["tuneforge"] * 1e3, "eager_ms": t["eager"] * 1e3, "ratio": t["eager"] / t["tuneforge"],
            "target": LORA_TARGET, "trainable_params": n_tf, "layers": len(paths), "first_loss": losses[0],
            "loss_diff_step1": diffs[0], "loss_diff_step2": diffs[1]}


def routing_base(model, x):
    with routing.base():
        return model(x)


def bench_mixed(model: Transformer, names: list[str], x, repeats: int) -> dict:
    """One mixed batch routed per row against one ``using(model, [task])`` forward per task, scattered back."""
    rows = x.size(0)
    tasks = [names[i % len(names)] for i in range(rows)]  # rows interleaved across tasks
    groups = [(n, torch.tensor([i for i, t in enumerate(tasks) if t == n])) for n in names]
    groups = [(n, idx) for n, idx in groups if len(idx)]
    inverse = torch.argsort(torch.cat([idx for _, idx in groups]))  # concatenated task outputs -> batch order
    params = part_params(model)
    freeze_all_but(model, params)

    def mixed():
        with routing.rows(tasks):
            return model(x)

    def looped():
        outs = []
        for n, idx in groups:
            with adapters.using(model, [n]):
                outs.append(model(x[idx]))
        return torch.cat(outs).index_select(0, inverse)

    def grads(fn):
        for p in params:
            p.grad = None
        next_token_loss(fn(), x).backward()
        return [p.grad.clone() for p in params]

    with torch.no_grad():
        m, lo = mixed(), looped()
        out_diff = (m - lo).abs().max().item()
        base_diff = (m - routing_base(model, x)).abs().max().item()
    grad_diff = max((a - b).abs().max().item() for a, b in zip(grads(mixed), grads(looped)))
    assert out_diff < 1e-4, f"mixed and looped outputs differ by {out_diff:.3g}"
    assert base_diff > 1e-3, "the adapters change nothing: the comparison would not exercise them"

    def infer(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def train(fn):
        def run():
            for p in params:
                p.grad = None
            next_token_loss(fn(), x).backward()
        return run

    ti = interleaved({"looped": infer(looped), "mixed": infer(mixed)}, repeats)
    tt = interleaved({"looped": train(looped), "mixed": train(mixed)}, repeats)
    res = {"max_abs_diff": out_diff, "grad_max_abs_diff": grad_diff, "diff_from_base": base_diff,
           "trainable_params": sum(p.numel() for p in params), "target": MIXED_TARGET}
    for label, t in (("inference", ti), ("train", tt)):
        res[label] = {"mixed_ms": t["mixed"] * 1e3, "looped_ms": t["looped"] * 1e3, "ratio": t["looped"] / t["mixed"]}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model preset with overrides (default tiny)")
    ap.add_argument("--batch", type=int, default=None, help="LoRA step batch (default 16)")
    ap.add_argument("--rows", type=int, default=None, help="mixed batch rows (default 64)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 128)")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per contender (default 7)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--no-bottleneck", action="store_true", help="skip the bottleneck-adapter comparison")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats (a smoke test)")
    args = ap.parse_args()
    quick = dict(model="tiny:d_model=64,n_layers=2,n_heads=4", batch=4, rows=16, seq=32, repeats=2)
    full = dict(model="tiny", batch=16, rows=64, seq=128, repeats=7)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = model_config(args.model)
    if args.seq > cfg.max_seq_len:
        ap.error(f"--seq {args.seq} exceeds the model's context of {cfg.max_seq_len}")
    if args.rows < args.tasks:
        ap.error(f"--rows {args.rows} gives some of the {args.tasks} tasks no row")

    base = Transformer(cfg)
    names = [f"task{i}" for i in range(args.tasks)]
    x_step = torch.randint(0, VOCAB, (args.batch, args.seq))
    x_mixed = torch.randint(0, VOCAB, (args.rows, args.seq))

    # 1. one LoRA, training step
    lora_step = bench_lora_step(base, x_step, args.repeats)

    # 2. several LoRAs, mixed batch vs looped; B non-zero so each task's update changes its rows
    multi_lora = copy.deepcopy(base)
    for n in names:
        add_lora(multi_lora, n, targets=["q", "v"], rank=RANK, alpha=ALPHA)
    with torch.no_grad():
        for _, m in adapters.task_modules(multi_lora):
            for n in names:
                m.lora_b[n].normal_(0.0, 0.02)
    lora_mixed = bench_mixed(multi_lora, names, x_mixed, args.repeats)
    # memory to serve the tasks: one base with a LoRA each, against one fine-tuned copy of the model per task
    mib = lambda m: sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20  # noqa: E731
    memory = {"shared_mib": mib(multi_lora), "copies_mib": args.tasks * mib(base)}
    memory["ratio"] = memory["copies_mib"] / memory["shared_mib"]

    # 3. several serial bottleneck adapters, the same comparison; up non-zero
    adapter_mixed = None
    if not args.no_bottleneck:
        multi_adapter = copy.deepcopy(base)
        for n in names:
            add_adapter(multi_adapter, n, placement="serial", reduction=16)
        with torch.no_grad():
            for _, point in adapters.task_modules(multi_adapter):
                for n in names:
                    point[n].up.weight.normal_(0.0, 0.02)
                    point[n].up.bias.normal_(0.0, 0.02)
        adapter_mixed = bench_mixed(multi_adapter, names, x_mixed, args.repeats)

    machine = platform.processor() or platform.machine()
    backends = sorted(set(kernels.backend().values()))
    print(f"machine: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"kernels: {', '.join(backends)}")
    print(f"model {args.model} (d_model {cfg.d_model}, {cfg.n_layers} layers); median of {args.repeats} "
          "interleaved repeats after one warm-up call each")
    s = lora_step
    print(f"\n1. LoRA training step (r={RANK} on q,v, alpha {ALPHA:g}, {s['trainable_params']:,} trainable, "
          f"batch {args.batch} x {args.seq}, AdamW lr {LR:g})")
    print(f"   loss agreement: step 1 {s['loss_diff_step1']:.2e}, step 2 {s['loss_diff_step2']:.2e}")
    print(f"   {'PEFT-style eager':24s} {s['eager_ms']:8.1f} ms/step")
    print(f"   {'tuneforge LoRALinear':24s} {s['tuneforge_ms']:8.1f} ms/step")
    print(f"   ratio eager / tuneforge {s['ratio']:5.2f}x   (> 1: tuneforge faster; target once fused kernels land "
          f">= {LORA_TARGET}x)")
    for i, (title, r) in enumerate((("LoRAs (r=8 on q,v)", lora_mixed),
                                    ("serial bottleneck adapters (reduction 16)", adapter_mixed)), start=2):
        if r is None:
            continue
        print(f"\n{i}. {args.tasks} {title}: mixed batch vs looped per task, batch {args.rows} x {args.seq}, "
              f"rows interleaved, {r['trainable_params']:,} trainable")
        print(f"   agreement mixed vs looped: outputs {r['max_abs_diff']:.2e}, gradients {r['grad_max_abs_diff']:.2e}"
              f" (adapters move the logits by up to {r['diff_from_base']:.3f} from the base model)")
        for label in ("inference", "train"):
            t = r[label]
            print(f"   {label:9s}  mixed batch {t['mixed_ms']:8.1f} ms   looped per task {t['looped_ms']:8.1f} ms   "
                  f"speed-up looped / mixed {t['ratio']:5.2f}x")
        print(f"   target once fused kernels land: >= {MIXED_TARGET}x")
    print(f"\nmemory to serve {args.tasks} tasks: one model with {args.tasks} LoRAs {memory['shared_mib']:.2f} MiB, "
          f"{args.tasks} fine-tuned copies {memory['copies_mib']:.2f} MiB ({memory['ratio']:.1f}x less)")
    if backends == ["reference"]:
        print("\nEvery op runs its pure-torch reference today, so these ratios measure the routing and bookkeeping "
              "around the same math; the targets are for the fused kernels.")
    print(json.dumps({
        "benchmark": "adapters", "machine": machine, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "kernels": kernels.backend(), "model": args.model, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
        "batch": args.batch, "rows": args.rows, "seq": args.seq, "tasks": args.tasks, "repeats": args.repeats,
        "quick": args.quick, "lora_step": lora_step, "multi_lora": lora_mixed, "multi_adapter": adapter_mixed,
        "memory": memory,
    }))


if __name__ == "__main__":
    main()
