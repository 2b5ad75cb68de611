"""``builtin:instruct``: questions about a short passage given in the prompt, answered from it, with ground truth.

Each record is ``{"prompt": passage + " " + question, "completion": answer, "kind": kind}``. The passage is a
scene of the world's town (two people, a place, a dish, the weather), a review from the world's review generator
or a topic note; the question asks for one fact of it. :func:`instruct_answer` re-derives the answer from the
prompt text alone (the scene's words, :func:`~tuneforge.data.town.sentiment_of`,
:func:`~tuneforge.data.town.topic_of`), so evaluation has an answer key independent of the generator.

Every record fits the embedded model's 128-byte context with a chat template's ~10 tokens around it
(``MAX_PROMPT``, ``MAX_COMPLETION``, ``MAX_RECORD`` bytes). Generation uses its own ``random.Random`` keyed by
the world's seed, so the other built-in datasets are the same bytes whether or not this one is generated.
See docs/data-world.md.
"""
from __future__ import annotations

import random
import re
from collections.abc import Container

from tuneforge.data import town

__all__ = ["KINDS", "QUESTIONS", "SIZES", "MAX_PROMPT", "MAX_COMPLETION", "MAX_RECORD", "generate_instruct",
           "instruct_answer", "instruct_kind", "exact_match"]

KINDS = ("who", "where", "what", "weather", "sentiment", "topic")
# A few phrasings per kind, so the data teaches following a question rather than one template. ``{a}`` is one
# of the scene's two people. Every phrasing ends the prompt and no two kinds share one, so the question alone
# tells the kind.
QUESTIONS = {
    "who": ["who did {a} meet?", "who was with {a}?", "{a} met whom?"],
    "where": ["where did they meet?", "where was {a}?", "what place was it?"],
    "what": ["what did they share?", "what did {a} have?", "what food was there?"],
    "weather": ["what was the weather?", "how was the weather?", "what weather was it?"],
    "sentiment": ["good or bad?", "was it good or bad?", "is this review good or bad?"],
    "topic": ["what is the topic?", "which topic is this?", "food, weather, travel or sport?"],
}
SCENES = [
    "{a} met {b} at {place} in the {weather} over {dish}.",
    "in the {weather}, {a} and {b} had {dish} at {place}.",
    "{a} had {dish} with {b} at {place} in the {weather}.",
]
SIZES = {"train": 4000, "test": 400}
# Bytes (= tokens of the byte tokenizer): the embedded model's 128-token context less ~10 of a chat template and
# some slack; a completion is one short word or place.
MAX_PROMPT, MAX_COMPLETION, MAX_RECORD = 92, 14, 106

_WEATHER = town.TOPIC_WORDS["weather"]
_NAME = "|".join(town.NAMES)
_WORD = re.compile(r"[a-z]+")


def _question_pattern(template: str) -> re.Pattern:
    return re.compile(" " + re.escape(template).replace(re.escape("{a}"), f"(?P<a>{_NAME})") + "$")


# (kind, pattern) for every phrasing; the longest first, so "was it good or bad?" is not read as "good or bad?".
_PATTERNS = sorted(((k, _question_pattern(q)) for k, qs in QUESTIONS.items() for q in qs),
                   key=lambda kp: -len(kp[1].pattern))


def _parse(prompt: str) -> tuple[str, str, str | None] | None:
    """(kind, passage, person named in the question or None) of a prompt, or None when no question matches."""
    for kind, pattern in _PATTERNS:
        m = pattern.search(prompt)
        if m:
            return kind, prompt[: m.start()], m.groupdict().get("a")
    return None


def _only(found: list[str]) -> str | None:
    return found[0] if len(set(found)) == 1 else None


def instruct_kind(prompt: str) -> str | None:
    """The kind of question ``prompt`` ends with (one of :data:`KINDS`), or None."""
    parsed = _parse(prompt)
    return parsed[0] if parsed else None


def instruct_answer(prompt: str) -> str | None:
    """Ground truth of ``builtin:instruct`` from the prompt text alone; None when the prompt has no known question
    or its passage does not determine one answer.

    - who: the scene's other person (a scene names exactly two; the question names one of them);
    - where: the scene's place without its article (``the old mill`` -> ``old mill``);
    - what: the scene's dish; weather: the scene's weather word;
    - sentiment: the verbalizer word (good / bad) of :func:`~tuneforge.data.town.sentiment_of` of the passage;
    - topic: the verbalizer word of :func:`~tuneforge.data.town.topic_of` of the passage.
    """
    parsed = _parse(prompt)
    if parsed is None:
        return None
    kind, passage, person = parsed
    words = _WORD.findall(passage)
    if kind == "who":
        people = {w for w in words if w in town.NAMES}
        others = people - {person}
        return others.pop() if len(people) == 2 and len(others) == 1 else None
    if kind == "where":
        place = _only([p for p in town.PLACES if p in passage])
        return place.removeprefix("the ") if place else None
    if kind == "what":
        return _only([w for w in words if w in town.DISHES])
    if kind == "weather":
        return _only([w for w in words if w in _WEATHER])
    truth = town.sentiment_of if kind == "sentiment" else town.topic_of
    label = truth(passage)
    return town.VERBALIZERS[kind][label] if label else None


def exact_match(prompts: list[str], answers: list[str]) -> dict[str, float]:
    """Exact-match accuracy of ``answers`` (surrounding whitespace ignored) against :func:`instruct_answer`:
    ``{"all": ..., KIND: ...}`` with one entry per kind present. A prompt without a known answer counts as a
    miss under ``all`` only."""
    if len(prompts) != len(answers):
        raise ValueError(f"exact_match: {len(prompts)} prompts but {len(answers)} answers")
    hits: dict[str, list[bool]] = {"all": []}
    for prompt, answer in zip(prompts, answers):
        truth = instruct_answer(prompt)
        hit = truth is not None and answer.strip() == truth
        hits["all"].append(hit)
        kind = instruct_kind(prompt)
        if kind is not None:
            hits.setdefault(kind, []).append(hit)
    return {k: sum(v) / len(v) if v else 0.0 for k, v in hits.items()}


# --- generator ---------------------------------------------------------------------------------------------

def _scene(rng: random.Random, kind: str) -> tuple[str, str]:
    """(passage, question) of a scene kind."""
    a, b = rng.sample(town.NAMES, 2)
    passage = rng.choice(SCENES).format(a=a, b=b, place=rng.choice(town.PLACES), dish=rng.choice(town.DISHES),
                                        weather=rng.choice(_WEATHER))
    return passage, rng.choice(QUESTIONS[kind]).format(a=rng.choice([a, b]))


def _passage(rng: random.Random, kind: str, turn: int) -> tuple[str, str]:
    """(passage, question) of any kind; reviews and notes come from the world's own generators, their labels in
    turn (``turn``: records of the kind so far), so good/bad and the four topics are balanced too."""
    if kind in ("sentiment", "topic"):
        labels = town.LABELS[kind]
        make = town.review if kind == "sentiment" else town.topic_note
        return make(rng, labels[turn % len(labels)]), rng.choice(QUESTIONS[kind])
    return _scene(rng, kind)


def _fits(prompt: str, completion: str) -> bool:
    p, c = len(prompt.encode()), len(completion.encode())
    return p <= MAX_PROMPT and c <= MAX_COMPLETION and p + c <= MAX_RECORD


def generate_instruct(seed: int, *, excluded: Container[str] = frozenset(), corpus: str = "") -> dict[str, list[dict]]:
    """Both splits of ``builtin:instruct`` for world seed ``seed`` (``world.builtin("instruct")`` caches them).

    Test first: kinds in turn (balanced to one record), no passage twice (so no test passage is in train), no
    passage in ``excluded`` (the world passes its classification test texts), and no test review or note found in
    ``corpus`` (the world's text, where reviews and notes appear with their verdicts). Reviews too long for the
    size limit are drawn again. A random stream of its own, keyed by the seed, so generating this changes no other
    dataset."""
    rng = random.Random(f"instruct:{seed}")  # a string seed is hashed the same way on every machine
    seen: set[str] = set()
    out = {}
    for split in ("test", "train"):
        records = []
        while len(records) < SIZES[split]:
            kind = KINDS[len(records) % len(KINDS)]
            passage, question = _passage(rng, kind, len(records) // len(KINDS))
            prompt = f"{passage} {question}"
            answer = instruct_answer(prompt)
            assert answer is not None, prompt  # the generator and the answer key agree
            if passage in seen or passage in excluded or not _fits(prompt, answer):
                continue
            if split == "test" and kind in ("sentiment", "topic") and passage in corpus:
                continue
            seen.add(passage)
            records.append({"prompt": prompt, "completion": answer, "kind": kind})
        rng.shuffle(records)
        out[split] = records
    return out
