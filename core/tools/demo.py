"""``tuneforge demo``: the main job on the embedded default, one stage per mechanism, one table at the end.

pretrain (the tiny model on ``builtin:text``) -> fine-tune (classification head on the last 2 blocks, and all
blocks for reference) -> the head alone, and beside serial / parallel adapters and LoRA -> prompt tuning on the
bare input (two tasks, one frozen model, then both served in one mixed batch) -> prompting (the bare input; the
task's format zero-shot and 2-shot with right and wrong labels) -> instruction tuning (a LoRA and ``sft`` on
``builtin:instruct``, exact match against zero-shot) -> RLHF on ``builtin:rankings``: a reward model (ties modelled
and ignored), PPO with a LoRA policy against it, DPO (win rates judged by the hidden preference); those two stages
are in :mod:`tuneforge.tools.demo_assistant`, what stages share in :mod:`tuneforge.tools.demo_stage`.
Every row goes to the table and ``demo.json``; loss curves go to ``loss_curves.png`` when matplotlib is
installed (``pip install tuneforge[plot]``).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from tuneforge.engine.loop import train
from tuneforge.errors import ConfigError
from tuneforge.objectives.next_token import TokenWindows, unigram_entropy
from tuneforge.models.factory import PRESET, kind_of
from tuneforge.common.names import inside
from tuneforge.common.options import parse_spec
from tuneforge.parts.modules import names as part_names
from tuneforge.models.tokenizer import tokenizer_of
from tuneforge.tools.demo_assistant import rlhf_stages, sft_stage
from tuneforge.data.world import builtin
from tuneforge.tools.demo_report import judge, plot_curves, print_report, write_report
from tuneforge.tools.demo_stage import PRECISIONS, Demo, claim, demo_precision, format_table, row

__all__ = ["run_demo", "format_table"]

PROMPTS = ["review: the soup", "note: the rain", "mira walked"]
MODEL = "tiny:max_seq_len=256"  # the tiny preset with room for few-shot prompts
BARE = "{input} {label}"  # no task format: what a soft prompt has to make up for
# Virtual tokens and steps of the soft prompts. On the bare input the stage was fragile on AdamW-pretrained models
# (0.74-0.97 sentiment, 0.28-0.74 topic over seeds, whatever the prompt's length, initialisation or learning rate)
# and is not on Muon-pretrained ones (benchmarks/RESULTS.md, "Soft prompts on the bare input"): on the seed-1 model
# 0.982 / 0.954 after 150 steps, 0.998 / 0.992 after 300; seed 0, 200 steps in bf16-mixed: 1.0 / 0.98. 150 steps were
# too few: seed 1's topic prompt 0.878 and seed 2's sentiment prompt 0.840 after 150; 0.988 and 0.998 after 200.
PROMPT_TOKENS = 16
PROMPT_STEPS = 200
# Pretraining steps of 8 x 256 tokens. Muon on the hidden matrices reaches in 800 steps the held-out bits/token AdamW
# reached in 2,000 (0.289 and 0.285, lr 5e-3 both; 700 Muon steps: 0.297, 1,000: 0.283): benchmarks/RESULTS.md.
PRETRAIN_STEPS = 800
# Steps of the fine-tuning stages (batch 32): their training loss is flat by step 60-80 of 150, and 80-step runs on
# a Muon-pretrained model gave 1.0 (last 2 blocks, all), 0.994 and 1.0 (serial, parallel adapters). 60 steps were too
# few: the seed-2 model's adapters reached 0.892 / 0.870 after 60, 1.0 / 1.0 after 80.
FT_STEPS = 80


def run_demo(out: str | Path, *, quick: bool = False, seed: int = 0, model: str | None = None,
             precision: str = "auto") -> list[dict]:
    """Run every stage, print the table, write ``demo.json``; return its rows. Replaces its own stage folders in
    ``out``, which must be new, empty or an earlier demo's output (else :class:`ConfigError`, nothing changed).

    ``model="hf:PATH"`` (or ``gguf:PATH``, ``smollm2-135m``) tells the same story on a pretrained model: its first
    stage goes on pretraining the model's own weights on the world's text (every weight, a gentle learning rate),
    and every later stage starts from that, as they start from the pretrained tiny model by default."""
    if model is not None and kind_of(model) is PRESET:
        raise ConfigError(f"demo --model {model}: give a pretrained model (hf:PATH, gguf:PATH or smollm2-135m; see "
                          "tuneforge models); the embedded tiny model is the default")
    if precision not in PRECISIONS:
        raise ConfigError(f"demo --precision {precision}: choose one of {', '.join(PRECISIONS)}")
    out = Path(out)
    claim(out)
    d = Demo(out, quick, seed, demo_precision(precision))
    native = "this hardware multiplies bfloat16 natively" if d.precision != "fp32" else "bfloat16 is not native here"
    why = f"--precision {precision}" if precision != "auto" else f"auto: {native}"
    print(f"training precision: {d.precision} ({why})", file=sys.stderr)
    pre, result = _pretrain(d, model)
    base_params = result.summary["total_params"]
    d.samples += _samples(result.model.eval(), seed)
    ft = dict(init=str(pre), data="builtin:sentiment", batch_size=32, warmup=d.n(10, 2), **d.common)
    _finetune(d, ft)
    _parts(d, ft)
    _prompt_tuning(d, ft, pre, base_params)
    result = _prompting(d, pre)
    sft_stage(d, pre)
    rlhf_stages(d, pre)
    d.end()

    judge(d.rows, quick)
    inside(out, "demo.json").write_text(json.dumps(d.rows, indent=2))
    plotted = plot_curves(d.curves, inside(out, "loss_curves.png"))
    inside(out, "samples.txt").write_text("\n".join(d.samples) + "\n")
    held_out = TokenWindows([r["text"] for r in builtin("text", split="test")], tokenizer_of(result.model), seq_len=2)
    unigram = unigram_entropy(held_out.tokens) / math.log(2)
    write_report(out, d.rows, d.times, d.samples, plotted, seed=seed, quick=quick, unigram=unigram,
                 precision=d.precision)
    print_report(d.rows, d.samples, out, plotted, unigram, d.times, quick)
    return d.rows


def _pretrain(d: Demo, model: str | None):
    """The first stage: the tiny model pretrained on the world's text, or an HF model's own weights trained on
    further. Returns (its run folder, its result)."""
    steps = d.n(PRETRAIN_STEPS, 40)
    if model is not None and kind_of(model) is not PRESET:  # a pretrained model: hf:PATH, gguf:PATH, smollm2-135m
        pre = d.stage("pretrain", f"{model}: its own weights, {steps} more steps on builtin:text (the world)")
        result = train(model=model, mechanisms=["finetune:layers=all"], data="builtin:text", steps=steps,
                       batch_size=8, lr=2e-4, warmup=min(30, steps // 4), out=str(pre), **d.common)
        label = "continued pretraining (all layers)"
    else:
        pre = d.stage("pretrain", f"the tiny model, {steps} steps of Muon on builtin:text (the embedded world)")
        result = train(model=model or MODEL, mechanisms=["pretrain"], data="builtin:text", steps=steps, batch_size=8,
                       lr=5e-3, warmup=min(30, steps // 4), optimizer="muon", out=str(pre), **d.common)
        label = "pretrain"
    d.add(row(label, result, "held-out bits/token", "eval/bits_per_token"), "pretrain", result)
    return pre, result


def _finetune(d: Demo, ft: dict) -> None:
    """A classification head on the last 2 blocks, and every weight for reference."""
    folder = d.stage("finetune", "classification head on the last 2 blocks, builtin:sentiment")
    result = train(mechanisms=["finetune:layers=2,head=classify"], steps=d.n(FT_STEPS, 10), lr=1e-3,
                   out=str(folder), **ft)
    d.add(row("finetune (last 2 blocks + head)", result, "sentiment accuracy", "eval/accuracy"), "finetune last 2",
          result)
    folder = d.stage("finetune-all", "every weight, the full fine-tuning reference")
    result = train(mechanisms=["finetune:layers=all,head=classify"], steps=d.n(FT_STEPS, 10), lr=5e-4,
                   out=str(folder), **ft)
    d.add(row("finetune (all layers + head)", result, "sentiment accuracy", "eval/accuracy"), "finetune all", result)


def _parts(d: Demo, ft: dict) -> None:
    """Adapters and LoRA train a few percent of the weights beside the same new head; the head alone (a linear
    probe of the frozen model) is the row that shows what they add. Parts that fold into the weights (their
    plugin says so) are folded in and out again, and the largest output difference is recorded."""
    folder = d.stage("head-only", "only the new head trains (a linear probe of the frozen model)")
    result = train(mechanisms=["finetune:layers=0,head=classify"], steps=d.n(FT_STEPS, 10), lr=1e-3,
                   out=str(folder), **ft)
    d.add(row("finetune (head only)", result, "sentiment accuracy", "eval/accuracy"), None, result)
    for name, label, mechanism in (
            ("adapter-serial", "adapter (serial) + head", "adapter:placement=serial"),
            ("adapter-parallel", "adapter (parallel) + head", "adapter:placement=parallel,scale=4"),
            ("lora", "lora (rank 8 on q, v) + head", "lora:rank=8,targets=q,v")):
        folder = d.stage(name, f"{mechanism} beside a new head; the base model stays frozen")
        result = train(mechanisms=[mechanism, "finetune:layers=0,head=classify"], steps=d.n(FT_STEPS, 10), lr=3e-3,
                       out=str(folder), **ft)
        d.add(row(label, result, "sentiment accuracy", "eval/accuracy"), label.split(" +")[0], result)
        folds = [p for p in result.run.plugins.values() if callable(getattr(p, "fold_into_base", None))]
        if folds:
            d.rows[-1]["merged_max_abs_diff"] = _merge_gap(result.model, folds[0], name)


def _prompt_tuning(d: Demo, ft: dict, pre: Path, base_params: int) -> None:
    """Soft prompts on the bare input ("{input} {label}"): without the task's own format the frozen model is at
    chance (the prompting rows show it), so what the soft prompt's vectors learn is the whole difference. Then
    both prompts on one model, serving a mixed batch."""
    prompt_runs, load = {}, None
    for task in ("sentiment", "topic"):
        folder = d.stage(f"prompt-{task}", f"a {PROMPT_TOKENS}-token soft prompt for {task} on the bare input; "
                                           "the model stays frozen")
        spec = f"prompt-tuning:tasks={task},tokens={PROMPT_TOKENS},template={BARE}"
        result = train(mechanisms=[spec], steps=d.n(PROMPT_STEPS, 10), lr=0.1, **{**ft, "data": f"builtin:{task}"},
                       out=str(folder))
        d.add(row(f"prompt-tuning ({task})", result, f"{task} accuracy", "eval/accuracy", base_params),
              f"prompt-tuning {task}", result)
        prompt_runs[task] = folder
        load = type(result.run.plugins[parse_spec(spec)[0]]).load_frozen  # the plugin's own loader: no import
    d.stage("mixed-batch", "both soft prompts loaded on one model, rows of both tasks in one batch")
    d.add(_mixed_batch(pre, prompt_runs, base_params, limit=d.n(250, 64), load=load))


def _prompting(d: Demo, pre: Path):
    """Prompting on the bare input and in the task's own format, zero- and 2-shot; nothing trains. Returns the
    last stage's result."""
    folder = d.stage("prompting-bare", "the same bare input without a soft prompt; nothing trains")
    result = train(init=str(pre), mechanisms=[f"prompting:template={BARE},limit={d.n(300, 40)}"],
                   data="builtin:sentiment", out=str(folder), seed=d.seed)
    d.add(row("prompting (zero-shot, bare input)", result, "sentiment accuracy", "eval/accuracy"))

    folder = d.stage("prompting", "the task's own format, 2-shot with right and with wrong labels; nothing "
                    "trains")
    result = train(init=str(pre), mechanisms=[f"prompting:shots=2,limit={d.n(300, 40)},generate=3"],
                   data="builtin:sentiment", out=str(folder), seed=d.seed)
    assert result.summary["frozen_weights"]["unchanged"], "prompting changed a weight"
    for label, key in (("zero-shot, task format", "eval/accuracy_zero_shot"), ("2-shot, right labels", "eval/accuracy"),
                       ("2-shot, wrong labels", "eval/accuracy_wrong_labels")):
        d.add(row(f"prompting ({label})", result, "sentiment accuracy", key))
    return result


def _mixed_batch(pre: Path, runs: dict[str, Path], base_params: int, limit: int, load) -> dict:
    """Both prompts on one frozen model (``load(model, *run_folders)``: the prompt plugin's loader); held-out rows
    of both tasks interleaved in one batch, scored in one forward pass each, against each task's rows scored
    alone."""
    from tuneforge.objectives.classify import score_candidates
    from tuneforge.engine.loop import load_model
    from tuneforge.data.labelled import Template, verbalizer
    from tuneforge.data.world import LABELS, builtin

    started = time.perf_counter()
    model = load_model(pre)
    tok = tokenizer_of(model)
    load(model, *map(str, runs.values()))
    rows = []  # (task, prompt ids, candidate ids, label index)
    for task in runs:
        template = Template(BARE, owner="demo")
        words = verbalizer(None, LABELS[task], f"builtin:{task}", owner="demo")
        cands = [tok.encode(words[lb]) for lb in LABELS[task]]
        for r in builtin(task, "test")[:limit]:
            rows.append((task, tok.encode(template.prompt(r["text"]), bos=True), cands, LABELS[task].index(r["label"])))
    rows = [rows[i] for i in sorted(range(len(rows)), key=lambda i: (i % limit, i))]  # interleave the tasks

    def score(rs):
        return score_candidates(model, [r[1] for r in rs], [r[2] for r in rs], tasks=[r[0] for r in rs],
                                pad_id=tok.pad_id, device=torch.device("cpu"))

    mixed = score(rows)
    seconds = time.perf_counter() - started
    alone = {}
    for task in runs:
        mine = [i for i, r in enumerate(rows) if r[0] == task]
        alone.update(zip(mine, score([rows[i] for i in mine])))
    gap = max(abs(a - b) for i, s in enumerate(mixed) for a, b in zip(s, alone[i]))
    right = [max(range(len(s)), key=s.__getitem__) == r[3] for s, r in zip(mixed, rows)]
    print(f"mixed batch of {len(rows)} rows ({', '.join(runs)}): largest difference from each task alone "
          f"{gap:.2e} (log-likelihood)", file=sys.stderr)
    return {"mechanism": "prompt-tuning (both, one mixed batch)", "trainable_params": 0, "trainable_pct": 0.0,
            "seconds": round(seconds, 3), "metric": "accuracy, both tasks", "value": sum(right) / len(right),
            "max_abs_diff_vs_alone": gap, "soft_prompt_params": sum(p.numel() for p in model.prefix.parameters()),
            "soft_prompt_pct": 100.0 * sum(p.numel() for p in model.prefix.parameters()) / base_params}


def _merge_gap(model, plugin, name: str) -> float:
    """Largest output difference between the parts beside the weights and folded into them (then taken out), by
    the plugin's own ``fold_into_base`` / ``unfold_from_base`` (see :mod:`tuneforge.tools.hf_export`)."""
    parts = part_names(model).get(plugin.fold_kind, [])
    ids = torch.randint(0, min(256, model.config.vocab_size), (8, min(64, model.config.max_seq_len)),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.eval()(ids)
        plugin.fold_into_base(model, parts)
        merged = model(ids)
        plugin.unfold_from_base(model, parts)
        after = model(ids)
    gap = max((merged - before).abs().max().item(), (after - before).abs().max().item())
    print(f"{name} merged into the weights and taken out again: largest output difference {gap:.2e}", file=sys.stderr)
    return gap


def _samples(model, seed: int) -> list[str]:
    tok = tokenizer_of(model)
    device = model.lm_head.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt, bos=True)], device=device)
        new = model.generate(ids, 80, temperature=0.7, top_k=40, eos_id=tok.eos_id, generator=gen)
        out.append(prompt + tok.decode(new[0, ids.size(1):].tolist()))
    return out
