"""bench/step_cost.py: FLOP counting against a hand count, and the table with its throughput columns (tiny preset)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from .helpers import load_bench_script

ROOT = Path(__file__).resolve().parents[1]


def test_flop_count_of_a_linear_training_step_by_hand():
    bench = load_bench_script("step_cost")
    layer = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16, requires_grad=True)

    def step():
        layer(x).sum().backward()

    # forward: 2*B*in*out; backward: the same again for the input gradient and for the weight gradient.
    assert bench.count_flops(step) == 3 * 2 * 4 * 16 * 8


def test_peak_table_lookup():
    bench = load_bench_script("step_cost")
    assert bench.peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") == 312.0
    assert bench.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0  # not the SXM part's peak
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.0
    assert bench.peak_tflops("Some GPU", "bf16") is None


def test_tiny_table_has_throughput_settings_and_memory_per_sample(tmp_path):
    out = tmp_path / "table.md"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    args = ["--preset", "tiny", "--resolution", "64", "--batch-size", "2", "--steps", "1", "--data-workers", "0"]
    args += ["--settings", "fused,channels_last,tf32", "--memory-per-sample", "--output", str(out)]
    subprocess.run([sys.executable, str(ROOT / "bench" / "step_cost.py"), *args], check=True, env=env, cwd=ROOT)
    table = out.read_text()
    cells = [line.split("|") for line in table.splitlines() if line.startswith("| ")]
    rows = {c[1].strip(): c for c in cells if len(c) == 17}  # the step table (15 columns)
    for key in ("a", "e", "a-fused", "e-fused", "a-channels_last", "e-channels_last"):
        assert key in rows, key
    plain, full = rows["a"], rows["e"]
    # columns: time, x plain, extra, samples/s, GFLOP/step, TFLOP/s, MFU
    assert float(plain[6]) > 0 and float(full[7]) > float(plain[7])  # the full step does more arithmetic
    assert float(rows["a-fused"][7]) == float(plain[7])  # a setting does the same arithmetic as its base row
    assert abs(float(plain[6]) - 2 / float(plain[3])) < 0.01 * float(plain[6])  # samples/s = batch / time
    assert plain[9].strip() == "-"  # no MFU without a known peak (CPU)
    assert "tf32 (CUDA only)" in table
    assert re.search(r"Data loading alone .*: [0-9.]+ samples/s", table)
    memory = [line for line in table.splitlines() if re.match(r"\| [ae] \| (on|off) \|", line)]
    assert len(memory) == 4
    saved = {tuple(c.strip() for c in line.split("|")[1:3]): float(line.split("|")[3]) for line in memory}
    assert saved[("a", "on")] < saved[("a", "off")]  # checkpointing keeps less per sample
