#!/usr/bin/env bash
# The real-data walk-through (docs/real_data.md) at CPU size, every step a user-facing command:
#   1. python -m oneflow_jax.example_photos   photographs -> webdataset tars + parquet, a tiny SD3-architecture VAE,
#                                             a byte-level BPE tokenizer.json (skipped if DIR already has them)
#   2. python -m oneflow_jax.precompute       the VAE latents (bf16), sharded over PROCESSES processes (default 2)
#   3. python -m oneflow_jax.train            configs/photos_tiny.py:DIR (20 steps)
#   4. python -m oneflow_jax.sample           a caption of a held-out photo and an image from a caption
#   5. python -m oneflow_jax.export_torch     the run as a PyTorch / safetensors checkpoint
# Usage: launch/real_data_example.sh DIR [train flags...]     (outputs: DIR/data, DIR/run, DIR/samples, DIR/torch)
set -euo pipefail
if [[ $# -lt 1 ]]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
dir="$(mkdir -p "$1" && cd "$1" && pwd)"
shift
cd "$(dirname "$0")/.."
[[ -n "${VIRTUAL_ENV:-}" ]] || OFJ_EXTRAS="${OFJ_EXTRAS-torch,examples}" source launch/venv.sh
export TFDS_DATA_DIR="$dir/data"

[[ -f "$dir/builder_config.json" ]] || python -m oneflow_jax.example_photos --out "$dir"
MODULE=precompute launch/local_multiprocess.sh "${PROCESSES:-2}" --name image_caption_pairs \
  --config "$(cat "$dir/builder_config.json")" --per_device_batch 4 --log_every_s 5
python -m oneflow_jax.train --config "configs/photos_tiny.py:$dir" --workdir "$dir/run" "$@"
eval_jpg="$dir/held_out.jpg"
python - "$dir/shards/eval.tar" "$eval_jpg" <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    member = next(m for m in tar if m.name.endswith(".jpg"))
    open(sys.argv[2], "wb").write(tar.extractfile(member).read())
PY
python -m oneflow_jax.sample --workdir "$dir/run" --prompt "<image>" --image "$eval_jpg" --out "$dir/samples/caption"
python -m oneflow_jax.sample --workdir "$dir/run" --prompt "a cup of coffee on a saucer <image>" --image - \
  --out "$dir/samples/image"
python -m oneflow_jax.export_torch --workdir "$dir/run" --out "$dir/torch"
echo "done: data $dir/data, run $dir/run, samples $dir/samples, PyTorch checkpoint $dir/torch"
