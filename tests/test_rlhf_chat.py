"""RLHF on chat prompts: ranking rows are the chat template's rendering (bytes and a Hugging Face tokenizer), text
prompts keep their rows, rollouts answer after the generation prompt and stop at eos only, malformed conversations
are refused naming file:line before anything is written, and reward-model, dpo and ppo train on conversations."""
import json
import math
import re

import pytest
import torch

import tuneforge
from tuneforge import DataError
from tuneforge.data.chat import template_of
from tuneforge.data.rankings import prompt_ids, ranking_batch, ranking_ids, read_rankings
from tuneforge.data.world import builtin, hidden_judge
from tuneforge.models.tokenizer import ByteTokenizer
from tuneforge.rlhf.rollout import judge_for, sample

SYSTEM = "answer kindly."
# A ChatML-like template whose end-of-turn is the tiny tokenizer's eos, with a newline after it (layout, not answer)
TEMPLATE = ("{% for m in messages %}{{ '<|bos|>' + m['role'] + '\\n' + m['content'] + '<|eos|>' + '\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|bos|>assistant\\n' }}{% endif %}")


def _chat(record: dict) -> dict:
    return {**record, "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": record["prompt"]}]}


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return (_write(root / "train.jsonl", [_chat(r) for r in builtin("rankings")[:160]]),
            _write(root / "test.jsonl", [_chat(r) for r in builtin("rankings", "test")[:16]]))


@pytest.fixture(scope="module")
def hf_chat(tmp_path_factory):
    """A tiny Llama folder with a chat template written into its tokenizer_config.json."""
    pytest.importorskip("transformers")
    from tuneforge.tools.hf_tiny import make_tiny

    folder = make_tiny(tmp_path_factory.mktemp("hf") / "llama", "llama", d_model=32, n_layers=2, n_heads=4,
                       context=128, vocab_size=320)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    return folder


def _hf_tokenizer(folder):
    from tuneforge.models.hf_tokenizer import HFTokenizer

    return HFTokenizer(folder)


def _rows(batch):
    """(row ids up to its last token, its record index, its response index, start) of each row of a batch."""
    for n in range(batch["input"].size(0)):
        last = int(batch["last"][n])
        yield (batch["input"][n, :last + 1].tolist(), int(batch["record"][n]), int(batch["response"][n]),
               int(batch["start"][n]))


def test_chat_rows_are_the_template_rendering(chat_data):
    tok = ByteTokenizer()
    template = template_of(tok)
    records = read_rankings(chat_data[0])[:4]
    assert records[0].prompt == _chat(builtin("rankings")[0])["prompt"]
    batch = ranking_batch(records, tok, context=256)
    for ids, r, k, start in _rows(batch):
        rec, response = records[r], records[r].responses[k]
        assert tok.decode(ids, skip_special=False) == template.render(
            rec.prompt + [{"role": "assistant", "content": response}])
        # the built-in template by hand: the chat path, not the text layout
        assert tok.decode(ids, skip_special=False) == (f"<bos>{SYSTEM}\nQ: {rec.prompt[1]['content']}\nA: "
                                                       f"{response}<eos>")
        assert ids[:start] == prompt_ids(tok, rec.prompt) == template.prompt_ids(rec.prompt)  # what a policy follows
        assert ids[-1] == tok.eos_id and tok.decode(ids[start:-1]) == response


def test_text_prompts_keep_their_rows_with_bytes_and_subwords(hf_chat):
    records = builtin("rankings")[:12]
    for tok in (ByteTokenizer(), _hf_tokenizer(hf_chat)):
        for r in records:
            head = tok.encode(r["prompt"] + " ", bos=True)  # the layout before chat prompts: bos prompt ␣
            assert prompt_ids(tok, r["prompt"]) == head
            for response in r["responses"]:
                assert ranking_ids(tok, r["prompt"], response) == (head + tok.encode(response, eos=True), len(head))


def test_dpo_rows_on_a_hugging_face_model_end_with_the_templates_end_of_turn(hf_chat, chat_data, tmp_path):
    train, held = chat_data
    result = tuneforge.train(model=f"hf:{hf_chat}", mechanisms=["dpo:judge=none,eval_limit=8"], data=train,
                             eval_data=held, steps=2, batch_size=4, lr=1e-3, warmup=1, eval_every=0,
                             out=str(tmp_path / "run"))
    assert all(math.isfinite(h["loss"]) for h in result.history) and len(result.history) == 2
    tok, dpo = result.run.tokenizer, result.run.plugins["dpo"]
    assert tok.chat_template == TEMPLATE
    template = template_of(tok)
    batch = ranking_batch(dpo.train[:3], tok, result.run.model_config.max_seq_len, with_ties=False)
    for ids, r, k, start in _rows(batch):
        rec = dpo.train[r]
        rendered = template.render(rec.prompt + [{"role": "assistant", "content": rec.responses[k]}])
        assert rendered.endswith("<|eos|>\n")
        assert ids[-1] == tok.eos_id  # the end-of-turn, not the newline the template writes after it
        assert tok.decode(ids, skip_special=False) == rendered[:-1]
        assert ids[:start] == template.prompt_ids(rec.prompt)
    # the reference's log-probabilities of those rows were cached as the batches held them
    assert bool(torch.isfinite(dpo.ref_logp).any())


class _Scripted:
    """A stand-in for ``model.generate`` that writes ``a \\n b eos`` after every prompt and records its stop ids."""

    def __init__(self, tok):
        self.tok, self.stops = tok, []

    def __call__(self, left, max_new_tokens, *, eos_id, pad_id, **kw):
        self.stops.append(list(eos_id))
        new = [ord("a"), 10, ord("b"), self.tok.eos_id] + [pad_id] * (max_new_tokens - 4)
        return torch.cat([left, torch.tensor([new] * left.size(0))], dim=1)


def test_chat_rollouts_answer_after_the_generation_prompt_and_stop_at_eos_only():
    tok = ByteTokenizer()
    chat = [_chat({"prompt": "describe the lake."})["prompt"], [{"role": "user", "content": "and the river?"}]]
    prompts = [chat[0], "describe the lake.", chat[1]]  # mixed: each kind is generated with its own stops
    generate = _Scripted(tok)
    s = sample(generate, tok, prompts, max_new_tokens=8)
    assert sorted(generate.stops) == [[10, tok.eos_id], [tok.eos_id]]
    assert s.prompts == prompts and s.texts == ["a\nb", "a", "a\nb"] and s.stopped.all()
    for i, p in enumerate(prompts):
        row = s.input[i, :int(s.last[i]) + 1].tolist()
        assert row[:int(s.start[i])] == prompt_ids(tok, p)
        assert row[int(s.start[i]):] == ([ord("a"), 10] if isinstance(p, str) else [ord("a"), 10, ord("b"), tok.eos_id])
    assert int(s.mask.sum()) == int(s.lengths.sum()) == 2 + 4 + 4


def test_the_world_judges_a_conversation_by_its_last_user_message():
    prompt = builtin("rankings", "test")[0]["prompt"]
    texts = ["a nice calm answer", "the old bakery was sad"]
    judge = judge_for("world", "chat.jsonl", chat=True)
    assert judge([_chat({"prompt": prompt})["prompt"], prompt], texts) == hidden_judge([prompt, prompt], texts)
    assert judge_for("world", "chat.jsonl") is hidden_judge  # text prompts: the judge itself, as before


ROBOT = [{"role": "robot", "content": "describe the lake."}]


@pytest.mark.parametrize("mechanism, prompt, message", [
    ("reward-model", ROBOT, r"prompt\[0\]: unknown role \"robot\""),
    ("reward-model", [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "  "}],
     r"prompt\[1\] \(user\): content must be a non-empty string"),
    ("reward-model", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
     r"last message has role 'assistant'"),
    ("reward-model", [], r"non-empty list"),
    ("dpo", ROBOT, r"unknown role \"robot\""),
    ("ppo", ROBOT, r"unknown role \"robot\""),
], ids=["role", "empty-content", "ends-with-answer", "no-messages", "dpo", "ppo"])
def test_a_bad_conversation_is_refused_naming_its_line_before_anything_is_written(pretrained, tmp_path, mechanism,
                                                                                  prompt, message):
    records = [_chat(r) for r in builtin("rankings")[:40]]
    records[2] = {**records[2], "prompt": prompt}
    data = _write(tmp_path / "bad.jsonl", records)
    spec = f"ppo:reward={pretrained},rollouts=8" if mechanism == "ppo" else mechanism
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'bad.jsonl'}:3: ") + f".*{message}"):
        tuneforge.train(init=str(pretrained), mechanisms=[spec], data=data, steps=1, batch_size=8,
                        out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def chat_reward(pretrained, chat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm-chat") / "run"
    result = tuneforge.train(init=str(pretrained), mechanisms=["reward-model"], data=chat_data[0],
                             eval_data=chat_data[1], steps=40, batch_size=8, lr=5e-3, warmup=4, eval_every=0,
                             out=str(out))
    return out, result


def test_the_reward_model_trains_on_conversations(chat_reward, chat_data):
    out, result = chat_reward
    losses = [h["loss"] for h in result.history]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-8:]) < sum(losses[:8])
    assert math.isfinite(result.metrics["eval/pairwise_accuracy"])
    # it scores a conversation as it was trained: the chat template's row, read at the answer's eos
    from tuneforge.sdk import score

    rec = read_rankings(chat_data[1])[0]
    model = tuneforge.load_model(out)
    chat = score(model, [rec.prompt] * len(rec.responses), rec.responses)
    text = score(model, [rec.prompt[1]["content"]] * len(rec.responses), rec.responses)
    assert chat.shape == (len(rec.responses),) and not torch.allclose(chat, text)


def test_dpo_trains_on_conversations_and_is_judged_on_their_questions(pretrained, chat_data, tmp_path):
    train, held = chat_data
    dpo = "dpo:judge=world,beta=0.5,eval_prompts=8,max_new_tokens=16"
    result = tuneforge.train(init=str(pretrained), mechanisms=[dpo], data=train, eval_data=held, steps=8,
                             batch_size=8, lr=3e-3, warmup=1, eval_every=0, out=str(tmp_path / "run"))
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert result.metrics["loss"] < math.log(2)  # moved away from the reference's log 2
    for key in ("eval/pair_accuracy", "eval/win_rate", "eval/kl_per_token"):
        assert math.isfinite(result.metrics[key]), key


def test_ppo_trains_on_conversations_with_the_chat_reward_model(chat_reward, pretrained, chat_data, tmp_path):
    rm, _ = chat_reward
    ppo = f"ppo:reward={rm},rollouts=8,ppo_epochs=2,max_new_tokens=24,eval_prompts=8,judge=world"
    result = tuneforge.train(init=str(pretrained), mechanisms=["lora:rank=4", ppo], data=chat_data[0],
                             eval_data=chat_data[1], steps=4, batch_size=4, lr=1e-2, warmup=1, eval_every=0,
                             out=str(tmp_path / "run"))
    assert result.run.plugins["ppo"].chat
    for key in ("loss", "reward", "kl", "policy_loss", "value_loss", "judge_score", "eval/win_rate",
                "eval/kl_per_token"):
        assert key in result.metrics and math.isfinite(result.metrics[key]), key
