#!/usr/bin/env bash
# InnerControl training on SDXL, lineart (configs/sdxl_lineart.yaml): one process per visible GPU
# (train/config.yml: data parallel).
#
#   train/aligned_sdxl_lineart.sh [key=value ...]
#   NUM_PROCESSES=4 train/aligned_sdxl_lineart.sh
#   ACCELERATE_CONFIG=train/deepspeed_zero2.yml train/aligned_sdxl_lineart.sh
#   MACHINE_RANK=1 MAIN_IP=10.0.0.1 ACCELERATE_CONFIG=train/multinode.yml train/aligned_sdxl_lineart.sh
# Overrides go to the config, e.g. logging.resume=latest optim.max_steps=5000 loss.alignment_weight=0.
# accelerate comes from .venv when present (scripts/launch.sh).
set -euo pipefail
here="$(dirname "$0")"
source "$here/../scripts/launch.sh"
launch "$here/config.yml" innercontrol.train --config "$here/../configs/sdxl_lineart.yaml" "$@"
