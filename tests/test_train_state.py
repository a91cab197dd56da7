"""train_state.make_train_step's update rules on a two-leaf quadratic (no model): the EMA of the params and the
skipping of non-finite steps. The CLI tests (test_train.py) run the same step inside the real train loop."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from oneflow_jax.training import train_state

OPTIMIZER = ml_collections.ConfigDict(dict(lr=0.1, min_lr_ratio=0.1, warmup_steps=1, b1=0.9, b2=0.95, eps=1e-8,
                                           weight_decay=0.0, grad_clip=1.0))


def quadratic(model, params, batch, loss_weight):
    """sum((params - target)^2) * scale: a NaN scale makes the loss and the gradient non-finite."""
    loss = sum(jnp.sum((p - batch["target"]) ** 2) for p in jax.tree_util.tree_leaves(params)) * batch["scale"]
    return loss, {}


def run_steps(ema_decay: float, scales):
    tx, schedule = train_state.make_optimizer(OPTIMIZER, total_steps=100)
    params = {"a": jnp.zeros((3, 2)), "b": jnp.ones((4,))}
    step = jax.jit(train_state.make_train_step(None, tx, schedule, 1.0, quadratic, ema_decay))
    states = [train_state.initial_state(params, tx, ema_decay)]
    for scale in scales:
        states.append(step(states[-1], {"target": jnp.float32(2.0), "scale": jnp.float32(scale)})[0])
    return jax.device_get(states)


def test_ema_decay_warms_up_then_holds():
    decays = np.asarray([train_state.ema_decay_at(s, 0.998) for s in (0, 10, 100, 10_000)])
    np.testing.assert_allclose(decays, [0.1, 11 / 20, 101 / 110, 0.998], rtol=1e-6)


def test_ema_follows_the_params_and_skips_nonfinite_steps():
    decay = 0.9
    states = run_steps(decay, [1.0, 1.0, float("nan"), 1.0])
    expected = states[0]["params"]
    for i, (before, after) in enumerate(zip(states, states[1:])):
        if i == 2:      # the NaN step: params, optimizer state and EMA all unchanged
            for key in ("params", "ema_params"):
                jax.tree_util.tree_map(np.testing.assert_array_equal, after[key], before[key])
            continue
        d = min(decay, (1 + i) / (10 + i))
        expected = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, expected, after["params"])
        jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), after["ema_params"], expected)
    assert int(states[-1]["step"]) == 4 and np.all(states[-1]["params"]["a"] > 0.1)   # moved towards the target


def test_no_ema_state_without_ema_decay():
    states = run_steps(0.0, [1.0])
    assert set(states[-1]) == {"step", "params", "opt_state"}
