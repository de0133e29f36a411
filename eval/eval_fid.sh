#!/usr/bin/env bash
# FID (clean-fid) between the eval set's real images and each group of generated images, averaged over groups.
# Offline machines: eval.inception_weights=FILE (a copy of clean-fid's inception-2015-12-05.pt).
#
#   eval/eval_fid.sh CONTROLNET [key=value ...]
#
# CONTROLNET: hub id or local folder. Overrides go to the config, e.g. model.pretrained_model=DIR eval.dataset=DIR
# eval.output_dir=DIR eval.guidance_scale=3.0. Scripts sharing eval.output_dir reuse each other's images.
# Environment: NUM_PROCESSES (default 8), METRICS (default fid; comma-separated: control,clip,fid or all), CONDITION (default depth).
set -euo pipefail
here="$(dirname "$0")"
exec accelerate launch --config_file "$here/config.yml" --num_processes "${NUM_PROCESSES:-8}" ${MAIN_PORT:+--main_process_port "$MAIN_PORT"} \
  -m innercontrol.evaluate --config "$here/../configs/${CONDITION:-depth}.yaml" \
  --controlnet "${1:?usage: eval/eval_fid.sh CONTROLNET [key=value ...]}" --metrics "${METRICS:-fid}" "${@:2}"
