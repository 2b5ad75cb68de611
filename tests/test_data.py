import json

import pytest

import tuneforge
from tuneforge.data.records import read_records
from tuneforge.errors import DataError


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_reads_records_and_skips_blank_lines(tmp_path):
    f = write(tmp_path / "d.jsonl", [json.dumps({"text": "a"}), "", json.dumps({"text": "b", "x": 1})])
    recs = read_records(f, fields={"text": str})
    assert [r["text"] for r in recs] == ["a", "b"]
    assert recs.where == [f"{f}:1", f"{f}:3"]


@pytest.mark.parametrize("lines, where, words", [
    ([json.dumps({"text": "ok"}), "{not json"], 2, ["invalid JSON"]),
    ([json.dumps({"text": "ok"}), json.dumps({"txt": "typo"})], 2, ["field 'text' is missing", "'txt'"]),
    ([json.dumps({"text": 3})], 1, ["field 'text' must be str", "int"]),
    ([json.dumps(["text"])], 1, ["must be a JSON object"]),
])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, lines, where, words):
    f = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        read_records(f, fields={"text": str})
    assert f"{f}:{where}:" in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_txt_is_one_record(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world")
    assert read_records(str(f), fields={"text": str}).items == [{"text": "hello world"}]


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unknown data format"):
        read_records(str(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="builtin:text"):
        read_records(str(tmp_path / "nope.jsonl"))


def test_builtin_unknown_name():
    with pytest.raises(DataError, match="builtin:nope"):
        read_records("builtin:nope")


def test_bad_record_fails_before_anything_is_written(tmp_path, micro):
    good = [json.dumps({"text": "the river is cold. " * 20})] * 50
    f = write(tmp_path / "d.jsonl", good[:30] + [json.dumps({"body": "x"})] + good[30:])
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"d\.jsonl:31: field 'text' is missing"):
        tuneforge.train(model=micro, mechanisms=["pretrain"], data=f, steps=5, batch_size=4, out=str(out))
    assert not out.exists()


def test_pretrain_reads_a_custom_field_and_holds_out_the_tail(tmp_path, micro):
    f = write(tmp_path / "d.jsonl", [json.dumps({"body": f"line {i} of the text, a river runs by. " * 3}) for i in range(60)])
    result = tuneforge.train(model=micro, mechanisms=["pretrain:field=body,holdout=0.1"], data=f, steps=3, batch_size=4)
    assert "eval/loss" in result.metrics
