"""MFU of the real train step: analytic FLOPs (oneflow_jax.flops, reference §8) / step time / per-device peak.

    python benchmarks/mfu.py --config configs/shapes_tiny.py [--config.key=value ...] [--steps 10] [--warmup 2]

Builds the model, sharded state and jitted step exactly as train.py does, pulls `steps` real batches from the Grain
pipeline *before* timing (input time is not measured), runs `warmup` untimed steps, then times `steps` steps each
ended by block_until_ready. The peak is config.peak_flops if set, else the device's spec sheet, else (CPU) the best
of `--peak_repeats` jitted f32 matmuls of `--peak_n`^3. Prints one JSON object.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from oneflow_jax import config_lib, flops, input_pipeline, sharding  # noqa: E402
from oneflow_jax.train_state import (build_model, create_sharded_state, loss_function, make_optimizer,  # noqa: E402
                                     make_train_step)

config_flags.DEFINE_config_file("config", None, "configs/*.py[:variant]", lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_integer("peak_n", 2048, "Matmul size of the CPU peak measurement.")
flags.DEFINE_integer("peak_repeats", 10, "Best of this many peak matmuls.")
FLAGS = flags.FLAGS


def run(config, steps: int, warmup: int, peak: float, peak_source: str) -> dict:
    config_lib.validate(config, jax.device_count())
    mesh = sharding.make_mesh(config.mesh)
    tokenizer = input_pipeline.get_tokenizer(config)
    model, codec = build_model(config, tokenizer.vocab_size)
    tx, schedule = make_optimizer(config.optimizer, config.total_steps)
    state, shardings = create_sharded_state(model, tx, mesh, config.seed)
    transform = packer = None
    if config.get("model_type", "oneflow") == "ar":
        from oneflow_jax import ar_objective
        transform, packer = ar_objective.pipeline_pieces(config, tokenizer, codec)
    it = input_pipeline.create_train_iterator(config, process_index=0, process_count=1, codec=codec,
                                              tokenizer=tokenizer, seed=config.seed, transform=transform, packer=packer)
    batches = [input_pipeline.make_global_batch(next(it), mesh, sharding.BATCH_AXES) for _ in range(1 + warmup + steps)]
    step = jax.jit(make_train_step(model, tx, schedule, config.objective.image_loss_weight, loss_function(config)),
                   in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=(0,))
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
    model_type = config.get("model_type", "oneflow")
    flops_step = flops.train_flops_per_step(model.cfg, config.data, model_type)
    positions = config.data.global_batch_size * config.data.seq_len
    filled = float(np.mean([np.sum(np.asarray(b["segment_ids"]) > 0) for b in batches])) / positions
    out = dict(config_model=dict(d_model=model.cfg.d_model, n_layers=model.cfg.n_layers, vocab=model.cfg.vocab_size),
               devices=jax.device_count(), device_kind=jax.devices()[0].device_kind, timed_steps=len(times),
               compile_and_first_step_s=compile_s, step_time_s=step_s, step_time_min_s=min(times),
               steps_per_sec=1.0 / step_s, tokens_per_sec=positions / step_s,
               useful_tokens_per_sec=filled * positions / step_s, packing_fill=filled,
               params=flops.params(model.cfg, model_type), train_flops_per_step=flops_step,
               peak_flops_per_device=peak, peak_source=peak_source)
    out.update(flops.throughput_metrics(flops_step, 1.0 / step_s, jax.device_count(), peak))
    return out


def main(argv):
    del argv
    if FLAGS.config is None:
        raise config_lib.UserError("--config is required")
    peak, source = flops.resolve_peak_flops(FLAGS.config.get("peak_flops", 0.0), FLAGS.peak_n, FLAGS.peak_repeats)
    print(json.dumps(run(FLAGS.config, FLAGS.steps, FLAGS.warmup, peak, source), sort_keys=True))


if __name__ == "__main__":
    app.run(config_lib.run_cli(main))
