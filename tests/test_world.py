import collections
import math
import re

import pytest

from tuneforge.data import world
from tuneforge.data.rankings import parse_ranking
from tuneforge.data.world import LABELS, World, builtin, preference, sentiment_of, topic_of


def test_same_seed_same_world_other_seed_other_world():
    assert builtin("sentiment", seed=0) == builtin("sentiment", seed=0)
    assert builtin("text", "test", seed=0) == builtin("text", "test", seed=0)
    assert builtin("sentiment", seed=1) != builtin("sentiment", seed=0)
    assert builtin("rankings", seed=1) != builtin("rankings", seed=0)


def test_records_are_fresh_copies():
    a = builtin("sentiment")
    a[0]["label"] = "mutated"
    assert builtin("sentiment")[0]["label"] != "mutated"


@pytest.mark.parametrize("task, truth", [("sentiment", sentiment_of), ("topic", topic_of)])
def test_classification_splits_balanced_disjoint_and_true(task, truth):
    train, test = builtin(task, "train"), builtin(task, "test")
    assert len(train) == 4000 and len(test) == 500
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    for split in (train, test):
        counts = collections.Counter(r["label"] for r in split)
        assert set(counts) == set(LABELS[task]) and max(counts.values()) - min(counts.values()) <= 1
        assert all(truth(r["text"]) == r["label"] for r in split)
        assert max(len(r["text"]) for r in split) < 120  # fits a 128-byte context with a short prompt


def test_negation_flips_sentiment_and_occurs_under_both_labels():
    assert sentiment_of("the soup was lovely.") == "positive"
    assert sentiment_of("the soup was not lovely.") == "negative"
    assert sentiment_of("the soup was not cold.") == "positive"
    negated = collections.Counter(r["label"] for r in builtin("sentiment") if " not " in r["text"])
    assert min(negated[label] for label in LABELS["sentiment"]) > 300


def test_reviews_pair_words_with_what_they_fit():
    food = set(world.FOOD_WORDS[0] + world.FOOD_WORDS[1])
    dish_words = [m.group(1) for r in builtin("sentiment") for m in re.finditer(
        r"the (?:%s)(?: at the [a-z]+ [a-z]+)? was (?:not )?([a-z]+)" % "|".join(world.DISHES), r["text"])]
    assert len(dish_words) > 3000 and set(dish_words) == food  # never "the soup was rude"
    assert "friendly" not in food and "rude" not in food and "burnt" not in world.ASPECTS["the view"][1]


def test_held_out_texts_never_appear_in_the_corpus():
    corpus = "\n".join(r["text"] for r in builtin("text", "train") + builtin("text", "test"))
    for task in ("sentiment", "topic"):
        held = [r["text"] for r in builtin(task, "test")]
        assert not [t for t in held if t in corpus]
        # while the train split's kind of text, with its label verbalised, is there
    assert "verdict: good." in corpus and "category: weather." in corpus


def test_text_corpus_sizes_and_ascii():
    train, test = builtin("text", "train"), builtin("text", "test")
    size = sum(len(r["text"]) for r in train)
    assert 1.5e6 < size < 3e6
    assert 0.03 < sum(len(r["text"]) for r in test) / size < 0.1
    assert all(90 <= len(r["text"]) <= 400 for r in train + test)
    assert all(r["text"].isascii() and r["text"] == r["text"].lower() for r in train + test)
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    records = [r for task in ("sentiment", "topic", "rankings") for split in ("train", "test")
               for r in builtin(task, split)]
    texts = [r.get("text") or r["prompt"] for r in records] + [x for r in records for x in r.get("responses", [])]
    assert all(t.isascii() for t in texts)


def test_corpus_has_every_kind_of_paragraph():
    paragraphs = [p for r in builtin("text") for p in r["text"].split("\n")]
    kinds = collections.Counter("review" if p.startswith("review: ") else "note" if p.startswith("note: ")
                                else "answer" if p.split(".")[0].split("?")[0].startswith(
                                    ("tell me", "describe", "what is", "say something")) else "story"
                                for p in paragraphs)
    assert min(kinds.values()) > 0.05 * len(paragraphs), kinds
    assert all(re.search(r" verdict: (good|bad)\.$", p) for p in paragraphs if p.startswith("review: "))
    assert all(re.search(r" category: (food|weather|travel|sport)\.$", p) for p in paragraphs
               if p.startswith("note: "))


def test_rankings_are_valid_consistent_with_the_preference_and_have_ties():
    records, test = builtin("rankings", "train"), builtin("rankings", "test")
    assert len(records) == 2000 and len(test) == 300
    key = lambda r: (r["prompt"], tuple(r["responses"]))  # noqa: E731
    assert not {key(r) for r in records} & {key(r) for r in test}
    ties = 0
    for r in records:
        assert re.fullmatch(r"[A-E]( [>=] [A-E])*", r["ranking"]), r["ranking"]
        assert all(len(r["prompt"]) + 1 + len(x) < 128 for x in r["responses"])  # a pair fits the context
        assert len(set(r["responses"])) == len(r["responses"])
        tiers = parse_ranking(r["ranking"], len(r["responses"]))
        flat = [i for tier in tiers for i in tier]
        assert sorted(flat) == list(range(len(r["responses"]))) and 3 <= len(flat) <= 5
        scores = [[preference(r["prompt"], r["responses"][i]) for i in tier] for tier in tiers]
        assert all(len(set(s)) == 1 for s in scores)  # a tier is a tie
        assert all(a[0] > b[0] for a, b in zip(scores, scores[1:]))  # tiers strictly ordered
        ties += any(len(t) > 1 for t in tiers)
    assert 0.2 <= ties / len(records) <= 0.4


def test_preference_rules():
    p = "tell me about the river."
    assert preference(p, "the river is calm.") == 2 + 1
    assert preference(p, "the lake is calm.") == 1
    assert preference(p, "the river is grim.") == 2 - 2
    assert preference(p, "the river is calm kind warm lovely.") == 2 + 3  # pleasant words capped at 3
    long = "the river " + "and so on " * 6
    assert preference(p, long) == 2 - (len(long.split()) - 12)
    assert World().rank(p, ["the lake.", "the river is calm.", "the river."]) == "B > C > A"


def test_preference_separates_responses_in_the_data():
    # every record has a best response strictly above its worst, and the score is not just the subject bonus
    records = builtin("rankings", "train") + builtin("rankings", "test")
    assert all(">" in r["ranking"] for r in records)
    scores = {preference(r["prompt"], x) for r in records for x in r["responses"]}
    assert len(scores) >= 8


def test_builtin_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="builtin:text"):
        builtin("sentiments")
    with pytest.raises(ValueError, match="train, test"):
        builtin("topic", "validation")
    with pytest.raises(ValueError, match="train, test"):
        World().text("dev")
    with pytest.raises(ValueError, match="sentiment, topic"):
        World().classification("rankings")


def test_world_methods_match_builtin():
    w = World(0)
    assert [{"text": t} for t in w.text("test")] == builtin("text", "test")
    assert w.classification("topic", "test") == builtin("topic", "test")
    assert w.rankings("test") == builtin("rankings", "test")
    r = w.rankings("test")[0]
    assert w.rank(r["prompt"], r["responses"]) == r["ranking"]


def test_generation_is_cached():
    # No timing threshold (a loaded CI machine makes those flaky): the second call must not regenerate.
    from tuneforge.data.world import _generate

    builtin("sentiment", seed=12345)
    before = _generate.cache_info()
    again = builtin("sentiment", seed=12345)
    after = _generate.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses
    assert again == builtin("sentiment", seed=12345)


def _bag_of_words_accuracy(task):
    """Naive Bayes on word counts: proof the labels follow from the words, learnably, without one fixed cue."""
    counts = collections.defaultdict(collections.Counter)
    for r in builtin(task, "train"):
        counts[r["label"]].update(re.findall(r"[a-z]+", r["text"]))
    vocab = set().union(*counts.values())
    totals = {lab: sum(c.values()) for lab, c in counts.items()}

    def predict(text):
        words = re.findall(r"[a-z]+", text)
        return max(counts, key=lambda lab: sum(
            math.log((counts[lab][w] + 1) / (totals[lab] + len(vocab))) for w in words))

    test = builtin(task, "test")
    return sum(predict(r["text"]) == r["label"] for r in test) / len(test)


@pytest.mark.parametrize("task", ["sentiment", "topic"])
def test_tasks_are_learnable_from_words(task):
    assert _bag_of_words_accuracy(task) >= 0.95


def test_module_exports():
    for name in world.__all__:
        assert hasattr(world, name)
