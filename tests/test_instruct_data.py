import collections
import re

import pytest

from tuneforge.data import instruct, world
from tuneforge.data.instruct import KINDS, QUESTIONS, exact_match, instruct_answer, instruct_kind
from tuneforge.data.records import read_records
from tuneforge.data.world import builtin
from tuneforge.errors import DataError


def _split(prompt: str) -> tuple[str, str]:
    """(passage, question): passages end with a full stop and questions hold none."""
    passage, question = prompt.rsplit(". ", 1)
    return passage + ".", question


@pytest.fixture(scope="module")
def splits():
    return {split: builtin("instruct", split) for split in world.SPLITS}


def test_same_seed_same_records_other_seed_other_records(splits):
    assert builtin("instruct", "train", seed=0) == splits["train"]
    assert builtin("instruct", "test", seed=0) == splits["test"]
    assert builtin("instruct", "test", seed=1) != splits["test"]


def test_records_are_fresh_copies(splits):
    a = builtin("instruct", "test")
    a[0]["completion"] = "mutated"
    assert builtin("instruct", "test")[0]["completion"] == splits["test"][0]["completion"] != "mutated"


def test_sizes_fields_and_kinds_balanced(splits):
    for split, records in splits.items():
        assert len(records) == instruct.SIZES[split]
        assert all(set(r) == {"prompt", "completion", "kind"} for r in records)
        assert all(all(isinstance(v, str) and v for v in r.values()) for r in records)
        kinds = collections.Counter(r["kind"] for r in records)
        assert set(kinds) == set(KINDS) and max(kinds.values()) - min(kinds.values()) <= 1
        for kind in ("sentiment", "topic"):  # the answers within a classification kind are balanced as well
            answers = collections.Counter(r["completion"] for r in records if r["kind"] == kind)
            assert set(answers) == set(world.VERBALIZERS[kind].values())
            assert max(answers.values()) - min(answers.values()) <= 1
        # every phrasing is used, so the data is not one template per kind
        used = {(r["kind"], q) for r in records for q in QUESTIONS[r["kind"]]
                if re.fullmatch(re.escape(q).replace(re.escape("{a}"), "[a-z]+"), _split(r["prompt"])[1])}
        assert used == {(k, q) for k, qs in QUESTIONS.items() for q in qs}


def test_every_record_fits_the_embedded_context(splits):
    for r in splits["train"] + splits["test"]:
        p, c = len(r["prompt"].encode()), len(r["completion"].encode())
        assert p <= instruct.MAX_PROMPT and c <= instruct.MAX_COMPLETION and p + c <= instruct.MAX_RECORD, r
        assert r["prompt"] == r["prompt"].lower() and r["completion"] == r["completion"].lower()
        assert r["completion"] == r["completion"].strip() and not r["completion"].endswith(".")
    assert instruct.MAX_RECORD + 10 <= 128  # room for a chat template's tokens in the 128-byte context


def test_splits_are_disjoint_and_passages_held_out(splits):
    train_prompts = {r["prompt"] for r in splits["train"]}
    test_prompts = [r["prompt"] for r in splits["test"]]
    assert len(set(test_prompts)) == len(test_prompts) and len(train_prompts) == len(splits["train"])
    assert not train_prompts & set(test_prompts)

    train_passages = {_split(r["prompt"])[0] for r in splits["train"]}
    assert not [r for r in splits["test"] if _split(r["prompt"])[0] in train_passages]
    # the reviews and notes of the classification test splits are nowhere here, and the instruct test split's
    # reviews and notes are not in the pretraining corpus with their verdict written out
    held = {r["text"] for task in world.LABELS for r in builtin(task, "test")}
    assert not [r for r in splits["train"] + splits["test"] if _split(r["prompt"])[0] in held]
    corpus = "\n".join(d["text"] for s in world.SPLITS for d in builtin("text", s))
    tests = [_split(r["prompt"])[0] for r in splits["test"] if r["kind"] in ("sentiment", "topic")]
    assert len(tests) > 100 and not [t for t in tests if t in corpus]


def test_the_answer_key_agrees_with_every_record(splits):
    for r in splits["train"] + splits["test"]:
        assert instruct_answer(r["prompt"]) == r["completion"], r
        assert instruct_kind(r["prompt"]) == r["kind"], r


def test_the_answer_key_reads_the_prompt():
    assert instruct_answer("mira met tomas at the old mill in the rain over soup. who did mira meet?") == "tomas"
    assert instruct_answer("mira met tomas at the old mill in the rain over soup. who was with tomas?") == "mira"
    assert instruct_answer("mira met tomas at the old mill in the rain over soup. where did they meet?") == "old mill"
    assert instruct_answer("in the fog, ana and kai had tea at the hill inn. what food was there?") == "tea"
    assert instruct_answer("in the fog, ana and kai had tea at the hill inn. how was the weather?") == "fog"
    assert instruct_answer("the soup at the old mill was not lovely. was it good or bad?") == "bad"
    assert instruct_answer("the soup at the old mill was not cold. good or bad?") == "good"
    assert instruct_answer("first the goal, then the team. what is the topic?") == "sport"
    assert instruct_kind("first the goal, then the team. what is the topic?") == "topic"
    # no known question, a person not in the scene, a passage with no single answer
    assert instruct_answer("mira met tomas at the old mill. tell me a story.") is None
    assert instruct_answer("mira met tomas at the old mill. who did ana meet?") is None
    assert instruct_answer("mira had tea and cake. what did they share?") is None
    assert instruct_kind("what is this?") is None


def test_exact_match_scores_per_kind(splits):
    records = splits["test"]
    prompts = [r["prompt"] for r in records]
    perfect = exact_match(prompts, [" " + r["completion"] + "\n" for r in records])
    assert perfect == {"all": 1.0, **{k: 1.0 for k in KINDS}}
    # wrong on every sentiment record only
    answers = [("good" if r["completion"] == "bad" else "bad") if r["kind"] == "sentiment" else r["completion"]
               for r in records]
    scores = exact_match(prompts, answers)
    n_sentiment = sum(r["kind"] == "sentiment" for r in records)
    assert scores["sentiment"] == 0.0 and scores["who"] == 1.0
    assert scores["all"] == pytest.approx(1 - n_sentiment / len(records))
    with pytest.raises(ValueError):
        exact_match(prompts, answers[:-1])


def test_generating_instruct_leaves_the_other_datasets_alone():
    def fresh_world():
        world._generate.cache_clear()
        world._instruct.cache_clear()
        return {name: builtin(name, split) for name in ("text", "sentiment", "topic", "rankings")
                for split in world.SPLITS}

    before = fresh_world()
    assert set(world._generate(0)) == {"text", "sentiment", "topic", "rankings"}  # instruct is not generated there
    world._generate.cache_clear()
    builtin("instruct", "test")  # generated first this time: the other datasets must not depend on it
    after = {name: builtin(name, split) for name in ("text", "sentiment", "topic", "rankings")
             for split in world.SPLITS}
    assert after == before


def test_read_records_and_the_unknown_dataset_message():
    records = read_records("builtin:instruct", split="test", fields={"prompt": str, "completion": str})
    assert len(records) == instruct.SIZES["test"] and records.where[0] == "builtin:instruct[test]#0"
    with pytest.raises(DataError, match="builtin:instruct"):
        read_records("builtin:nope")
    with pytest.raises(DataError, match="builtin:rankings, builtin:instruct"):
        read_records("no-such-file.jsonl")
    with pytest.raises(ValueError, match="splits: train, test"):
        builtin("instruct", "dev")
