"""Chat records and templates (tuneforge.data.chat): validation with file:line, rendering as transformers renders,
which tokens train, eos only where the template ends no turn, left truncation."""
from __future__ import annotations

import json

import pytest

from tuneforge.data.chat import BUILTIN_TEMPLATE, ChatTemplate, chat_messages, template_of
from tuneforge.errors import DataError
from tuneforge.models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a?"},
                     {"role": "assistant", "content": "bb"}, {"role": "user", "content": "c?"},
                     {"role": "assistant", "content": "dd"}]}


def trained_text(tok, ex) -> str:
    return tok.decode([i for i, t in zip(ex.ids, ex.trained) if t], skip_special=False)


def test_prompt_completion_is_a_user_turn_and_an_answer():
    assert chat_messages({"prompt": "hi", "completion": "yo"}, "f:1") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    listed = chat_messages({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                            "completion": "c"}, "f:1")
    assert [m["role"] for m in listed] == ["system", "user", "assistant"]


@pytest.mark.parametrize("record, needle", [
    ({"text": "x"}, "needs 'messages'"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role \"robot\""),
    ({"messages": [{"role": "user", "content": "  "}]}, "non-empty string"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, "before any user"),
    ({"prompt": "x", "completion": ""}, "'completion' must be a non-empty string"),
    ({"messages": ["hello"]}, "'role' and 'content'"),
])
def test_malformed_records_name_the_record(record, needle):
    with pytest.raises(DataError) as err:
        chat_messages(record, "data.jsonl:7")
    assert str(err.value).startswith("data.jsonl:7") and needle in str(err.value)


def test_a_prompt_without_answer_is_fine_where_none_is_needed():
    assert chat_messages({"prompt": "q"}, "f:1", needs_answer=False) == [{"role": "user", "content": "q"}]


@pytest.mark.parametrize("train_on, expected", [
    ("completion", "dd<eos>"), ("assistant", "bb<eos>dd<eos>"),
    ("all", "<bos>be brief\nQ: a?\nA: bb<eos>Q: c?\nA: dd<eos>"),
])
def test_builtin_template_trains_the_chosen_tokens(train_on, expected):
    ex = template_of(TOK).example(chat_messages(CHAT, "f:1"), train_on=train_on)
    assert TOK.decode(ex.ids, skip_special=False) == "<bos>be brief\nQ: a?\nA: bb<eos>Q: c?\nA: dd<eos>"
    assert trained_text(TOK, ex) == expected
    assert TOK.decode(ex.ids[ex.answer_start:], skip_special=False) == "dd<eos>"


def test_generation_prompt_is_the_training_prefix():
    messages = chat_messages(CHAT, "f:1")
    t = template_of(TOK)
    ex = t.example(messages)
    assert ex.ids[:ex.answer_start] == t.prompt_ids(messages[:-1])


def test_eos_is_added_only_where_the_template_ends_no_turn():
    bare = "{% for m in messages %}{{ m.role + ': ' + m.content + '\n' }}{% endfor %}" \
           "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    ex = ChatTemplate(TOK, bare).example(chat_messages({"prompt": "q", "completion": "a"}, "f:1"))
    assert TOK.decode(ex.ids, skip_special=False) == "user: q\nassistant: a\n<eos>"
    # the answer trains up to and with the eos; the template's newline before it is part of the answer here
    assert trained_text(TOK, ex) == "a\n<eos>"
    ends = ChatTemplate(TOK, BUILTIN_TEMPLATE).example(chat_messages({"prompt": "q", "completion": "a"}, "f:1"))
    assert TOK.decode(ends.ids, skip_special=False).count("<eos>") == 1


def test_a_template_that_drops_content_is_refused():
    drops = "{% for m in messages %}{% if m.role != 'system' %}{{ m.content }}{% endif %}{% endfor %}"
    with pytest.raises(DataError, match="f:3: the chat template dropped the system message"):
        ChatTemplate(TOK, drops).example(chat_messages(CHAT, "f:3"), where="f:3")


def test_a_template_that_is_not_incremental_is_refused():
    # renders the generation prompt differently from a finished turn: answers cannot be told apart
    odd = "{% for m in messages %}{{ m.content }}|{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
    with pytest.raises(DataError, match="f:2: the chat template does not render"):
        ChatTemplate(TOK, odd).example(chat_messages(CHAT, "f:2"), where="f:2")


def test_raise_exception_in_a_template_is_a_data_error():
    strict = "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}x"
    with pytest.raises(DataError, match="refused the conversation: user first"):
        ChatTemplate(TOK, strict).render(chat_messages(CHAT, "f:1"))


def test_truncation_cuts_the_left_and_keeps_bos_and_the_answer():
    ex = template_of(TOK).example(chat_messages(CHAT, "f:1"))
    cut, n = ex.truncated(12, keep_first=True)
    assert n == len(ex) - 12 and len(cut) == 12
    assert cut.ids[0] == TOK.bos_id and cut.ids[-len("dd") - 1:] == ex.ids[-3:]
    assert TOK.decode(cut.ids[cut.answer_start:], skip_special=False) == "dd<eos>"
    with pytest.raises(ValueError, match="last answer alone"):
        ex.truncated(3, keep_first=True)


@pytest.mark.real_model
def test_smollm2_template_matches_transformers(smollm2):
    from transformers import AutoTokenizer

    from tuneforge.models.hf_tokenizer import HFTokenizer

    tok = HFTokenizer(smollm2.folder)
    messages = chat_messages(CHAT, "f:1")
    ex = template_of(tok).example(messages)
    theirs = AutoTokenizer.from_pretrained(str(smollm2.folder))
    ids = theirs.apply_chat_template(messages, tokenize=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    assert ex.ids == ids
    assert template_of(tok).prompt_ids(messages[:-1]) == ex.ids[:ex.answer_start]
    assert tok.decode([i for i, t in zip(ex.ids, ex.trained) if t], skip_special=False) == \
        "bb<|im_end|>dd<|im_end|>"  # the newline after each end-of-turn is layout, not answer


def test_hf_tokenizer_reads_the_template_from_tokenizer_config(tmp_path):
    pytest.importorskip("transformers")
    from tuneforge.models.hf_tokenizer import HFTokenizer
    from tuneforge.tools.hf_tiny import make_tiny

    folder = make_tiny(tmp_path / "m", "llama", d_model=16, n_layers=1, n_heads=2, vocab_size=300)
    assert HFTokenizer(folder).chat_template is None  # a tiny folder has none: the built-in template is used
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg["chat_template"] = [{"name": "default", "template": "{% for m in messages %}{{ m.content }}{% endfor %}"},
                            {"name": "tool_use", "template": "x"}]
    cfg_path.write_text(json.dumps(cfg))
    assert HFTokenizer(folder).chat_template == "{% for m in messages %}{{ m.content }}{% endfor %}"
