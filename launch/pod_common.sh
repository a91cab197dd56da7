#!/usr/bin/env bash
# Sourced by launch/tpu_pod.sh and launch/xpk/workload.sh.

# pod_workdir ARGS...: prints the --workdir value of train ARGS; exits 2 unless it is a gs:// path (every worker and
# every restart must see the same checkpoints).
pod_workdir() {
  local workdir="" i j arg
  for ((i = 1; i <= $#; i++)); do
    arg="${!i}"
    case "$arg" in
      --workdir=*) workdir="${arg#--workdir=}" ;;
      --workdir) j=$((i + 1)); workdir="${!j:-}" ;;
    esac
  done
  if [[ "$workdir" != gs://* ]]; then
    echo "error: --workdir must be a gs:// path, got '${workdir}'" >&2
    exit 2
  fi
  echo "$workdir"
}

# config_preflight ROOT ARGS...: loads and validates the config with its --config.* overrides on this machine
# (python -m oneflow_jax.flops), so a bad flag fails in seconds instead of on every worker after provisioning.
# Skipped with a warning when oneflow_jax is not importable here.
config_preflight() {
  local root="$1" i j arg; shift
  local config_args=()
  for ((i = 1; i <= $#; i++)); do
    arg="${!i}"
    if [[ "$arg" == --config ]]; then j=$((i + 1)); config_args+=("$arg" "${!j:-}"); i=$j
    elif [[ "$arg" == --config[.=]* ]]; then config_args+=("$arg"); fi
  done
  if ! (cd "$root" && python3 -c "import oneflow_jax" 2>/dev/null); then
    echo "warning: oneflow_jax is not importable here; skipping the config preflight" >&2
    return 0
  fi
  (cd "$root" && python3 -m oneflow_jax.flops "${config_args[@]}" >/dev/null) || exit 2
}
