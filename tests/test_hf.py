"""Hugging Face models (``--model hf:PATH``): every mechanism on tiny random GPT-2 and Llama folders made in the
test (no downloads), through the same ``tuneforge.train`` path a user takes."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import tuneforge  # noqa: E402
from tuneforge.models import hf  # noqa: E402
from tuneforge.models import routing  # noqa: E402
from tuneforge.errors import ConfigError  # noqa: E402
from tuneforge.parts.modules import TaskModule  # noqa: E402
from tuneforge.tools.hf_tiny import make_tiny  # noqa: E402

FAMILIES = ["gpt2", "llama"]
SMALL = dict(d_model=32, n_layers=2, n_heads=4, context=256, vocab_size=320)


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    # briefly trained, as a downloaded model would be: parts on a frozen model need features to work with
    return {f: make_tiny(root / f, f, train_steps=60, **SMALL) for f in FAMILIES + ["qwen2"]}


def _eager(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()


def _ids(model, texts):
    rows = [model.tokenizer.encode(t, bos=True) for t in texts]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), model.tokenizer.pad_id)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):  # left padded, as generation wants
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), True
    return ids, mask


TEXTS = ["review: the room was warm", "note: omar wrote a note on the snow and the wind"]


# -- loading -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES + ["qwen2"])
def test_wrapped_model_matches_transformers_eager(folders, family):
    model = hf.load(folders[family])  # the fused attention
    assert model.hf_model.config._attn_implementation == "tuneforge"
    ref = _eager(folders[family])
    ids, mask = _ids(model, TEXTS)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # each row's first real token is position 0
    with torch.no_grad():
        ours = model(ids, key_padding_mask=mask, positions=positions)
        theirs = ref(ids, attention_mask=mask.long(), position_ids=positions).logits
    assert torch.allclose(ours[mask], theirs[mask], atol=2e-5), (ours[mask] - theirs[mask]).abs().max()
    # module paths are transformers' own (what PEFT names tensors by)
    paths = {n for n, _ in model.named_modules()}
    assert ({"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"} <= paths if family == "gpt2"
            else {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"} <= paths)
    assert set(model.state_dict()) == set(ref.state_dict()) | ({"lm_head.weight"} if family != "llama" else set())


def test_generation_with_cache_equals_without_and_transformers(folders):
    model = hf.load(folders["llama"])
    ids, mask = _ids(model, TEXTS)
    cached = model.generate(ids, 12, temperature=0.0, key_padding_mask=mask)
    fresh = model.generate(ids, 12, temperature=0.0, key_padding_mask=mask, use_cache=False)
    assert torch.equal(cached, fresh)
    theirs = _eager(folders["llama"]).generate(ids, attention_mask=mask.long(), max_new_tokens=12, do_sample=False,
                                               eos_token_id=None, pad_token_id=model.tokenizer.pad_id)
    assert torch.equal(cached, theirs)


def test_hub_names_and_missing_folders_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="never downloads.*huggingface-cli download gpt2"):
        hf.load("gpt2")
    with pytest.raises(ConfigError, match="never downloads"):
        tuneforge.train(model="hf:Qwen/Qwen2-0.5B", mechanisms=["lora", "finetune:layers=0"], steps=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        hf.load(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no such folder"):
        hf.load(str(tmp_path / "missing"))


def test_without_transformers_the_error_says_how_to_install(folders):
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import tuneforge\n"
            f"tuneforge.train(model='hf:{folders['gpt2']}', mechanisms=['pretrain'], steps=1)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert "pip install 'tuneforge[hf]'" in done.stderr


# -- parts start as the identity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_and_lora_are_the_identity_at_init(folders, family):
    from tuneforge.plugins.adapter import add_adapter
    from tuneforge.plugins.lora import add_lora

    model = hf.load(folders[family])
    ids, _ = _ids(model, TEXTS[:1])
    with torch.no_grad():
        before = model(ids)
    paths = add_lora(model, "l", targets=["all"], rank=4)
    add_adapter(model, "s", placement="serial")
    add_adapter(model, "p", placement="parallel")
    expected = 4 * SMALL["n_layers"] if family == "gpt2" else 7 * SMALL["n_layers"]
    assert len(paths) == expected
    from tuneforge.parts.modules import set_active
    set_active(model, ["l", "s", "p"])  # all three at once
    with torch.no_grad():
        assert torch.equal(model(ids), before)
        # ...and not by accident: a non-zero B changes the output
        for m in model.modules():
            if hasattr(m, "lora_b"):
                m.lora_b["l"].add_(0.1)
        assert not torch.allclose(model(ids), before)


# -- every mechanism trains, saves and loads back --------------------------------------------------------------

RUNS = {  # mechanisms, data, lr, steps
    "pretrain": (["pretrain"], "builtin:text", 1e-2, 24),
    "finetune": (["finetune:layers=1"], "builtin:text", 1e-2, 24),
    "finetune-head": (["finetune:layers=all,head=classify"], "builtin:sentiment", 3e-3, 40),
    "adapter": (["adapter:placement=parallel,scale=2", "finetune"], "builtin:text", 1e-2, 24),
    "lora": (["lora:targets=attn", "finetune"], "builtin:text", 1e-2, 24),
    "prompt-tuning": (["prompt-tuning:tokens=8", "finetune"], "builtin:text", 1e-2, 24),
    "reward-model": (["reward-model"], "builtin:rankings", 1e-2, 24),
    "dpo": (["lora:targets=all,rank=8", "dpo:beta=0.5"], "builtin:rankings", 3e-3, 24),
}


def _losses(result):
    return [h["loss"] for h in result.history if "loss" in h]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(RUNS))
def test_mechanism_trains_and_round_trips(folders, tmp_path, family, name):
    mechanisms, data, lr, steps = RUNS[name]
    out = tmp_path / "run"
    result = tuneforge.train(model=f"hf:{folders[family]}", mechanisms=mechanisms, data=data, steps=steps,
                             batch_size=8, seq_len=48, lr=lr, warmup=2, eval_every=0, out=str(out))
    losses = _losses(result)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.02, losses
    recorded = json.loads((out / "config.json").read_text())["model_config"]
    assert recorded["hf"] == str(folders[family])
    assert recorded["weights"] == ("random" if name == "pretrain" else "pretrained")
    # the saved run rebuilds (base from the folder, the mechanism's modules replayed) to the same function
    loaded = tuneforge.load_model(out)
    trained = result.model.eval()
    ids, _ = _ids(loaded, TEXTS[:1])
    with torch.no_grad():
        assert torch.allclose(loaded(ids), trained(ids), atol=1e-6)
    if name in ("adapter", "lora", "prompt-tuning"):  # beside a part, finetune (layers=auto) trains nothing itself
        assert result.summary["trainable_by_plugin"]["finetune"] == 0
    if name not in ("pretrain", "finetune", "finetune-head", "reward-model"):  # frozen base: the folder's weights
        base = dict(_eager(folders[family]).named_parameters())
        ours = dict(loaded.named_parameters())
        key = "transformer.h.0.mlp.c_fc.weight" if family == "gpt2" else "model.layers.0.mlp.up_proj.weight"
        w = ours[key] if family != "gpt2" else ours[key].t()  # Conv1D stores (in, out)
        assert torch.equal(w, base[key])
    if name == "pretrain":  # from the config's random init, not the folder's weights
        key = "transformer.h.0.mlp.c_fc.weight" if family == "gpt2" else "model.layers.0.mlp.up_proj.weight"
        first = dict(_eager(folders[family]).named_parameters())[key]
        assert not torch.allclose(dict(loaded.named_parameters())[key].reshape(first.shape), first, atol=1e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompting_changes_no_weight(folders, family):
    result = tuneforge.train(model=f"hf:{folders[family]}", mechanisms=["prompting:shots=2"], data="builtin:sentiment",
                             steps=1)
    frozen = result.summary["frozen_weights"]
    # every weight hashed before and after (buffers too, such as rotary frequencies)
    assert frozen["unchanged"] is True and frozen["values"] >= sum(p.numel() for p in result.model.parameters())
    assert 0.0 <= result.metrics["eval/accuracy"] <= 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_ppo_on_a_reward_model_of_the_same_family(folders, tmp_path, family):
    model = f"hf:{folders[family]}"
    tuneforge.train(model=model, mechanisms=["reward-model"], data="builtin:rankings", steps=10, batch_size=8,
                    eval_every=0, out=str(tmp_path / "rm"))
    result = tuneforge.train(model=model, mechanisms=["lora:targets=attn", f"ppo:reward={tmp_path / 'rm'},rollouts=16,"
                                                      "max_new_tokens=12,judge=none"],
                             data="builtin:rankings", steps=16, batch_size=8, lr=1e-2, warmup=1, eval_every=0,
                             out=str(tmp_path / "ppo"))
    # PPO's loss is minimised on each rollout for ppo_epochs (4) passes of 2 minibatches: within every rollout the
    # last pass's loss is below the first's (which starts near 0: ratio 1, whitened advantages)
    losses = _losses(result)
    passes = [losses[i] + losses[i + 1] for i in range(0, 16, 2)]  # (rollout, pass) in order
    for rollout in (passes[:4], passes[4:]):
        assert rollout[-1] < rollout[0], passes
    assert result.history[0]["kl"] == 0.0 and result.history[-1]["kl"] != 0.0  # the second rollout's policy moved...
    loaded = tuneforge.load_model(tmp_path / "ppo")  # ...and comes back with its LoRA and value head
    ids, _ = _ids(loaded, TEXTS[:1])
    with torch.no_grad():
        assert torch.allclose(loaded(ids), result.model.eval()(ids), atol=1e-6)


# -- prompt tuning: the prefix goes through the input embeddings ----------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_soft_prompts_generate_the_same_with_and_without_the_cache(folders, family):
    from tuneforge.plugins.prompt_tuning import SoftPrompts

    model = hf.load(folders[family])
    g = torch.Generator().manual_seed(0)
    sp = SoftPrompts(model.config.d_model)
    sp.add("a", torch.randn(3, model.config.d_model, generator=g))
    sp.add("b", torch.randn(6, model.config.d_model, generator=g))  # rows' prompts of different lengths
    model.prefix = sp
    ids, mask = _ids(model, TEXTS)
    with routing.rows(["a", "b"]):
        cached = model.generate(ids, 10, temperature=0.0, key_padding_mask=mask)
        fresh = model.generate(ids, 10, temperature=0.0, key_padding_mask=mask, use_cache=False)
        with torch.no_grad():
            logits = model(ids, key_padding_mask=mask, positions=(mask.long().cumsum(-1) - 1).clamp(min=0))
    assert torch.equal(cached, fresh)
    # row b alone with its prompt spelled out as embeddings in front: same logits (positions and masks right)
    row = ids[1:, mask[1]]
    emb = torch.cat([sp.prompts["b"][None], model.tok_emb(row)], 1)
    with torch.no_grad():
        out = model.base(inputs_embeds=emb).last_hidden_state[:, 6:]
    assert torch.allclose(model.lm_head(out)[0], logits[1, mask[1]], atol=1e-5)


# -- LoRA in PEFT's layout ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_lora_exports_to_and_imports_from_peft(folders, tmp_path, family):
    peft = pytest.importorskip("peft")
    from safetensors import safe_open

    from tuneforge.plugins.lora import export_peft
    from tuneforge.plugins.lora import add_lora, load_lora

    model = hf.load(folders[family])
    add_lora(model, "mine", targets=["q", "v", "o"], rank=4, alpha=8)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_b"):
                m.lora_b["mine"].normal_(0, 0.05)
    folder = export_peft(model, tmp_path / "peft")
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    expected = ("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" if family == "gpt2"
                else "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    assert expected in keys
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (family == "gpt2") and config["base_model_name_or_path"] == str(folders[family])
    # PEFT builds exactly the adapted layers from target_modules (GPT-2's attn.c_proj, not also mlp.c_proj)
    assert config["target_modules"] == (["attn.c_attn", "attn.c_proj"] if family == "gpt2"
                                        else ["self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"])

    ids, _ = _ids(model, TEXTS[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "missing adapter keys": a target matched too much
        theirs = peft.PeftModel.from_pretrained(_eager(folders[family]), str(folder)).eval()
    with torch.no_grad():
        assert torch.allclose(model(ids), theirs(ids).logits, atol=2e-5)

    # the other way: a LoRA PEFT trained (random B), saved by PEFT, loaded by tuneforge
    base = _eager(folders[family])
    targets = ["c_attn", "c_fc"] if family == "gpt2" else ["q_proj", "down_proj"]
    made = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                                     fan_in_fan_out=family == "gpt2"))
    with torch.no_grad():
        for n, p in made.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    made.save_pretrained(str(tmp_path / "from-peft"))
    ours = hf.load(folders[family])
    names = load_lora(ours, str(tmp_path / "from-peft"))
    with torch.no_grad():
        assert torch.allclose(ours(ids), made.eval()(ids).logits, atol=2e-5), names


def test_ranking_rows_start_the_response_where_a_rollout_does(folders):
    from tuneforge.data.rankings import ranking_batch, read_rankings
    from tuneforge.rlhf.rollout import sample

    model = hf.load(folders["gpt2"])
    tok = model.tokenizer
    records = read_rankings("builtin:rankings")[:3]
    batch = ranking_batch(records, tok, model.config.max_seq_len)
    row = 0
    for rec in records:
        for text in rec.responses:
            ids = batch["input"][row, : batch["last"][row] + 1].tolist()
            start = int(batch["start"][row])
            assert tok.decode(ids[start:]) == text  # the response's tokens exactly, no space merged into the prompt
            assert ids[:start] == tok.encode(f"{rec.prompt} ", bos=True)  # what a rollout is sampled after
            row += 1
    s = sample(model.generate, tok, [records[0].prompt], max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    assert s.input[0, : int(s.start[0])].tolist() == tok.encode(f"{records[0].prompt} ", bos=True)


@pytest.mark.parametrize("name", ["lora", "adapter", "prompt-tuning"])
def test_saved_parts_load_onto_a_fresh_hf_base(folders, tmp_path, name):
    from tuneforge.plugins.adapter import load_adapters
    from tuneforge.plugins.lora import load_lora
    from tuneforge.plugins.prompt_tuning import add_prompts

    mechanisms, data, lr, _ = RUNS[name]
    result = tuneforge.train(model=f"hf:{folders['llama']}", mechanisms=mechanisms, data=data, steps=6,
                             batch_size=8, seq_len=48, lr=lr, eval_every=0, out=str(tmp_path / "run"))
    fresh = hf.load(folders["llama"])
    {"lora": load_lora, "adapter": load_adapters, "prompt-tuning": add_prompts}[name](fresh, str(tmp_path / "run"))
    ids, _ = _ids(fresh, TEXTS[:1])
    with torch.no_grad():
        assert torch.allclose(fresh(ids), result.model.eval()(ids), atol=1e-6)
        assert not torch.allclose(fresh(ids), hf.load(folders["llama"])(ids), atol=1e-4)  # the part did something


def test_checkpoints_leave_the_folders_weights_in_the_folder(folders, tmp_path):
    import shutil

    from safetensors import safe_open

    from tuneforge.errors import CheckpointError

    copy = shutil.copytree(folders["llama"], tmp_path / "model")  # this test changes it at the end
    common = dict(model=f"hf:{copy}", data="builtin:text", batch_size=4, seq_len=32, eval_every=0)
    lora = tuneforge.train(mechanisms=["lora:targets=q,v", "finetune"], steps=4, out=str(tmp_path / "lora"), **common)
    with safe_open(str(lora.checkpoint / "model.safetensors"), "pt") as fh:
        stored = set(fh.keys())
    assert stored and all(".lora_" in k for k in stored)  # the LoRA only: the frozen base stays in the folder
    state = json.loads((lora.checkpoint / "state.json").read_text())
    assert "model.layers.0.mlp.up_proj.weight" in state["folder_weights"]["names"]
    assert state["folder_weights"]["folder"] == str(copy)

    # finetune of the last block: that block, the final norm and the head are stored; the rest is the folder's
    last = tuneforge.train(mechanisms=["finetune:layers=1"], steps=3, out=str(tmp_path / "last"), **common)
    with safe_open(str(last.checkpoint / "model.safetensors"), "pt") as fh:
        stored = set(fh.keys())
    assert "model.layers.1.mlp.up_proj.weight" in stored and "model.layers.0.mlp.up_proj.weight" not in stored
    ids, _ = _ids(last.model, TEXTS[:1])
    with torch.no_grad():
        assert torch.allclose(tuneforge.load_model(tmp_path / "last")(ids), last.model.eval()(ids), atol=1e-6)

    # killed after step 2 and resumed: the same weights as the uninterrupted run
    tuneforge.train(mechanisms=["lora:targets=q,v", "finetune"], steps=4, save_every=2, out=str(tmp_path / "again"),
                    **common)
    resumed = tuneforge.train(mechanisms=["lora:targets=q,v", "finetune"], steps=4, out=str(tmp_path / "again"),
                              resume=str(tmp_path / "again" / "step-00000002"), **common)
    for (n, a), (_, b) in zip(lora.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n

    # the folder now holds other weights: the checkpoint refuses to pretend they are its base
    other = transformers.AutoModelForCausalLM.from_pretrained(str(copy))
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    other.save_pretrained(str(copy))
    with pytest.raises(CheckpointError, match="have changed since"):
        tuneforge.load_model(tmp_path / "lora")


@pytest.mark.parametrize("family", FAMILIES)
def test_export_hf_writes_a_folder_transformers_loads(folders, tmp_path, family):
    from tuneforge.tools.hf_export import export_hf

    run = tmp_path / "run"
    result = tuneforge.train(model=f"hf:{folders[family]}", mechanisms=["lora:targets=all", "finetune:layers=1"],
                             data="builtin:text", steps=6, batch_size=4, seq_len=32, lr=1e-2, eval_every=0,
                             out=str(run))
    out = export_hf(run, tmp_path / "exported")
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    ids, _ = _ids(result.model, TEXTS)
    with torch.no_grad():  # the LoRA folded in, the trained last block as trained; GPT-2 back in Conv1D layout
        assert torch.allclose(theirs(ids).logits, result.model.eval()(ids), atol=1e-5)
        assert not torch.allclose(theirs(ids).logits, _eager(folders[family])(ids).logits, atol=1e-3)


def test_export_hf_refuses_what_a_causal_lm_cannot_hold(folders, tmp_path):
    from tuneforge.tools.hf_export import export_hf

    for mechanisms, data, says in ((["adapter", "finetune"], "builtin:text", "holds adapters"),
                                   (["finetune:layers=1,head=classify"], "builtin:sentiment", "ClassifierHead")):
        run = tmp_path / mechanisms[0]
        tuneforge.train(model=f"hf:{folders['gpt2']}", mechanisms=mechanisms, data=data, steps=1, batch_size=4,
                        eval_every=0, out=str(run))
        with pytest.raises(ConfigError, match=says):
            export_hf(run, tmp_path / "nope")
        assert not (tmp_path / "nope").exists()
    with pytest.raises(ConfigError, match="not trained on a Hugging Face model"):
        export_hf(tuneforge.train(model="tiny:n_layers=1,d_model=32,n_heads=2", mechanisms=["pretrain"], steps=1,
                                  batch_size=2).model, tmp_path / "nope")


class _Scales(torch.nn.Module, TaskModule):
    """A third-party part kind: a named scale per task, which no installed plugin folds into the weights."""

    kind = "output scales"

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.ParameterDict({"calm": torch.nn.Parameter(torch.ones(1))})

    def task_names(self):
        return list(self.scale)

    def part_parameters(self, name):
        return [self.scale[name]]


def test_export_hf_asks_the_installed_plugins_which_parts_fold(folders, tmp_path, monkeypatch):
    from tuneforge.engine import registry
    from tuneforge.tools.hf_export import export_hf

    model = hf.load(folders["gpt2"])
    model.scales = _Scales()
    with pytest.raises(ConfigError, match="holds output scales calm, modules a plain transformers model has no place"):
        export_hf(model, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()

    calls = []

    class Folding:  # a third-party plugin that says its parts fold into the base weights
        fold_kind, fold_noun = "output scales", "scale"

        @staticmethod
        def fold_into_base(model, names):
            calls.append(("in", names))

        @staticmethod
        def unfold_from_base(model, names):
            calls.append(("out", names))

    found = registry.discover()
    monkeypatch.setattr(registry, "discover", lambda **kw: {
        **found, "scales": registry.PluginInfo("scales", "x:Folding", "someone", "1", False, obj=Folding)})
    with pytest.raises(ConfigError, match="no scale named 'loud'; the model holds calm"):
        export_hf(model, tmp_path / "nope", lora="loud")
    export_hf(model, tmp_path / "out")
    assert calls == [("in", ["calm"]), ("out", ["calm"])]  # folded for the export, and out again after it


# -- the command line ---------------------------------------------------------------------------------------------

def _cli(*args, cwd):
    env = {**os.environ, "TUNEFORGE_LOAD_PLUGINS": ""}
    return subprocess.run([sys.executable, "-m", "tuneforge", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_cli_trains_lora_on_an_hf_model_and_generates(folders, tmp_path, capfd, monkeypatch):
    done = _cli("train", "--model", f"hf:{folders['gpt2']}", "--mechanism", "lora", "--mechanism",
                "finetune", "--data", "builtin:text", "--steps", "6", "--batch-size", "4", "--seq-len", "32",
                "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = _cli("generate", str(tmp_path / "run"), "--prompt", "review: the", "--max-new-tokens", "8",
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("review: the")
    done = _cli("export-hf", str(tmp_path / "run"), str(tmp_path / "hf-out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf-out")).config.model_type == "gpt2"
    # refused before anything runs: main() in this process (a process importing torch and transformers is ~4 s)
    from tuneforge.tools.cli import main
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    code = main(["train", "--model", "hf:gpt2", "--mechanism", "pretrain"])
    err = capfd.readouterr().err
    assert code != 0 and "never downloads" in err and "Traceback" not in err


def test_demo_tells_the_same_story_on_an_hf_model(folders, tmp_path):
    done = _cli("demo", "--model", f"hf:{folders['gpt2']}", "--quick", "--out", str(tmp_path / "demo"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "demo" / "demo.json").read_text())
    names = [r["mechanism"] for r in rows]
    assert names[0] == "continued pretraining (all layers)"
    for stage in ("head only", "adapter (serial)", "lora (rank 8", "prompt-tuning (sentiment)", "one mixed batch",
                  "right labels", "sft (lora)", "reward model, ties modelled", "ppo (lora", "dpo (lora"):
        assert any(stage in n for n in names), stage
    lora = next(r for r in rows if r["mechanism"].startswith("lora"))
    assert lora["merged_max_abs_diff"] < 1e-4
    mixed = next(r for r in rows if "mixed" in r["mechanism"])
    assert mixed["max_abs_diff_vs_alone"] < 1e-3
    recorded = json.loads((tmp_path / "demo" / "pretrain" / "config.json").read_text())["model_config"]
    assert recorded["hf"] == str(folders["gpt2"])
