"""``tuneforge demo``: the main job on the embedded default, one stage per mechanism, one table at the end.

Stages so far: pretrain the tiny model on ``builtin:text``, then sample from it. Later mechanisms add their
stages (fine-tune, prompt tuning, prompting, adapters, RLHF) to the same table and ``demo.json``.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import torch

from .engine import train
from .lm import TokenWindows, unigram_entropy
from .tokenizer import ByteTokenizer

__all__ = ["run_demo", "format_table"]

PROMPTS = ["review: the soup", "note: the rain", "mira walked"]


def format_table(rows: list[dict]) -> str:
    head = ["mechanism", "trainable params", "% of model", "seconds", "metric", "value"]
    body = [[r["mechanism"], f"{r['trainable_params']:,}", f"{r['trainable_pct']:.2f}", f"{r['seconds']:.1f}",
             r["metric"], f"{r['value']:.4f}"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def run_demo(out: str | Path, *, quick: bool = False, seed: int = 0) -> list[dict]:
    """Run every stage, print the table, write ``demo.json``; return its rows. Overwrites its own stage folders."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = ByteTokenizer()
    rows: list[dict] = []

    stage = out / "pretrain"
    shutil.rmtree(stage, ignore_errors=True)
    steps = 40 if quick else 600
    print(f"== pretrain: tiny model, {steps} steps on builtin:text (the embedded world)", file=sys.stderr)
    result = train(model="tiny", mechanisms=["pretrain"], data="builtin:text", steps=steps, batch_size=16,
                   lr=5e-3, warmup=min(30, steps // 4), eval_every=max(steps // 5, 1), seed=seed, out=str(stage))
    s = result.summary
    rows.append({
        "mechanism": "pretrain", "trainable_params": s["trainable_params"], "trainable_pct": s["trainable_pct"],
        "seconds": s["seconds"], "metric": "held-out bits/token", "value": result.metrics["eval/bits_per_token"],
    })

    from .world import builtin

    held_out = TokenWindows([r["text"] for r in builtin("text", split="test")], tok, seq_len=2)
    unigram = unigram_entropy(held_out.tokens) / math.log(2)
    model = result.model.eval()
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    samples = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt, bos=True)], device=model.lm_head.weight.device)
        new = model.generate(ids, 80, temperature=0.7, top_k=40, eos_id=tok.eos_id, generator=gen)
        samples.append(prompt + tok.decode(new[0, ids.size(1):].tolist()))
    (out / "samples.txt").write_text("\n".join(samples) + "\n")
    (out / "demo.json").write_text(json.dumps(rows, indent=2))

    print("\n" + format_table(rows))
    print(f"\n(unigram baseline: {unigram:.3f} bits/token; a model that learned nothing scores about that)")
    print("\nsamples (temperature 0.7, top-k 40):")
    for text in samples:
        print("  " + text.replace("\n", " | "))
    print(f"\nrows written to {out / 'demo.json'}; checkpoints in {stage}")
    return rows
