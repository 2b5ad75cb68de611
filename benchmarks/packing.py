"""SFT with packed rows against the same records padded per batch, side by side in one run: useful tokens/s.

    python benchmarks/packing.py                  # embedded `small` (max_seq_len 512), full fine-tune, 192 records
    python benchmarks/packing.py --real           # SmolLM2-135M-Instruct, LoRA r16 on q, k, v, o, 32 records
    python benchmarks/packing.py --quick          # a tiny model and a few records: checks the script, not the speed

The data: generated instruction records (``{"prompt", "completion"}``, a quarter as two-turn ``{"messages"}`` with
a system turn) whose token lengths are log-normal (median ``--median`` tokens, sigma ``--spread``, clipped to 16 ..
0.9 x seq_len), the spread of real instruction sets, rendered with the model's chat template by ``read_examples``
(the ``sft`` objective's own reader, ``train_on=assistant``).

The two runs see the SAME records (one pass = one epoch of the sft plugin's batches, epoch 0 both times):

- padded, what ``sft`` runs without ``packing``: ``padded_batches`` -- ``--batch`` records a step, right-padded to
  the batch's longest record;
- packed, ``packing=true``: ``packed_batches`` -- ``--batch`` rows of ``--seq`` tokens a step, records laid back
  to back by first fit, attention kept inside each record by ``cu_seqlens`` and positions restarting per record.

A step is the sft plugin's loss (``Sft.tuneforge_loss``: ``next_token_loss_of`` with the fused linear +
cross-entropy) + backward + ``torch.optim.AdamW.step``; the batches are built inside the timed pass, as a run
draws them. Each side trains its own build of the same initial model; passes alternate between the sides, one
untimed warm-up pass first, then the median pass time of ``--repeats``. The warm-up pass's mean loss per trained
token is reported for each side: both start from the same weights and read the same records, and the means differ
only because packing takes fewer, larger optimizer steps over them (the loss check below shows the per-token
computation is the same). Useful tokens/s = the records' own tokens (no padding) of a pass / its median time;
ratio = packed / padded. The padding share (padding / all positions of the batches) is printed for both sides.
Target (issue 21): at >= 35% padding the packed run's useful tokens/s >= 1.5x the padded run's, with the same loss.

Same loss: on a fixed set of records (the first ``--check`` of them), the loss per trained token and the gradients
of one padded batch and of the same records packed, from the same weights, must agree (printed; the script stops
above 1e-4). Fraction of the machine: useful FLOPs (6 x matmul parameters x useful tokens for a full fine-tune; 4 x
for LoRA, whose frozen weights get no gradient; attention not counted) / the sgemm peak (``torch.mm`` of square
float32 matrices, best of the runs at the start and the end, benchmarks/kernels.py). Timings on a shared machine
are noisy: record the load and repeat; with more threads than free cores every parallel op waits for a descheduled
thread (``--threads 1`` then measures the code, not the scheduler). The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_training as shared  # noqa: E402  (machine() and the interleaved step timing)
from kernels import against_peak  # noqa: E402  (the same sgemm peak as every benchmark)

from tuneforge.models.lm_loss import next_token_loss_of
from tuneforge.plugins.sft.examples import IGNORE, packed_batches, padded_batch, padded_batches, read_examples
from tuneforge.plugins.sft.plugin import Sft

TARGET = {"padding_share": 0.35, "useful_tokens_ratio": 1.5}
LOSS_TOL = 1e-4  # packed and padded forward of the same records (float32; measured ~1e-6)
RANK, ALPHA, LR = 16, 32.0, 1e-4
WORDS = ("the a of to and in is it that for on with as was at by this from be or an are not have one all can "
         "which there their when what your more about how some would other into time only could these two may "
         "first then do any like my now over such our man me even most made after also did many before must "
         "through back years where much way well down should because each just those people how too little "
         "state good very make world still own see men work long get here between both life being under never "
         "day same another know while last might us great old year off come since against go came right used "
         "take three river garden window market letter question answer morning winter bridge station").split()
SIDES = ("padded", "packed")


def write_records(path: Path, n: int, tokens_per_word: float, median: int, spread: float, longest: int,
                  seed: int) -> None:
    """``n`` JSONL records whose token lengths are log-normal (``median``, sigma ``spread``), clipped to 16 ..
    ``longest``."""
    rng = random.Random(seed)

    def text(tokens: float) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, round(tokens / tokens_per_word))))

    with path.open("w") as f:
        for i in range(n):
            total = min(max(16.0, rng.lognormvariate(math.log(median), spread)), longest)
            answer = total * rng.uniform(0.2, 0.7)  # the answer's share of the record
            if i % 4 == 3:  # a chat: system, question, answer, follow-up, answer
                q = (total - answer) / 2
                rec = {"messages": [{"role": "system", "content": "answer briefly"},
                                    {"role": "user", "content": text(q)},
                                    {"role": "assistant", "content": text(answer / 2)},
                                    {"role": "user", "content": text(q)},
                                    {"role": "assistant", "content": text(answer / 2)}]}
            else:
                rec = {"prompt": text(total - answer), "completion": text(answer)}
            f.write(json.dumps(rec) + "\n")


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matrix products: every nn.Linear's weight (a tied head counted once, as the
    product it is; embeddings are lookups)."""
    seen, n = set(), 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n += m.weight.numel()
    return n


def build(args):
    """(model, its trainable parameters, tokenizer, FLOPs per useful token, description)."""
    from tuneforge.models import factory
    from tuneforge.models.tokenizer import tokenizer_of
    if not args.real:
        model, _ = factory.build(args.model, seed=0)
        model.train()
        return model, list(model.parameters()), tokenizer_of(model), 6 * matmul_params(model), \
            f"embedded {args.model}, full fine-tune"
    from tuneforge.plugins.lora import add_lora, lora_layers
    model, _ = factory.build("smollm2-135m", seed=0)
    add_lora(model, "default", targets=["q", "k", "v", "o"], rank=RANK, alpha=ALPHA, seed=0)
    model.requires_grad_(False)
    params = [p for _, m in lora_layers(model) for p in m.part_parameters("default")]
    for p in params:
        p.requires_grad_(True)
    model.train()
    return model, params, model.tokenizer, 4 * matmul_params(model), \
        f"SmolLM2-135M-Instruct, LoRA r{RANK} on q,k,v,o"


def examples_of(args, tokenizer):
    probe = " ".join(WORDS[:100])
    tokens_per_word = len(tokenizer.encode(probe)) / 100
    with tempfile.TemporaryDirectory(prefix="packing_") as tmp:
        path = Path(tmp) / "records.jsonl"
        write_records(path, args.records, tokens_per_word, args.median, args.spread, int(0.9 * args.seq),
                      args.seed)
        read = read_examples(str(path), "train", tokenizer, train_on="assistant", room=args.seq, truncate="left")
    return read.examples, read.truncated


def batch_streams(examples, args, pad_id):
    """Each side's batches of one pass (built when iterated, as a run draws them)."""
    return {"padded": lambda: padded_batches(examples, batch_size=args.batch, pad_id=pad_id, seed=args.seed,
                                             epoch=0),
            "packed": lambda: packed_batches(examples, batch_size=args.batch, width=args.seq, pad_id=pad_id,
                                             seed=args.seed, epoch=0)}


def shape_stats(streams) -> dict:
    """Per side: steps, useful tokens, all positions, and the share of positions that are padding."""
    out = {}
    for side, stream in streams.items():
        batches = list(stream())
        useful, positions = sum(b["tokens"] for b in batches), sum(b["input"].numel() for b in batches)
        out[side] = {"steps": len(batches), "useful_tokens": useful, "positions": positions,
                     "padding_share": 1 - useful / positions,
                     "trained_tokens": sum(b["trained_tokens"] for b in batches)}
    return out


def build_seconds(streams, repeats: int = 3) -> dict:
    """Median seconds to build each side's batches of a pass alone (the packer's Python cost)."""
    out = {}
    for side, stream in streams.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in stream():
                pass
            times.append(time.perf_counter() - t0)
        out[side] = sorted(times)[len(times) // 2]
    return out


def loss_check(model, params, examples, seq: int, pad_id: int) -> dict:
    """The same records as one padded batch and packed: loss per trained token and gradients from the same
    weights; their largest differences."""
    padded = padded_batch(examples, pad_id)
    packed = next(packed_batches(examples, batch_size=len(examples), width=seq, pad_id=pad_id, seed=0, epoch=0))
    results = []
    for batch in (padded, packed):
        for p in params:
            p.grad = None
        extra = {k: batch[k] for k in ("positions", "cu_seqlens") if k in batch}
        loss = next_token_loss_of(model, batch["input"], batch["target"], ignore_index=IGNORE, **extra)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in params]))
    for p in params:
        p.grad = None
    (la, ga), (lb, gb) = results
    grad = max((a - b).abs().max().item() for a, b in zip(ga, gb))
    scale = max(a.abs().max().item() for a in ga)
    return {"records": len(examples), "loss_padded": la, "loss_packed": lb, "loss_abs_diff": abs(la - lb),
            "grad_max_abs_diff": grad, "grad_max_abs": scale}


def pass_runner(model, params, stream):
    """One pass over the records: per batch the sft loss, backward, AdamW; returns the mean loss per trained
    token of the pass."""
    sft, opt = Sft(Sft.Options()), torch.optim.AdamW(params, lr=LR)

    def run() -> float:
        total = count = 0.0
        for batch in stream():
            loss, metrics = sft.tuneforge_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            total, count = total + loss.item() * metrics["trained_tokens"], count + metrics["trained_tokens"]
        return total / count

    return run


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct with LoRA (slow on a CPU)")
    ap.add_argument("--model", default=None, help="embedded preset (default small:max_seq_len=512)")
    ap.add_argument("--seq", type=int, default=None, help="packed row width and the longest record (default 512)")
    ap.add_argument("--batch", type=int, default=None, help="records (padded) or rows (packed) a step (default 8)")
    ap.add_argument("--records", type=int, default=None, help="records in a pass (default 192; --real 32)")
    ap.add_argument("--median", type=int, default=None, help="median record length in tokens (default 100)")
    ap.add_argument("--spread", type=float, default=0.75, help="sigma of the log-normal lengths (default 0.75)")
    ap.add_argument("--repeats", type=int, default=None, help="timed passes per side (default 3; --real 2)")
    ap.add_argument("--check", type=int, default=None, help="records in the loss check (default 12)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the JSON report here")
    ap.add_argument("--quick", action="store_true", help="tiny model, 32 records, 1 timed pass: a smoke test")
    args = ap.parse_args(argv)
    preset = dict(model="small:max_seq_len=512", seq=512, batch=8, records=192, median=100, repeats=3, check=12)
    if args.real:
        preset.update(batch=4, records=32, repeats=2, check=8)
    if args.quick:
        preset.update(model="tiny:n_layers=2,d_model=64,n_heads=2,max_seq_len=128", seq=128, batch=4, records=32,
                      median=28, repeats=1, check=6)
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.records -= args.records % args.batch  # the padded epoch drops an incomplete last batch: keep all
    return args


def measure(args) -> dict:
    model, params, tokenizer, flops_per_token, what = build(args)
    examples, truncated = examples_of(args, tokenizer)
    pad = tokenizer.pad_id
    check = loss_check(model, params, examples[:args.check], args.seq, pad)
    if check["loss_abs_diff"] > LOSS_TOL or check["grad_max_abs_diff"] > LOSS_TOL:
        raise SystemExit(f"packed and padded disagree on the same records ({check}): not the same computation, "
                         "no figures reported")
    streams = batch_streams(examples, args, pad)
    shapes = shape_stats(streams)
    if shapes["padded"]["useful_tokens"] != shapes["packed"]["useful_tokens"]:
        raise SystemExit(f"the two runs read different records: {shapes}")
    twin, twin_params, *_ = build(args)  # the packed side's model: built again from the same seeds
    if not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values())):
        raise SystemExit("the two builds of the model differ: the runs would not start from the same weights")
    runs = {"padded": pass_runner(model, params, streams["padded"]),
            "packed": pass_runner(twin, twin_params, streams["packed"])}
    t = shared.interleaved(runs, 1, args.repeats)
    lengths = sorted(len(e) for e in examples)
    report = {"model": what, "seq": args.seq, "batch": args.batch, "records": len(examples), "spread": args.spread,
              "record_tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]},
              "truncated": truncated, "loss_check": check, "build_s": build_seconds(streams), "sides": {}}
    for side in SIDES:
        s, row = t[side]["median_s"], shapes[side]
        row.update(pass_s=s, min_pass_s=t[side]["min_s"], useful_tokens_per_s=row["useful_tokens"] / s,
                   positions_per_s=row["positions"] / s, first_pass_loss=t[side]["losses"][0],
                   useful_gflops=flops_per_token * row["useful_tokens"] / s / 1e9)
        report["sides"][side] = row
    sides = report["sides"]
    report["ratio"] = sides["packed"]["useful_tokens_per_s"] / sides["padded"]["useful_tokens_per_s"]
    report["flops_per_useful_token"] = flops_per_token
    return report


def say(report: dict) -> None:
    c, sides = report["loss_check"], report["sides"]
    r = report["record_tokens"]
    print(f"{report['model']}: {report['records']} records of {r['min']}..{r['max']} tokens (median {r['median']}, "
          f"{report['truncated']} truncated), batch {report['batch']}, rows of {report['seq']}")
    print(f"  {report['machine']}; sgemm peak {report['sgemm_peak_gflops']:.1f} GFLOP/s "
          f"(measured {', '.join(f'{p:.1f}' for p in report['sgemm_peaks_measured'])})")
    print(f"  same records, same weights: loss per trained token padded {c['loss_padded']:.6f}, packed "
          f"{c['loss_packed']:.6f} (diff {c['loss_abs_diff']:.1e}); gradients max diff {c['grad_max_abs_diff']:.1e} "
          f"(largest {c['grad_max_abs']:.1e})")
    for side in SIDES:
        s = sides[side]
        print(f"  {side:6s}: {s['steps']:3d} steps, padding {s['padding_share']:6.1%}, pass {s['pass_s']:7.2f} s "
              f"(min {s['min_pass_s']:.2f}), {s['useful_tokens_per_s']:8.0f} useful tok/s "
              f"({s['positions_per_s']:.0f} positions/s), {s['useful_gflops']:.1f} useful GFLOP/s = "
              f"{s['fraction_of_peak']:.0%} of peak; first-pass loss {s['first_pass_loss']:.4f}; batches built in "
              f"{report['build_s'][side] * 1e3:.1f} ms")
    ok = (sides["padded"]["padding_share"] >= TARGET["padding_share"]
          and report["ratio"] >= TARGET["useful_tokens_ratio"])
    print(f"  useful tokens/s packed / padded: {report['ratio']:.2f}x at {sides['padded']['padding_share']:.1%} "
          f"padding (target >= {TARGET['useful_tokens_ratio']}x at >= {TARGET['padding_share']:.0%}: "
          f"{'met' if ok else 'NOT met'})")


def main(argv=None):
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # others' work: this process has not started computing yet
    if args.real:
        for name in ("transformers", "gguf"):
            if not shared.installed(name):
                print(f"skipped: --real needs {name} (pip install 'tuneforge[test]')")
                return
        shared.quiet_transformers()
    report = against_peak(lambda: measure(args), quick=args.quick, flops="useful_gflops", load_before=load_before)
    report.update(benchmark="packing", machine=shared.machine(torch.device("cpu")), target=TARGET)
    say(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
