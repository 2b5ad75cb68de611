"""The ``tuneforge`` command: train, generate, chat, plugins, models, data, export-peft, export-hf, kernels,
hf-tiny, new-plugin, demo."""
from __future__ import annotations

import argparse
import json
import os
import sys

from tuneforge.engine.config import FIELD_HELP, TrainConfig, load_config
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.tools import chat, demo_stage

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneforge",
        description="Train or steer a language model; every mechanism (pretrain, lora, ...) is a plugin.",
        epilog="Start with 'tuneforge demo', then 'tuneforge train --help'.",
    )
    plugins = parser.add_argument_group("plugin loading (for every command; also TUNEFORGE_LOAD_PLUGINS and "
                                        "TUNEFORGE_STRICT_PLUGINS)")
    plugins.add_argument("--no-plugins", action="store_true",
                         help="load only tuneforge's built-in plugins: no installed third-party package is imported")
    plugins.add_argument("--plugins", metavar="NAME,...",
                         help="load only these third-party plugins (an allowlist; built-ins always load)")
    plugins.add_argument("--strict-plugins", action="store_true",
                         help="fail when any installed plugin cannot be imported, instead of skipping it")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train", help="train with one or more mechanisms",
        description="Train a model. Mechanisms are plugins, named with -m NAME[:key=value,...]; a run has exactly "
        "one objective (e.g. pretrain) and any number of parameterisations. Flags override --config.",
        epilog="example: tuneforge train -m pretrain --data builtin:text --steps 600 --out runs/pre",
    )
    t.add_argument("--config", metavar="FILE.toml", help="TOML file with these options and [mechanisms.NAME] tables")
    t.add_argument("-m", "--mechanism", action="append", metavar="NAME[:k=v,...]", dest="mechanisms",
                   help="a mechanism and its options, repeatable in registration order, e.g. -m pretrain")
    for field in TrainConfig.fields():
        if field != "mechanisms":
            t.add_argument(f"--{field.replace('_', '-')}", dest=field, metavar=field.upper(), help=FIELD_HELP[field])
    t.add_argument("--nproc-per-node", metavar="N",
                   help="train on N processes of this machine, launched by torchrun (python -m torch.distributed.run "
                   "--standalone); N may be a number, 'gpu' or 'cpu'. Across machines, run torchrun yourself: "
                   "torchrun --nnodes ... -m tuneforge train ...")

    g = sub.add_parser("generate", help="sample text from a trained checkpoint",
                       description="Continue prompts with a trained model (KV-cache sampling).")
    g.add_argument("checkpoint", help="a checkpoint folder (step-XXXXXXXX) or a run folder (its latest checkpoint)")
    g.add_argument("-p", "--prompt", action="append", help="prompt text, repeatable (default: one empty prompt)")
    g.add_argument("-n", "--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    g.add_argument("--task", help="the soft prompt / adapter / LoRA to generate with, when the model holds several "
                   "('' = the base model)")

    chat.add_parser(sub)
    p = sub.add_parser("plugins", help="list installed plugins, their hooks and load status; NAME: its options")
    p.add_argument("name", nargs="?", help="one plugin: its options with types, defaults and help (as -m NAME:help)")
    p.add_argument("--json", action="store_true", help="machine-readable output (with each plugin's options)")

    ms = sub.add_parser("models", help="the models --model can name offline: presets, named models, local files",
                        description="The embedded presets (random init) with their sizes, the named pretrained models "
                        "(installed or not, with the install line) and how to name a local folder or file.")
    ms.add_argument("--json", action="store_true", help="machine-readable output")

    d = sub.add_parser("data", help="show or export an embedded builtin: dataset",
                       description="Look at the embedded data world (see docs/data-world.md).")
    d.add_argument("name", help="builtin:NAME: text, sentiment, topic, rankings or instruct")
    d.add_argument("--split", default="train", choices=("train", "test"))
    d.add_argument("-n", "--head", type=int, default=3, help="records to print (default: 3)")
    d.add_argument("--export", metavar="FILE.jsonl", help="write every record of the split as JSON lines")

    e = sub.add_parser("export-peft", help="write a trained LoRA in Hugging Face PEFT's layout",
                       description="Write adapter_config.json + adapter_model.safetensors (PEFT's LoRA layout) from a "
                       "LoRA saved by tuneforge. Import goes the other way with -m lora:load=PEFT_FOLDER.")
    e.add_argument("source", help="a saved LoRA folder (.../lora/NAME), or a checkpoint or run folder")
    e.add_argument("out", help="the folder to write: new, empty, or an earlier export (which is replaced); any "
                   "other folder is refused unless --force")
    e.add_argument("--name", help="which LoRA, when the checkpoint holds several")
    e.add_argument("--base-model", help="base_model_name_or_path to record in adapter_config.json")
    e.add_argument("--force", action="store_true",
                   help="replace OUT even when it is a folder tuneforge did not write, and everything in it")

    x = sub.add_parser("export-hf", help="write a model trained on --model hf:PATH as a Hugging Face folder, its "
                       "LoRA folded into the weights",
                       description="What save_pretrained writes (config, safetensors, the source folder's tokenizer "
                       "files): transformers loads it like the original. Adapters, soft prompts and replaced heads "
                       "cannot go into a plain causal LM and are refused.")
    x.add_argument("source", help="a checkpoint or run folder of a run on --model hf:PATH")
    x.add_argument("out", help="the folder to write: new, empty, or an earlier export (which is replaced); any "
                   "other folder is refused unless --force")
    x.add_argument("--lora", help="which LoRA to fold in, when the model holds several")
    x.add_argument("--force", action="store_true",
                   help="replace OUT even when it is a folder tuneforge did not write, and everything in it")

    k = sub.add_parser("kernels", help="which implementation each kernel op runs, per device, and why",
                       description="Per op and device (cpu, cuda; without a GPU: what would run on one): the "
                       "project's compiled kernel (cpp), torch SDPA (attention) or the pure-torch reference, and why. "
                       "TUNEFORGE_KERNELS=auto|cpp|reference chooses.")
    k.add_argument("--json", action="store_true", help="machine-readable output")

    h = sub.add_parser("hf-tiny", help="write a tiny random Hugging Face model folder (GPT-2, Llama or Qwen2 style) "
                       "to try --model hf:PATH offline",
                       description="A random model and a BPE tokenizer trained on the embedded world's text, saved "
                       "as transformers saves a real one (config.json, model.safetensors, tokenizer.json). Needs "
                       "pip install 'tuneforge[hf]'.")
    h.add_argument("out", help="the folder to write")
    h.add_argument("--family", default="gpt2", choices=("gpt2", "llama", "qwen2"))
    h.add_argument("--d-model", type=int, default=64)
    h.add_argument("--layers", type=int, default=2)
    h.add_argument("--heads", type=int, default=4)
    h.add_argument("--context", type=int, default=256)
    h.add_argument("--vocab", type=int, default=512, help="tokenizer vocabulary (default: 512)")
    h.add_argument("--train-steps", type=int, default=300,
                   help="next-token steps on the world's text before saving, so the model has learned something "
                   "(default: 300; 0 = random weights)")

    n = sub.add_parser("new-plugin", help="scaffold a pip-installable package for your own mechanism",
                       description="Write a package with a mechanism skeleton, its entry point in the group "
                       "'tuneforge' and a test that trains a few steps; its tests pass as generated. Then: "
                       "pip install -e DIR && pytest DIR.")
    n.add_argument("name", help="the mechanism's name, as -m NAME will use it (e.g. my-lora)")
    n.add_argument("--dir", help="where to write the package (default: ./tuneforge-NAME)")
    n.add_argument("--force", action="store_true", help="write into an existing non-empty folder")

    m = sub.add_parser("demo", help="the main job on the embedded default: every mechanism, one table",
                       description="Pretrain the tiny model on the embedded world, then every mechanism from it "
                       "(fine-tuning, parts, soft prompts, prompting, instruction tuning, RLHF); writes demo.json (one "
                       "row per stage) in --out.")
    m.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    m.add_argument("--quick", action="store_true", help="a short version for smoke tests")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--precision", choices=demo_stage.PRECISIONS, default="auto", help="of the training "
                   "stages; auto: bf16-mixed where bfloat16 is native (CUDA, AVX512-BF16, AMX), else fp32")
    m.add_argument("--model", metavar="SPEC", help="tell the same story on a pretrained model (hf:PATH, gguf:PATH, "
                   "smollm2-135m): it goes on training its own weights on the world's text first; on a CPU a real "
                   "model takes hours, --quick minutes (default: the embedded tiny model, pretrained from scratch)")
    return parser


def _launch(nproc: str, argv: list[str]) -> int:
    """Become torchrun running this same command, minus --nproc-per-node, on ``nproc`` processes."""
    from tuneforge.engine.distributed import launched, torchrun_command

    if launched():
        raise ConfigError("--nproc-per-node given inside a torchrun job: torchrun already started the processes; "
                          "drop --nproc-per-node")
    if not (nproc.isdigit() and int(nproc) >= 1) and nproc not in ("gpu", "cpu", "auto"):
        raise ConfigError(f"--nproc-per-node {nproc!r}: give a number of processes, or gpu, cpu or auto")
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            rest.append(a)
    command = torchrun_command(nproc, rest)
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child: signals (Ctrl-C, a scheduler's SIGTERM) reach torchrun, which passes them to the ranks
    os.execv(command[0], command)
    return 1  # pragma: no cover


def _train(args) -> int:
    from tuneforge.engine.loop import train

    asked = [m.partition(":")[0] for m in args.mechanisms or [] if m.partition(":")[2].strip().lower() == "help"]
    if asked:  # -m NAME:help: the options of NAME, nothing trains
        return _plugins(argparse.Namespace(name=asked[0], json=False))
    values = load_config(args.config) if args.config else {}
    given = {f: getattr(args, f) for f in TrainConfig.fields() if f != "mechanisms" and getattr(args, f) is not None}
    values.update(given)
    if args.mechanisms:
        values["mechanisms"] = args.mechanisms
    if not values.get("mechanisms"):
        raise ConfigError("name at least one mechanism with -m NAME (e.g. -m pretrain); see 'tuneforge plugins'")
    cfg = TrainConfig.build(values, source="tuneforge train" + (f" (config {args.config})" if args.config else ""))
    if args.nproc_per_node is not None:  # the options are checked once, here, before N processes start
        from tuneforge.engine.registry import build_manager

        build_manager(cfg.mechanisms, autoload=False)  # unknown mechanisms, options, required ones, two objectives
        return _launch(args.nproc_per_node, args.argv)
    result = train(cfg)
    signum = result.summary.get("signal")
    if signum and result.run.is_main:
        where = result.checkpoint or "nowhere (no --out)"
        print(f"tuneforge: interrupted at step {result.run.step}; checkpoint: {where}. "
              "Continue with the same command plus --resume auto.", file=sys.stderr)
    code = 128 + int(signum) if signum else 0
    if result.run.world_size > 1:
        # Every file is written and closed. Under FSDP2 on gloo, PyTorch's C++ teardown at interpreter exit
        # aborts now and then ("terminate called without an active exception"; a hand-written fully_shard loop
        # does it too), which torchrun would report as a failed job: leave without running it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _generate(args) -> int:
    import torch

    from tuneforge.models import routing
    from tuneforge.engine.loop import load_model
    from tuneforge.models.tokenizer import tokenizer_of

    model = load_model(args.checkpoint, device=args.device)
    tok = tokenizer_of(model)
    if model.lm_head.out_features != model.config.vocab_size:
        raise ConfigError(f"{args.checkpoint} has a {model.lm_head.out_features}-class head instead of the LM head, so it "
                          "cannot generate text; predict labels with tuneforge.plugins.finetune.classify(model, texts)")
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    for prompt in args.prompt or [""]:
        ids = torch.tensor([tok.encode(prompt, bos=True)], device=args.device)
        room = model.config.max_seq_len - ids.size(1)
        if room <= 0:
            raise ConfigError(f"prompt {prompt[:30]!r}... is {ids.size(1)} tokens; the model's context is "
                              f"{model.config.max_seq_len}: shorten it to leave room for new tokens")
        try:
            with routing.rows([args.task] if args.task is not None else None):
                out = model.generate(ids, min(args.max_new_tokens, room), temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, eos_id=tok.eos_id, generator=gen)
        except ValueError as exc:  # several soft prompts / LoRAs and no --task, or a --task nothing holds
            raise ConfigError(f"{args.checkpoint}: {exc}") from None
        print(prompt + tok.decode(out[0, ids.size(1):].tolist()))
    return 0


def _plugins(args) -> int:
    from tuneforge.common.options import suggest
    from tuneforge.engine.registry import discover
    from tuneforge.tools.catalog import render_plugin, render_plugins

    infos = discover(strict=False)
    if args.name is not None:
        info = infos.get(args.name)
        if info is None:
            raise ConfigError(f"no plugin named '{args.name}'{suggest(args.name, infos)}; installed: "
                              f"{', '.join(infos) or 'none'}")
        print(json.dumps(info.as_dict(), indent=2, default=str) if args.json else render_plugin(info))
        return 0
    print(json.dumps([i.as_dict() for i in infos.values()], indent=2, default=str) if args.json
          else render_plugins(infos))
    return 0


def _models(args) -> int:
    from tuneforge.models.factory import available
    from tuneforge.tools.catalog import render

    found = available()
    print(json.dumps(found, indent=2) if args.json else render(found))
    return 0


def _data(args) -> int:
    from tuneforge.data.records import read_records

    records = read_records(args.name, split=args.split)
    if args.export:
        try:
            with open(args.export, "w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
        except OSError as exc:
            from tuneforge.engine.runfolder import write_error

            raise write_error(args.export, exc, "--export") from None
        print(f"wrote {len(records)} records to {args.export}", file=sys.stderr)
    for r in records.items[: args.head]:
        print(json.dumps(r))
    print(f"({len(records)} records in {args.name} [{args.split}])", file=sys.stderr)
    return 0


def _peft_exporter():
    """``export_peft`` of the installed plugin that offers PEFT's LoRA layout (tuneforge's lora does): found by
    the class attribute, so the command names no mechanism."""
    from tuneforge.engine.registry import offering

    offered = offering("export_peft", accept=callable)
    if not offered:
        raise ConfigError("export-peft: no loaded plugin writes PEFT folders (a plugin class with an export_peft "
                          "attribute, as tuneforge's lora); see 'tuneforge plugins' for one that failed to load, or "
                          "reinstall tuneforge")
    if len(offered) > 1:
        raise ConfigError(f"export-peft: plugins {', '.join(n for n, _ in offered)} all write PEFT folders; leave "
                          "out the third-party ones you do not mean with --plugins NAME,... or --no-plugins")
    return offered[0][1].export_peft


def _export_peft(args) -> int:
    export_peft = _peft_exporter()
    out = export_peft(args.source, args.out, name=args.name, base_model_name_or_path=args.base_model,
                      force=args.force)
    print(f"wrote {out} (PEFT LoRA layout)", file=sys.stderr)
    return 0


def _export_hf(args) -> int:
    from tuneforge.tools.hf_export import export_hf

    out = export_hf(args.source, args.out, lora=args.lora, force=args.force)
    print(f"wrote {out} (a Hugging Face model folder: AutoModelForCausalLM.from_pretrained loads it)", file=sys.stderr)
    return 0


def _kernels(args) -> int:
    import torch

    from tuneforge.kernels import backend, native, routes

    state, table = native.status(), routes()
    isa = torch.ops.tuneforge.cpu_isa() if state["loaded"] else None  # the CPU attention's instruction set
    if args.json:
        paths = {op: {device: {"path": path, "why": why} for device, (path, why) in per.items()}
                 for op, per in table.items()}
        print(json.dumps({"ops": backend(), "routes": paths, "mode": native.mode(), "cpu_isa": isa,
                          "cuda_available": torch.cuda.is_available(), **state}, indent=2))
        return 0
    for op, per in table.items():
        print(op)
        for device, (path, why) in per.items():
            print(f"  {device:<5} {path:<10} {why}")
    where = state["how"] if state["loaded"] else state["why"]
    print(f"\nTUNEFORGE_KERNELS={native.mode()}; compiled kernels: {where}")
    if isa:
        print(f"CPU attention instruction set: {isa} (chosen at run time; TUNEFORGE_CPU_ISA=avx512|avx2|scalar "
              "forces one)")
    return 0


def _hf_tiny(args) -> int:
    from tuneforge.tools.hf_tiny import make_tiny

    folder = make_tiny(args.out, args.family, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       context=args.context, vocab_size=args.vocab, train_steps=args.train_steps)
    trained = f"trained {args.train_steps} steps" if args.train_steps else "random"
    print(f"wrote a {args.family} model ({trained}) to {folder}; try: tuneforge demo --model hf:{folder} --quick")
    return 0


def _new_plugin(args) -> int:
    from tuneforge.tools.scaffold import new_plugin

    folder = new_plugin(args.name, args.dir, force=args.force)
    print(f"wrote {folder}; next: pip install -e {folder} && pytest {folder}", file=sys.stderr)
    return 0


def _plugin_loading(args) -> None:
    """The plugin flags become the environment discovery reads, so torchrun's worker processes inherit them."""
    if args.no_plugins and args.plugins is not None:
        raise ConfigError("--no-plugins and --plugins contradict each other; give one")
    if args.no_plugins:
        os.environ["TUNEFORGE_LOAD_PLUGINS"] = ""
    elif args.plugins is not None:
        os.environ["TUNEFORGE_LOAD_PLUGINS"] = args.plugins
    if args.strict_plugins:
        os.environ["TUNEFORGE_STRICT_PLUGINS"] = "1"


def _demo(args) -> int:
    from tuneforge.tools.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, model=args.model, precision=args.precision)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    handlers = {"train": _train, "generate": _generate, "chat": chat.run, "plugins": _plugins, "models": _models,
                "data": _data, "export-peft": _export_peft, "export-hf": _export_hf, "kernels": _kernels,
                "demo": _demo, "hf-tiny": _hf_tiny, "new-plugin": _new_plugin}
    try:
        _plugin_loading(args)
        return handlers[args.command](args)
    except TuneforgeError as exc:
        where = f" (rank {os.environ['RANK']})" if "RANK" in os.environ and "WORLD_SIZE" in os.environ else ""
        print(f"tuneforge: error{where}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tuneforge: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

