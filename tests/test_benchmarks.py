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
    assert report["contention"] is False
    peaks = report["sgemm_peaks_measured"]  # start, middle and end; the op fractions are against the best
    assert len(peaks) == 3 and report["sgemm_peak_gflops"] == max(peaks) > 0
    # every attention row computes what PyTorch's does (output and gradients), packed documents included
    for key, against in (("flash_attention", "sdpa"), ("flash_attention_tiny", "sdpa"),
                         ("packed_attention", "sdpa_looped")):
        row = report[key]
        assert row["parity_against"] == against, key
        assert row["max_abs_diff"] < 1e-4 and row["grad_max_abs_diff"] < 1e-3, key
    assert set(report["packed_attention"]["forward_backward"]["vs"]) == {"sdpa_looped", "sdpa_mask"}
    assert report["lora_linear"]["max_abs_diff"] < 1e-4 and report["bottleneck_adapter"]["max_abs_diff"] < 1e-4
    rows = [report["lora_linear"], report["bottleneck_adapter"], report["flash_attention"]["forward"]]
    for variant in report["multi_lora_linear"].values():
        assert variant["max_abs_diff"] < 1e-4  # the op, the in-place loop and the old loop agree
        rows += [variant["forward"], variant["forward_backward"]]
        assert variant["forward"]["vs"]["loop_in_place"]["target"] is not None
        assert variant["forward"]["vs"]["loop_out_of_place_old"]["target"] is None  # history only, no target
    for row in rows:  # each ratio names the code it was measured against, and each op its share of the peak
        assert row["tuneforge"]["ms"] > 0 and 0 < row["tuneforge"]["fraction_of_peak"]
        assert all(b["baseline"] and b["ratio"] > 0 for b in row["vs"].values())
    assert "index_add_" in report["multi_lora_linear"]["update_only"]["forward"]["vs"]["loop_in_place"]["baseline"]
    step = report["pretrain_step"]
    assert step["kernels_ms"] > 0 and step["reference_ms"] > 0 and step["baseline"]


def test_kernels_benchmark_contention_flag_starts_and_stops_its_competitor():
    """--contention runs one busy process beside the benchmark and ends it (by its pid) when the run is over."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with bench.contention(True) as pid:
        assert pid is not None and Path(f"/proc/{pid}").exists()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    with bench.contention(False) as none:
        assert none is None


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


def test_linear_ce_benchmark_quick_agrees_with_its_baseline():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "linear_ce.py"), "--quick"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["max_abs_diff"]["loss"] < 1e-4 and report["max_abs_diff"]["dx"] < 1e-4  # the same computation
    assert report["peak_mb"]["fused"] < report["peak_mb"]["baseline"]  # never the whole logits
    assert report["ms"]["fused"] > 0 and report["sgemm_peak_gflops"] > 0


def test_packing_benchmark_quick_compares_the_same_records_padded_and_packed():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "packing.py"), "--quick"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    check = report["loss_check"]  # one padded batch and the same records packed: the same loss and gradients
    assert check["loss_abs_diff"] < 1e-4 and check["grad_max_abs_diff"] < 1e-4 and check["grad_max_abs"] > 1e-3
    padded, packed = report["sides"]["padded"], report["sides"]["packed"]
    for key in ("useful_tokens", "trained_tokens"):  # both runs read every record once
        assert padded[key] == packed[key] > 0, key
    assert padded["padding_share"] >= report["target"]["padding_share"] > packed["padding_share"]
    assert packed["steps"] < padded["steps"] and packed["positions"] < padded["positions"]
    for side in (padded, packed):
        assert side["useful_tokens_per_s"] > 0 and 0 < side["fraction_of_peak"] and side["first_pass_loss"] > 0
    assert report["ratio"] > 0 and report["sgemm_peak_gflops"] > 0


def test_muon_benchmark_quick_trains_both_optimizers_through_the_engine():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "muon.py"), "--quick"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [report[k]["optimizer"] for k in ("adamw", "muon")] == ["adamw", "muon"]
    assert report["adamw"]["steps"] > report["muon"]["steps"]  # the comparison is at the demo's two schedules
    for k in ("adamw", "muon"):
        assert 0 < report[k]["bits_per_token"] < 8.0  # below a uniform guess over the 259 tokens (8.02 bits)
        assert report[k]["tokens"] == report[k]["steps"] * 4 * 64
    assert report["time_ratio_adamw_over_muon"] > 0
