"""Every refused input is one ``tuneforge: error:`` line naming what was wrong and where, exit code 2, no
traceback, and nothing written to ``--out``: one table of bad inputs, each run through the real command line."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tuneforge.tools.cli import main

MICRO = "tiny:n_layers=1,d_model=32,n_heads=2,max_seq_len=32"
SMALL_RUN = ["--model", MICRO, "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0"]


def _jsonl_with_bad_byte_on_line_700() -> bytes:
    """699 lines (every seventh blank) of ~60 bytes, then a Latin-1 'é': far past the first block a text-mode
    reader decodes ahead, so a line count taken while iterating lags behind the real line."""
    lines = [b"" if i % 7 == 0 else json.dumps({"text": f"record {i} " + "words " * 8}).encode() for i in range(1, 700)]
    return b"\n".join(lines + [b'{"text": "caf\xe9"}', b'{"text": "fine"}']) + b"\n"


def _labels_with_a_stray_capital() -> str:
    rows = [{"text": f"review {i}", "label": "positive" if i % 2 else "negative"} for i in range(1, 25)]
    rows[4]["label"] = "Positive"  # line 5; "positive" first appears on line 1
    return "".join(json.dumps(r) + "\n" for r in rows)


# -- damaged Hugging Face folders: each a function of the folder, applied to a fresh copy --------------------

def _broken_config(folder):
    (folder / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": ]\n}\n')  # line 2


def _config_of_other_shapes(folder):
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 100  # the weight file holds a 300-row embedding
    (folder / "config.json").write_text(json.dumps(config))


def _truncated_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _truncated_tokenizer(folder):
    text = (folder / "tokenizer.json").read_text()
    (folder / "tokenizer.json").write_text(text[: len(text) // 2])


def _tokenizer_beyond_the_embedding(folder):
    tok = json.loads((folder / "tokenizer.json").read_text())
    used = max(t["id"] for t in tok["added_tokens"]) + len(tok["model"]["vocab"])
    tok["added_tokens"].append({"id": used + 5, "content": "<|extra|>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(tok))


# (argv, {file: content}, words the error must contain). In argv and words, {tmp} is the case's folder and {hf}
# a copy of a tiny Llama folder; a content of None makes a folder, a function damages the {hf} copy.
CASES = [
    pytest.param(["-m", "pretrain", "--lr", "nan"], {}, ["--lr", "nan", "finite"], id="lr-nan"),
    pytest.param(["-m", "pretrain", "--lr", "inf"], {}, ["--lr", "inf", "finite"], id="lr-inf"),
    pytest.param(["-m", "pretrain", "--config", "{tmp}/run.toml"], {"run.toml": "lr = nan\n"},
                 ["lr", "run.toml", "finite"], id="toml-lr-nan"),
    pytest.param(["-m", "pretrain", "--beta1", "2"], {}, ["--beta1", "[0, 1)", "2.0"], id="beta1-2"),
    pytest.param(["-m", "pretrain", "--beta2", "nan"], {}, ["--beta2", "finite"], id="beta2-nan"),
    pytest.param(["-m", "pretrain", "--weight-decay", "-5"], {}, ["--weight-decay", "-5"], id="weight-decay-neg"),
    pytest.param(["-m", "pretrain", "--clip", "-1"], {}, ["--clip", "-1"], id="clip-neg"),
    pytest.param(["-m", "pretrain", "--min-lr-ratio", "nan"], {}, ["--min-lr-ratio"], id="min-lr-ratio-nan"),
    pytest.param(["-m", "pretrain", "--seed", str(2**64)], {}, ["--seed", str(2**64)], id="seed-overflow"),
    pytest.param(["-m", "pretrain", "--model", "tiny:n_layers=1,d_model=32,n_heads=2,norm_eps=0"], {},
                 ["norm_eps", "> 0"], id="model-norm-eps-0"),
    pytest.param(["-m", "lora:alpha=nan"], {}, ["alpha", "lora", "finite"], id="lora-alpha-nan"),
    pytest.param(["-m", "dpo:beta=nan,judge=none", "--data", "builtin:rankings"], {}, ["beta", "dpo", "finite"],
                 id="dpo-beta-nan"),
    pytest.param(["-m", "pretrain", "--config", "{tmp}/conf"], {"conf": None}, ["--config", "conf", "folder"],
                 id="config-is-a-folder"),
    pytest.param(["-m", "pretrain", "--config", "{tmp}/run.toml"], {"run.toml": b"steps = 2\n# caf\xe9\n"},
                 ["run.toml:2", "UTF-8"], id="config-not-utf8"),
    pytest.param(["-m", "pretrain", "--model", "tiny:vocab_size=10"], {}, ["vocab_size", "259"], id="tiny-vocab-10"),
    pytest.param(["-m", "pretrain", "--model", "hf:{hf}"], {"hf": _broken_config}, ["config.json:2", "{hf}"],
                 id="hf-config-broken"),
    pytest.param(["-m", "pretrain", "--model", "hf:{hf}"], {"hf": _config_of_other_shapes}, ["config.json", "hf:{hf}"],
                 id="hf-config-other-shapes"),
    pytest.param(["-m", "pretrain", "--model", "hf:{hf}"], {"hf": _truncated_weights}, ["model.safetensors",
                 "truncated", "{hf}"], id="hf-weights-truncated"),
    pytest.param(["-m", "pretrain", "--model", "hf:{hf}"], {"hf": _truncated_tokenizer}, ["tokenizer.json", "{hf}"],
                 id="hf-tokenizer-broken"),
    pytest.param(["-m", "pretrain", "--model", "hf:{hf}"], {"hf": _tokenizer_beyond_the_embedding},
                 ["hf:{hf}", "embedding has 300 rows", "tokenizer"], id="hf-tokenizer-beyond-embedding"),
    pytest.param(["-m", "finetune", "--data", "{tmp}/labels.jsonl"], {"labels.jsonl": _labels_with_a_stray_capital()},
                 ["labels.jsonl:5", "'Positive'", "'positive'", "labels.jsonl:1"], id="labels-differ-in-case"),
    pytest.param(["-m", "pretrain", "--data", "{tmp}/data.jsonl"], {"data.jsonl": _jsonl_with_bad_byte_on_line_700()},
                 ["data.jsonl:700:", "UTF-8"], id="jsonl-not-utf8-line"),
    pytest.param(["-m", "pretrain", "--data", "{tmp}/notes.txt"], {"notes.txt": b"one\n\ntwo\n\xff three\n"},
                 ["notes.txt:4:", "UTF-8"], id="txt-not-utf8-line"),
]

# These run as a real `python -m tuneforge` too: the whole process's stderr, transformers' own logging included.
SUBPROCESS = {"lr-nan", "hf-config-other-shapes", "labels-differ-in-case"}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    from tuneforge.tools.hf_tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("hf") / "llama", "llama", d_model=32, n_layers=1, n_heads=2, context=64,
                     vocab_size=300, train_steps=0)


def _prepare(tmp_path, argv, files, words, request):
    """The case's files under tmp_path, and argv / words with {tmp} and {hf} filled in."""
    names = {"tmp": str(tmp_path), "hf": str(tmp_path / "hf")}
    for name, content in files.items():
        path = tmp_path / name
        if content is None:
            path.mkdir()
        elif callable(content):
            shutil.copytree(request.getfixturevalue("hf_folder"), path)
            content(path)
        else:
            (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    fill = lambda s: s.format(**names)  # noqa: E731
    return [fill(a) for a in argv], [fill(w) for w in words]


def _check(code, out, err, words, out_dir):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}\nstderr:\n{err}"
    assert "Traceback" not in out + err, err
    assert len(lines) == 1 and lines[0].startswith("tuneforge: error: "), f"not one error line:\n{err}"
    for word in words:
        assert word in lines[0], f"{word!r} missing from: {lines[0]}"
    assert not out_dir.exists(), f"{out_dir} was written"


@pytest.mark.parametrize("argv, files, words", CASES)
def test_refused_input_is_one_error_line_and_writes_nothing(argv, files, words, tmp_path, capfd, request):
    argv, words = _prepare(tmp_path, argv, files, words, request)
    out_dir = tmp_path / "out"
    code = main(["train", *SMALL_RUN, *argv, "--out", str(out_dir)])  # the case's flags win
    out, err = capfd.readouterr()
    _check(code, out, err, words, out_dir)


@pytest.mark.parametrize("argv, files, words", [c for c in CASES if c.id in SUBPROCESS])
def test_refused_input_in_a_real_process(argv, files, words, tmp_path, request):
    argv, words = _prepare(tmp_path, argv, files, words, request)
    out_dir = tmp_path / "out"
    env = {**os.environ, "TUNEFORGE_LOAD_PLUGINS": ""}
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", *SMALL_RUN, *argv, "--out", str(out_dir)],
                          capture_output=True, text=True, env=env, timeout=300)
    _check(proc.returncode, proc.stdout, proc.stderr, words, out_dir)
