"""The embedded data world: a small town rendered as simple English, generated from a seed, with ground truth.

Everything is a deterministic function of the seed (a private ``random.Random``, never the global one), so
every machine sees the same data and every later mechanism has an answer key:

- ``text``: documents for pretraining: town stories, plus reviews and topic notes with their labels written
  out (``verdict: good``, ``category: weather``), so a pretrained model already knows the associations that
  prompting and soft prompts later draw on; and answers to ranking-style prompts, unjudged.
- ``sentiment``: reviews labelled positive/negative by a lexicon with negation (:func:`sentiment_of`).
- ``topic``: short notes labelled food/weather/travel/sport by their topic words (:func:`topic_of`).
- ``rankings``: a prompt with 3-5 responses, ranked by a hidden preference (:meth:`World.preference`) as a
  scripted stand-in for human labellers; equal scores are ties (``"C > B = D > A"``).
- ``instruct``: a scene, review or note with a question about it, answered from it (:mod:`tuneforge.data.instruct`).

The classification test splits never appear in the text corpus, so held-out accuracy is honest. The town's words
and their ground truth are in ``town.py``. See docs/data-world.md.
"""
from __future__ import annotations

import copy
import functools
import random
import re

# The vocabulary and ground truth live in town.py, which instruct.py reads too (it cannot read this module, which
# builds builtin:instruct with it); imported here, they are tuneforge.data.world.NAME as they always were.
from tuneforge.data.instruct import generate_instruct
from tuneforge.data.town import (ASPECTS, DISHES, FOOD_WORDS, LABELS, NAMES, NEGATIVE, PLACES, POSITIVE,
                                 TOPIC_TEMPLATES, TOPIC_WORDS, VERBALIZERS, review, sentiment_of, topic_note,
                                 topic_of)

__all__ = [
    "DEFAULT_SEED", "World", "builtin", "BUILTIN_DATASETS", "LABELS", "VERBALIZERS",
    "sentiment_of", "topic_of", "preference", "rank", "SPLITS", "hidden_judge", "judge_of", "vocabulary",
    "in_vocabulary", "fluency_of",
    # the town's vocabulary (town.py), read by the tests and by anyone writing data in the world's words
    "NAMES", "PLACES", "DISHES", "POSITIVE", "NEGATIVE", "FOOD_WORDS", "ASPECTS", "TOPIC_WORDS", "TOPIC_TEMPLATES",
]

DEFAULT_SEED = 0

BUILTIN_DATASETS = {
    "text": "town stories, reviews and notes as raw text for pretraining (~2 MB train)",
    "sentiment": "reviews labelled positive / negative (train 4000, test 500)",
    "topic": "notes labelled food / weather / travel / sport (train 4000, test 500)",
    "rankings": "prompts with 3-5 responses ranked by a hidden preference, ties included (train 2000, test 300)",
    "instruct": "questions about a scene, review or note answered from it, six kinds (train 4000, test 400)",
}
SPLITS = ("train", "test")

# The hidden preference of the ranking task (see World.preference).
PLEASANT = ["kind", "bright", "calm", "lovely", "warm", "gentle", "happy", "clear", "sweet", "friendly"]
UNPLEASANT = ["grim", "dark", "angry", "dull", "cold", "harsh", "sad", "rude"]
SUBJECTS = ["river", "harbor", "market", "bridge", "garden", "forest", "station", "bakery", "lake", "square"]
NEUTRAL = ["quiet", "old", "long", "small", "busy", "wide"]
PROMPTS = ["tell me about the {s}.", "describe the {s}.", "what is the {s} like?", "say something about the {s}."]
KEEP_TIE = 0.4
MAX_RESPONSE = 90  # bytes: the longest prompt (32) + a space + a response fit a 128-byte context with room to spare
FILLER = ["today", "again", "near the water", "by the road", "in the morning", "after dinner", "with friends",
          "for a while", "as usual", "at last"]

_WORD = re.compile(r"[a-z]+")


class World:
    """All datasets of one seed; cheap to construct (generation is cached per seed)."""

    def __init__(self, seed: int = DEFAULT_SEED):
        self.seed = seed

    @property
    def _data(self) -> dict:
        return _generate(self.seed)

    def text(self, split: str = "train") -> list[str]:
        return list(self._data["text"][_split(split)])

    def classification(self, task: str, split: str = "train") -> list[dict]:
        if task not in LABELS:
            raise ValueError(f"unknown classification task '{task}'; tasks: {', '.join(LABELS)}")
        return copy.deepcopy(self._data[task][_split(split)])

    def rankings(self, split: str = "train") -> list[dict]:
        return copy.deepcopy(self._data["rankings"][_split(split)])

    def preference(self, prompt: str, response: str) -> int:
        return preference(prompt, response)

    def rank(self, prompt: str, responses: list[str]) -> str:
        return rank(prompt, responses)


def preference(prompt: str, response: str) -> int:
    """The hidden judge of ``rankings``, also usable on generated text (which may be broken English).

    +2 if the response names the prompt's subject; +1 per pleasant word (at most 3); -2 per unpleasant word;
    -1 per word beyond 12. Higher is better; equal scores are ties.
    """
    words = _WORD.findall(response.lower())
    subject = _subject_of(prompt)
    score = 2 if subject and subject in words else 0
    score += min(3, sum(w in PLEASANT for w in words))
    score -= 2 * sum(w in UNPLEASANT for w in words)
    score -= max(0, len(words) - 12)
    return score


def hidden_judge(prompts: list[str], responses: list[str]) -> list[float]:
    """:func:`preference` of each (prompt, response), as floats: the judge of an evaluation
    (:func:`tuneforge.rlhf.rollout.judge_for`)."""
    return [float(preference(p, r)) for p, r in zip(prompts, responses)]


def judge_of(data: str):
    """The hidden judge of dataset spec ``data`` when it is a built-in dataset that has one (``builtin:rankings``:
    :func:`hidden_judge`), else None: what an evaluation scores responses with by default."""
    return hidden_judge if data.startswith("builtin:rankings") else None


@functools.lru_cache(maxsize=4)
def vocabulary(seed: int = DEFAULT_SEED) -> frozenset[str]:
    """Every word of the world's text, rankings and instructions (lower-case runs of letters): the words a
    fluent answer in this world is made of."""
    data = _generate(seed)
    texts = data["text"]["train"] + data["text"]["test"]
    texts += [x for s in SPLITS for r in data["rankings"][s] for x in [r["prompt"], *r["responses"]]]
    texts += [r[k] for s in SPLITS for r in _instruct(seed)[s] for k in ("prompt", "completion")]
    return frozenset(w for t in texts for w in _WORD.findall(t.lower()))


def in_vocabulary(texts: list[str], seed: int = DEFAULT_SEED) -> float:
    """Share of the words of ``texts`` that are words of the world (:func:`vocabulary`): how fluent generated text
    is, where a policy that games its reward drifts into non-words ("the mare loim for a whille"). 0.0 when
    the texts hold no word at all (an empty answer is not a fluent one)."""
    known = vocabulary(seed)
    words = [w for t in texts for w in _WORD.findall(t.lower())]
    return sum(w in known for w in words) / len(words) if words else 0.0


def fluency_of(data: str):
    """``texts -> share of words in the world's vocabulary`` (:func:`in_vocabulary`) when dataset spec ``data``
    is one of the world's own datasets, else None: what online objectives report beside the KL."""
    return in_vocabulary if data.startswith("builtin:") else None


def rank(prompt: str, responses: list[str]) -> str:
    """Rank responses by :func:`preference`, best first, ties joined by ``=``: e.g. ``"C > B = D > A"``."""
    scores = [preference(prompt, r) for r in responses]
    tiers = []
    for s in sorted(set(scores), reverse=True):
        tiers.append(" = ".join(chr(ord("A") + i) for i, x in enumerate(scores) if x == s))
    return " > ".join(tiers)


def _subject_of(prompt: str) -> str | None:
    words = _WORD.findall(prompt.lower())
    return next((w for w in words if w in SUBJECTS), None)


def _split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; splits: {', '.join(SPLITS)}")
    return split


# --- generators -------------------------------------------------------------------------------------------

def _labelled(rng: random.Random, make, labels: list[str], truth, n_train: int, n_test: int):
    """Balanced, de-duplicated train/test records; the test texts never appear in train."""
    seen: set[str] = set()
    out = {}
    for split, n in (("test", n_test), ("train", n_train)):
        records = []
        while len(records) < n:
            label = labels[len(records) % len(labels)]
            text = make(rng, label)
            if text in seen:
                continue
            assert truth(text) == label, (text, label)  # the generator and the ground truth agree
            seen.add(text)
            records.append({"text": text, "label": label})
        rng.shuffle(records)
        out[split] = records
    return out


def _story(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    place, other = rng.sample(PLACES, 2)
    dish = rng.choice(DISHES)
    weather = rng.choice(TOPIC_WORDS["weather"])
    lines = [
        f"{a} walked to {place} in the {weather}.",
        f"{a} met {b} there and they shared some {dish}.",
        f"{b} said the {dish} was {rng.choice(FOOD_WORDS[0] + FOOD_WORDS[1])}.",
        f"later they went to {other} by the {rng.choice(['river', 'road', 'bridge', 'lake'])}.",
        f"{b} went home and {a} stayed until the {rng.choice(['evening', 'night', 'morning'])}.",
    ]
    return " ".join(lines[: rng.randint(3, 5)])


def _response(rng: random.Random, subject: str) -> str:
    """A candidate answer: on the prompt's subject or another, in a pleasant, unpleasant, plain or mixed mood,
    with 0-4 filler phrases (long answers lose points)."""
    others = [s for s in SUBJECTS if s != subject]
    words = ["the " + (subject if rng.random() < 0.6 else rng.choice(others)),
             rng.choice(["is", "was", "looks", "feels", "seemed"])]
    mood = rng.random()
    if mood < 0.5:
        adjectives = rng.sample(PLEASANT, rng.randint(1, 4))
    elif mood < 0.7:
        adjectives = rng.sample(UNPLEASANT, rng.randint(1, 2))
    elif mood < 0.85:
        adjectives = rng.sample(NEUTRAL, rng.randint(1, 2))
    else:
        adjectives = [rng.choice(PLEASANT), rng.choice(UNPLEASANT)]
    words.append(" and ".join(adjectives))
    words += [rng.choice(FILLER) for _ in range(rng.choice([0, 0, 1, 1, 2, 3, 4]))]
    return " ".join(words) + "."


def _rankings(rng: random.Random, n: int, seen: set[str]) -> list[dict]:
    """``n`` ranking records with prompts+responses not in ``seen`` (so splits are disjoint). The scripted
    labeller keeps a candidate that ties an earlier one only with probability ``KEEP_TIE`` (otherwise it
    draws another), which holds ties to about a third of the records. A set whose responses all tie says
    nothing and is dropped, so every record has a strict best-over-worst."""
    records = []
    while len(records) < n:
        subject = rng.choice(SUBJECTS)
        prompt = rng.choice(PROMPTS).format(s=subject)
        responses: list[str] = []
        scores: list[int] = []
        n_responses = rng.randint(3, 5)
        while len(responses) < n_responses:
            r = _response(rng, subject)
            score = preference(prompt, r)
            if r in responses or len(r) > MAX_RESPONSE or (score in scores and rng.random() >= KEEP_TIE):
                continue
            responses.append(r)
            scores.append(score)
        key = "\n".join([prompt] + responses)
        if key in seen or len(set(scores)) == 1:
            continue
        seen.add(key)
        records.append({"prompt": prompt, "responses": responses, "ranking": rank(prompt, responses)})
    return records


@functools.lru_cache(maxsize=4)
def _generate(seed: int) -> dict:
    rng = random.Random(seed)
    sentiment = _labelled(rng, review, ["positive", "negative"], sentiment_of, 4000, 500)
    topic = _labelled(rng, topic_note, LABELS["topic"], topic_of, 4000, 500)
    held_out = {r["text"] for r in sentiment["test"] + topic["test"]}

    def document() -> str:
        parts: list[str] = []
        target = rng.randint(100, 300)
        while sum(len(p) + 1 for p in parts) < target:
            kind = rng.random()
            if kind < 0.35:
                part = _story(rng)
            elif kind < 0.45:  # an unjudged answer, so a pretrained policy can answer ranking prompts at all
                subject = rng.choice(SUBJECTS)
                part = f"{rng.choice(PROMPTS).format(s=subject)} {_response(rng, subject)}"
            elif kind < 0.7:
                label = rng.choice(LABELS["sentiment"])
                text = review(rng, label)
                part = "" if text in held_out else f"review: {text} verdict: {VERBALIZERS['sentiment'][label]}."
            else:
                label = rng.choice(LABELS["topic"])
                text = topic_note(rng, label)
                part = "" if text in held_out else f"note: {text} category: {VERBALIZERS['topic'][label]}."
            if part and sum(len(p) + 1 for p in parts) + len(part) <= 400:
                parts.append(part)
        return "\n".join(parts)

    text = {"train": [document() for _ in range(8000)], "test": [document() for _ in range(400)]}
    seen: set[str] = set()
    rankings = {"test": _rankings(rng, 300, seen)}
    rankings["train"] = _rankings(rng, 2000, seen)
    return {"text": text, "sentiment": sentiment, "topic": topic, "rankings": rankings}


@functools.lru_cache(maxsize=4)
def _instruct(seed: int) -> dict:
    """``builtin:instruct``, kept apart from the classification test splits, its test split also from the corpus
    (where reviews and notes appear with their verdicts). Its own random stream: the other datasets do not change."""
    data = _generate(seed)
    excluded = {r["text"] for task in LABELS for r in data[task]["test"]}
    return generate_instruct(seed, excluded=excluded, corpus="\n".join(data["text"]["train"] + data["text"]["test"]))


def builtin(name: str, split: str = "train", seed: int = DEFAULT_SEED) -> list[dict]:
    """Records of ``builtin:NAME``: ``text`` -> ``[{"text": doc}]``; the others as described in the module doc."""
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown builtin dataset '{name}'; datasets: "
                         + ", ".join(f"builtin:{n}" for n in BUILTIN_DATASETS))
    world = World(seed)
    if name == "text":
        return [{"text": doc} for doc in world.text(split)]
    if name == "rankings":
        return world.rankings(split)
    if name == "instruct":
        return copy.deepcopy(_instruct(seed)[_split(split)])
    return world.classification(name, split)
