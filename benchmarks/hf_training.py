"""LoRA training on a Hugging Face GPT-2 model: tuneforge against transformers + PEFT, side by side in one run.

    python benchmarks/hf_training.py [--d-model 256] [--layers 6] [--heads 8] [--context 256] [--vocab 2048]
                                     [--batch 8] [--seq 256] [--repeats 10] [--device cpu|cuda] [--json PATH]
    python benchmarks/hf_training.py --quick   # tiny sizes: a smoke test, well under 30 s

Why: someone with a transformers model who fine-tunes it through tuneforge (``--model hf:PATH``) rather than with
transformers + PEFT, the stack they would otherwise reach for, should not pay for it in speed or memory. This
measures that on one LoRA training step (forward, next-token cross-entropy, backward, AdamW on the LoRA
parameters only):

(a) tuneforge: ``tuneforge.models.hf.load(folder)`` (attention through tuneforge's fused op), ``add_lora`` rank 8 on
    q,v (GPT-2's fused ``attn.c_attn``), alpha 16: the ``lora_linear`` kernel;
(b) transformers + PEFT: ``AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")`` and
    ``peft.get_peft_model`` with ``LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True,
    lora_dropout=0.0)`` (PEFT's default GPT-2 target). Skipped, with a message, when peft is not installed.

Apples to apples: both load the same folder (a random GPT-2-style model written on the spot by
``tuneforge.tools.hf_tiny.make_tiny``, or ``--folder`` for one of yours), PEFT's LoRA A is overwritten with tuneforge's
(B = 0 on both), both see the same seeded random token batches in the same order and use the same AdamW
settings. The script checks that the first-batch losses agree (same weights, B = 0) and that the second-step
losses agree too (the LoRA gradients and the optimizer step matched), and stops if they do not.

Speed: tokens/s = batch x seq over the median step time of ``--repeats`` timed steps, after ``--warmup`` steps,
both models in one process, steps interleaved (tuneforge, PEFT, tuneforge, ...) so drift on a shared machine hits
both alike. Memory: each side in a fresh subprocess of its own (so neither sees the other's allocations): one
warm-up step (one-time library set-up such as thread pools or the cuBLAS workspace, and AdamW's state, which is
2 x the LoRA parameters on both sides), then ``--mem-steps`` measured steps. On CUDA:
``torch.cuda.max_memory_allocated`` during those steps minus the allocation before them. On the CPU: the process's
peak resident set during those steps (``VmHWM``, reset just before them through ``/proc/self/clear_refs``) minus
its resident set before them (after imports, model load, data, the warm-up step and ``malloc_trim``). There glibc
is told to map every block of 64 KiB or more on its own (``MALLOC_MMAP_THRESHOLD_``), so the resident set follows
the live tensors, not heap slack: with glibc's default the same steps read about 500 MiB instead of 330 MiB at
the default sizes, and moved by 30 MiB between runs. Either way the figure is what a training step needs on top
of the loaded model: activations kept for backward, gradients, temporaries. The last line printed is one JSON
object.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rss  # noqa: E402  (the peak-RSS method shared by the benchmarks)

RANK, ALPHA, LR = 8, 16.0, 1e-3
ADAPTER = "default"  # PEFT's adapter name; tuneforge's LoRA is given the same one
# First- and second-step losses must agree this closely (float32: different kernels, same math).
LOSS_TOL = {"float32": 1e-4, "bfloat16": 5e-2}
PEFT_SKIPPED = "transformers + PEFT: skipped (peft is not installed: pip install peft)"
SIDES = ("tuneforge", "peft")
LABEL = {"tuneforge": "tuneforge", "peft": "transformers + PEFT"}


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def quiet_transformers() -> None:
    """No 'Loading weights' progress bars: they would bury the table."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# -- the model folder and the data ----------------------------------------------------------------------------


def write_folder(folder: Path, args) -> Path:
    """A random GPT-2-style model of exactly the asked size, in the layout ``save_pretrained`` writes."""
    import transformers
    from tuneforge.tools.hf_tiny import make_tiny
    make_tiny(folder, "gpt2", d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, context=args.context,
              vocab_size=args.vocab, seed=args.seed)
    # make_tiny's tokenizer stops growing when its small corpus runs out of merges (2048 asked -> ~800), and the
    # model's vocabulary follows it. The batches are random ids, so the tokenizer does not matter here but the
    # vocabulary size does (the LM head is a large share of the step): rewrite the weights at the asked size.
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if config.vocab_size != args.vocab:
        config.vocab_size = args.vocab
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    return folder


def folder_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def batches(args, vocab: int, device) -> list[torch.Tensor]:
    """``--batches`` distinct (batch, seq) random-token batches from a fixed seed; every side cycles through the
    same ones in the same order (more distinct batches would only cost memory, not change the work)."""
    g = torch.Generator().manual_seed(args.seed)
    return [torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device) for _ in range(args.batches)]


# -- the two sides --------------------------------------------------------------------------------------------


def build_tuneforge(folder: Path, args, device):
    """(model, trainable params, forward); LoRA on q,v with A drawn by tuneforge and B = 0."""
    from tuneforge.models import hf
    from tuneforge.plugins.lora import lora_layers
    from tuneforge.plugins.lora import add_lora
    model = hf.load(folder, attn=args.attn, dtype=args.dtype, device=device)
    add_lora(model, ADAPTER, targets=["q", "v"], rank=RANK, alpha=ALPHA, seed=args.seed)
    model.requires_grad_(False)
    params = [p for _, m in lora_layers(model) for p in m.part_parameters(ADAPTER)]
    for p in params:
        p.requires_grad_(True)
    return model.train(), params, lambda x: model(x)


def lora_a(model) -> dict[str, torch.Tensor]:
    """tuneforge's LoRA A per adapted module path (the transformers path: the wrapper keeps transformers' names)."""
    from tuneforge.plugins.lora import lora_layers
    return {path: m.lora_a[ADAPTER].detach().float().cpu() for path, m in lora_layers(model)}


def build_peft(folder: Path, args, device, a_by_path: dict[str, torch.Tensor]):
    """(model, trainable params, forward); PEFT's LoRA with tuneforge's A copied in (B = 0 on both)."""
    import peft
    import transformers
    # PEFT 0.21 calls a transformers 5 method deprecated in favour of another: noise in the benchmark's output.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), local_files_only=True, attn_implementation="sdpa", dtype=getattr(torch, args.dtype))
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["c_attn"], fan_in_fan_out=True,
                             lora_dropout=0.0)
    # autocast_adapter_dtype=False: PEFT would otherwise keep bf16 models' adapters in float32, tuneforge keeps
    # them in the model's dtype; same dtype on both sides (no effect in float32).
    model = peft.get_peft_model(base, config, autocast_adapter_dtype=False).to(device)
    adapted = {}
    for path, module in model.named_modules():
        if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and ADAPTER in module.lora_A:
            adapted[path.removeprefix("base_model.model.")] = module
    if sorted(adapted) != sorted(a_by_path):
        raise SystemExit(f"PEFT adapted {sorted(adapted)}, tuneforge {sorted(a_by_path)}: not the same layers")
    with torch.no_grad():
        for path, module in adapted.items():
            module.lora_A[ADAPTER].weight.copy_(a_by_path[path])  # (r, in) on both sides
            if module.lora_B[ADAPTER].weight.abs().max() != 0:
                raise SystemExit("PEFT's LoRA B does not start at zero")
    params = [p for p in model.parameters() if p.requires_grad]
    return model.train(), params, lambda x: model(input_ids=x).logits


def next_token_loss(logits, x):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1))


def stepper(params, forward, data, device):
    """One training step per call, cycling through ``data``; returns the step's loss."""
    opt = torch.optim.AdamW(params, lr=LR)  # torch's defaults otherwise: betas (0.9, 0.999), weight decay 0.01
    state = {"i": 0}

    def step() -> float:
        x = data[state["i"] % len(data)]
        state["i"] += 1
        loss = next_token_loss(forward(x), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()  # what a training loop logs; also a host sync, on both sides alike

    return step


# -- memory: one side per fresh process -----------------------------------------------------------------------


def worker(args) -> None:
    """Measure one side's memory in this (fresh) process; print one JSON line."""
    device = torch.device(args.device)
    folder = Path(args.folder)
    quiet_transformers()
    data = batches(args, folder_config(folder)["vocab_size"], device)
    if args.worker == "tuneforge":
        _, params, forward = build_tuneforge(folder, args, device)
    else:
        _, params, forward = build_peft(folder, args, device, torch.load(args.lora_a))
    step = stepper(params, forward, data, device)
    # One unmeasured step: one-time set-up (thread pools, cuBLAS workspace) and AdamW's state are not the step's.
    # It advances through the data, so the measured steps' first loss is the second step's of the main process.
    warm_loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        losses = [step() for _ in range(args.mem_steps)]
        peak = torch.cuda.max_memory_allocated()
        measure = ("torch.cuda.max_memory_allocated during the steps minus memory_allocated before them (after "
                   "model load, data and one warm-up step)")
    else:
        rss.trim_heap()
        exact = rss.reset_peak()
        before = rss.status_bytes("VmRSS")
        losses = [step() for _ in range(args.mem_steps)]
        if exact:
            peak = rss.status_bytes("VmHWM")
            measure = ("peak resident set during the steps (VmHWM reset before them) minus the resident set before "
                       "them (after imports, model load, data, one warm-up step, malloc_trim)"
                       + (", blocks over 64 KiB mmapped" if os.environ.get("MALLOC_MMAP_THRESHOLD_") == rss.MMAP_BYTES
                          else ""))
        else:  # no clear_refs: ru_maxrss is the lifetime peak, so it may include a transient peak of loading
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            measure = "ru_maxrss (lifetime peak, may include loading) minus the resident set before the steps"
    print(json.dumps({"side": args.worker, "losses": [warm_loss, *losses], "loaded_mib": before / 2**20,
                      "peak_mib": peak / 2**20, "step_mib": (peak - before) / 2**20, "measure": measure}))


def measure_memory(side: str, folder: Path, a_file: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--folder", str(folder),
           "--lora-a", str(a_file)]
    for key in ("batch", "seq", "batches", "seed", "device", "dtype", "attn", "mem_steps", "threads"):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ)
    if args.device == "cpu":  # freed tensors go straight back to the OS: the resident set tracks live memory
        env["MALLOC_MMAP_THRESHOLD_"] = rss.MMAP_BYTES
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"the {side} memory subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the comparison -------------------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


def interleaved(steps: dict, warmup: int, repeats: int) -> dict:
    """Per side: the warm-up losses and the median seconds per step of ``repeats`` interleaved timed steps."""
    losses = {k: [] for k in steps}
    for _ in range(warmup):
        for k, step in steps.items():
            losses[k].append(step())
    times = {k: [] for k in steps}
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t0)
    return {k: {"losses": losses[k], "median_s": statistics.median(times[k]), "min_s": min(times[k])} for k in steps}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=None, help="default 256")
    ap.add_argument("--layers", type=int, default=None, help="default 6")
    ap.add_argument("--heads", type=int, default=None, help="default 8")
    ap.add_argument("--context", type=int, default=None, help="default 256")
    ap.add_argument("--vocab", type=int, default=None, help="default 2048")
    ap.add_argument("--folder", default=None, help="a GPT-2 model folder of yours instead of a random one made here")
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default 8)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default: the context)")
    ap.add_argument("--batches", type=int, default=4, help="distinct random batches cycled through")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per side first (default 3; >= 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per side (default 10)")
    ap.add_argument("--mem-steps", type=int, default=None, help="steps run in each memory subprocess (default 3)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--attn", default="tuneforge", choices=["tuneforge", "sdpa", "eager"],
                    help="tuneforge side's attention (default its fused op); PEFT's side always runs sdpa")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the JSON report here")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 timed steps: checks the script, not the speed")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side's memory
    ap.add_argument("--lora-a", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    quick = dict(d_model=64, layers=2, heads=4, context=64, vocab=512, batch=2, seq=32, warmup=2, repeats=2,
                 mem_steps=2)
    full = dict(d_model=256, layers=6, heads=8, context=256, vocab=2048, batch=8, seq=None, warmup=3, repeats=10,
                mem_steps=3)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)

    if not installed("transformers"):
        print("skipped: this benchmark needs Hugging Face transformers (pip install 'tuneforge[hf]')")
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if args.warmup < 2 or args.mem_steps < 1:
        ap.error("--warmup must be at least 2 (the first two steps are the loss checks), --mem-steps at least 1")
    device = torch.device(args.device)
    quiet_transformers()
    has_peft = installed("peft")
    load_avg = os.getloadavg()  # a busy machine (another job on these cores) shows here first

    with tempfile.TemporaryDirectory(prefix="hf_training_") as tmp:
        if args.folder:
            folder = Path(args.folder).expanduser().resolve()
            if folder_config(folder).get("model_type") != "gpt2":
                ap.error(f"--folder {folder}: a GPT-2 model is needed (PEFT's target here is GPT-2's c_attn)")
        else:
            folder = write_folder(Path(tmp) / "model", args)
        cfg = folder_config(folder)
        context = cfg.get("n_positions") or cfg["n_ctx"]
        args.seq = args.seq or context
        if args.seq > context:
            ap.error(f"--seq {args.seq} exceeds the model's context of {context}")
        data = batches(args, cfg["vocab_size"], device)
        tokens = args.batch * args.seq

        tf_model, tf_params, tf_forward = build_tuneforge(folder, args, device)
        a_file = Path(tmp) / "lora_a.pt"
        torch.save(lora_a(tf_model), a_file)
        steps = {"tuneforge": stepper(tf_params, tf_forward, data, device)}
        trainable = {"tuneforge": sum(p.numel() for p in tf_params)}
        n_params = sum(p.numel() for p in tf_model.parameters())
        if has_peft:
            _, peft_params, peft_forward = build_peft(folder, args, device, torch.load(a_file))
            steps["peft"] = stepper(peft_params, peft_forward, data, device)
            trainable["peft"] = sum(p.numel() for p in peft_params)
            if trainable["peft"] != trainable["tuneforge"]:
                raise SystemExit(f"trainable parameters differ: {trainable}")

        # Fallbacks of tuneforge's attention to transformers' warn (once); catch them, so the table says whether
        # side (a) really ran the fused op.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = interleaved(steps, args.warmup, args.repeats)
        fallbacks = sorted({str(w.message) for w in caught if "falls back" in str(w.message)})
        for w in caught:  # anything else is shown as it would have been
            if "falls back" not in str(w.message):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)

        tol = LOSS_TOL[args.dtype]
        check = {"first_loss": {k: v["losses"][0] for k, v in t.items()},
                 "second_loss": {k: v["losses"][1] for k, v in t.items()}, "tolerance": tol}
        if has_peft:
            check["first_loss_diff"] = abs(t["tuneforge"]["losses"][0] - t["peft"]["losses"][0])
            check["second_loss_diff"] = abs(t["tuneforge"]["losses"][1] - t["peft"]["losses"][1])

        memory = {k: measure_memory(k, folder, a_file, args) for k in steps}
        for k, m in memory.items():  # a fresh process, the same batches and weights: the same first two losses
            check.setdefault("memory_process_loss_diff", {})[k] = max(abs(m["losses"][i] - t[k]["losses"][i])
                                                                      for i in range(2))

    rows = {}
    for k in steps:
        rows[k] = {"ms_per_step": t[k]["median_s"] * 1e3, "tokens_per_s": tokens / t[k]["median_s"],
                   "best_tokens_per_s": tokens / t[k]["min_s"], "trainable_params": trainable[k],
                   "step_mib": memory[k]["step_mib"], "loaded_mib": memory[k]["loaded_mib"],
                   "peak_mib": memory[k]["peak_mib"], "first_loss": check["first_loss"][k]}
    ratio = None
    if has_peft:
        ratio = {"tokens_per_s": rows["tuneforge"]["tokens_per_s"] / rows["peft"]["tokens_per_s"],
                 "step_mib": rows["tuneforge"]["step_mib"] / rows["peft"]["step_mib"]}

    from tuneforge import kernels
    import transformers
    backend = kernels.backend()
    mem_word = "allocated" if device.type == "cuda" else "RSS"
    print(f"machine: {machine(device)}, load average {load_avg[0]:.2f} at start; transformers "
          f"{transformers.__version__}" + (f", peft {importlib.import_module('peft').__version__}" if has_peft else "")
          + f"; tuneforge kernels: attention {backend.get('flash_attention')}, LoRA {backend.get('lora_linear')}")
    print(f"model: {'GPT-2 folder ' + str(folder) if args.folder else 'random GPT-2-style'} (d_model {cfg['n_embd']}, "
          f"{cfg['n_layer']} layers, {cfg['n_head']} heads, context {context}, vocab {cfg['vocab_size']}, "
          f"{n_params:,} parameters, {args.dtype}) on {device.type}")
    print(f"step: LoRA r={RANK} alpha {ALPHA:g} on c_attn (q,v), {trainable['tuneforge']:,} trainable; batch "
          f"{args.batch} x {args.seq} = {tokens:,} tokens; next-token cross-entropy, backward, AdamW lr {LR:g}")
    print(f"timing: median of {args.repeats} interleaved steps per side after {args.warmup} warm-up steps each; "
          f"memory: each side in its own process, 1 warm-up + {args.mem_steps} measured steps, "
          f"{memory['tuneforge']['measure']}")
    fl = check["first_loss"]
    if has_peft:
        print(f"loss check: first batch tuneforge {fl['tuneforge']:.6f} vs PEFT {fl['peft']:.6f} (diff "
              f"{check['first_loss_diff']:.1e}); second step diff {check['second_loss_diff']:.1e}; memory processes "
              f"reproduce both (max diff {max(check['memory_process_loss_diff'].values()):.1e}); tolerance {tol:g}")
    else:
        print(f"loss check: first batch tuneforge {fl['tuneforge']:.6f} (no PEFT side to compare)")
    print(f"\n| side | attention | ms/step | tokens/s | step peak above loaded ({mem_word}) | loaded ({mem_word}) |")
    print("| --- | --- | --- | --- | --- | --- |")
    attn = {"tuneforge": "tuneforge fused" if args.attn == "tuneforge" else args.attn, "peft": "sdpa"}
    for k, r in rows.items():
        print(f"| {LABEL[k]} | {attn[k]} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {r['step_mib']:.1f} MiB "
              f"| {r['loaded_mib']:.1f} MiB |")
    if ratio:
        print(f"| ratio tuneforge / PEFT | | | {ratio['tokens_per_s']:.2f}x | {ratio['step_mib']:.2f}x | |")
        print("\ntokens/s: > 1 means tuneforge is faster; memory: < 1 means tuneforge's step needs less")
    else:
        print(f"\n{PEFT_SKIPPED}")
    for message in fallbacks:
        print(f"note: {message}")

    report = {"benchmark": "hf_training", "machine": machine(device), "load_average_at_start": load_avg[0],
              "device": device.type, "dtype": args.dtype, "quick": args.quick, "folder": args.folder,
              "model": {"d_model": cfg["n_embd"], "n_layers": cfg["n_layer"], "n_heads": cfg["n_head"],
                        "context": context, "vocab": cfg["vocab_size"], "params": n_params},
              "batch": args.batch, "seq": args.seq, "warmup": args.warmup, "repeats": args.repeats,
              "mem_steps": args.mem_steps, "attn": args.attn, "kernels": backend, "peft_installed": has_peft,
              "memory_measure": memory["tuneforge"]["measure"], "loss_check": check, "rows": rows, "ratio": ratio,
              "attention_fallbacks": fallbacks}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    bad = [f"{k} {check[k]:.3g}" for k in ("first_loss_diff", "second_loss_diff") if check.get(k, 0) > tol]
    bad += [f"the {k} memory process's losses differ by {d:.3g}"
            for k, d in check["memory_process_loss_diff"].items() if d > tol]
    if bad:
        raise SystemExit(f"the two sides do not compute the same step ({'; '.join(bad)}): the comparison is void")


if __name__ == "__main__":
    main()
