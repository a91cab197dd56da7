#!/usr/bin/env bash
# The embedded default: set up ./.venv, prepare shapes-world (offline, first use), train $CONFIG (default
# configs/shapes_tiny.py) into $WORKDIR (default ./workdir/<config name>; resuming if it is already there), then print
# the shapes-world eval table. A VQ-codec config (configs/nextflow_shapes_tiny.py) trains its tokenizer first.
# Usage: [CONFIG=configs/X.py] ./launch/local.sh [--config.key=value ...]      (extra flags go to the train command)
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
CONFIG="${CONFIG:-configs/shapes_tiny.py}"
WORKDIR="${WORKDIR:-workdir/$(basename "${CONFIG%%:*}" .py)}"
# A run whose images are VQ codes (codec 'vq': the NextFlow-style baseline, docs/nextflow.md) trains its tokenizer
# first, into $WORKDIR/vq with $VQ_CONFIG, unless --config.codec.tokenizer names a trained one.
codec="$(python -c 'import sys; from oneflow_jax import config_lib as c; print(c.load_config_file(sys.argv[1]).codec.name)' "$CONFIG" 2>/dev/null || true)"  # a bad CONFIG: train says why
if [[ "$codec" == vq && " $* " != *" --config.codec.tokenizer="* ]]; then
  python -m oneflow_jax.train_vq --config "${VQ_CONFIG:-configs/vq_shapes_tiny.py}" --workdir "$WORKDIR/vq"
  set -- "--config.codec.tokenizer=$(cd "$WORKDIR/vq" && pwd)" "$@"
fi
python -m oneflow_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
python -m oneflow_jax.eval --workdir "$WORKDIR"
echo "done in $(( $(date +%s) - start )) s (setup + training + eval); run dir: $WORKDIR"
