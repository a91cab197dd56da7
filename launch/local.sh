#!/usr/bin/env bash
# The embedded default: set up ./.venv, prepare shapes-world (offline, first use), train configs/shapes_tiny.py into
# ./workdir/shapes_tiny (resuming if it is already there), then print the shapes-world eval table.
# Usage: ./launch/local.sh [--config.key=value ...]      (extra flags go to the train command)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
OFJ_EXTRAS="${OFJ_EXTRAS-}" source launch/venv.sh   # the base package only: training needs no torch
WORKDIR="${WORKDIR:-workdir/shapes_tiny}"
CONFIG="${CONFIG:-configs/shapes_tiny.py}"
python -m oneflow_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
python -m oneflow_jax.eval --workdir "$WORKDIR"
echo "done in $(( $(date +%s) - start )) s (setup + training + eval); run dir: $WORKDIR"
