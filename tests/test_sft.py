"""The sft objective: chat records to rows with the answers marked, packed batches equal to padded ones in loss and
gradients on both model kinds, exact resume with packing, beside every parameterisation, errors before any file."""
from __future__ import annotations

import json
import random

import pytest
import torch

import tuneforge
from tuneforge.errors import ConfigError, DataError
from tuneforge.models.lm_loss import next_token_loss_of
from tuneforge.models.tokenizer import ByteTokenizer
from tuneforge.plugins.sft.examples import (IGNORE, packed_batch, packed_batches, padded_batch, padded_batches,
                                            read_examples)

from conftest import micro_config
from test_engine import SignalAt, assert_same_weights, weights

MODEL = "tiny:n_layers=2,d_model=32,n_heads=2,max_seq_len=64"


def qa_file(path, n=60, seed=0, long_every=0):
    """Addition questions of varied length, some as chats with a system turn and two answers."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            if i % 3 == 0:
                rec = {"messages": [{"role": "system", "content": "add"}, {"role": "user", "content": f"{a}+{b}"},
                                    {"role": "assistant", "content": str(a + b)},
                                    {"role": "user", "content": f"and +{a}?"},
                                    {"role": "assistant", "content": str(2 * a + b)}], "kind": "chat"}
            else:
                pad = " please" * rng.randint(0, 3) + (" x" * 80 if long_every and i % long_every == 1 else "")
                rec = {"prompt": f"what is {a} plus {b}{pad}?", "completion": str(a + b), "kind": "sum"}
            f.write(json.dumps(rec) + "\n")
    return str(path)


def sft_config(tmp_path, data, mechanisms=("sft",), **kw):
    base = dict(model=MODEL, mechanisms=list(mechanisms), data=data, steps=8, batch_size=4, lr=3e-3, warmup=1,
                eval_every=0, out=str(tmp_path / "run"))
    base.update(kw)
    return micro_config(**base)


def test_rows_mark_only_the_answers(tmp_path):
    data = qa_file(tmp_path / "qa.jsonl", n=6)
    tok = ByteTokenizer()
    read = read_examples(data, "train", tok, train_on="assistant", room=63, truncate="left")
    chat, plain = read.examples[0], read.examples[1]
    learnt = lambda e: tok.decode([t for t in e.target if t != IGNORE], skip_special=False)  # noqa: E731
    a, b = map(int, chat.messages[1]["content"].split("+"))
    assert learnt(chat) == f"{a + b}<eos>{2 * a + b}<eos>"
    assert learnt(plain) == plain.messages[-1]["content"] + "<eos>"
    assert chat.kind == "chat" and plain.kind == "sum"
    completion = read_examples(data, "train", tok, train_on="completion", room=63, truncate="left").examples[0]
    assert learnt(completion) == f"{2 * a + b}<eos>"


def _packed_equals_padded(model, examples, pad_id):
    padded = padded_batch(examples, pad_id)
    packed = packed_batch([examples[:2], examples[2:]], max(len(e) for e in examples) * 3, pad_id)
    assert packed["cu_seqlens"].shape[0] == 2 and packed["tokens"] == padded["tokens"]
    assert packed["trained_tokens"] == padded["trained_tokens"] == int((padded["target"] != IGNORE).sum())
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        extra = {k: batch[k] for k in ("positions", "cu_seqlens") if k in batch}
        loss = next_token_loss_of(model, batch["input"], batch["target"], ignore_index=IGNORE, **extra)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_packed_loss_and_gradients_equal_the_padded_ones_on_the_embedded_model(tmp_path):
    from tuneforge.models.transformer import Transformer, model_config

    torch.manual_seed(0)
    model = Transformer(model_config("tiny:n_layers=2,d_model=32,n_heads=2,max_seq_len=256"))
    tok = ByteTokenizer()
    ex = read_examples(qa_file(tmp_path / "qa.jsonl", n=5), "train", tok, train_on="assistant", room=63,
                       truncate="left").examples
    _packed_equals_padded(model, ex, tok.pad_id)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_loss_and_gradients_equal_the_padded_ones_on_hf_models(tmp_path, family):
    pytest.importorskip("transformers")
    from tuneforge.models import hf
    from tuneforge.tools.hf_tiny import make_tiny

    folder = make_tiny(tmp_path / family, family, d_model=32, n_layers=2, n_heads=4, context=256, vocab_size=320)
    model = hf.load(folder).eval()  # eval: GPT-2's dropout would differ between the two forwards
    ex = read_examples(qa_file(tmp_path / "qa.jsonl", n=5), "train", model.tokenizer, train_on="assistant",
                       room=120, truncate="left").examples
    _packed_equals_padded(model, ex, model.tokenizer.pad_id)


def test_packed_batches_fill_rows_and_keep_every_record_once(tmp_path):
    tok = ByteTokenizer()
    ex = read_examples(qa_file(tmp_path / "qa.jsonl", n=40), "train", tok, train_on="assistant", room=63,
                       truncate="left").examples
    batches = list(packed_batches(ex, batch_size=2, width=200, pad_id=tok.pad_id, seed=1, epoch=0))
    assert all(b["input"].shape[1] == 200 and b["input"].shape[0] <= 2 for b in batches)
    seen = sum(int((b["cu_seqlens"][:, 1:] > b["cu_seqlens"][:, :-1]).sum()) for b in batches)
    assert seen == len(ex)  # every record packed once per epoch, none split
    assert sum(b["tokens"] for b in batches) == sum(len(e) for e in ex)
    fill = sum(b["tokens"] for b in batches) / sum(b["input"].numel() for b in batches)
    padded = list(padded_batches(ex, batch_size=4, pad_id=tok.pad_id, seed=1, epoch=0))
    padded_fill = sum(b["tokens"] for b in padded) / sum(b["input"].numel() for b in padded)
    assert fill > max(0.9, padded_fill)  # packing wastes less than padding each batch to its longest
    again = list(packed_batches(ex, batch_size=2, width=200, pad_id=tok.pad_id, seed=1, epoch=0))
    assert all(torch.equal(a["input"], b["input"]) for a, b in zip(batches, again))  # (seed, epoch) decide


@pytest.mark.parametrize("packing", [False, True])
def test_sft_alone_learns_the_answers_and_reports_tokens(tmp_path, packing):
    data = qa_file(tmp_path / "qa.jsonl")
    result = tuneforge.train(sft_config(tmp_path, data, mechanisms=[f"sft:packing={str(packing).lower()}"],
                                        steps=25, eval_every=25))
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert all(0 < m["trained_tokens"] < m["tokens_per_s"] * 1e6 for m in lines)
    summary = result.summary
    assert summary["sft"]["records"] + summary["sft"]["held_out"] == 60
    assert {"exact_match", "exact_match/sum", "exact_match/chat"} <= summary["sft"]["zero_shot"].keys()
    assert {"eval/loss", "eval/exact_match", "eval/exact_match/sum"} <= summary["eval"].keys()
    assert result.run.trainable["sft"] == sum(p.numel() for p in result.model.parameters())


@pytest.mark.parametrize("mechanism", ["lora:targets=q,v", "adapter", "prompt-tuning:tokens=4", "finetune:layers=1"])
def test_sft_is_the_objective_beside_any_parameterisation(tmp_path, mechanism):
    data = qa_file(tmp_path / "qa.jsonl")
    result = tuneforge.train(sft_config(tmp_path, data, mechanisms=[mechanism, "sft"], steps=6))
    assert result.run.objective == "sft"
    assert "sft" not in result.run.trainable or result.run.trainable["sft"] == 0
    assert result.summary["status"] == "completed"


def test_packing_resumes_exactly(tmp_path):
    data = qa_file(tmp_path / "qa.jsonl", n=80)
    common = dict(steps=12, batch_size=2, eval_every=0)
    mech = ["sft:packing=true"]
    full = tuneforge.train(sft_config(tmp_path / "full", data, mechanisms=mech, **common))
    first = tuneforge.train(sft_config(tmp_path / "part", data, mechanisms=mech + [SignalAt(5)], **common))
    assert first.run.step == 5
    resumed = tuneforge.train(sft_config(tmp_path / "part", data, mechanisms=mech, resume="auto", **common))
    assert resumed.run.step == 12
    assert_same_weights(weights(full.model), weights(resumed.model))


def test_long_records_are_cut_from_the_left_and_counted_or_refused(tmp_path):
    data = qa_file(tmp_path / "qa.jsonl", long_every=5)
    result = tuneforge.train(sft_config(tmp_path, data, steps=2))
    assert result.summary["sft"]["truncated"] > 0
    with pytest.raises(DataError, match=r"qa.jsonl:2: the record is \d+ tokens, longer than the context of 64"):
        tuneforge.train(sft_config(tmp_path / "e", data, mechanisms=["sft:truncate=error"], steps=2))
    assert not (tmp_path / "e" / "run").exists()


def test_a_malformed_record_stops_the_run_before_anything_is_written(tmp_path):
    data = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "q", "completion": "a"})
    data.write_text("\n".join([good] * 5 + [json.dumps({"messages": [{"role": "bot", "content": "x"}]})]) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:6: messages\[0\]: unknown role \"bot\""):
        tuneforge.train(sft_config(tmp_path, str(data)))
    assert not (tmp_path / "run").exists()


def test_refusals(tmp_path):
    data = qa_file(tmp_path / "qa.jsonl")
    with pytest.raises(ConfigError, match="packing=true cannot be combined with soft prompts"):
        tuneforge.train(sft_config(tmp_path, data, mechanisms=["prompt-tuning:tokens=4", "sft:packing=true"]))
    with pytest.raises(ConfigError, match="instruction tuning needs the LM head"):
        tuneforge.train(sft_config(tmp_path, data, mechanisms=["finetune:head=classify,labels=a,b", "sft"]))
    assert not (tmp_path / "run").exists()


def test_chat_records_without_sft_say_to_add_it(tmp_path):
    with pytest.raises(DataError, match="field 'text' is missing .* it is a chat record: train on it with -m sft"):
        tuneforge.train(sft_config(tmp_path, "builtin:instruct", mechanisms=["lora"]))


@pytest.mark.parametrize("layers", ["0", "1"])
def test_sft_alone_with_layers_trains_the_last_blocks_and_an_untied_head(tmp_path, layers):
    data = qa_file(tmp_path / "qa.jsonl")
    result = tuneforge.train(sft_config(tmp_path, data, mechanisms=[f"sft:layers={layers}"], steps=3))
    model = result.model
    assert model.lm_head.weight is not model.tok_emb.weight  # untied: the embedding stays frozen
    assert not model.tok_emb.weight.requires_grad and model.lm_head.weight.requires_grad
    trains = [any(p.requires_grad for p in b.parameters()) for b in model.blocks]
    assert trains == [False] * (len(trains) - int(layers)) + [True] * int(layers)
    assert result.summary["frozen_weights"]["unchanged"]


def test_evaluation_asks_a_cut_record_as_it_was_cut(tmp_path):
    from tuneforge.models.transformer import Transformer, model_config
    from tuneforge.data.chat import template_of
    from tuneforge.plugins.sft.evaluate import exact_match

    model = Transformer(model_config(MODEL)).eval()  # a 64-token context
    read = read_examples(qa_file(tmp_path / "qa.jsonl", n=12, long_every=5), "train", ByteTokenizer(),
                         train_on="assistant", room=63, truncate="left")
    whole = template_of(ByteTokenizer())
    cut = [e for e in read.examples if len(whole.prompt_ids(e.messages[:-1])) > 64]  # whole: over the context
    assert cut and read.truncated >= len(cut)
    scores = exact_match(model, cut, batch_size=4, device="cpu")
    assert set(scores) == {"exact_match", "exact_match/sum"} and 0 <= scores["exact_match"] <= 1
