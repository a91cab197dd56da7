"""Input pipeline throughput: documents (examples)/s and packed rows/s on this machine, one JSON line per setting.

python benchmarks/input_pipeline.py [--num_workers 0,2] [--seq_len 256] [--batch 32] [--batches 50]

The dataset (shapes-world by default) is prepared in $TFDS_DATA_DIR on first use; that time is not counted. The
first `--warmup` batches (worker start-up, caches) are timed separately as `startup_s`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import ml_collections
import numpy as np

from oneflow_jax.models import codec as codec_lib
from oneflow_jax import config_lib
from oneflow_jax.data import input_pipeline


def run(args, num_workers: int) -> dict:
    cfg = ml_collections.ConfigDict({"data": config_lib.as_dict(config_lib.DataConfig()), "objective": {}})
    cfg.data.update(dict(name=args.dataset, data_dir=args.data_dir, seq_len=args.seq_len,
                         max_deletions=args.max_deletions, global_batch_size=args.batch, num_workers=num_workers,
                         prefetch=args.prefetch, read_threads=args.read_threads, overlong=args.overlong,
                         cache_decoded=args.cache_decoded))
    if args.num_train:
        cfg.data.builder_config = dict(num_train=args.num_train, num_eval=100)
    tokenizer = input_pipeline.get_tokenizer(cfg)
    codec = codec_lib.PixelPatchCodec(image_size=32, patch_size=args.patch_size)
    t0 = time.perf_counter()
    it = input_pipeline.create_train_iterator(cfg, process_index=0, process_count=1, codec=codec,
                                              tokenizer=tokenizer, seed=0)
    for _ in range(args.warmup):
        next(it)
    startup = time.perf_counter() - t0
    before = it.counters
    used = total = 0
    t1 = time.perf_counter()
    for _ in range(args.batches):
        batch = next(it)
        used += int((batch["segment_ids"] > 0).sum())
        total += batch["segment_ids"].size
    elapsed = time.perf_counter() - t1
    after = it.counters
    it.close()
    docs = after["documents"] - before["documents"]
    rows = after["rows"] - before["rows"]
    return {
        "benchmark": "input_pipeline", "dataset": args.dataset, "num_workers": num_workers,
        "seq_len": args.seq_len, "rows_per_batch": args.batch, "batches": args.batches,
        "examples_per_s": round(docs / elapsed, 1), "rows_per_s": round(rows / elapsed, 1),
        "tokens_per_s": round(total / elapsed, 1), "fill": round(used / max(total, 1), 3),
        "docs_per_row": round(docs / max(rows, 1), 2), "skipped_records": it.skipped_records,
        "cache_decoded": args.cache_decoded, "startup_s": round(startup, 2), "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="shapes_world")
    p.add_argument("--data_dir", default=None, help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets")
    p.add_argument("--num_train", type=int, default=0, help="shapes-world size (0: the default 20k dataset)")
    p.add_argument("--num_workers", default="0,2", help="comma-separated settings to measure")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--max_deletions", type=int, default=256)
    p.add_argument("--batch", type=int, default=32, help="rows per batch")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--read_threads", type=int, default=1)
    p.add_argument("--patch_size", type=int, default=4)
    p.add_argument("--overlong", default="truncate")
    p.add_argument("--cache_decoded", action="store_true", help="data.cache_decoded (warm the cache with --warmup)")
    args = p.parse_args()
    for n in (int(x) for x in args.num_workers.split(",")):
        print(json.dumps(run(args, n)), flush=True)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
