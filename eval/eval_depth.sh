#!/usr/bin/env bash
# Depth controllability: RMSE (0-255 scale) of DPT-Large depth of the generated images vs the input depth.
#
#   eval/eval_depth.sh CONTROLNET [key=value ...]
#
# CONTROLNET: hub id or local folder (a T2I-Adapter with eval.model_kind=t2i_adapter).
# Overrides go to the config, e.g. model.pretrained_model=DIR eval.dataset=DIR
# eval.output_dir=DIR eval.guidance_scale=3.0. Scripts sharing eval.output_dir reuse each other's images.
# Environment: METRICS (default control; comma-separated: control,clip,fid or all).
# NUM_PROCESSES (default: one per visible GPU), ACCELERATE_CONFIG (default eval/config.yml), MAIN_PORT.
# accelerate comes from .venv when present (scripts/launch.sh).
set -euo pipefail
here="$(dirname "$0")"
source "$here/../scripts/launch.sh"
launch "$here/config.yml" innercontrol.evaluate --config "$here/../configs/depth.yaml" \
  --controlnet "${1:?usage: eval/eval_depth.sh CONTROLNET [key=value ...]}" --metrics "${METRICS:-control}" "${@:2}"
