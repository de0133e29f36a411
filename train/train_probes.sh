#!/usr/bin/env bash
# Probe pretraining for CONDITION (depth, hed, lineart): configs/probe_CONDITION.yaml, 8 GPUs by default.
#
#   train/train_probes.sh CONDITION [key=value ...]
#   NUM_PROCESSES=1 train/train_probes.sh depth probe.max_steps=1000
# The probe is written to probe.path with its accuracy-vs-timestep table and plot.
set -euo pipefail
here="$(dirname "$0")"
condition="${1:?usage: train/train_probes.sh CONDITION [key=value ...]  (CONDITION: depth, hed, lineart)}"
exec accelerate launch --config_file "${ACCELERATE_CONFIG:-$here/config.yml}" \
  ${NUM_PROCESSES:+--num_processes "$NUM_PROCESSES"} ${MAIN_PORT:+--main_process_port "$MAIN_PORT"} \
  -m innercontrol.train_probes --config "$here/../configs/probe_${condition}.yaml" "${@:2}"
