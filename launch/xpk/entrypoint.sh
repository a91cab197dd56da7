#!/usr/bin/env bash
# What every pod of the XPK / GKE JobSet runs: the train command, then launch/check_done.py.
# Exit 0 only when the run has reached config.total_steps. train.py also exits 0 after a SIGTERM (node maintenance,
# preemption: it saves a checkpoint first), so that case becomes exit 3 and the JobSet restarts the workload
# (xpk --max-restarts with --restart-on-user-code-failure); the restarted run resumes from the checkpoint.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python -m oneflow_jax.train --distributed "$@" || exit $?
workdir=""
for ((i = 1; i <= $#; i++)); do
  case "${!i}" in --workdir=*) workdir="${!i#--workdir=}" ;; --workdir) j=$((i + 1)); workdir="${!j}" ;; esac
done
exec python launch/check_done.py "$workdir"
