#!/usr/bin/env bash
# Multi-process training on this machine: N processes of `python -m oneflow_jax.$MODULE` (MODULE=train by default;
# MODULE=precompute for the latent precompute) joined by jax.distributed,
# with CPU collectives over gloo on loopback (a coordinator on 127.0.0.1 at a free port). The same code path as a
# multi-host run, on one box.
#
# Usage: launch/local_multiprocess.sh N [train args...]
#   launch/local_multiprocess.sh 2 --config configs/shapes_tiny.py:smoke --workdir /tmp/mp --config.data.num_streams=2
#
# - Each process gets --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i after your args.
# - Devices per process: XLA_FLAGS as given; if it sets no device count, DEVICES_PER_PROCESS (default 1) fake CPU
#   devices via --xla_force_host_platform_device_count. JAX_PLATFORMS defaults to cpu.
# - Output lines are prefixed with "[i] " (stdout stays stdout, stderr stays stderr).
# - Waits for all processes; exits with the first non-zero status. When one process fails the others are stopped
#   (SIGTERM, then SIGKILL after GRACE_SECONDS, default 10) instead of waiting on a peer that is gone.
#   SIGTERM / SIGINT to this script are forwarded to every process (they checkpoint and exit 0).
# - Uses ./.venv of this repository when no virtual environment is active.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
num_processes=$1
shift

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${VIRTUAL_ENV:-}" && -x "$root/.venv/bin/python" ]]; then
  source "$root/.venv/bin/activate"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export PYTHONUNBUFFERED=1
if [[ "${XLA_FLAGS:-}" != *xla_force_host_platform_device_count* ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}"
fi

port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((i = 0; i < num_processes; i++)); do
  python -m "oneflow_jax.${MODULE:-train}" "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$num_processes" \
    --process_id="$i" > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=($!)
done

declare -A live  # pid -> process id, of the processes still running
for ((i = 0; i < num_processes; i++)); do live[${pids[$i]}]=$i; done

signal_live() {
  ((${#live[@]} > 0)) && kill -"$1" "${!live[@]}" 2>/dev/null
  return 0
}
trap 'signal_live TERM' TERM
trap 'signal_live INT' INT

status=0
killer=""
while ((${#live[@]} > 0)); do
  # `wait -n` also returns early (status > 128, no pid) when a trapped signal arrives: then just wait again.
  rc=0
  finished=""
  wait -n -p finished "${!live[@]}" || rc=$?
  [[ -z "$finished" ]] && continue
  id=${live[$finished]}
  unset "live[$finished]"
  if ((rc != 0 && status == 0)); then
    echo "local_multiprocess: process $id exited with status $rc; stopping the others" >&2
    status=$rc
    signal_live TERM
    if ((${#live[@]} > 0)); then
      (sleep "${GRACE_SECONDS:-10}"; kill -KILL "${!live[@]}" 2>/dev/null) &
      killer=$!
    fi
  elif ((rc != 0)); then
    echo "local_multiprocess: process $id exited with status $rc" >&2
  fi
done
[[ -n "$killer" ]] && kill "$killer" 2>/dev/null
wait  # the output prefixers
exit "$status"
