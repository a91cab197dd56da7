"""The train loop, top to bottom (`python -m oneflow_jax.train` runs it):

  config (resolved and validated before anything compiles) -> mesh -> tokenizer + codec -> the method's model ->
  sharded train state (jit with out_shardings from eval_shape) -> Grain iterator -> restore the latest good
  checkpoint (state and iterator) -> for each step: global batch -> jitted step (donated state) -> metrics /
  samples / checkpoints.
SIGTERM saves the current step and returns; rerunning the same command resumes exactly where it stopped.
"""
from __future__ import annotations

import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from oneflow_jax import cli, config_lib
from oneflow_jax.cli import UserError
from oneflow_jax.data import input_pipeline, records
from oneflow_jax.data import tokenizer as tokenizer_lib
from oneflow_jax.training import checkpointing, flops, sharding
from oneflow_jax.training.metrics_logging import MetricLogger
from oneflow_jax.training.train_state import (abstract_train_state, build_model, create_sharded_state, jit_train_step,
                                              make_optimizer, sampling_weights)


# ------------------------------------------------------------------------------------------------ setup

def load_run_tokenizer(config, workdir: str):
    """The run's tokenizer: the copy in the workdir if resuming, else config.data.tokenizer_path (SentencePiece or a
    Hugging Face tokenizer.json, `<image>` as data.image_token) or the dataset's."""
    saved_path = tokenizer_lib.find_in_dir(workdir)
    data = config_lib.resolve(config).data
    if not data.tokenizer_path and saved_path:
        return tokenizer_lib.load(saved_path)
    if data.tokenizer_path:
        try:
            tok = tokenizer_lib.load(data.tokenizer_path, data.image_token)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"config.data.tokenizer_path: {e}") from None
    else:
        tok = input_pipeline.get_tokenizer(data)
    if saved_path and tokenizer_lib.load(saved_path).model_proto != tok.model_proto:
        raise UserError(f"tokenizer mismatch: {saved_path} (used by this run's checkpoints) differs from "
                        f"{data.tokenizer_path or 'the dataset tokenizer'}; use a new --workdir")
    if jax.process_index() == 0:
        tokenizer_lib.save_to_dir(tok, workdir)
    return tok


def global_data_counts(data_iter) -> dict[str, int]:
    """Records skipped so far by every process (each iterator counts only its own streams), in all and unreadable,
    and the documents read. A collective."""
    c = data_iter.counters
    local = np.asarray([data_iter.skipped_records, c["skipped_unreadable"], c["documents"]], np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        local = np.sum(multihost_utils.process_allgather(local), axis=0)
    return dict(skipped_records=int(local[0]), unreadable_records=int(local[1]), documents=int(local[2]))


# ------------------------------------------------------------------------------------------------ the loop

def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains until config.total_steps (or a stop signal). Returns the last logged scalars."""
    cfg = config_lib.validate(config, jax.device_count())
    try:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --workdir {workdir}: {e}") from None
    mesh = sharding.make_mesh(cfg.mesh)
    tokenizer = load_run_tokenizer(cfg, workdir)
    model, codec = build_model(cfg, tokenizer.vocab_size)
    checkpointing.save_config(workdir, config)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.total_steps)
    ema_decay = cfg.optimizer.ema_decay
    state, state_shardings = create_sharded_state(model, tx, mesh, cfg.seed, ema_decay)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state["params"]))
    cli.say(f"model: {n_params / 1e6:.2f}M parameters ({cfg.model_type}); mesh {dict(mesh.shape)}; "
            f"{jax.process_count()} process(es), {jax.device_count()} device(s)")

    try:
        data_iter = input_pipeline.create_train_iterator(
            cfg, process_index=jax.process_index(), process_count=jax.process_count(), codec=codec,
            tokenizer=tokenizer, seed=cfg.seed)
    except ValueError as e:           # the data cannot be read as configured (too many unreadable shards, ...)
        raise UserError(str(e)) from None
    lost_shards = {"unreadable_shards": len(data_iter.unreadable_shards),
                   "unreadable_shard_records": sum(u["records_lost_estimate"] for u in data_iter.unreadable_shards)}
    for u in data_iter.unreadable_shards:
        cli.say(f"skipping unreadable shard {u['path']} (~{u['records_lost_estimate']} records): {u['error']}")
    ckpt = checkpointing.Checkpointer(workdir, keep=cfg.keep_checkpoints, save_every=cfg.ckpt_every)
    nonfinite = NonfiniteSteps(cfg.optimizer.max_consecutive_nonfinite)
    if ckpt.latest_step() is not None:
        try:
            state, meta, _ = ckpt.restore(abstract_train_state(model, tx, mesh, ema_decay)[0], data_iter)
        except RuntimeError as e:
            if "ema_params" not in str(e):
                raise
            raise UserError(f"the checkpoints in {workdir} {'lack' if ema_decay > 0 else 'hold'} an EMA of the params "
                            f"but config.optimizer.ema_decay={ema_decay}: resume with the run's ema_decay") from None
        nonfinite.total = int(meta.get("user", {}).get("nonfinite_steps", 0))
        cli.say(f"resumed from checkpoint step {int(state['step'])} in {workdir}")
    start = int(state["step"])
    flops_per_step = flops.train_flops_per_step(model.cfg, cfg.data, cfg.model_type)
    peak, peak_source = flops.resolve_peak_flops(cfg.peak_flops)
    cli.say(f"{flops_per_step / 1e12:.3f} TFLOP per step (analytic, device-computed); peak "
            f"{peak / 1e12:.3f} TFLOP/s per device ({peak_source})")

    train_step = jit_train_step(model, tx, schedule, cfg, state_shardings, codec)
    logger = MetricLogger(workdir, cfg.total_steps, resume_step=start)
    sampler_hook = None
    if cfg.sample_every:
        from oneflow_jax.sampling import generate
        sampler_hook = generate.TrainSampler(cfg, model, codec, tokenizer, workdir)
    validation = None
    if cfg.eval_every:
        from oneflow_jax.training.validation import ValidationLoss
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            validation = ValidationLoss(cfg, model, mesh, codec, tokenizer)
        cli.say(f"validation loss every {cfg.eval_every} steps on {len(validation.batches)} batches of "
                f"'{cfg.eval.split}'")
    cli.say(f"training from step {start} to {cfg.total_steps} in {workdir}")
    last, window = {}, _Window()
    config_hash = checkpointing.config_hash(config)
    with checkpointing.PreemptionGuard() as guard, jax.set_mesh(mesh), \
            nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        step = start
        while step < cfg.total_steps:
            try:
                local = next(data_iter)
            except input_pipeline.DataStarvedError as e:
                ckpt.close()
                raise UserError(str(e)) from None
            batch = input_pipeline.make_global_batch(local, mesh, sharding.BATCH_AXES)
            state, metrics = train_step(state, batch)
            step += 1
            window.add(metrics)
            nonfinite.push(step, metrics["finite"])     # reads the previous step's flag: this one stays queued
            stop = guard.should_stop(step)
            log_now = step % cfg.log_every == 0 or step == cfg.total_steps
            save_now = step % cfg.ckpt_every == 0 or step == cfg.total_steps or stop
            if log_now or save_now:
                nonfinite.flush()                       # logged and saved counts are exact
            if log_now:
                counts = global_data_counts(data_iter)
                last = window.flush(skipped_records=counts["skipped_records"],
                                    unreadable_records=counts["unreadable_records"], nonfinite_steps=nonfinite.total,
                                    **(lost_shards if lost_shards["unreadable_shards"] else {}))
                last.update(flops.throughput_metrics(flops_per_step, last["steps_per_sec"], jax.device_count(), peak))
                if validation and (step % cfg.eval_every == 0 or step == cfg.total_steps):
                    t_val = time.time()
                    last.update(validation(state["params"]))
                    window.t0 += time.time() - t_val            # the next window's steps/s leaves it out
                logger.write_scalars(step, last)
                logger.progress(step, last)
                seen = counts["documents"] + counts["skipped_records"]
                if seen >= records.MIN_RECORDS_TO_JUDGE:
                    try:
                        records.check_loss(counts["unreadable_records"], seen, cfg.data.max_unreadable_fraction,
                                           "of the records read so far")
                    except ValueError as e:
                        ckpt.close()
                        raise UserError(f"stopping at step {step}: {e}") from None
            if sampler_hook and step % cfg.sample_every == 0:
                sampler_hook(step, state[sampling_weights(cfg)], logger)
            meta = dict(nonfinite_steps=nonfinite.total, skipped_records=data_iter.skipped_records,
                        config_hash=config_hash)
            ckpt.save(step, state, data_iter, meta, force=step == cfg.total_steps or stop)
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
