"""Milliseconds per network evaluation of OneFlow's sampler and of AR+FM's, by batch size and length.

python benchmarks/evaluation_cost.py [--config configs/shapes_tiny.py] [--ar_config configs/ar_shapes_tiny.py]
    [--batches 1,50] [--repeats 10] [--inner 20] [--lengths 24,40] [--out F.jsonl]

What a sampler's latency and throughput are made of (docs/results.md, "Why the cost targets cannot be met on this
CPU"): OneFlow's sampler runs the whole live sequence through the network at every evaluation, on the smallest of its
length buckets (sampling.common.bucket_lengths of sampler.max_len) that holds it; AR+FM's prefills the prompt once
and then runs one position per step against its KV cache. Random weights, as the cost does not depend on them; the
vocabulary is the dataset tokenizer's. Each call runs `--inner` times inside one jitted loop, as in a sampler (no
Python dispatch between calls); a row is the median over `--repeats` such loops after a compiling one, divided by
`--inner`. One JSON line per (model, call, batch, length).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from oneflow_jax import config_lib  # noqa: E402
from oneflow_jax.models import ar_transformer  # noqa: E402
from oneflow_jax.models.transformer import dummy_batch  # noqa: E402
from oneflow_jax.sampling.common import bucket_lengths  # noqa: E402
from oneflow_jax.training.train_state import build_model  # noqa: E402


def chunk(batch: int, length: int, patch_dim: int, start: int = 0) -> dict:
    """Model inputs of `length` text positions from `start` (the cost of a position does not depend on its kind)."""
    shape = (batch, length)
    return dict(tokens=jnp.full(shape, 3, jnp.int32), is_patch=jnp.zeros(shape, bool),
                patch_index=jnp.zeros(shape, jnp.int32), patches=jnp.zeros(shape + (patch_dim,), jnp.float32),
                patch_t=jnp.ones(shape, jnp.float32),
                positions=jnp.broadcast_to(jnp.arange(start, start + length, dtype=jnp.int32), shape))


def ms_per_call(fn, args, repeats: int, inner: int) -> float:
    """Median milliseconds of one fn(*args) inside a jitted loop of `inner` calls, as a sampler's while_loop runs
    them (no Python dispatch per call); each call reads the previous one's output, so none is hoisted."""
    def loop(*a):
        def body(_, c):
            out = fn(*a, c)
            return c + 1e-30 * jnp.sum(out["q_logits"][:, -1, :1])
        return jax.lax.fori_loop(0, inner, body, jnp.float32(0))
    loop = jax.jit(loop)
    jax.block_until_ready(loop(*args))                       # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) / inner


def init(config_path: str):
    """(sampler config, model, codec, random params) of a config file."""
    config = config_lib.load_config_file(config_path)
    model, codec = build_model(config, config_lib.vocab_size(config))
    params = model.init(jax.random.PRNGKey(0), dummy_batch(model.cfg))["params"]
    return config_lib.sampler_config(config), model, codec, params


def oneflow_rows(config_path: str, batches, repeats: int, inner: int, lengths=None):
    cfg, model, codec, params = init(config_path)
    forward = lambda p, inp, c: model.apply({"params": p}, dict(inp, patch_t=inp["patch_t"] + c))
    for b in batches:
        for n in lengths or bucket_lengths(cfg.max_len, cfg.length_buckets):
            inp = dict(chunk(b, n, codec.patch_dim), segment_ids=jnp.ones((b, n), jnp.int32))
            yield dict(model="oneflow", call="evaluation", batch=b, positions=n,
                       ms=ms_per_call(forward, (params, inp), repeats, inner))


def ar_rows(config_path: str, batches, repeats: int, inner: int, prompt_len: int):
    cfg, model, codec, params = init(config_path)
    length = cfg.max_len
    decode = lambda p, inp, cache, write, mask, c: model.apply(
        {"params": p}, dict(inp, patch_t=inp["patch_t"] + c), cache, write, mask,
        method=ar_transformer.ARModel.decode)[0]                # the heads; the new cache is not needed
    for b in batches:
        cache = ar_transformer.empty_cache(model.cfg, b, length)
        for name, start, n in (("prefill", 0, prompt_len), ("decode step", prompt_len, 1)):
            inp = chunk(b, n, codec.patch_dim, start)
            write = inp["positions"]
            mask = jnp.broadcast_to(jnp.arange(length)[None, None, None, :] <= (start + n - 1), (b, 1, n, length))
            yield dict(model="ar_fm", call=name, batch=b, positions=n,
                       ms=ms_per_call(decode, (params, inp, cache, write, mask), repeats, inner))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/shapes_tiny.py")
    p.add_argument("--ar_config", default="configs/ar_shapes_tiny.py")
    p.add_argument("--batches", default="1,50")
    p.add_argument("--repeats", type=int, default=10, help="timed loops; the median is kept")
    p.add_argument("--inner", type=int, default=20, help="calls per jitted loop")
    p.add_argument("--lengths", default="", help="OneFlow lengths to time, e.g. 24,40 (default: the sampler's buckets)")
    p.add_argument("--prompt_len", type=int, default=6, help="AR prefill: BOS, <image> and a 32x32 image's 4 patches")
    p.add_argument("--out", default=None, help="append the rows to this JSONL file")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lengths = [int(n) for n in args.lengths.split(",") if n]
    rows = [*oneflow_rows(args.config, batches, args.repeats, args.inner, lengths),
            *ar_rows(args.ar_config, batches, args.repeats, args.inner, args.prompt_len)]
    for row in rows:
        row.update(ms_per_row=row["ms"] / row["batch"], date=datetime.date.today().isoformat(), commit=commit,
                   device=jax.devices()[0].device_kind, cpus=os.cpu_count())
        print(json.dumps(row), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
