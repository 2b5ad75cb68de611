"""benchmarks/hf_training.py runs as a user runs it (a real subprocess, --quick sizes) and its checks hold: both
sides (tuneforge and transformers + PEFT) train the same LoRA step from the same first-batch loss. Timings are
never asserted here; they go to benchmarks/RESULTS.md."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("transformers")


def test_hf_training_benchmark_quick_compares_the_same_step():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hf_training.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    report = json.loads(out.strip().splitlines()[-1])
    check = report["loss_check"]
    assert "| tuneforge | tuneforge fused |" in out
    assert report["rows"]["tuneforge"]["tokens_per_s"] > 0 and report["rows"]["tuneforge"]["step_mib"] >= 0
    assert report["attention_fallbacks"] == []  # side (a) really ran tuneforge's fused attention
    if importlib.util.find_spec("peft") is None:
        assert "transformers + PEFT: skipped (peft is not installed" in out
        assert report["ratio"] is None
        return
    assert "| transformers + PEFT | sdpa |" in out and "| ratio tuneforge / PEFT |" in out
    # Same weights, LoRA B = 0, same batch: the same first loss; then the same gradients and AdamW step.
    first = check["first_loss"]
    assert abs(first["tuneforge"] - first["peft"]) < 1e-4 and check["first_loss_diff"] < 1e-4
    assert check["second_loss_diff"] < 1e-4
    assert all(d < 1e-4 for d in check["memory_process_loss_diff"].values())  # the memory processes ran it too
    assert report["rows"]["peft"]["trainable_params"] == report["rows"]["tuneforge"]["trainable_params"]
