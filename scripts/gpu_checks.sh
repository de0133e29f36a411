#!/usr/bin/env bash
# The checks a session with a lent GPU runs (see ../shared/gpu/README.md for bringing the wheels in .whl/):
# CUDA-only tests (reward CUDA graph == eager; fp16 training with the graphed reward), the GPU benchmark table,
# and the training tests on the GPU. Logs and tables go to OUT (default outputs/gpu).
set -uo pipefail
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
stamp() { echo "[gpu_checks] $1 at +$(($(date +%s) - start)) s"; }
stamp "CUDA tests"
timeout 240 python3 -m pytest -q -ra tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
stamp "benchmark"
OUT="$OUT" timeout 300 bash bench/gpu_step_cost.sh 2>&1 | tee "$OUT/bench.log"
stamp "training tests on the GPU"
timeout 150 python3 -m pytest -q -ra tests/test_train.py -k "not two_process and not resume_matches" 2>&1 | tee "$OUT/train_gpu.log"
stamp "done"
