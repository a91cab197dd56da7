#!/usr/bin/env bash
# MFU of the paper-size train steps (OneFlow 1B and its AR+FM baseline) on one accelerator, synthetic batches
# (benchmarks/mfu.py --synthetic: no dataset, tokenizer or VAE weights needed). One JSON line per run in $1
# (default mfu_paper_sizes.jsonl); a run that fails or runs past $RUN_TIMEOUT seconds is reported and skipped.
#
#   benchmarks/mfu_paper_sizes.sh /tmp/mfu.jsonl     # ROWS=16 STEPS=8 RUN_TIMEOUT=150 by default; EXTRA="--config.x=y"
#                                                     # is added to every run
set -uo pipefail
out=${1:-mfu_paper_sizes.jsonl}
rows=${ROWS:-16}
steps=${STEPS:-8}
limit=${RUN_TIMEOUT:-150}
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."

run() {   # name, then mfu.py arguments
  local name=$1; shift
  local t0=$SECONDS line
  line=$(timeout "$limit" "$py" benchmarks/mfu.py --synthetic --steps "$steps" --warmup 2 \
         "$@" --config.data.global_batch_size="$rows" ${EXTRA:-} 2>"/tmp/mfu_$name.err" | tail -1)
  if [[ $line == "{"* ]]; then
    echo "{\"run\": \"$name\", \"wall_s\": $((SECONDS - t0)), ${line#\{}" | tee -a "$out"
  else
    echo "{\"run\": \"$name\", \"wall_s\": $((SECONDS - t0)), \"error\": \"$(tail -c 300 "/tmp/mfu_$name.err" \
         | tr -d '"\\' | tr '\n' ' ')\"}" | tee -a "$out"
  fi
}

run oneflow_1b_cudnn --config configs/oneflow_1b.py --config.model.attention_impl=cudnn
run oneflow_1b_xla --config configs/oneflow_1b.py
run ar_1b_cudnn --config configs/ar_1b.py --config.model.attention_impl=cudnn
run oneflow_1b_cudnn_noremat --config configs/oneflow_1b.py --config.model.attention_impl=cudnn \
    --config.model.remat=none
