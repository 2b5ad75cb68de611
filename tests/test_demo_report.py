"""The demo's verdict: each row is judged against its target, relative targets against their reference row, and
report.md says how many were met."""
import pytest

from tuneforge.tools.demo_report import judge, write_report
from tuneforge.tools.demo_stage import demo_precision


def _row(mechanism, metric, value, **extra):
    return {"mechanism": mechanism, "metric": metric, "value": value, "trainable_params": 10, "trainable_pct": 0.5,
            "seconds": 1.0, **extra}


def _rows(sentiment_prompt=0.95, ppo_kl=0.2, dpo_vocab=0.97):
    return [
        _row("pretrain", "held-out bits/token", 0.29, stage="pretrain"),
        _row("finetune (all layers + head)", "sentiment accuracy", 1.0, stage="finetune-all"),
        _row("prompt-tuning (sentiment)", "sentiment accuracy", sentiment_prompt, stage="prompt-sentiment"),
        _row("ppo (lora policy)", "KL per token to the reference", ppo_kl, stage="ppo"),
        _row("dpo (lora policy)", "in-vocabulary words in its samples", dpo_vocab, stage="dpo"),
        _row("prompting (zero-shot, bare input)", "sentiment accuracy", 0.5, stage="prompting-bare"),
    ]


def test_rows_are_judged_against_their_targets():
    rows = judge(_rows())
    assert [r.get("met") for r in rows] == [True, None, True, True, True, None]
    assert "target" not in rows[1] and "target" not in rows[5]  # a reference row and a row without a target
    assert rows[2]["target"].startswith("≥ 0.90 × full fine-tuning")


@pytest.mark.parametrize("change", [dict(sentiment_prompt=0.89), dict(ppo_kl=0.31), dict(dpo_vocab=0.94)])
def test_a_row_below_its_target_is_not_met(change):
    rows = judge(_rows(**change))
    assert [r.get("met") for r in rows].count(False) == 1


def test_relative_target_follows_its_reference_row():
    rows = _rows(sentiment_prompt=0.80)
    rows[1]["value"] = 0.85  # 0.80 >= 0.9 * 0.85
    assert judge(rows)[2]["met"] is True


def test_quick_runs_are_not_judged_and_the_report_says_so(tmp_path):
    rows = judge(_rows(), quick=True)
    assert all(r["met"] is None for r in rows if "target" in r)
    text = write_report(tmp_path, rows, {"pretrain": 60.0, "dpo": 30.0}, ["a sample"], False, seed=3, quick=True,
                        unigram=4.2).read_text()
    assert "seed 3" in text and "1.5 minutes" in text and "too short to judge" in text and "a sample" in text


def test_the_report_counts_the_targets_met(tmp_path):
    text = write_report(tmp_path, judge(_rows(ppo_kl=0.5)), {"pretrain": 60.0}, [], True, seed=0, quick=False,
                        unigram=4.2).read_text()
    assert "3 of 4 targets met" in text and "≤ 0.3 nats ✗" in text and "![loss curves](loss_curves.png)" in text


def test_the_report_names_the_stages_that_ran_in_another_precision(tmp_path):
    rows = judge([{**r, "precision": "fp32" if r["stage"] == "ppo" else "bf16-mixed"} for r in _rows()])
    text = write_report(tmp_path, rows, {}, [], False, seed=0, quick=False, unigram=4.2,
                        precision="bf16-mixed").read_text()
    assert "training in bf16-mixed (fp32: ppo)." in text
    text = write_report(tmp_path, rows, {}, [], False, seed=0, quick=False, unigram=4.2, precision="fp32").read_text()
    assert "training in fp32 (bf16-mixed: pretrain, finetune-all, prompt-sentiment, dpo, prompting-bare)." in text


@pytest.mark.parametrize("flags, expected", [
    ("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni", "bf16-mixed"),  # Zen 4, Cooper Lake and later
    ("flags\t\t: fpu avx2 amx_bf16 amx_tile", "bf16-mixed"),  # Sapphire Rapids
    ("flags\t\t: fpu avx2 fma avx512f avx512bw", "fp32"),  # AVX-512 without bfloat16: emulated, slower
    ("", "fp32"),
])
def test_auto_precision_is_bf16_mixed_only_where_bfloat16_is_native(flags, expected, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert demo_precision("auto", cpuinfo=flags) == expected
    assert demo_precision("fp32", cpuinfo=flags) == "fp32"  # asked for: kept


def test_the_cli_offers_the_demos_precisions():
    """`tuneforge demo --precision` offers demo_stage.PRECISIONS, the choices run_demo accepts."""
    from tuneforge.tools.cli import build_parser
    from tuneforge.tools.demo_stage import PRECISIONS

    sub = next(a for a in build_parser()._actions if a.dest == "command" or getattr(a, "choices", None)
               and "demo" in a.choices)
    demo = sub.choices["demo"]
    flag = next(a for a in demo._actions if "--precision" in a.option_strings)
    assert tuple(flag.choices) == PRECISIONS and flag.default == "auto"
