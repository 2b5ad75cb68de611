"""Names read from files and options never become paths outside a run, exports and the demo never delete a user's
folder, and malformed part manifests and PEFT configs are one clear error with nothing changed.

Every name check is driven through ``tuneforge.tools.cli.main`` as a user would hit it: exit 2, one ``tuneforge: error:``
line, no traceback, and a "victim" folder beside the run whose files must come through untouched."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tuneforge import ConfigError
from tuneforge.parts.files import MANIFEST, TENSORS, save_part
from tuneforge.tools.cli import main
from tuneforge.plugins.lora import lora_state
from tuneforge.models.transformer import Transformer, model_config
from tuneforge.common.names import EXPORT_MARKER, replace_folder
from tuneforge.plugins.lora import PEFT_CONFIG, export_peft
from tuneforge.plugins.adapter import Adapter, add_adapter, load_adapters
from tuneforge.plugins.lora import add_lora, load_lora

MICRO = "tiny:n_layers=1,d_model=32,n_heads=2,max_seq_len=32"
RUN = ["--model", MICRO, "--data", "builtin:text", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
       "--eval-every", "0", "--warmup", "1"]


def _cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _refused(code: int, err: str, *says: str) -> str:
    """The one error line of a refused command (exit 2, no traceback), checked to say each of ``says``."""
    lines = [line for line in err.splitlines() if line.startswith("tuneforge: error")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for text in says:
        assert text in lines[0], lines[0]
    return lines[0]


def _victim(root: Path) -> Path:
    """A folder of someone's files that no tuneforge command here has any business touching."""
    victim = root / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("my notes\n")
    (victim / "precious.safetensors").write_bytes(b"not yours")
    return victim


def _files(root: Path, skip: str = "run") -> dict[str, bytes]:
    """Every file under ``root`` (but the run folder ``skip``) with its bytes: what must not change."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != skip}


def _part(folder: Path, mechanism: str = "lora", name: str = "good") -> Path:
    """A real saved part for the MICRO model, as a run would write it."""
    model = Transformer(model_config(MICRO))
    if mechanism == "lora":
        add_lora(model, name, rank=2)
        tensors, points = lora_state(model, name)
    else:
        add_adapter(model, name, reduction=4)
        tensors, points = Adapter(Adapter.Options()).export(model, name)
    return save_part(folder, mechanism=mechanism, name=name, tensors=tensors, points=points, options={}, model=model)


def _edit_manifest(folder: Path, change) -> Path:
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps(change(manifest)))
    return folder


# -- every way a name enters -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["lora", "adapter"])
@pytest.mark.parametrize("name", ["ABSOLUTE", "a/b", "../../../victim", ".hidden", ""])
def test_a_manifest_name_that_is_a_path_is_refused_and_nothing_outside_changes(tmp_path, capsys, mechanism, name):
    victim = _victim(tmp_path)
    name = str(victim) if name == "ABSOLUTE" else name
    crafted = _edit_manifest(_part(tmp_path / "crafted", mechanism), lambda m: {**m, "name": name})
    before = _files(tmp_path)
    code, err = _cli(capsys, "train", *RUN, "-m", f"{mechanism}:load={crafted},tasks=extra",
                     "--out", tmp_path / "run")
    _refused(code, err, str(crafted / MANIFEST), "field 'name'", "not a valid name")
    assert _files(tmp_path) == before


@pytest.mark.parametrize("task", ["ABSOLUTE", "a/b", "../../../victim/precious"])
def test_a_soft_prompt_task_that_is_a_path_is_refused(tmp_path, capsys, task):
    victim = _victim(tmp_path)
    task = str(victim / "precious") if task == "ABSOLUTE" else task
    crafted = tmp_path / "crafted.safetensors"
    save_file({"prompt": torch.randn(4, 32)}, str(crafted),
              metadata={"format": "tuneforge.soft-prompt", "version": "1", "task": task})
    before = _files(tmp_path)
    code, err = _cli(capsys, "train", *RUN, "-m", f"prompt-tuning:load={crafted},tasks=extra,tokens=4",
                     "--out", tmp_path / "run")
    _refused(code, err, str(crafted), "metadata 'task'", "not a valid name")
    assert _files(tmp_path) == before


@pytest.mark.parametrize("mechanism", ["lora", "adapter"])
@pytest.mark.parametrize("rename", ["../../../victim", "a/b", "ABSOLUTE"])
def test_load_at_name_that_is_a_path_is_refused(tmp_path, capsys, mechanism, rename):
    victim = _victim(tmp_path)
    rename = str(victim) if rename == "ABSOLUTE" else rename
    part = _part(tmp_path / "part", mechanism)
    before = _files(tmp_path)
    code, err = _cli(capsys, "train", *RUN, "-m", f"{mechanism}:load={part}@{rename},tasks=extra",
                     "--out", tmp_path / "run")
    _refused(code, err, f"load={part}@{rename}", "not a valid name")
    assert _files(tmp_path) == before


@pytest.mark.parametrize("mechanism,task", [
    ("lora", ".hidden"), ("adapter", "x" * 65), ("lora", "../x"), ("prompt-tuning", "ABSOLUTE"),
    ("prompt-tuning", "a/b"),
])
def test_a_task_name_that_is_no_name_is_refused(tmp_path, capsys, mechanism, task):
    victim = _victim(tmp_path)
    task = str(victim / "precious") if task == "ABSOLUTE" else task
    before = _files(tmp_path)
    code, err = _cli(capsys, "train", *RUN, "-m", f"{mechanism}:tasks={task}", "--out", tmp_path / "run")
    _refused(code, err, "option tasks", "not a valid name")
    assert _files(tmp_path) == before


def test_a_peft_folder_whose_name_is_no_name_loads_under_at_name(tmp_path, capsys):
    model = Transformer(model_config(MICRO))
    add_lora(model, "a", rank=2)
    peft = export_peft(model, tmp_path / "my peft")  # a space: no part name, so it needs @NAME
    code, err = _cli(capsys, "train", *RUN, "-m", f"lora:load={peft},tasks=extra", "--out", tmp_path / "run")
    _refused(code, err, "'my peft' is not a valid name", f"load={peft}@NAME")
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("step-*"))
    code, err = _cli(capsys, "train", *RUN, "-m", f"lora:load={peft}@mine,tasks=extra", "--out", tmp_path / "run")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*/lora/*")) == ["extra", "mine"]


# -- exports -------------------------------------------------------------------------------------------------------

def test_export_peft_never_replaces_a_folder_it_did_not_write_unless_forced(tmp_path, capsys):
    part = _part(tmp_path / "part")
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    code, err = _cli(capsys, "export-peft", part, out)
    _refused(code, err, str(out), "not an earlier tuneforge export", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes\n"

    assert _cli(capsys, "export-peft", part, out, "--force")[0] == 0
    assert not (out / "notes.txt").exists() and (out / PEFT_CONFIG).is_file()
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert marker["what"] == "export-peft" and marker["written_by"].startswith("tuneforge ") and marker["when"]
    # an earlier export is tuneforge's own: replaced without --force, nothing left beside it
    (out / PEFT_CONFIG).write_text("{}")
    assert _cli(capsys, "export-peft", part, out)[0] == 0
    assert json.loads((out / PEFT_CONFIG).read_text())["peft_type"] == "LORA"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part", "project"]

    file = tmp_path / "file.txt"
    file.write_text("keep")
    for force in ([], ["--force"]):
        _refused(*_cli(capsys, "export-peft", part, file, *force), "is a file, not a folder")
        assert file.read_text() == "keep"


def test_export_hf_refuses_a_users_folder_before_loading_anything(tmp_path, capsys):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    code, err = _cli(capsys, "export-hf", tmp_path / "no-such-run", out)
    _refused(code, err, "export-hf:", str(out), "not an earlier tuneforge export")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_export_hf_force_and_a_second_export(tmp_path, capsys):
    pytest.importorskip("transformers")
    import tuneforge
    from tuneforge.tools.hf_tiny import make_tiny

    folder = make_tiny(tmp_path / "hf", "gpt2", d_model=32, n_layers=1, n_heads=2, context=64, vocab_size=300)
    run = tmp_path / "run"
    tuneforge.train(model=f"hf:{folder}", mechanisms=["lora"], data="builtin:text", steps=1, batch_size=2,
                    seq_len=16, eval_every=0, warmup=1, out=str(run))
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    _refused(*_cli(capsys, "export-hf", run, out), "not an earlier tuneforge export")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert _cli(capsys, "export-hf", run, out, "--force")[0] == 0
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()
    assert _cli(capsys, "export-hf", run, out)[0] == 0
    assert json.loads((out / EXPORT_MARKER).read_text())["what"] == "export-hf"


# -- malformed manifests and PEFT configs --------------------------------------------------------------------------

def _drop(key):
    return lambda m: {k: v for k, v in m.items() if k != key}


def _first_point(key, value):
    def change(m):
        path = sorted(m["points"])[0]
        return {**m, "points": {**m["points"], path: {**m["points"][path], key: value}}}
    return change


@pytest.mark.parametrize("mechanism,change,field", [
    ("lora", lambda m: [m], "JSON list"),
    ("lora", lambda m: {**m, "points": "blocks.0.attn.q"}, "field 'points'"),
    ("adapter", lambda m: {**m, "points": {}}, "field 'points'"),
    ("lora", _drop("name"), "no field 'name'"),
    ("adapter", _drop("name"), "no field 'name'"),
    ("lora", lambda m: {**m, "version": "x"}, "field 'version'"),
    ("lora", _first_point("rank", "8"), ".rank"),
    ("lora", _first_point("in", None), ".in"),
    ("adapter", _first_point("activation", "nope"), ".activation"),
    ("adapter", _first_point("size", -3), ".size"),
    ("adapter", lambda m: {**m, "points": {p: [1] for p in m["points"]}}, "not an object"),
])
def test_a_malformed_manifest_is_a_config_error_and_changes_nothing(tmp_path, mechanism, change, field):
    folder = _edit_manifest(_part(tmp_path / "crafted", mechanism), change)
    on_disk = _files(tmp_path)
    model = Transformer(model_config(MICRO))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    load = load_lora if mechanism == "lora" else load_adapters
    with pytest.raises(ConfigError) as caught:
        load(model, str(folder))
    assert str(folder / MANIFEST) in str(caught.value) and field in str(caught.value)
    assert _files(tmp_path) == on_disk
    assert model.state_dict().keys() == state.keys()


def test_an_adapter_whose_second_point_does_not_fit_leaves_the_model_as_it_was(tmp_path):
    folder = _part(tmp_path / "crafted", "adapter")
    tensors = load_file(str(folder / TENSORS))
    last = sorted(k for k in tensors if k.endswith("up.weight"))[-1]
    tensors[last] = torch.zeros(3, 3)  # the first point loads, the last does not
    save_file(tensors, str(folder / TENSORS))
    model = Transformer(model_config(MICRO))
    keys = set(model.state_dict())
    with pytest.raises(ConfigError) as caught:
        load_adapters(model, str(folder))
    assert set(model.state_dict()) == keys  # not the first point's adapter either
    assert str(folder) in str(caught.value) and "blocks.0.mlp" in str(caught.value)


MISSING = object()


@pytest.mark.parametrize("field,value", [
    ("lora_alpha", "x"), ("lora_alpha", None), ("r", MISSING), ("r", -1), ("r", 0), ("r", "4"), ("r", 2.5),
    ("r", True), ("r", 7), ("lora_dropout", "x"), ("lora_dropout", 1.5), ("use_rslora", "yes"),
    ("rank_pattern", {"attn.q": "x"}), ("alpha_pattern", ["attn.q"]),
])
def test_a_malformed_peft_config_is_a_config_error_and_changes_nothing(tmp_path, field, value):
    source = Transformer(model_config(MICRO))
    add_lora(source, "a", rank=2)
    folder = export_peft(source, tmp_path / "peft")
    config = json.loads((folder / PEFT_CONFIG).read_text())
    config = {k: v for k, v in config.items() if k != field} if value is MISSING else {**config, field: value}
    (folder / PEFT_CONFIG).write_text(json.dumps(config))
    on_disk = _files(tmp_path)
    model = Transformer(model_config(MICRO))
    keys = set(model.state_dict())
    with pytest.raises(ConfigError) as caught:
        load_lora(model, str(folder))
    assert str(folder / PEFT_CONFIG) in str(caught.value) and f"'{field}'" in str(caught.value)
    assert _files(tmp_path) == on_disk and set(model.state_dict()) == keys


def test_a_peft_config_that_is_no_object_is_one_line_from_the_command_line(tmp_path, capsys):
    source = Transformer(model_config(MICRO))
    add_lora(source, "a", rank=2)
    folder = export_peft(source, tmp_path / "peft")
    (folder / PEFT_CONFIG).write_text("[1, 2]")
    code, err = _cli(capsys, "train", *RUN, "-m", f"lora:load={folder},tasks=extra", "--out", tmp_path / "run")
    _refused(code, err, str(folder / PEFT_CONFIG), "JSON list")


# -- folders written whole: parts, the demo, new-plugin, IA³ -------------------------------------------------------

def test_replace_folder_leaves_nothing_beside_its_folder(tmp_path):
    def fail(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_folder(tmp_path / "out", fail, ours=lambda f: True, refusal="no")
    assert list(tmp_path.iterdir()) == []
    for text in ("one", "two"):
        replace_folder(tmp_path / "out", lambda tmp: (tmp / "f").write_text(text), ours=lambda f: True, refusal="no")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "f").read_text() == "two"


def test_saving_a_part_over_a_folder_that_is_no_part_is_refused(tmp_path):
    victim = _victim(tmp_path)
    before = _files(tmp_path)
    with pytest.raises(ConfigError, match="is not a saved part"):
        _part(victim)
    with pytest.raises(ConfigError, match="not a valid name"):
        _part(tmp_path / "x", name="a/b")
    assert _files(tmp_path) == before


def test_the_demo_replaces_only_its_own_stage_folders(tmp_path, capsys, monkeypatch):
    from tuneforge.tools import demo, demo_stage

    class Stop(Exception):
        pass

    def stop(**kw):  # the first stage's training: the demo got as far as replacing a stage folder
        raise Stop(kw["out"])

    monkeypatch.setattr(demo, "train", stop)
    out = tmp_path / "runs"
    (out / "pretrain").mkdir(parents=True)  # someone's own run of that name, beside their notes
    (out / "pretrain" / "notes.txt").write_text("my run\n")
    (out / "notes.txt").write_text("my notes\n")
    before = _files(tmp_path, skip="")
    code, err = _cli(capsys, "demo", "--quick", "--out", out)
    _refused(code, err, f"demo --out {out}", "notes.txt", "new or empty folder")
    assert _files(tmp_path, skip="") == before

    earlier = tmp_path / "demo"  # an earlier demo's layout (from before the marker): replaced stage by stage
    (earlier / "pretrain").mkdir(parents=True)
    (earlier / "pretrain" / "old.json").write_text("{}")
    (earlier / "demo.json").write_text("[]")
    with pytest.raises(Stop):
        demo.run_demo(earlier, quick=True)
    assert not (earlier / "pretrain").exists() and (earlier / demo_stage.MARKER).is_file()


def test_new_plugin_writes_nothing_through_a_link_out_of_its_folder(tmp_path, capsys):
    victim = _victim(tmp_path)
    dest = tmp_path / "pkg"
    dest.mkdir()
    (dest / "tests").symlink_to(victim, target_is_directory=True)
    before = _files(tmp_path, skip="pkg")
    _refused(*_cli(capsys, "new-plugin", "my-gain", "--dir", dest, "--force"), "leaves")
    assert _files(tmp_path, skip="pkg") == before and sorted(p.name for p in dest.iterdir()) == ["tests"]


def test_saving_ia3_over_a_folder_that_is_not_ia3_is_refused(tmp_path):
    ia3 = pytest.importorskip("tuneforge_ia3")
    model = Transformer(model_config(MICRO))
    ia3.add_ia3(model)
    victim = _victim(tmp_path)
    before = _files(tmp_path)
    with pytest.raises(ConfigError, match="is not an IA³ folder"):
        ia3.save_ia3(model, victim)
    assert _files(tmp_path) == before
    for _ in range(2):  # its own folder is replaced whole, nothing left beside it
        ia3.save_ia3(model, tmp_path / "ia3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ia3", "victim"]


def test_hf_tiny_writes_only_a_new_folder_or_one_it_wrote(tmp_path, capsys):
    user = tmp_path / "my-model"
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')  # a real model folder holds the same file names
    code = main(["hf-tiny", str(user), "--train-steps", "0", "--d-model", "16", "--layers", "1", "--heads", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("tuneforge: error:") == 1 and "not written by hf-tiny" in err
    assert [p.name for p in user.iterdir()] == ["config.json"] and json.loads((user / "config.json").read_text())
    tiny = tmp_path / "tiny"
    for family in ("gpt2", "llama"):  # the second replaces the first: it is hf-tiny's own
        assert main(["hf-tiny", str(tiny), "--family", family, "--train-steps", "0", "--d-model", "16",
                     "--layers", "1", "--heads", "2"]) == 0
    assert json.loads((tiny / "config.json").read_text())["model_type"] == "llama"
