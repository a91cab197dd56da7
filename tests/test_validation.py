"""The validation loss (training/validation.py) for both methods: the same held-out documents and noise at every
evaluation and in a second run, so equal params give bit-equal values and the curve moves only with the params."""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from oneflow_jax import config_lib
from oneflow_jax.data import input_pipeline
from oneflow_jax.training import sharding, train_state
from oneflow_jax.training.validation import ValidationLoss


def _config(model_type: str):
    config = config_lib.load_config_file("configs/shapes_tiny.py:smoke")
    config.model_type = model_type
    config.eval_every, config.eval.val_batches = 2, 2
    return config_lib.validate(config, jax.device_count())


@pytest.mark.parametrize("model_type", ["oneflow", "ar"])
def test_fixed_documents_and_noise(model_type, data_dir):
    cfg = _config(model_type)
    tokenizer = input_pipeline.get_tokenizer(cfg.data)
    model, codec = train_state.build_model(cfg, tokenizer.vocab_size)
    mesh = sharding.make_mesh(cfg.mesh)
    tx, _ = train_state.make_optimizer(cfg.optimizer, cfg.total_steps)
    a = train_state.create_sharded_state(model, tx, mesh, seed=0)[0]["params"]
    b = train_state.create_sharded_state(model, tx, mesh, seed=1)[0]["params"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        first = ValidationLoss(cfg, model, mesh, codec, tokenizer)
        again = ValidationLoss(cfg, model, mesh, codec, tokenizer)          # as a resumed or second run builds it
        scores = first(a)
        assert scores == first(a) == again(a)                               # bit-equal: nothing is redrawn
        assert scores["val_loss"] != first(b)["val_loss"]
    assert len(first.batches) == 2
    for x, y in zip(first.batches, again.batches):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    assert {"val_loss", "val_text_loss", "val_image_loss"} <= set(scores)
    assert all(np.isfinite(v) for v in scores.values())


def test_eval_every_must_be_a_multiple_of_log_every():
    config = config_lib.load_config_file("configs/shapes_tiny.py:smoke")
    config.eval_every = 3                                                   # log_every is 2
    with pytest.raises(config_lib.UserError, match="multiple of log_every"):
        config_lib.validate(config, jax.device_count())
