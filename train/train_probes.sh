#!/usr/bin/env bash
# Probe pretraining for CONDITION (depth, hed, lineart; sdxl_depth, sdxl_hed, sdxl_lineart on SDXL):
# configs/probe_CONDITION.yaml, one process per visible GPU.
#
#   train/train_probes.sh CONDITION [key=value ...]
#   NUM_PROCESSES=1 train/train_probes.sh depth probe.max_steps=1000
# The probe is written to probe.path with its accuracy-vs-timestep table and plot.
# accelerate comes from .venv when present (scripts/launch.sh).
set -euo pipefail
here="$(dirname "$0")"
condition="${1:?usage: train/train_probes.sh CONDITION [key=value ...]  (CONDITION: depth, hed, lineart, sdxl_depth, sdxl_hed, sdxl_lineart)}"
source "$here/../scripts/launch.sh"
launch "$here/config.yml" innercontrol.train_probes --config "$here/../configs/probe_${condition}.yaml" "${@:2}"
