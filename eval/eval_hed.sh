#!/usr/bin/env bash
# HED soft-edge controllability: MS-SSIM (and SSIM) between HED maps of the generated and the source images.
#
#   eval/eval_hed.sh CONTROLNET [key=value ...]
#
# CONTROLNET: hub id or local folder. Overrides go to the config, e.g. model.pretrained_model=DIR eval.dataset=DIR
# eval.output_dir=DIR eval.guidance_scale=3.0. Scripts sharing eval.output_dir reuse each other's images.
# Environment: NUM_PROCESSES (default 8), METRICS (default control; comma-separated: control,clip,fid or all).
set -euo pipefail
here="$(dirname "$0")"
exec accelerate launch --config_file "$here/config.yml" --num_processes "${NUM_PROCESSES:-8}" ${MAIN_PORT:+--main_process_port "$MAIN_PORT"} \
  -m innercontrol.evaluate --config "$here/../configs/hed.yaml" \
  --controlnet "${1:?usage: eval/eval_hed.sh CONTROLNET [key=value ...]}" --metrics "${METRICS:-control}" "${@:2}"
