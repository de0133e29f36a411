# Sourced by train/*.sh and eval/*.sh: `launch DEFAULT_ACCELERATE_CONFIG MODULE [ARGS ...]` runs
# `accelerate launch --config_file ... -m MODULE ARGS`.
#
# accelerate: the project's venv (.venv, or $VENV; what `make demo` / `make test` create) when it has accelerate,
# else `accelerate` on the PATH. Processes: NUM_PROCESSES if set; else, with your own ACCELERATE_CONFIG, that file
# decides; else one per visible GPU (CUDA_VISIBLE_DEVICES or nvidia-smi -L), one on a machine without GPUs.
# Also passed on when set: MACHINE_RANK, MAIN_IP, MAIN_PORT.

visible_gpus() {
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    local ids="${CUDA_VISIBLE_DEVICES//[[:space:]]/}"
    if [[ -z "$ids" || "$ids" == -1* ]]; then echo 0; else tr ',' '\n' <<<"$ids" | grep -c .; fi
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

launch() {
  local default_config="$1" module="$2"
  shift 2
  local root venv
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="${VENV:-$root/.venv}"
  local -a accelerate
  if [[ -x "$venv/bin/accelerate" && -x "$venv/bin/python" ]]; then
    # through the venv's python, so the launched processes use it too (no activation needed)
    accelerate=("$venv/bin/python" -m accelerate.commands.launch)
  elif command -v accelerate >/dev/null 2>&1; then
    accelerate=(accelerate launch)
  else
    echo "error: accelerate not found: no $venv/bin/accelerate and no \`accelerate\` on the PATH." >&2
    echo "Run \`make test\` (or \`make demo\`) in $root to create .venv with every dependency," >&2
    echo "or \`pip install -r requirements.txt && pip install -e .\` in the Python environment you use." >&2
    exit 127
  fi
  local -a options=(--config_file "${ACCELERATE_CONFIG:-$default_config}")
  if [[ -n "${NUM_PROCESSES:-}" ]]; then
    options+=(--num_processes "$NUM_PROCESSES")
  elif [[ -z "${ACCELERATE_CONFIG:-}" ]]; then
    local gpus
    gpus="$(visible_gpus)"
    options+=(--num_processes "$((gpus > 0 ? gpus : 1))")
  fi
  if [[ -n "${MACHINE_RANK:-}" ]]; then options+=(--machine_rank "$MACHINE_RANK"); fi
  if [[ -n "${MAIN_IP:-}" ]]; then options+=(--main_process_ip "$MAIN_IP"); fi
  if [[ -n "${MAIN_PORT:-}" ]]; then options+=(--main_process_port "$MAIN_PORT"); fi
  exec "${accelerate[@]}" "${options[@]}" -m "$module" "$@"
}
