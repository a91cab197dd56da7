"""The validation loss: the run's own objective on a fixed held-out set, every `eval_every` steps, for both methods.

The first `eval.val_batches` batches of the `eval.split` split are built once, through the run's own pipeline (same
tokenizer, codec, document transform and packing), with the transform's noise drawn from a fixed seed, and kept in
host memory. Every evaluation then scores the same noised documents with the current params, so the curve is
comparable across steps, and across runs with the same data, config and seed. The values are logged next to the
training loss as `val_loss`, `val_text_loss`, `val_image_loss` (and the method's other loss terms).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from oneflow_jax import config_lib, methods
from oneflow_jax.cli import UserError
from oneflow_jax.data import input_pipeline
from oneflow_jax.training import sharding, train_state

NOISE_SEED = 1234567        # the transform's seed for the held-out documents (any fixed value)
NOT_AVERAGED = ("num_tokens", "num_docs", "finite")


class ValidationLoss:
    """`ValidationLoss(config, model, mesh, codec, tokenizer)(params) -> {"val_loss": ..., ...}`."""

    def __init__(self, config, model, mesh, codec, tokenizer):
        cfg = config_lib.resolve(config)
        held_out = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, split=cfg.eval.split, num_epochs=1, shuffle_seed=0, num_workers=0, cache_decoded=False))
        try:
            iterator = input_pipeline.create_train_iterator(
                held_out, process_index=jax.process_index(), process_count=jax.process_count(), codec=codec,
                tokenizer=tokenizer, seed=NOISE_SEED)
        except ValueError as e:
            raise UserError(f"config.eval_every needs a held-out split (config.eval.split={cfg.eval.split!r}): "
                            f"{e}") from None
        self.batches = []
        for _ in range(cfg.eval.val_batches):
            try:
                self.batches.append(next(iterator))
            except StopIteration:
                break
        iterator.close()
        count = len(self.batches)
        if jax.process_count() > 1:            # every process must evaluate the same number of global batches
            from jax.experimental import multihost_utils
            count = int(np.min(multihost_utils.process_allgather(np.int32(count))))
        self.batches = self.batches[:count]
        if not self.batches:
            raise UserError(f"config.eval_every: the {cfg.eval.split!r} split gives no batch to validate on")
        self.mesh = mesh
        loss_fn = methods.for_config(cfg).loss_function(cfg.objective.image_loss_space)
        weight = cfg.objective.image_loss_weight
        score = lambda params, batch: loss_fn(model, params, batch, weight)
        if cfg.data.encode_in_step:
            score = train_state.with_encoded_images(score, codec)
        self._loss = jax.jit(score)

    def __call__(self, params) -> dict[str, float]:
        rows = []
        for local in self.batches:
            batch = input_pipeline.make_global_batch(local, self.mesh, sharding.BATCH_AXES)
            loss, metrics = self._loss(params, batch)
            rows.append(dict(jax.device_get(metrics), loss=loss))
        keys = [k for k in rows[0] if k not in NOT_AVERAGED]
        return {f"val_{k}": float(np.mean([np.asarray(r[k], np.float64) for r in rows])) for k in keys}
