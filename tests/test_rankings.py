"""Rankings with ties: the parser (valid and malformed, errors naming file:line), the pairs a ranking implies, and
batches that keep a ranking together with per-ranking weights."""
import json

import pytest
import torch

from tuneforge import DataError
from tuneforge.data.rankings import (Ranking, format_ranking, parse_ranking, ranking_batch, ranking_pairs, read_rankings)
from tuneforge.models.tokenizer import ByteTokenizer
from tuneforge.data.world import builtin, preference


@pytest.mark.parametrize("text, n, tiers", [
    ("C > B = D > A", 4, [[2], [1, 3], [0]]),
    ("A>B", 2, [[0], [1]]),
    ("  B =A  ", 2, [[1, 0]]),  # all tied: allowed (it says only that they tie)
    ([[2], [1, 3], [0]], 4, [[2], [1, 3], [0]]),
    ([2, [1, 3], 0], 4, [[2], [1, 3], [0]]),  # a bare index is a tier of one
])
def test_valid_rankings_parse_to_tiers(text, n, tiers):
    assert parse_ranking(text, n) == tiers


def test_the_issue_example_implies_five_strict_pairs_and_one_tie():
    strict, ties = ranking_pairs(parse_ranking("C > B = D > A", 4))
    # C beats everyone, B and D beat A, B ties D
    assert sorted(strict) == sorted([(2, 1), (2, 3), (2, 0), (1, 0), (3, 0)])
    assert ties == [(1, 3)]
    assert format_ranking([[2], [1, 3], [0]]) == "C > B = D > A"


@pytest.mark.parametrize("ranking, n, message", [
    ("C > B = E > A", 4, "names response E, but the record has 4 responses (A-D)"),
    ("C > B > A", 4, "leaves out response(s) D"),
    ("A > B > C > A > D", 4, "is a cycle: A is ranked both above and below B > C"),
    ("A > > B", 2, "empty tier"),
    ("A = > B", 2, "empty tier"),
    ("> A > B", 2, "empty tier"),
    ("A = A > B", 2, "lists response A twice in one tier"),
    ("A > b", 2, "upper case"),
    ("A > BC", 2, "'BC' is not a response letter"),
    ("1 > 0", 2, "is not a response letter"),
    ([[0], [5]], 2, "names response 5, but the record has 2 responses"),
    ([[0], []], 2, "tier 2 is empty"),
    ([[0], ["B"]], 2, "each tier is a list of response indices"),
    ([[0, 1], [1]], 2, "cycle"),
    (3, 2, "must be str or list"),
])
def test_malformed_rankings_are_errors_naming_the_record(tmp_path, ranking, n, message):
    path = tmp_path / "r.jsonl"
    good = {"prompt": "describe the lake.", "responses": ["one.", "two."], "ranking": "A > B"}
    bad = {"prompt": "describe the lake.", "responses": [f"answer {i}." for i in range(n)], "ranking": ranking}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as err:
        read_rankings(str(path))
    assert f"{path}:3" in str(err.value)  # the blank line counts: line 3 is the bad record
    assert message in str(err.value)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "responses": ["only one."], "ranking": "A"}, "at least 2"),
    ({"prompt": "p", "responses": ["a.", ""], "ranking": "A > B"}, "response B"),
    ({"prompt": "p", "responses": ["a.", 7], "ranking": "A > B"}, "non-empty text"),
    ({"prompt": "p", "responses": "a.", "ranking": "A"}, "field 'responses' must be list"),
    ({"prompt": "p", "responses": ["a.", "b."]}, "field 'ranking' is missing"),
])
def test_malformed_records_are_errors(tmp_path, record, message):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=rf"{path}:1.*") as err:
        read_rankings(str(path))
    assert message in str(err.value)


def test_builtin_rankings_parse_and_order_responses_by_the_hidden_preference():
    records = read_rankings("builtin:rankings", split="test")
    assert len(records) == len(builtin("rankings", split="test"))
    n_ties = 0
    for r in records:
        strict, ties = r.pairs()
        n_ties += len(ties)
        for i, j in strict:
            assert preference(r.prompt, r.responses[i]) > preference(r.prompt, r.responses[j])
        for i, j in ties:
            assert preference(r.prompt, r.responses[i]) == preference(r.prompt, r.responses[j])
    assert n_ties > 0  # the scripted labellers do tie


def test_a_batch_keeps_each_ranking_together_and_weighs_rankings_equally():
    tok = ByteTokenizer()
    long = Ranking("describe the lake.", [f"the lake is calm {i}." for i in range(5)], [[0], [1, 2], [3], [4]])
    short = Ranking("describe the river.", ["the river is kind.", "the river.", "the river is sad."], [[0], [1], [2]])
    b = ranking_batch([long, short], tok, context=128)
    assert b["input"].shape[0] == 5 + 3 and b["record"].tolist() == [0] * 5 + [1] * 3
    # long: 10 pairs (one tie), short: 3 pairs; each ranking's weights sum to 1/2
    in_long = b["better"] < 5
    assert int(in_long.sum()) == 10 and int((~in_long).sum()) == 3
    assert float(b["weight"][in_long].sum()) == pytest.approx(0.5)
    assert float(b["weight"][~in_long].sum()) == pytest.approx(0.5)
    assert int(b["tie"].sum()) == 1
    # rows: bos prompt ␣ response eos; start..last spans the response and its eos
    for row in range(8):
        rec = long if row < 5 else short
        k = int(b["response"][row])
        ids = b["input"][row].tolist()
        span = ids[int(b["start"][row]):int(b["last"][row]) + 1]
        assert tok.decode(span) == rec.responses[k] and span[-1] == tok.eos_id
        assert ids[0] == tok.bos_id
    # a pair's rows really are its better and worse responses
    for i, j, tie in zip(b["better"].tolist(), b["worse"].tolist(), b["tie"].tolist()):
        if i < 5 and not tie:
            ti = next(t for t, tier in enumerate(long.tiers) if int(b["response"][i]) in tier)
            tj = next(t for t, tier in enumerate(long.tiers) if int(b["response"][j]) in tier)
            assert ti < tj
    no_ties = ranking_batch([long, short], tok, context=128, with_ties=False)
    assert not bool(no_ties["tie"].any()) and float(no_ties["weight"].sum()) == pytest.approx(1.0)


def test_a_row_longer_than_the_context_loses_its_prompt_not_its_response():
    tok = ByteTokenizer()
    rec = Ranking("tell me " * 20 + "about the lake.", ["the lake is calm.", "the lake."], [[0], [1]])
    b = ranking_batch([rec], tok, context=40)
    assert b["input"].shape[1] == 40
    for row in range(2):
        span = b["input"][row, int(b["start"][row]):int(b["last"][row])].tolist()
        assert tok.decode(span) == rec.responses[row]
    assert torch.all(b["input"][:, 0] == tok.bos_id)
