#!/usr/bin/env bash
# Pretraining on a Cloud TPU VM slice: create or reuse the TPU (directly, or through a queued resource), install this
# repository on every worker, start the same train command on all workers, and restart after preemption until the
# run has reached config.total_steps. Checkpoints, metrics and the copied code live under a gs:// workdir.
#
# Usage: launch/tpu_pod.sh --config configs/oneflow_1b.py --workdir gs://BUCKET/runs/1b [more train flags...]
#
# Environment (default):
#   TPU_NAME (oneflow-$USER)  ZONE (us-east5-a)  PROJECT (gcloud's default)  ACCELERATOR (v5p-128)
#   RUNTIME (v2-alpha-tpuv5; v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e, v4: tpu-ubuntu2204-base)
#   QUEUED (1): create through a queued resource and wait for capacity; 0: `tpu-vm create` (fails without capacity)
#   SPOT (0): 1 = spot capacity (cheaper, preempted more often; the restart loop handles it)
#   RESERVED (0): 1 = use the project's reservation (--reserved)
#   DATA_BUCKET (): gs://bucket mounted read-only with gcsfuse at /tmp/gcsfuse/<bucket> on every worker; point
#                   --config.data.data_dir there (Grain reads ArrayRecord through POSIX files)
#   JAX_PIP ("jax[tpu]")  MAX_RESTARTS (100)  RESTART_WAIT_S (60)  DELETE_AT_END (0)
#   DRY_RUN (0): print every gcloud / gsutil command instead of running it (nothing is created)
# Exit status: 0 when the run is complete, 2 for a configuration error (never retried), 1 when out of restarts.
# Code that goes to the workers is `git archive HEAD`: commit first (uncommitted changes are not shipped).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TPU_NAME="${TPU_NAME:-oneflow-${USER:-user}}"
ZONE="${ZONE:-us-east5-a}"
ACCELERATOR="${ACCELERATOR:-v5p-128}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"
QUEUED="${QUEUED:-1}" SPOT="${SPOT:-0}" RESERVED="${RESERVED:-0}" DRY_RUN="${DRY_RUN:-0}"
JAX_PIP="${JAX_PIP:-jax[tpu]}"
MAX_RESTARTS="${MAX_RESTARTS:-100}" RESTART_WAIT_S="${RESTART_WAIT_S:-60}" DELETE_AT_END="${DELETE_AT_END:-0}"
DATA_BUCKET="${DATA_BUCKET:-}"
project_flag=(); [[ -n "${PROJECT:-}" ]] && project_flag=(--project "$PROJECT")

source "$root/launch/pod_common.sh"
if [[ $# -eq 0 ]]; then
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
workdir="$(pod_workdir "$@")"
config_preflight "$root" "$@"

run() {  # a gcloud/gsutil command, or its echo under DRY_RUN=1
  if [[ "$DRY_RUN" == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}
tpu() { run gcloud compute tpus "$@" --zone "$ZONE" "${project_flag[@]}"; }
on_all_workers() { tpu tpu-vm ssh "$TPU_NAME" --worker=all --command "$1"; }

tpu_state() {  # READY, CREATING, PREEMPTED, ... or empty when it does not exist
  [[ "$DRY_RUN" == 1 ]] && { echo "${DRY_RUN_STATE:-}"; return; }
  gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" "${project_flag[@]}" --format='value(state)' \
    2>/dev/null || true
}

delete_tpu() {
  if [[ "$QUEUED" == 1 ]]; then
    tpu queued-resources delete "$TPU_NAME" --force --quiet || true
  else
    tpu tpu-vm delete "$TPU_NAME" --quiet || true
  fi
}

ensure_tpu() {  # reuse a READY TPU; replace a preempted / broken one; create one if there is none
  local state; state="$(tpu_state)"
  [[ "$state" == READY ]] && { echo "reusing TPU $TPU_NAME ($ACCELERATOR)"; return; }
  [[ -n "$state" ]] && { echo "TPU $TPU_NAME is $state: deleting it"; delete_tpu; }
  local capacity=(); [[ "$SPOT" == 1 ]] && capacity+=(--spot); [[ "$RESERVED" == 1 ]] && capacity+=(--reserved)
  if [[ "$QUEUED" == 1 ]]; then
    tpu queued-resources create "$TPU_NAME" --node-id "$TPU_NAME" --accelerator-type "$ACCELERATOR" \
      --runtime-version "$RUNTIME" "${capacity[@]}"
    [[ "$DRY_RUN" == 1 ]] && return
    echo "waiting for the queued resource $TPU_NAME to become ACTIVE ..."
    while true; do
      local q; q="$(gcloud compute tpus queued-resources describe "$TPU_NAME" --zone "$ZONE" "${project_flag[@]}" \
        --format='value(state.state)' 2>/dev/null || true)"
      case "$q" in
        ACTIVE) break ;;
        FAILED|SUSPENDED|"") echo "queued resource is ${q:-gone}; retrying"; delete_tpu; sleep "$RESTART_WAIT_S"
          tpu queued-resources create "$TPU_NAME" --node-id "$TPU_NAME" --accelerator-type "$ACCELERATOR" \
            --runtime-version "$RUNTIME" "${capacity[@]}" ;;
        *) sleep 30 ;;
      esac
    done
  else
    tpu tpu-vm create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$RUNTIME" "${capacity[@]}"
  fi
}

# The code: one tarball of HEAD per commit under the workdir, unpacked into ~/oneflow_jax on every worker.
sha="$(git -C "$root" rev-parse --short=12 HEAD)"
code_url="$workdir/code/oneflow_jax-$sha.tar.gz"
[[ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]] && \
  echo "warning: uncommitted changes are not shipped (workers get HEAD $sha)" >&2
tarball="$(mktemp -d)/code.tar.gz"
run git -C "$root" archive --format=tar.gz -o "$tarball" HEAD
run gsutil -q cp "$tarball" "$code_url"

q() { printf '%q ' "$@"; }
install_cmd="set -e; mkdir -p ~/oneflow_jax && cd ~/oneflow_jax
if [ ! -f .installed-$sha ]; then
  gsutil -q cp $(q "$code_url") code.tar.gz && tar xzf code.tar.gz
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . $(q "$JAX_PIP") && touch .installed-$sha
fi"
if [[ -n "$DATA_BUCKET" ]]; then
  bucket="${DATA_BUCKET#gs://}"; bucket="${bucket%%/*}"
  install_cmd+="
if ! mountpoint -q /tmp/gcsfuse/$bucket; then
  command -v gcsfuse >/dev/null || { echo deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main \
    | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg \
    | sudo apt-key add - && sudo apt-get -qq update && sudo apt-get -qq install -y gcsfuse; }
  mkdir -p /tmp/gcsfuse/$bucket && gcsfuse -o ro --implicit-dirs $bucket /tmp/gcsfuse/$bucket
fi"
fi
# Same command on every worker; jax.distributed finds the other workers itself (--distributed). The exit status of
# check_done.py tells a finished run (0) from one stopped early by SIGTERM (3).
train_cmd="cd ~/oneflow_jax && source .venv/bin/activate && export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1 &&
python -m oneflow_jax.train --distributed $(q "$@") && python launch/check_done.py $(q "$workdir")"

for ((attempt = 0; attempt <= MAX_RESTARTS; attempt++)); do
  ensure_tpu
  set +e
  on_all_workers "$install_cmd" && on_all_workers "$train_cmd"
  rc=$?
  set -e
  if [[ $rc -eq 0 ]]; then
    echo "run complete: $workdir"
    [[ "$DELETE_AT_END" == 1 ]] && delete_tpu
    exit 0
  fi
  if [[ $rc -eq 2 ]]; then
    echo "configuration error (exit 2) on the workers: not retrying; fix the flags and rerun" >&2
    exit 2
  fi
  [[ "$DRY_RUN" == 1 ]] && exit 0
  echo "attempt $attempt ended with status $rc (TPU state: $(tpu_state)); restarting in ${RESTART_WAIT_S}s" >&2
  sleep "$RESTART_WAIT_S"
done
echo "giving up after $MAX_RESTARTS restarts" >&2
exit 1
