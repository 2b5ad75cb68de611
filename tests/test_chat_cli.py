"""``tuneforge chat``: answers through the chat template, streamed as generate produces them, the conversation kept."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tuneforge.data.chat import template_of
from tuneforge.errors import ConfigError
from tuneforge.models.tokenizer import ByteTokenizer, tokenizer_of
from tuneforge.tools.chat import Chat, Streamer
from tuneforge.tools.cli import main

MODEL = "tiny:n_layers=1,d_model=32,n_heads=2,max_seq_len=128"


def tf(*args, check=True, **kw):
    env = {**os.environ, "TUNEFORGE_LOAD_PLUGINS": ""}
    proc = subprocess.run([sys.executable, "-m", "tuneforge", *args], capture_output=True, text=True, env=env,
                          timeout=300, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A briefly pretrained byte model (context 128), a run of it with two LoRAs, and one with a classifier head."""
    import tuneforge

    root = tmp_path_factory.mktemp("chat")
    mixed = root / "mixed.jsonl"
    rows = ({"text": f"the lake {i}", "label": "ab"[i % 3 % 2], "task": ["pos", "neg"][i % 2]} for i in range(8))
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(eval_every=0, batch_size=4)
    os.environ["TUNEFORGE_LOAD_PLUGINS"] = ""
    try:
        tuneforge.train(model=MODEL, mechanisms=["pretrain"], data="builtin:text", steps=20, seq_len=64, lr=3e-3,
                        warmup=2, out=str(root / "pre"), **common)
        tuneforge.train(init=str(root / "pre"), mechanisms=["lora:tasks=pos,neg,rank=2"], data=str(mixed), steps=1,
                        out=str(root / "lora"), **common)
        tuneforge.train(init=str(root / "pre"), mechanisms=["finetune:layers=0,head=classify"],
                        data="builtin:sentiment", steps=1, out=str(root / "cls"), **common)
    finally:
        del os.environ["TUNEFORGE_LOAD_PLUGINS"]
    return root


def answer(model, messages, max_new_tokens, generator=None, temperature=0.0):
    """What generate answers to the template's prompt for ``messages`` (greedily unless a temperature is given):
    the text before the eos."""
    template = template_of(tokenizer_of(model))
    ids = template.prompt_ids(messages)
    n = min(max_new_tokens, model.config.max_seq_len - len(ids))
    new = model.generate(torch.tensor([ids]), n, temperature=temperature, generator=generator,
                         eos_id=template.eos_id)[0, len(ids):].tolist()
    return tokenizer_of(model).decode(new[:new.index(template.eos_id)] if template.eos_id in new else new)


def test_on_token_sees_exactly_the_tokens_generate_returns():
    from tuneforge.models.transformer import Transformer, model_config

    torch.manual_seed(0)
    model = Transformer(model_config("tiny:n_layers=1,d_model=32,n_heads=2,max_seq_len=32")).eval()
    prompt = torch.randint(0, 256, (3, 4))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, :2] = False  # a left-padded row
    for use_cache in (True, False):
        seen = []
        out = model.generate(prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(1),
                             key_padding_mask=mask, eos_id=[10, 32, 101], pad_id=0, use_cache=use_cache,
                             on_token=seen.append)
        assert seen and all(t.shape == (3,) and not t.is_inference() for t in seen)
        assert torch.equal(torch.stack(seen, 1), out[:, 4:])  # every step's tokens, pads of done rows included
        seen[0].float().requires_grad_()  # an ordinary tensor: it may enter autograd


def test_streamer_prints_whole_characters_and_stops_at_eos():
    tok = ByteTokenizer()
    text = "héllo → wörld €"
    streamer, printed = Streamer(tok, tok.eos_id), []
    for i in tok.encode(text) + [tok.eos_id, 65, 66]:  # what follows the stop token is not the answer
        printed.append(streamer.push(i))
    printed.append(streamer.flush())
    assert "".join(printed) == text == streamer.text
    assert not any("\ufffd" in p for p in printed)
    assert sum(1 for p in printed if p) == len(text)  # one character at a time, as soon as it is whole


def test_prompt_flag_answers_as_generate_does_and_keeps_the_turns(runs, monkeypatch, capsys):
    import io

    from tuneforge.engine.loop import load_model

    model, gen = load_model(runs / "pre"), torch.Generator().manual_seed(3)
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the river"}]
    a1 = answer(model, first, 20, gen, temperature=1.0)
    second = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": "and the lake"}]
    a2 = answer(model, second, 20, gen, temperature=1.0)
    assert a1.strip() and a2.strip()
    flags = ["--system", "be brief", "-n", "20", "--temperature", "1", "--seed", "3"]
    proc = tf("chat", str(runs / "pre"), *flags, "-p", "the river", "-p", "and the lake")
    assert proc.stdout == f"{a1}\n{a2}\n"
    assert proc.stderr.count("no chat template of its own") == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("the river\n\nand the lake\n"))  # not a terminal
    assert main(["chat", str(runs / "pre"), *flags]) == 0
    assert capsys.readouterr().out == proc.stdout  # one line, one turn; the empty line is skipped


def test_the_second_prompt_holds_the_first_turn(runs, monkeypatch, capsys):
    """Piped lines, in process, with generate watched: each prompt is the whole conversation so far."""
    import io

    from tuneforge.engine.loop import load_model
    from tuneforge.models.transformer import Transformer

    first = [{"role": "user", "content": "the river"}]
    a1 = answer(load_model(runs / "pre"), first, 6)
    prompts, generate = [], Transformer.generate

    def watched(self, idx, *args, **kw):
        prompts.append(idx[0].tolist())
        return generate(self, idx, *args, **kw)

    monkeypatch.setattr(Transformer, "generate", watched)
    monkeypatch.setattr("sys.stdin", io.StringIO("the river\nand the lake\n"))
    assert main(["chat", str(runs / "pre"), "-n", "6"]) == 0
    assert capsys.readouterr().out.startswith(a1 + "\n")
    template = template_of(ByteTokenizer())
    assert prompts == [template.prompt_ids(first), template.prompt_ids(
        first + [{"role": "assistant", "content": a1}, {"role": "user", "content": "and the lake"}])]
    assert "Q: the river" in ByteTokenizer().decode(prompts[1])


def test_a_terminal_gets_an_interactive_loop(runs):
    from tuneforge.engine.loop import load_model

    said = answer(load_model(runs / "pre"), [{"role": "user", "content": "the hill"}], 10)
    master, slave = os.openpty()
    env = {**os.environ, "TUNEFORGE_LOAD_PLUGINS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "chat", str(runs / "pre"), "-n", "10"], stdin=slave,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    os.close(slave)
    try:
        os.write(master, b"the hill\n")
        os.write(master, b"\x04")  # Ctrl-D on an empty line: end of input
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(master)
    assert proc.returncode == 0, err
    assert "chatting with" in err and out == f"> {said}\n> \n"


def test_task_choice_and_classifier_heads_are_refused_before_anything_streams(runs, capsys):
    assert main(["chat", str(runs / "lora"), "-p", "hi", "-n", "4"]) == 2
    assert "holds LoRA adapters neg, pos" in capsys.readouterr().err
    assert main(["chat", str(runs / "lora"), "-p", "hi", "-n", "4", "--task", "nope"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "names task 'nope'" in err and "known: neg, pos" in err
    assert main(["chat", str(runs / "lora"), "-p", "hi", "-n", "4", "--task", "pos"]) == 0
    assert main(["chat", str(runs / "cls"), "-p", "hi"]) == 2
    assert "2-class head instead of the LM head" in capsys.readouterr().err


def test_names_that_are_no_model_say_what_to_give(tmp_path, capsys):
    assert main(["chat", "no-such-run", "-p", "hi"]) == 2
    assert "no checkpoint or run folder of that name" in (err := capsys.readouterr().err) and "smollm2-135m" in err
    (tmp_path / "config.json").write_text("{}")
    assert main(["chat", str(tmp_path), "-p", "hi"]) == 2
    assert f"write hf:{tmp_path}" in capsys.readouterr().err
    assert main(["chat", "tiny:n_layers=1,d_model=32,n_heads=2", "-p", "hi", "-n", "3"]) == 0
    assert "random weights: it is untrained" in capsys.readouterr().err


def test_an_hf_folder_by_spec_with_and_without_its_own_template(tmp_path, capsys):
    pytest.importorskip("transformers")
    from tuneforge.models import factory
    from tuneforge.tools.hf_tiny import make_tiny

    folder = make_tiny(tmp_path / "m", "llama", d_model=32, n_layers=1, n_heads=4, context=64, vocab_size=300)
    messages = [{"role": "user", "content": "the lake"}]
    model = factory.build(f"hf:{folder}")[0].eval()
    assert main(["chat", f"hf:{folder}", "-p", "the lake", "-n", "12"]) == 0
    out, err = capsys.readouterr()
    assert out == answer(model, messages, 12) + "\n" and "no chat template of its own" in err
    (folder / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                                                "{% if add_generation_prompt %}<assistant>{% endif %}")
    model = factory.build(f"hf:{folder}")[0].eval()
    assert not template_of(tokenizer_of(model)).builtin
    assert main(["chat", f"hf:{folder}", "-p", "the lake", "-n", "12"]) == 0
    out, err = capsys.readouterr()
    assert out == answer(model, messages, 12) + "\n" and "no chat template" not in err


def test_old_turns_go_when_the_context_fills_and_the_system_message_stays(runs, capsys):
    from tuneforge.engine.loop import load_model

    chat = Chat(load_model(runs / "pre"), system="sys", max_new_tokens=40)  # context 128: the answer keeps 40
    for i in range(4):
        chat.say(f"question number {i}, which is long enough to fill the context quickly")
        prompt, room = chat.prompt()
        assert len(prompt) + min(40, room) <= 128
    users = [m["content"] for m in chat.messages if m["role"] == "user"]
    assert chat.messages[0] == {"role": "system", "content": "sys"} and users[-1].startswith("question number 3")
    assert not users[0].startswith("question number 0")
    assert "dropped its 1 oldest exchange (the system message is kept)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="context is 128"):
        chat.say("x" * 200)
    assert chat.messages[-1]["role"] == "assistant"  # a refused message leaves the conversation as it was


@pytest.mark.real_model
def test_smollm2_answers_through_its_own_template(smollm2):
    proc = tf("chat", smollm2.spec, "-p", "What is the capital of France? Answer in one word.", "-n", "8")
    assert "Paris" in proc.stdout and "no chat template" not in proc.stderr
