#!/usr/bin/env bash
# Depth controllability: RMSE (0-255 scale) of DPT-Large depth of the generated images vs the input depth.
#
#   eval/eval_depth.sh CONTROLNET [key=value ...]
#
# CONTROLNET: hub id or local folder. Overrides go to the config, e.g. model.pretrained_model=DIR eval.dataset=DIR
# eval.output_dir=DIR eval.guidance_scale=3.0. Scripts sharing eval.output_dir reuse each other's images.
# Environment: NUM_PROCESSES (default 8), METRICS (default control; comma-separated: control,clip,fid or all).
set -euo pipefail
here="$(dirname "$0")"
exec accelerate launch --config_file "$here/config.yml" --num_processes "${NUM_PROCESSES:-8}" ${MAIN_PORT:+--main_process_port "$MAIN_PORT"} \
  -m innercontrol.evaluate --config "$here/../configs/depth.yaml" \
  --controlnet "${1:?usage: eval/eval_depth.sh CONTROLNET [key=value ...]}" --metrics "${METRICS:-control}" "${@:2}"
