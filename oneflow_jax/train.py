"""Training: `python -m oneflow_jax.train --config configs/shapes_tiny.py --workdir W [--config.key=value ...]`.

The loop, top to bottom:
  config (validated before anything compiles) -> mesh -> tokenizer + codec -> model -> sharded train state
  (jit with out_shardings from eval_shape) -> Grain iterator -> restore the latest good checkpoint (state and
  iterator) -> for each step: global batch -> jitted step (donated state) -> metrics / samples / checkpoints.
SIGTERM saves the current step and exits 0; rerunning the same command resumes exactly where it stopped.
"""
from __future__ import annotations

import os
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from oneflow_jax import checkpointing, config_lib, flops, input_pipeline, sharding
from oneflow_jax import tokenizer as tokenizer_lib
from oneflow_jax.config_lib import UserError
from oneflow_jax.metrics_logging import MetricLogger
from oneflow_jax.train_state import (abstract_train_state, build_model, create_sharded_state, loss_function,
                                     make_optimizer, make_train_step, pipeline_pieces, sampling_weights)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tb/, samples/.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs (jax.distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM).")


# ------------------------------------------------------------------------------------------------ setup

def init_distributed() -> None:
    """jax.distributed for multi-process runs; CPU processes talk over gloo."""
    if FLAGS.coordinator_address or FLAGS.num_processes:
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()


def load_run_tokenizer(config, workdir: str) -> tokenizer_lib.Tokenizer:
    """The run's tokenizer: the copy in the workdir if resuming, else config.data.tokenizer_path or the dataset's."""
    saved = epath.Path(workdir) / tokenizer_lib.MODEL_FILENAME
    if not config.data.tokenizer_path and saved.exists():
        return tokenizer_lib.load(saved)
    if config.data.tokenizer_path:
        tok = tokenizer_lib.load(config.data.tokenizer_path)
    else:
        tok = input_pipeline.get_tokenizer(config)
    if saved.exists() and tokenizer_lib.load(saved).model_proto != tok.model_proto:
        raise UserError(f"tokenizer mismatch: {saved} (used by this run's checkpoints) differs from "
                        f"{config.data.tokenizer_path or 'the dataset tokenizer'}; use a new --workdir")
    if jax.process_index() == 0:
        tokenizer_lib.save_to_dir(tok, workdir)
    return tok


def global_skipped_records(data_iter) -> int:
    """Records skipped so far by every process (each iterator counts only its own streams). A collective."""
    if jax.process_count() == 1:
        return data_iter.skipped_records
    from jax.experimental import multihost_utils
    return int(np.sum(multihost_utils.process_allgather(np.asarray(data_iter.skipped_records, np.int64))))


# ------------------------------------------------------------------------------------------------ the loop

def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains until config.total_steps (or a stop signal). Returns the last logged scalars."""
    if config.compile_only:
        return compile_only(config)
    config_lib.validate(config, jax.device_count())
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh)
    tokenizer = load_run_tokenizer(config, workdir)
    model, codec = build_model(config, tokenizer.vocab_size)
    checkpointing.save_config(workdir, config)
    tx, schedule = make_optimizer(config.optimizer, config.total_steps)
    ema_decay = config.optimizer.get("ema_decay", 0.0)
    state, state_shardings = create_sharded_state(model, tx, mesh, config.seed, ema_decay)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state["params"]))
    config_lib.say(f"model: {n_params / 1e6:.2f}M parameters; mesh {dict(mesh.shape)}; {jax.process_count()} "
                   f"process(es), {jax.device_count()} device(s)")

    transform, packer = pipeline_pieces(config, tokenizer, codec)
    data_iter = input_pipeline.create_train_iterator(
        config, process_index=jax.process_index(), process_count=jax.process_count(), codec=codec,
        tokenizer=tokenizer, seed=config.seed, transform=transform, packer=packer)
    ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints, save_every=config.ckpt_every)
    nonfinite = NonfiniteSteps(config.optimizer.max_consecutive_nonfinite)
    if ckpt.latest_step() is not None:
        try:
            state, meta, _ = ckpt.restore(abstract_train_state(model, tx, mesh, ema_decay)[0], data_iter)
        except RuntimeError as e:
            if "ema_params" not in str(e):
                raise
            raise UserError(f"the checkpoints in {workdir} {'lack' if ema_decay > 0 else 'hold'} an EMA of the params "
                            f"but config.optimizer.ema_decay={ema_decay}: resume with the run's ema_decay") from None
        nonfinite.total = int(meta.get("user", {}).get("nonfinite_steps", 0))
        config_lib.say(f"resumed from checkpoint step {int(state['step'])} in {workdir}")
    start = int(state["step"])
    flops_per_step = flops.train_flops_per_step(model.cfg, config.data,
                                                config.get("model_type", "oneflow"))
    peak, peak_source = flops.resolve_peak_flops(config.get("peak_flops", 0.0))
    config_lib.say(f"{flops_per_step / 1e12:.3f} TFLOP per step (analytic, device-computed); peak "
                   f"{peak / 1e12:.3f} TFLOP/s per device ({peak_source})")

    train_step = jax.jit(make_train_step(model, tx, schedule, config.objective.image_loss_weight,
                                         loss_function(config), ema_decay),
                         in_shardings=(state_shardings, None), out_shardings=(state_shardings, None),
                         donate_argnums=(0,))
    logger = MetricLogger(workdir, config.total_steps, resume_step=start)
    sampler_hook = None
    if config.get("sample_every", 0):
        from oneflow_jax import generate
        sampler_hook = generate.TrainSampler(config, model, codec, tokenizer, workdir)
    config_lib.say(f"training from step {start} to {config.total_steps} in {workdir}")
    last, window = {}, _Window()
    config_hash = checkpointing.config_hash(config)
    with checkpointing.PreemptionGuard() as guard, jax.set_mesh(mesh), \
            nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        step = start
        while step < config.total_steps:
            local = next(data_iter)
            batch = input_pipeline.make_global_batch(local, mesh, sharding.BATCH_AXES)
            state, metrics = train_step(state, batch)
            step += 1
            window.add(metrics)
            nonfinite.push(step, metrics["finite"])     # reads the previous step's flag: this one stays queued
            stop = guard.should_stop(step)
            log_now = step % config.log_every == 0 or step == config.total_steps
            save_now = step % config.ckpt_every == 0 or step == config.total_steps or stop
            if log_now or save_now:
                nonfinite.flush()                       # logged and saved counts are exact
            if log_now:
                last = window.flush(skipped_records=global_skipped_records(data_iter),
                                    nonfinite_steps=nonfinite.total)
                last.update(flops.throughput_metrics(flops_per_step, last["steps_per_sec"], jax.device_count(), peak))
                logger.write_scalars(step, last)
                logger.progress(step, last)
            if sampler_hook and step % config.sample_every == 0:
                sampler_hook(step, state[sampling_weights(config)], logger)
            meta = dict(nonfinite_steps=nonfinite.total, skipped_records=data_iter.skipped_records,
                        config_hash=config_hash)
            ckpt.save(step, state, data_iter, meta, force=step == config.total_steps or stop)
            if nonfinite.too_many:
                ckpt.close()
                raise UserError(f"stopping: {nonfinite.in_a_row} non-finite losses in a row at step "
                                f"{nonfinite.last_step} (lower optimizer.lr or check the data); the last good "
                                f"checkpoint is kept")
            if stop:
                logging.warning("stopped by signal at step %d; checkpoint saved, rerun the command to resume", step)
                break
    ckpt.close()
    logger.close()
    return last


class NonfiniteSteps:
    """Counts the steps whose update was skipped (non-finite loss or gradient, see make_train_step) without a host
    sync per step: a step's flag is read once the next step is queued (`push`), or at once by `flush`."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row, self.total, self.in_a_row, self.last_step = max_in_a_row, 0, 0, 0
        self._pending = []

    @property
    def too_many(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    def push(self, step: int, finite) -> None:
        self._pending.append((step, finite))
        while len(self._pending) > 1:
            self._read(*self._pending.pop(0))

    def flush(self) -> None:
        while self._pending:
            self._read(*self._pending.pop(0))

    def _read(self, step: int, finite) -> None:
        self.last_step = step
        if bool(finite):
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        logging.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, self.in_a_row)


class _Window:
    """Accumulates device metrics between log steps; averages and throughput on flush."""

    def __init__(self):
        self.t0, self.metrics = time.time(), []

    def add(self, metrics):
        self.metrics.append(metrics)

    def flush(self, **extra) -> dict:
        ms = jax.device_get(self.metrics)
        dt = max(time.time() - self.t0, 1e-9)
        out = {k: float(np.mean([m[k] for m in ms])) for k in ms[0] if k not in ("num_tokens", "num_docs", "finite")}
        tokens = float(np.sum([m["num_tokens"] for m in ms]))
        out.update(steps_per_sec=len(ms) / dt, tokens_per_sec=tokens / dt, **{k: float(v) for k, v in extra.items()})
        self.t0, self.metrics = time.time(), []
        return out


def compile_only(config) -> dict:
    """Lower + compile the train step for the configured mesh (or `mesh.compile_topology`) and print per-device
    memory from the compiled executable; nothing runs and no data, tokenizer or VAE weights are read (aot.py)."""
    from oneflow_jax import aot
    result = aot.compile_train_step(config)
    for line in aot.memory_lines(result):
        config_lib.say(line)
    return aot.memory_stats(result.compiled)


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is None or FLAGS.workdir is None:
        raise UserError("--config and --workdir are required")
    init_distributed()
    train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(config_lib.run_cli(main), flags_parser=config_lib.parse_flags)
