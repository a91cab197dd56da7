#!/usr/bin/env bash
# The embedded default: set up ./.venv, prepare shapes-world (offline, first use), train configs/shapes_tiny.py into
# ./workdir/shapes_tiny (resuming if it is already there), then print the shapes-world eval table.
# Usage: ./launch/local.sh [--config.key=value ...]      (extra flags go to the train command)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
OFJ_EXTRAS="${OFJ_EXTRAS-}" source launch/venv.sh   # the base package only: training needs no torch
# XLA:CPU settings measured faster for the tiny model on 2 cores (train steps 2.5 vs 2.25 per second): no YNNPACK
# fusions, and the plain thunk scheduler instead of the (default) concurrency-optimised one. Used only if jaxlib knows
# them (docs/pod_scale.md, "FLOPs and MFU").
CPU_FLAGS="--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_enable_concurrency_optimized_scheduler=false"
if XLA_FLAGS="$CPU_FLAGS ${XLA_FLAGS:-}" python -c "import jax; jax.numpy.zeros(1).block_until_ready()" 2>/dev/null; then
  export XLA_FLAGS="$CPU_FLAGS ${XLA_FLAGS:-}"
fi
WORKDIR="${WORKDIR:-workdir/shapes_tiny}"
CONFIG="${CONFIG:-configs/shapes_tiny.py}"
python -m oneflow_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
python -m oneflow_jax.eval --workdir "$WORKDIR"
echo "done in $(( $(date +%s) - start )) s (setup + training + eval); run dir: $WORKDIR"
