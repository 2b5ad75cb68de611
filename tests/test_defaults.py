"""Options a run leaves to the engine are sized to the model (engine/defaults.py), printed, recorded and kept on
resume; objectives leave room in the context for a soft prompt whichever mechanism brings them."""
from __future__ import annotations

import json

import pytest
import torch

import tuneforge
from tuneforge.engine import defaults
from tuneforge.engine.config import TrainConfig
from tuneforge.models.transformer import ModelConfig

pytest.importorskip("transformers")
from tuneforge.tools.hf_tiny import make_tiny  # noqa: E402

CPU = torch.device("cpu")
GIB = 2**30


class _Sizes:  # what defaults.resolve reads of a description
    def __init__(self, context, n_layers=30, d_model=576):
        self.max_seq_len, self.n_layers, self.d_model = context, n_layers, d_model


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("hf") / "gpt2", "gpt2", train_steps=0, d_model=32, n_layers=2,
                     n_heads=4, context=96, vocab_size=320)


def test_the_embedded_presets_keep_their_toy_defaults():
    got = defaults.resolve(TrainConfig(), ModelConfig(), pretrained=False, only_new=False, device=CPU)
    assert (got.config.batch_size, got.config.lr, got.config.warmup) == (16, 3e-3, 30)
    assert got.config.seq_len is None and got.lines == []  # the whole (small) context, as before


def test_a_pretrained_model_gets_a_short_window_a_batch_that_fits_and_a_gentle_rate():
    sizes = _Sizes(context=8192)
    got = defaults.resolve(TrainConfig(steps=100), sizes, pretrained=True, only_new=True, device=CPU,
                           free_bytes=64 * GIB)
    assert got.config.seq_len == defaults.MAX_DEFAULT_SEQ_LEN
    assert got.config.lr == defaults.NEW_PARAMS_LR and got.config.warmup == 10
    per_row = 1024 * 30 * 576 * 136  # the estimate's bytes per row at 1,024 tokens
    assert got.config.batch_size == max(b for b in defaults.BATCH_CHOICES if b * per_row <= 16 * GIB)
    assert any(line.startswith("--seq-len 1024") for line in got.lines)
    whole = defaults.resolve(TrainConfig(), sizes, pretrained=True, only_new=False, device=CPU, free_bytes=64 * GIB)
    assert whole.config.lr == defaults.PRETRAINED_LR < defaults.NEW_PARAMS_LR


def test_the_batch_shrinks_with_free_memory_and_never_below_one():
    sizes = _Sizes(context=1024)
    per_row = 1024 * 30 * 576 * 136
    batches = [defaults.resolve(TrainConfig(), sizes, pretrained=True, only_new=True, device=CPU,
                                free_bytes=int(free)).config.batch_size
               for free in (64 * per_row, 8 * per_row, 4 * per_row, per_row)]
    assert batches == [8, 2, 1, 1]


def test_what_the_user_asked_for_is_kept():
    cfg = TrainConfig(batch_size=32, seq_len=4096, lr=1e-3, warmup=5)
    got = defaults.resolve(cfg, _Sizes(8192), pretrained=True, only_new=True, device=CPU, free_bytes=GIB)
    assert got.config == cfg and got.lines == []


def test_a_soft_prompt_shortens_the_default_window():
    got = defaults.resolve(TrainConfig(), _Sizes(1030), pretrained=True, only_new=True, device=CPU,
                           prefix_tokens=16, free_bytes=GIB)
    assert got.config.seq_len is None  # 1,014 positions left: the whole of them, under the 1,024 cap
    got = defaults.resolve(TrainConfig(), _Sizes(2048), pretrained=True, only_new=True, device=CPU,
                           prefix_tokens=16, free_bytes=GIB)
    assert got.config.seq_len == 1024


def test_a_run_prints_records_and_resumes_with_the_chosen_defaults(gpt2, tmp_path, capfd):
    out = tmp_path / "run"
    tuneforge.train(model=f"hf:{gpt2}", mechanisms=["lora"], data="builtin:text", steps=2, out=str(out),
                    eval_every=0)
    err = capfd.readouterr().err
    assert "default --lr 0.0002" in err and "default --batch-size" in err
    saved = json.loads((out / "config.json").read_text())["train"]
    assert saved["lr"] == defaults.NEW_PARAMS_LR and saved["batch_size"] in defaults.BATCH_CHOICES
    # a resume that again leaves them to the engine gets the checkpoint's, whatever memory is free now
    result = tuneforge.train(model=f"hf:{gpt2}", mechanisms=["lora"], data="builtin:text", steps=3, out=str(out),
                             eval_every=0, resume="auto")
    assert "resume_changes" not in result.summary or set(result.summary["resume_changes"]) == {"steps"}


@pytest.mark.parametrize("objective", ["pretrain", "finetune"])
def test_text_objectives_leave_room_for_a_soft_prompt(gpt2, objective, tmp_path, capfd):
    """A text objective brought by another mechanism than prompt-tuning still fits the prompt in the context: the
    window is the context minus the prompt (here 96 - 16), not the whole context. The command's main() in this
    process (a process of its own imports torch and transformers again, ~4 s a case)."""
    from tuneforge.tools.cli import main

    code = main(["train", "-m", objective, "-m", "prompt-tuning", "--model", f"hf:{gpt2}", "--data", "builtin:text",
                 "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "run")])
    assert code == 0, capfd.readouterr().err[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
