"""The benchmark scripts run as a user runs them (a real subprocess, --quick sizes) and their checks hold.
Timings are never asserted here; they go to benchmarks/RESULTS.md."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_adapters_benchmark_quick_agrees_with_its_baselines():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adapters.py"), "--quick"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["lora_step"]["loss_diff_step2"] < 1e-4  # the same numbers as the PEFT-style module
    for key in ("multi_lora", "multi_adapter"):
        assert report[key]["max_abs_diff"] < 1e-4 and report[key]["grad_max_abs_diff"] < 1e-4
        assert report[key]["diff_from_base"] > 1e-3  # the adapters really change the output
        assert report[key]["inference"]["mixed_ms"] > 0 and report[key]["train"]["looped_ms"] > 0


def test_kernels_benchmark_quick_agrees_with_its_baselines():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--quick"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["flash_attention"]["max_abs_diff_vs_sdpa"] < 1e-4  # the same attention as PyTorch's
    assert report["lora_linear"]["max_abs_diff"] < 1e-4 and report["bottleneck_adapter"]["max_abs_diff"] < 1e-4
    for variant in report["multi_lora_linear"].values():
        assert variant["max_abs_diff"] < 1e-4 and variant["forward"]["tuneforge_ms"] > 0
    step = report["pretrain_step"]
    assert step["kernels_ms"] > 0 and step["reference_ms"] > 0


def test_distributed_benchmark_quick_runs_both_strategies_against_hand_loops():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, fsdp = json.loads(proc.stdout.strip().splitlines()[-1])
    for row in (ddp, fsdp):
        assert row["tuneforge"]["tokens_per_s"] > 0 and row["hand"]["tokens_per_s"] > 0
        assert row["tuneforge"]["max_rss_mib"] > 0
    # FSDP on 2 processes holds half the parameters, gradients and AdamW state of DDP (up to shard padding)
    ratio = fsdp["tuneforge"]["model_state_mib"] / ddp["tuneforge"]["model_state_mib"]
    assert 0.45 < ratio < 0.6
