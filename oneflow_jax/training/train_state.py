"""The train state and the step: AdamW with warmup-cosine, params created straight into their shardings, a jitted
update that skips non-finite steps. Shared by the train loop and every tool that restores a checkpoint."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from oneflow_jax import cli
from oneflow_jax import config_lib, methods
from oneflow_jax.training import checkpointing
from oneflow_jax.training import sharding
from oneflow_jax.models.codec import make_codec
from oneflow_jax.models.transformer import dummy_batch


def make_optimizer(opt, total_steps: int):
    """AdamW with linear warmup and cosine decay to lr * min_lr_ratio; global-norm clipping; no decay on vectors."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.lr, warmup_steps=min(opt.warmup_steps, max(total_steps - 1, 1)),
        decay_steps=max(total_steps, opt.warmup_steps + 1), end_value=opt.lr * opt.min_lr_ratio)
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip),
                     optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                                 mask=decay_mask))
    return tx, schedule


def build_model(config, vocab_size: int):
    """(model, codec) of a run: the model of its method (methods.Method.model_class) and its image codec."""
    cfg = config_lib.resolve(config)
    try:
        codec = make_codec(cfg.codec)
    except (FileNotFoundError, ValueError) as e:      # e.g. --config.codec.path naming no VAE: one line, exit 2
        raise config_lib.UserError(f"config.codec: {e}") from None
    return methods.for_config(cfg).build_model(config_lib.model_config(cfg, vocab_size, codec)), codec


def jit_train_step(model, tx, schedule, config, state_shardings, codec=None):
    """The jitted train step of a run (state donated), as the train loop, aot and the benchmarks run it; with
    `data.encode_in_step`, `codec` encodes the batch's images first (data/encode_in_step.py)."""
    cfg = config_lib.resolve(config)
    step = make_train_step(model, tx, schedule, cfg.objective.image_loss_weight,
                           methods.for_config(cfg).loss_function(cfg.objective.image_loss_space),
                           cfg.optimizer.ema_decay)
    if cfg.data.encode_in_step:
        step = with_encoded_images(step, codec)
    return jax.jit(step, in_shardings=(state_shardings, None), out_shardings=(state_shardings, None),
                   donate_argnums=(0,))


def with_encoded_images(fn, codec):
    """fn(x, batch) -> fn(x, batch with its `pixels` encoded into the clean latents) (data/encode_in_step.py)."""
    from oneflow_jax.data import encode_in_step  # pylint: disable=g-import-not-at-top
    if codec is None:
        raise ValueError("data.encode_in_step needs the run's codec to build the train step")
    encode = encode_in_step.encoder(codec)
    return lambda x, batch: fn(x, encode_in_step.add_clean_latents(batch, encode))


def initial_state(params, tx, ema_decay: float = 0.0) -> dict:
    """The train state at step 0: params, the optimizer's state and, when ema_decay > 0, `ema_params`, an exponential
    moving average of the params (what sample, eval and export use; see make_train_step)."""
    state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    if ema_decay > 0:
        state["ema_params"] = params
    return state


def _init_fn(model, tx, ema_decay: float):
    def init(rng):
        params = model.init(rng, dummy_batch(model.cfg))["params"]      # boxed with logical axis names
        return initial_state(params, tx, ema_decay)
    return init


def abstract_train_state(model, tx, mesh, ema_decay: float = 0.0):
    """(abstract state whose leaves carry their target shardings, shardings), from eval_shape: nothing allocated."""
    abstract = jax.eval_shape(_init_fn(model, tx, ema_decay), jax.random.key(0))
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(abstract), mesh)
    abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      nn.meta.unbox(abstract), shardings)
    return abstract, shardings


def sampling_weights(config, ema: bool = True) -> str:
    """The train-state entry sample, eval and export read: `ema_params` if the run keeps an EMA of the params
    (optimizer.ema_decay > 0) and `ema`, else `params`."""
    return "ema_params" if ema and config_lib.resolve(config).optimizer.ema_decay > 0 else "params"


def restore_params(workdir: str, config, model, step: int | None = None, ema: bool = True):
    """(params, step) of checkpoint `step` (default: the newest readable) of run `workdir`, replicated on the local
    devices: the entry `sampling_weights(config, ema)` names; only it is read (the optimizer moments stay on disk).
    For sampling, eval and export."""
    mesh = sharding.make_mesh(config_lib.MeshConfig())
    key = sampling_weights(config, ema)
    abstract = {key: abstract_train_state(model, optax.identity(), mesh)[0]["params"]}
    ckpt = checkpointing.Checkpointer(workdir, keep=config_lib.resolve(config).keep_checkpoints, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise cli.UserError(f"{workdir} has no checkpoint yet")
        if step is not None and int(step) not in ckpt.all_steps():
            raise cli.UserError(f"{workdir} has no checkpoint at step {step} (it has steps "
                                f"{', '.join(map(str, ckpt.all_steps()))})")
        state, _, restored = ckpt.restore(abstract, step=step, partial=True)
    finally:
        ckpt.close()
    return state[key], restored


def create_sharded_state(model, tx, mesh, seed: int, ema_decay: float = 0.0):
    """(state, state_shardings): params initialised straight into their shardings (never whole on one device)."""
    _, shardings = abstract_train_state(model, tx, mesh, ema_decay)
    init = _init_fn(model, tx, ema_decay)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(jax.random.key(seed))
    return state, shardings


def ema_decay_at(step, decay: float):
    """The EMA's decay at optimizer step `step` (0-based): min(decay, (1 + step) / (10 + step)), so the average
    forgets the random init within the first few hundred steps instead of after ~1 / (1 - decay)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(model, tx, schedule, loss_weight: float, objective_fn, ema_decay: float = 0.0):
    """One optimizer step. A non-finite loss or gradient leaves params, optimizer state and EMA unchanged. With
    ema_decay > 0 (the state from initial_state(..., ema_decay)) also ema <- d ema + (1 - d) params (ema_decay_at)."""
    def train_step(state, batch):
        loss_fn = lambda p: objective_fn(model, p, batch, loss_weight)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        keep_new = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = dict(step=state["step"] + 1, params=keep_new(params, state["params"]),
                         opt_state=keep_new(opt_state, state["opt_state"]))
        if ema_decay > 0:
            d = ema_decay_at(state["step"], ema_decay)
            ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state["ema_params"], params)
            new_state["ema_params"] = keep_new(ema, state["ema_params"])
        metrics.update(grad_norm=grad_norm, lr=schedule(state["step"]), finite=finite.astype(jnp.float32))
        return new_state, metrics
    return train_step
