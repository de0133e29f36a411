#!/usr/bin/env bash
# The GPU table of bench/RESULTS.md: SD1.5 shapes at 512 px, batch 8, bf16, gradient checkpointing.
# Run from the repository root on a CUDA machine; OUT (default bench/) receives gpu_step_cost.md.
# SETTINGS=fused,channels_last,compile,best,adamw8bit adds the throughput settings (issue 16) beside the default;
# MEMORY_PER_SAMPLE=1 adds memory per sample with and without gradient checkpointing.
set -euo pipefail
OUT=${OUT:-bench}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_info.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu_info.txt"
PYTHONUNBUFFERED=1 python3 bench/step_cost.py --preset sd15 --resolution 512 --batch-size 8 --steps 6 \
  --precision bf16 --gradient-checkpointing ${VAE_GC:+--vae-gradient-checkpointing} --device cuda --output "$OUT/gpu_step_cost.md" ${PROFILE:+--profile "$PROFILE"} \
  ${SETTINGS:+--settings "$SETTINGS"} ${MEMORY_PER_SAMPLE:+--memory-per-sample}
