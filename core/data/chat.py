"""Chat data: records as conversations, the model's chat template, and which tokens an objective trains on.

A record is either ``{"prompt": ..., "completion": ...}`` (the prompt a string or a list of messages) or
``{"messages": [{"role", "content"}, ...]}`` with roles ``system``, ``user`` and ``assistant``. Both become a list
of messages (:func:`chat_messages`), rendered by the tokenizer's own chat template (Hugging Face tokenizers carry one
in ``chat_template.jinja`` or ``tokenizer_config.json``; a tokenizer without one gets :data:`BUILTIN_TEMPLATE`).
Templates are Jinja, rendered with jinja2's sandbox the way transformers' ``apply_chat_template`` does (same
variables: ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, ``raise_exception``).

Which tokens train: the conversation is rendered once per assistant turn, before it (with the generation prompt,
as at inference) and after it; the text between is that answer. A template must render a conversation as a
prefix of its continuation for this to work (every common one does); one that does not is refused with the record
named. The template decides the special tokens (no bos is added to one that writes its own, none is added where it
writes none); only an answer the template does not end with the eos token gets one, so the model learns to stop.
"""
from __future__ import annotations

import dataclasses
import functools

from tuneforge.data.records import shorten
from tuneforge.errors import DataError

__all__ = ["ROLES", "TRAIN_ON", "BUILTIN_TEMPLATE", "ChatTemplate", "ChatExample", "chat_messages", "is_chat_record",
           "template_of"]

ROLES = ("system", "user", "assistant")
#: completion = the last assistant turn, assistant = every assistant turn, all = every token of the conversation
TRAIN_ON = ("completion", "assistant", "all")

#: The template of a tokenizer without one (the embedded byte tokenizer, tiny Hugging Face folders): short, because
#: the embedded models' context is 128 bytes. ``<bos>`` / ``<eos>`` are the tokenizer's special tokens as text.
BUILTIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content + '\\n' }}"
    "{% elif m.role == 'user' %}{{ 'Q: ' + m.content + '\\n' }}"
    "{% else %}{{ 'A: ' + m.content + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
)


def is_chat_record(record: dict) -> bool:
    """Whether a record is chat data (``messages``, or ``prompt`` + ``completion``)."""
    return "messages" in record or ("prompt" in record and "completion" in record)


def chat_messages(record: dict, where: str, *, needs_answer: bool = True) -> list[dict]:
    """The record's conversation as ``[{"role", "content"}, ...]``, validated.

    :param where: ``file:line`` of the record, for messages.
    :param needs_answer: the conversation must hold an assistant turn (training data); prompts for generation and
        ranking prompts need not.
    :raises DataError: a record with neither form, a message that is not an object, an unknown role, content that
        is not a non-empty string, no user turn before the first answer, no assistant turn (``needs_answer``).
    """
    if "messages" in record:
        messages, field = record["messages"], "messages"
    elif "prompt" in record:
        prompt, field = record["prompt"], "prompt"
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if "completion" in record and isinstance(messages, list):
            completion = record["completion"]
            if not isinstance(completion, str) or not completion.strip():
                raise DataError(f"{where}: field 'completion' must be a non-empty string, got {shorten(completion)}")
            messages = messages + [{"role": "assistant", "content": completion}]
    else:
        raise DataError(f"{where}: a chat record needs 'messages' (a list of {{role, content}}) or 'prompt' and "
                        f"'completion'; the record has {', '.join(map(repr, record)) or 'no fields'}")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{field}' must be a string or a non-empty list of {{role, content}} "
                        f"messages, got {shorten(messages)}")
    out, seen_user = [], False
    for i, m in enumerate(messages):
        at = f"{where}: {field}[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{at} must be an object with 'role' and 'content', got {shorten(m)}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"{at}: unknown role {shorten(role)}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{at} ({role}): content must be a non-empty string, got {shorten(content)}")
        if role == "assistant" and not seen_user:
            raise DataError(f"{at}: an assistant turn before any user turn; a conversation starts with the user "
                            "(after an optional system message)")
        seen_user |= role == "user"
        out.append({"role": role, "content": content})
    if needs_answer and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn; add one "
                        "(or a 'completion')")
    return out


@dataclasses.dataclass
class ChatExample:
    """One conversation as token ids, with which of them the loss is taken on."""

    ids: list[int]
    trained: list[bool]  # per id: the model learns to produce it (its target position counts in the loss)
    answer_start: int  # index in ids of the last answer's first token (what left truncation must keep)

    def __len__(self) -> int:
        return len(self.ids)

    def truncated(self, room: int, keep_first: bool) -> "tuple[ChatExample, int]":
        """The example cut from the left to ``room`` tokens (the first kept when ``keep_first``: the template's bos),
        and how many tokens were cut. The last answer is never cut: it must fit, else ``ValueError``."""
        cut = len(self.ids) - room
        if cut <= 0:
            return self, 0
        head = 1 if keep_first else 0
        if len(self.ids) - self.answer_start + head > room:
            raise ValueError(f"its last answer alone is {len(self.ids) - self.answer_start} tokens")
        keep = slice(head + cut, None)
        return ChatExample(self.ids[:head] + self.ids[keep], self.trained[:head] + self.trained[keep],
                           self.answer_start - cut), cut


class ChatTemplate:
    """A tokenizer's chat template, compiled once: render conversations, their prompts, and training examples."""

    def __init__(self, tokenizer, source: str | None = None):
        self.tokenizer = tokenizer
        own = getattr(tokenizer, "chat_template", None)
        self.source = source or own or BUILTIN_TEMPLATE
        self.builtin = self.source == BUILTIN_TEMPLATE
        self._template = _compile(self.source)
        self._encode = getattr(tokenizer, "encode_rendered", None) or tokenizer.encode
        self.eos_id = tokenizer.eos_id

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        tok = self.tokenizer
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=getattr(tok, "bos_token", "") or "",
                                     eos_token=getattr(tok, "eos_token", "") or "")

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Ids that ask the model for the next assistant turn after ``messages`` (the generation prompt)."""
        return self._encode(self.render(messages, add_generation_prompt=True))

    def example(self, messages: list[dict], *, train_on: str = "assistant", where: str = "") -> ChatExample:
        """``messages`` as ids with the tokens to train on: ``train_on`` in :data:`TRAIN_ON`.

        :raises DataError: (naming ``where``) the template drops a message's content, or does not render a
            conversation as a prefix of its continuation.
        """
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        full = self.render(messages)
        for m in messages:
            if m["content"].strip() not in full:
                raise DataError(f"{where}: the chat template dropped the {m['role']} message {shorten(m['content'])} "
                                "from the text it renders; check the conversation's roles and order against what "
                                "the model's template accepts")
        pieces: list[tuple[str, bool]] = []  # (text, is an answer)
        done = ""
        for a in answers:
            before, after = self.render(messages[:a], add_generation_prompt=True), self.render(messages[:a + 1])
            if not (before.startswith(done) and after.startswith(before)):
                raise DataError(f"{where}: the chat template does not render the conversation up to turn {a} as a "
                                "prefix of the conversation after it, so its answers cannot be told apart; use "
                                "train_on=all, or a template that renders turns in order")
            pieces += [(before[len(done):], False), (after[len(before):], True)]
            done = after
        if not full.startswith(done):
            raise DataError(f"{where}: the chat template renders the whole conversation differently from its turns; "
                            "use train_on=all")
        pieces.append((full[len(done):], False))
        return self._assemble(pieces, train_on)

    def _assemble(self, pieces: list[tuple[str, bool]], train_on: str) -> ChatExample:
        ids: list[int] = []
        trained: list[bool] = []
        n_answers, answer_start = sum(a for _, a in pieces), 0
        k = 0
        for text, is_answer in pieces:
            part = self._encode(text) if text else []
            if not is_answer:
                ids += part
                trained += [train_on == "all"] * len(part)
                continue
            k += 1
            # the answer trains up to its end-of-turn token; what the template writes after it (a newline) is layout
            end = part.index(self.eos_id) + 1 if self.eos_id in part else None
            if end is None:
                part, end = part + [self.eos_id], len(part) + 1  # the template ends no turn: eos, to learn to stop
            learn = train_on == "all" or train_on == "assistant" or k == n_answers
            answer_start = len(ids)
            ids += part
            trained += [learn] * end + [train_on == "all"] * (len(part) - end)
        return ChatExample(ids, trained, answer_start)


def template_of(tokenizer) -> ChatTemplate:
    """The :class:`ChatTemplate` of ``tokenizer`` (one per tokenizer object, compiled once)."""
    cached = getattr(tokenizer, "_tuneforge_chat_template", None)
    if cached is None:
        cached = ChatTemplate(tokenizer)
        try:
            tokenizer._tuneforge_chat_template = cached
        except AttributeError:  # a tokenizer with __slots__: compile again next time (only a few ms)
            pass
    return cached


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise DataError("chat templates need the jinja2 package: pip install jinja2") from None

    def raise_exception(message):
        raise DataError(f"the chat template refused the conversation: {message}")

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    # the options transformers renders chat templates with, so a model's template renders as its authors tested it
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise DataError(f"the chat template is not valid Jinja ({exc}); fix the model's chat_template") from None
