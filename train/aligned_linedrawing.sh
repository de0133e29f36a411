#!/usr/bin/env bash
# InnerControl training, lineart (configs/lineart.yaml): 8 GPUs by default (train/config.yml).
#
#   train/aligned_linedrawing.sh [key=value ...]
#   ACCELERATE_CONFIG=train/deepspeed_zero2.yml train/aligned_linedrawing.sh
#   MACHINE_RANK=1 MAIN_IP=10.0.0.1 ACCELERATE_CONFIG=train/multinode.yml train/aligned_linedrawing.sh
# Overrides go to the config, e.g. logging.resume=latest optim.max_steps=5000 loss.alignment_weight=0.
set -euo pipefail
here="$(dirname "$0")"
exec accelerate launch --config_file "${ACCELERATE_CONFIG:-$here/config.yml}" \
  ${NUM_PROCESSES:+--num_processes "$NUM_PROCESSES"} ${MACHINE_RANK:+--machine_rank "$MACHINE_RANK"} \
  ${MAIN_IP:+--main_process_ip "$MAIN_IP"} ${MAIN_PORT:+--main_process_port "$MAIN_PORT"} \
  -m innercontrol.train --config "$here/../configs/lineart.yaml" "$@"
