"""The town's words and what they mean: names, places, dishes, the sentiment and topic lexicons with their ground
truth (:func:`sentiment_of`, :func:`topic_of`), and the review and note generators. Shared by the world's datasets
(``world.py``) and the instruction data built on them (``instruct.py``), which both read it; it reads neither.
"""
from __future__ import annotations

import random
import re

__all__ = [
    "LABELS", "VERBALIZERS", "NAMES", "PLACES", "DISHES", "POSITIVE", "NEGATIVE", "FOOD_WORDS", "ASPECTS",
    "TOPIC_WORDS", "TOPIC_TEMPLATES", "sentiment_of", "topic_of", "review", "topic_note",
]

LABELS = {"sentiment": ["negative", "positive"], "topic": ["food", "weather", "travel", "sport"]}
VERBALIZERS = {
    "sentiment": {"positive": "good", "negative": "bad"},
    "topic": {t: t for t in LABELS["topic"]},
}

NAMES = ["mira", "tomas", "ana", "joel", "lena", "omar", "ines", "pavel", "rosa", "kai", "nora", "felix",
         "ada", "ivan", "lucia", "sami"]
PLACES = ["the harbor cafe", "the old mill", "the river market", "the hill inn", "the corner bakery",
          "the north station", "the green park", "the stone bridge", "the town square", "the lake house"]
DISHES = ["soup", "bread", "pie", "stew", "tea", "pasta", "salad", "cake", "fish", "rice", "coffee", "cheese"]
POSITIVE = ["lovely", "warm", "fresh", "great", "tasty", "wonderful", "friendly", "perfect", "delicious", "pleasant"]
NEGATIVE = ["cold", "stale", "awful", "bland", "rude", "terrible", "soggy", "dull", "greasy", "burnt"]
# Which sentiment words fit what, so reviews stay sensible English ("the staff was rude", never "the view was
# burnt"). Every word of POSITIVE and NEGATIVE is used by something.
_ANY_GOOD, _ANY_BAD = ["lovely", "great", "wonderful", "perfect", "pleasant"], ["awful", "terrible", "dull"]
FOOD_WORDS = (_ANY_GOOD + ["fresh", "tasty", "delicious", "warm"],
              _ANY_BAD + ["cold", "stale", "bland", "soggy", "greasy", "burnt"])
ASPECTS = {
    "the service": (_ANY_GOOD + ["friendly", "warm"], _ANY_BAD + ["rude", "cold"]),
    "the staff": (_ANY_GOOD + ["friendly", "warm"], _ANY_BAD + ["rude", "cold"]),
    "the room": (_ANY_GOOD + ["warm", "fresh"], _ANY_BAD + ["cold", "stale"]),
    "the music": (_ANY_GOOD, _ANY_BAD),
    "the view": (_ANY_GOOD, _ANY_BAD),
}

TOPIC_WORDS = {
    "food": ["soup", "bread", "oven", "spices", "dinner", "recipe", "garlic", "butter", "kitchen", "honey"],
    "weather": ["rain", "wind", "clouds", "storm", "sunshine", "fog", "snow", "thunder", "frost", "breeze"],
    "travel": ["train", "ticket", "journey", "map", "suitcase", "ferry", "road", "station", "border", "luggage"],
    "sport": ["match", "goal", "team", "race", "ball", "coach", "score", "runner", "stadium", "referee"],
}
TOPIC_TEMPLATES = [
    "{name} talked about the {w1} and the {w2}.",
    "the {w1} was all anyone noticed, then the {w2}.",
    "{name} wrote a note on the {w1}, the {w2} and the {w3}.",
    "at {place} they spoke of the {w1} and the {w2}.",
    "nobody forgot the {w1}; {name} kept thinking of the {w2}.",
    "a long day of {w1}, {w2} and {w3} for {name}.",
    "{name} asked {other} about the {w1} and the {w2}.",
    "first the {w1}, then the {w2}, and at last the {w3}.",
    "every letter {name} sent was about the {w1} or the {w2}.",
    "all week at {place} it was the {w1} and the {w2}.",
]

_WORD = re.compile(r"[a-z]+")


def sentiment_of(text: str) -> str | None:
    """Ground truth of ``sentiment``: +1 per positive word, -1 per negative word, sign flipped by a preceding
    ``not``; positive if the sum is above 0, negative if below, None if 0 (never generated)."""
    words = _WORD.findall(text.lower())
    score = 0
    for i, w in enumerate(words):
        s = 1 if w in POSITIVE else -1 if w in NEGATIVE else 0
        if s and i > 0 and words[i - 1] == "not":
            s = -s
        score += s
    return "positive" if score > 0 else "negative" if score < 0 else None


def topic_of(text: str) -> str | None:
    """Ground truth of ``topic``: the topic whose words occur most often (None on a tie, never generated)."""
    words = _WORD.findall(text.lower())
    counts = {t: sum(w in vocab for w in words) for t, vocab in TOPIC_WORDS.items()}
    best = max(counts.values())
    winners = [t for t, c in counts.items() if c == best]
    return winners[0] if best > 0 and len(winners) == 1 else None


def review(rng: random.Random, label: str) -> str:
    """One review of ``label``. Negated words (``not cold``) always come with more plain words of the label, so
    word counts alone agree with the label and a model that also reads ``not`` agrees on every record."""
    side = 0 if label == "positive" else 1
    dish, place, aspect = rng.choice(DISHES), rng.choice(PLACES), rng.choice(list(ASPECTS))
    food_good, food_bad = FOOD_WORDS[side], FOOD_WORDS[1 - side]
    aspect_good = ASPECTS[aspect][side]
    form = rng.randrange(6)
    if form == 0:
        return f"the {dish} at {place} was {rng.choice(food_good)}."
    if form == 1:
        g1, g2 = rng.sample(food_good, 2)
        return f"the {dish} at {place} was {g1} and {g2}."
    if form == 2:
        g1, g2 = rng.sample(aspect_good, 2)
        return f"the {dish} at {place} was not {rng.choice(food_bad)}, and {aspect} was {g1} and {g2}."
    if form == 3:
        return f"{rng.choice(NAMES)} said the {dish} was {rng.choice(food_good)}, and {aspect} was " \
               f"{rng.choice(aspect_good)}."
    if form == 4:
        g1, g2 = rng.sample(aspect_good, 2)
        return f"{aspect} at {place} was {g1} and {g2}; the {dish} was not {rng.choice(food_bad)}."
    return f"{rng.choice(NAMES)} found {aspect} {rng.choice(aspect_good)}. the {dish} was {rng.choice(food_good)}."


def topic_note(rng: random.Random, label: str) -> str:
    w1, w2, w3 = rng.sample(TOPIC_WORDS[label], 3)
    name, other = rng.sample(NAMES, 2)
    template = rng.choice(TOPIC_TEMPLATES)
    return template.format(name=name, other=other, place=rng.choice(PLACES), w1=w1, w2=w2, w3=w3)
