#!/usr/bin/env bash
# FID (clean-fid) between the eval set's real images and each group of generated images, averaged over groups.
# Offline machines: eval.inception_weights=FILE (a copy of clean-fid's inception-2015-12-05.pt).
#
#   eval/eval_fid.sh CONTROLNET [key=value ...]
#
# CONTROLNET: hub id or local folder (a T2I-Adapter with eval.model_kind=t2i_adapter).
# Overrides go to the config, e.g. model.pretrained_model=DIR eval.dataset=DIR
# eval.output_dir=DIR eval.guidance_scale=3.0. Scripts sharing eval.output_dir reuse each other's images.
# Environment: METRICS (default fid; comma-separated: control,clip,fid or all), CONDITION (default depth).
# NUM_PROCESSES (default: one per visible GPU), ACCELERATE_CONFIG (default eval/config.yml), MAIN_PORT.
# accelerate comes from .venv when present (scripts/launch.sh).
set -euo pipefail
here="$(dirname "$0")"
source "$here/../scripts/launch.sh"
launch "$here/config.yml" innercontrol.evaluate --config "$here/../configs/${CONDITION:-depth}.yaml" \
  --controlnet "${1:?usage: eval/eval_fid.sh CONTROLNET [key=value ...]}" --metrics "${METRICS:-fid}" "${@:2}"
