"""``tuneforge chat``: talk to a trained run or a pretrained model through its chat template, the answer streamed.

Messages come from ``-p`` (each one a user turn of one conversation), from the lines of a piped stdin (one turn
each) or, on a terminal, from an interactive loop. The conversation keeps its earlier turns, each answer included
as an assistant message; when they outgrow the context the oldest exchanges are dropped (the system message
stays), and stderr says so.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from tuneforge.data.chat import template_of
from tuneforge.errors import ConfigError
from tuneforge.models import routing
from tuneforge.models.protocol import prefix_length
from tuneforge.models.tokenizer import tokenizer_of

__all__ = ["add_parser", "run", "load_chat_model", "Chat", "Streamer"]


def add_parser(sub) -> None:
    """Declare ``tuneforge chat`` on the ``tuneforge`` command's subparsers."""
    c = sub.add_parser("chat", help="talk to a model through its chat template, the answer streamed",
                       description="Chat with a trained run or a pretrained model, through the model's chat template "
                       "(tuneforge's short built-in one when its tokenizer has none). Messages: -p TEXT (repeatable: "
                       "the turns of one conversation), else the lines of a piped stdin (one turn each, empty ones "
                       "skipped), else on a terminal an interactive loop (Ctrl-C stops an answer, Ctrl-D ends). "
                       "Earlier turns stay in the conversation while they leave room for an answer (at most half "
                       "the context); the oldest are dropped first, the system message kept.",
                       epilog="example: tuneforge chat smollm2-135m -p 'What is the capital of France?'")
    c.add_argument("model", metavar="RUN_OR_MODEL",
                   help="a checkpoint or run folder (as 'generate' takes), or a model: smollm2-135m, hf:PATH, "
                   "gguf:PATH, or a preset (random weights: untrained)")
    c.add_argument("-p", "--prompt", action="append", metavar="TEXT",
                   help="a user message; repeat for the turns of one conversation")
    c.add_argument("--system", metavar="TEXT", help="a system message opening the conversation")
    c.add_argument("-n", "--max-new-tokens", type=int, default=256, help="longest answer in tokens (default: 256)")
    c.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy, the default: the same conversation gets the same answers")
    c.add_argument("--top-k", type=int, default=None)
    c.add_argument("--top-p", type=float, default=None)
    c.add_argument("--seed", type=int, default=0, help="seeds sampling (with --temperature > 0)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--task", help="the soft prompt / adapter / LoRA to answer with, when the model holds several "
                   "('' = the base model)")


def _note(text: str) -> None:
    print(f"tuneforge: {text}", file=sys.stderr, flush=True)


def load_chat_model(spec: str, device: str = "cpu"):
    """The model ``spec`` names, in eval mode on ``device``: a checkpoint or run folder (with what its mechanisms
    added), else a ``--model`` spec with its pretrained weights (a preset is built untrained, with a warning).

    :raises ConfigError: a name that is neither, a plain Hugging Face folder given without ``hf:``, a model with
        a classification head instead of the LM head.
    """
    from tuneforge.engine.loop import load_model
    from tuneforge.models import factory
    from tuneforge.models.transformer import PRESETS

    kind, path = factory.kind_of(spec), Path(spec).expanduser()
    preset = kind is factory.PRESET
    if preset and path.is_dir() and (path / "config.json").is_file() and not (path / "state.json").exists() \
            and not any(path.glob("step-*")):
        raise ConfigError(f"chat {spec}: this is a Hugging Face model folder, not a tuneforge run; write hf:{spec}")
    if preset and (path.exists() or "/" in spec or spec.startswith(".")):
        model = load_model(path, device=device)
    elif preset and spec.partition(":")[0] not in PRESETS:
        forms = ", ".join(k.form for k in factory.KINDS.values())
        raise ConfigError(f"chat {spec}: no checkpoint or run folder of that name, and no such model; give a run "
                          f"folder, a checkpoint, or a model ({forms}; presets: {', '.join(PRESETS)})")
    else:
        model = factory.build(spec, seed=0, device=device)[0].to(device).eval()
        if preset:
            _note(f"{spec} is an embedded preset with random weights: it is untrained, so its answers are noise; "
                  "chat with a trained run folder or a pretrained model (smollm2-135m, hf:PATH) instead")
    if model.lm_head.out_features != model.config.vocab_size:
        raise ConfigError(f"{spec} has a {model.lm_head.out_features}-class head instead of the LM head, so it "
                          "cannot write answers; predict labels with tuneforge.plugins.finetune.classify(model, texts)")
    return model


class Streamer:
    """Token ids in, printable text out: the answer so far is decoded whole and only its new end is handed back,
    so byte pieces of one character and BPE pieces that merge print right. Text ending in an incomplete character
    (decoded as U+FFFD) waits for the next token. Nothing after a stop token is taken."""

    def __init__(self, tokenizer, stop_id: int | None):
        self.tokenizer, self.stop_id = tokenizer, stop_id
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """The text to print after ``token``."""
        if self.stopped:
            return ""
        if token == self.stop_id:
            self.stopped = True
            return self.flush()
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        return "" if text.endswith("\ufffd") else self._new(text)

    def flush(self) -> str:
        """What is left to print at the end of the answer (an incomplete character included)."""
        return self._new(self.text)

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)

    def _new(self, text: str) -> str:
        same = 0  # a decoder that rewrote earlier text: print from where it changed (what is shown stays)
        while same < min(len(text), len(self.shown)) and text[same] == self.shown[same]:
            same += 1
        self.shown = text
        return text[same:]


class Chat:
    """One conversation with ``model``: :meth:`say` adds a user turn and returns the streamed answer."""

    def __init__(self, model, *, system: str | None = None, task: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_k=None, top_p=None, seed: int = 0, name: str = "the model"):
        if max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {max_new_tokens}: give at least 1")
        self.model, self.name, self.task = model, name, task
        self.tokenizer = tokenizer_of(model)
        self.template = template_of(self.tokenizer)
        self.messages = [{"role": "system", "content": system}] if system else []
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.max_new_tokens = max_new_tokens
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.context = model.config.max_seq_len - prefix_length(model)  # what the conversation and answer share

    def check_task(self) -> None:
        """Refuse a --task the model does not hold, or a model of several tasks without one, before an answer
        streams (routing names a typo only after the forward): one token's forward, routed."""
        ids = torch.tensor([self.template.prompt_ids([{"role": "user", "content": "hi"}])[:1]], device=self.device)
        try:
            with torch.no_grad(), self._routing():
                self.model(ids)
        except ValueError as exc:  # ConfigError included: several parts and no --task, or one nothing holds
            raise ConfigError(f"{self.name}: {exc}") from None

    def _routing(self):
        return routing.rows([self.task] if self.task is not None else None)

    def prompt(self) -> tuple[list[int], int]:
        """The conversation's prompt ids and the answer's room, after dropping the oldest exchanges while the
        prompt leaves less than ``min(max_new_tokens, context / 2)`` tokens for the answer."""
        reserve = min(self.max_new_tokens, self.context // 2)
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        dropped = 0
        while True:
            ids = self.template.prompt_ids(self.messages)
            later = [i for i in range(first + 1, len(self.messages)) if self.messages[i]["role"] == "user"]
            if len(ids) + reserve <= self.context or not later:
                break
            del self.messages[first:later[0]]  # the oldest exchange: a user turn and its answer
            dropped += 1
        if dropped:
            kept = " (the system message is kept)" if first else ""
            _note(f"the conversation outgrew the model's context of {self.context} tokens: dropped its {dropped} "
                  f"oldest exchange{'s' * (dropped > 1)}{kept}")
        room = self.context - len(ids)
        if room <= 0:
            raise ConfigError(f"the message {self.messages[-1]['content'][:30]!r}... makes a prompt of {len(ids)} "
                              f"tokens; the model's context is {self.context}: shorten it (or the --system message)")
        return ids, min(self.max_new_tokens, room)

    def say(self, text: str, write: Callable[[str], None] = lambda s: None) -> str:
        """Add the user turn ``text``, stream the answer through ``write`` and return it. On any error (or
        Ctrl-C) the conversation is left as it was before the call."""
        before = list(self.messages)
        self.messages.append({"role": "user", "content": text})
        try:
            ids, room = self.prompt()
            streamer = Streamer(self.tokenizer, self.template.eos_id)
            x = torch.tensor([ids], device=self.device)  # (1, T)
            with self._routing():
                self.model.generate(x, room, eos_id=self.template.eos_id, generator=self.generator,
                                    on_token=lambda t: write(streamer.push(int(t[0]))), **self.sampling)
            write(streamer.flush())
        except BaseException:
            self.messages[:] = before
            raise
        answer = streamer.text
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def _write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def _interactive(chat: Chat) -> int:
    _note(f"chatting with {chat.name}: type a message and Enter; Ctrl-C stops an answer, Ctrl-D ends")
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not text.strip():
            continue
        try:
            chat.say(text, _write)
        except KeyboardInterrupt:
            print()
            _note("answer stopped; it is not kept in the conversation")
            continue
        except ConfigError as exc:
            _note(f"error: {exc}")
            continue
        print()


def run(args) -> int:
    """The ``tuneforge chat`` command."""
    model = load_chat_model(args.model, args.device)
    chat = Chat(model, system=args.system, task=args.task, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, name=args.model)
    if chat.template.builtin:
        _note(f"{args.model} has no chat template of its own: using tuneforge's built-in one ('Q: ...' / 'A: ...')")
    chat.check_task()
    if args.prompt is None and sys.stdin.isatty():
        return _interactive(chat)
    lines = args.prompt if args.prompt is not None else (line.rstrip("\r\n") for line in sys.stdin)
    said = 0
    for text in lines:
        if text.strip():
            chat.say(text, _write)
            print(flush=True)
            said += 1
    if not said:
        raise ConfigError("chat: no message: give -p TEXT, pipe lines into stdin, or run it on a terminal")
    return 0
