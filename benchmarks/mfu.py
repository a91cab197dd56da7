"""MFU of the real train step: analytic FLOPs (oneflow_jax.training.flops, reference §8) / step time / per-device peak.

    python benchmarks/mfu.py --config configs/shapes_tiny.py [--config.key=value ...] [--steps 10] [--warmup 2]
    python benchmarks/mfu.py --config configs/oneflow_1b.py --synthetic --config.data.global_batch_size=32

Builds the model, sharded state and jitted step exactly as train.py does, pulls `steps` real batches from the Grain
pipeline *before* timing (input time is not measured), runs `warmup` untimed steps, then times `steps` steps each
ended by block_until_ready. `--synthetic` packs the batches from random documents instead (the real noising and
packing, `--synthetic_text_tokens` random token ids and one random-latent image each): no dataset, tokenizer, VAE,
Grain or tfds is needed, so a paper-size config runs anywhere; the step's cost does not depend on the values. The
peak is config.peak_flops if set, else the device's spec sheet, else (CPU) the best of `--peak_repeats` jitted f32
matmuls of `--peak_n`^3. Prints one JSON object.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from oneflow_jax import cli, config_lib, methods  # noqa: E402
from oneflow_jax.data import packing  # noqa: E402
from oneflow_jax.training import flops, sharding  # noqa: E402
from oneflow_jax.training.train_state import (build_model, create_sharded_state, jit_train_step,  # noqa: E402
                                              make_optimizer)

config_flags.DEFINE_config_file("config", None, "configs/*.py[:variant]", lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_bool("synthetic", False, "Batches packed from random documents (no dataset or tokenizer).")
flags.DEFINE_integer("synthetic_text_tokens", 48, "Mean text length of a synthetic document (uniform +-50%).")
flags.DEFINE_integer("peak_n", 2048, "Matmul size of the CPU peak measurement.")
flags.DEFINE_integer("peak_repeats", 10, "Best of this many peak matmuls.")
FLAGS = flags.FLAGS


def real_batches(config, tokenizer, codec, n: int) -> list[dict[str, np.ndarray]]:
    from oneflow_jax.data import input_pipeline
    it = input_pipeline.create_train_iterator(config, process_index=0, process_count=1, codec=codec,
                                              tokenizer=tokenizer, seed=config.seed)
    return [next(it) for _ in range(n)]


def synthetic_batches(config, codec, n: int, text_tokens: int) -> list[dict[str, np.ndarray]]:
    """`n` batches greedily packed (as the pipeline's packer) from random documents: ~`text_tokens` random ids
    around one image of N(0, 1) latents, noised by the config's own transform."""
    config = config_lib.resolve(config)
    tokenizer = types.SimpleNamespace(bos_id=1, eos_id=2, pad_id=0, image_id=4,
                                      vocab_size=config_lib.vocab_size(config))
    transform, packer = methods.for_config(config).pipeline_pieces(config, tokenizer, codec)
    rng = np.random.default_rng(config.seed)
    budget = packer.limits[0] - 2 - codec.num_patches       # text that still fits a row next to its image
    batches, pending = [], None
    for _ in range(n):
        rows = []
        while len(rows) < config.data.global_batch_size:
            docs, used = [], [0] * len(packer.limits)
            while True:
                if pending is None:
                    length = int(np.clip(rng.integers(text_tokens // 2, text_tokens * 3 // 2 + 1), 1, budget))
                    text = rng.integers(5, tokenizer.vocab_size, length).astype(np.int32)
                    text[rng.integers(length)] = tokenizer.image_id      # the image's <image> marker
                    latents = rng.standard_normal((1, codec.num_patches, codec.patch_dim)).astype(np.float32)
                    pending = transform(text, latents, rng)
                need = packer.usage(pending)
                if docs and not packing.fits(used, need, packer.limits):
                    break
                docs.append(pending)
                used = [u + k for u, k in zip(used, need)]
                pending = None
            rows.append(packer.pack(docs))
        batches.append({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    return batches


def run(config, steps: int, warmup: int, peak: float, peak_source: str, synthetic_text_tokens: int = 0) -> dict:
    """`synthetic_text_tokens` > 0: synthetic batches of that mean text length; 0: the config's dataset."""
    config = config_lib.validate(config, jax.device_count())
    mesh = sharding.make_mesh(config.mesh)
    if synthetic_text_tokens:
        model, codec = build_model(config, config_lib.vocab_size(config))
        host_batches = synthetic_batches(config, codec, 1 + warmup + steps, synthetic_text_tokens)
    else:
        from oneflow_jax.data import input_pipeline
        tokenizer = input_pipeline.get_tokenizer(config)
        model, codec = build_model(config, tokenizer.vocab_size)
        host_batches = real_batches(config, tokenizer, codec, 1 + warmup + steps)
    tx, schedule = make_optimizer(config.optimizer, config.total_steps)
    state, shardings = create_sharded_state(model, tx, mesh, config.seed, config.optimizer.ema_decay)
    batches = [{k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
                for k, v in b.items()} for b in host_batches]
    step = jit_train_step(model, tx, schedule, config, shardings)
    import flax.linen as nn
    times = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        t0 = time.perf_counter()
        state, _ = step(state, batches[0])
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - t0
        for i, batch in enumerate(batches[1:]):
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    model_type = config.model_type
    flops_step = flops.train_flops_per_step(model.cfg, config.data, model_type)
    positions = config.data.global_batch_size * config.data.seq_len
    filled = float(np.mean([np.sum(np.asarray(b["segment_ids"]) > 0) for b in batches])) / positions
    out = dict(config_model=dict(d_model=model.cfg.d_model, n_layers=model.cfg.n_layers, vocab=model.cfg.vocab_size),
               devices=jax.device_count(), device_kind=jax.devices()[0].device_kind, timed_steps=len(times),
               compile_and_first_step_s=compile_s, step_time_s=step_s, step_time_min_s=min(times),
               steps_per_sec=1.0 / step_s, tokens_per_sec=positions / step_s,
               useful_tokens_per_sec=filled * positions / step_s, packing_fill=filled,
               params=flops.params(model.cfg, model_type), train_flops_per_step=flops_step,
               peak_flops_per_device=peak, peak_source=peak_source,
               data="synthetic" if synthetic_text_tokens else config.data.name)
    out.update(flops.throughput_metrics(flops_step, 1.0 / step_s, jax.device_count(), peak))
    return out


def main(argv):
    del argv
    if FLAGS.config is None:
        raise cli.UserError("--config is required")
    peak, source = flops.resolve_peak_flops(config_lib.resolve(FLAGS.config).peak_flops, FLAGS.peak_n, FLAGS.peak_repeats)
    text_tokens = FLAGS.synthetic_text_tokens if FLAGS.synthetic else 0
    print(json.dumps(run(FLAGS.config, FLAGS.steps, FLAGS.warmup, peak, source, text_tokens), sort_keys=True))


if __name__ == "__main__":
    app.run(cli.run_cli(main))
