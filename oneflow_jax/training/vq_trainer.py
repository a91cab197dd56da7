"""Trains the multi-scale residual VQ tokenizer (models/vq.py) on a dataset's images; the command is
`python -m oneflow_jax.train_vq` (train_vq.py), the FLOP comparison calls `train` too (evals/compare.py).

The split's images are held in memory; step t's batch is drawn from them by a numpy generator seeded with (seed, t),
so rerunning the command resumes from W's latest checkpoint exactly. Writes W/config.json, W/checkpoints/ (Orbax),
W/metrics.jsonl and W/tb (loss, recon_mse, psnr, codebook_usage, perplexity, restarted_codes per logged step), and
at the end evaluates on config.eval.split: W/eval.json and W/reconstructions.png (originals, then the images decoded
from the first 1, 2, .. K token maps). `vq.load_tokenizer(W)` loads the result.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from oneflow_jax import cli
from oneflow_jax.cli import UserError
from oneflow_jax.models import vq
from oneflow_jax.models.vq import VQConfig, VQModel

# ------------------------------------------------------------------------------------------------ data
def load_images(data, split: str, limit: int, image_size: int):
    """(uint8 [N, S, S, 3] images of `split`'s records, their shapes-world attributes or None)."""
    from oneflow_jax.data import datasets     # pylint: disable=g-import-not-at-top  (tfds: slow to import)
    try:
        records = datasets.load_records(data.name, split, data.data_dir, limit=limit or None)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"config.data ({data.name}, split {split!r}): {e}".splitlines()[0]) from None
    images = [im for r in records for im in r["images"]]
    if not images:
        raise UserError(f"config.data: split {split!r} of {data.name} holds no images")
    if images[0].shape != (image_size, image_size, 3):
        raise UserError(f"{data.name} images are {images[0].shape}, config.vq.image_size is {image_size}")
    attributes = [a for r in records for a in r.get("attributes", [])]
    return np.stack(images), (attributes if len(attributes) == len(images) else None)


# ------------------------------------------------------------------------------------------------ training
def make_optimizer(opt, total_steps: int):
    schedule = optax.warmup_cosine_decay_schedule(0.0, opt.lr, min(opt.warmup_steps, total_steps - 1) or 1,
                                                  max(total_steps, opt.warmup_steps + 1), opt.lr * opt.min_lr_ratio)
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), optax.adam(schedule, b1=opt.b1, b2=opt.b2)), schedule


def create_state(cfg: VQConfig, tx, seed: int) -> dict:
    """The train state: params, Adam state, step, code hits of the current restart window, EMA codebook stats."""
    params = vq.init_params(cfg, seed)
    state = dict(params=params, opt_state=jax.jit(tx.init)(params), step=jnp.zeros((), jnp.int32),
                 usage=jnp.zeros(cfg.codebook_size, jnp.int32))
    if cfg.codebook_update == "ema":
        state["ema"] = dict(count=jnp.ones(cfg.codebook_size), sum=jnp.copy(params["codebook"]))  # its own buffer
    return jax.device_put(state, jax.devices()[0])


def make_train_step(cfg: VQConfig, tx, schedule, seed: int):
    """state, uint8 images [B, S, S, 3] -> (state, metrics); jitted, state donated."""
    model = VQModel(cfg)

    def loss_fn(params, x):
        recon, aux = model.apply({"params": params}, x)
        mse = jnp.mean((recon - x) ** 2)                  # in [-1, 1] pixel units
        return mse + aux["vq_loss"], (mse, aux)

    def step(state, images):
        x = vq.to_float(images)
        (loss, (mse, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], x)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
        codebook = params["codebook"]
        if cfg.codebook_update == "ema":                  # codes <- EMA mean of the residuals assigned to them
            d, ema = cfg.ema_decay, state["ema"]
            count = d * ema["count"] + (1 - d) * aux["hits"]
            total = d * ema["sum"] + (1 - d) * aux["assigned_sum"]
            n = jnp.sum(count)
            codebook = total / ((count + 1e-5) / (n + cfg.codebook_size * 1e-5) * n)[:, None]
            new["ema"] = dict(count=count, sum=total)
        # dead codes: no hit in the window that ends at this step -> a random quantiser input of this batch
        usage = state["usage"] + aux["hits"]
        window_end = (cfg.restart_every > 0) & ((state["step"] + 1) % max(cfg.restart_every, 1) == 0)
        dead = window_end & (usage == 0)
        key = jax.random.fold_in(jax.random.key(seed, impl="rbg"), state["step"])
        fresh = aux["inputs"][jax.random.randint(key, (cfg.codebook_size,), 0, aux["inputs"].shape[0])]
        new["params"] = dict(params, codebook=jnp.where(dead[:, None], fresh, codebook))
        if cfg.codebook_update == "ema":
            new["ema"] = dict(count=jnp.where(dead, 1.0, new["ema"]["count"]),
                              sum=jnp.where(dead[:, None], fresh, new["ema"]["sum"]))
        new["usage"] = jnp.where(window_end, 0, usage)
        recon_mse = mse / 4                               # in [0, 1] pixel units
        metrics = dict(loss=loss, recon_mse=recon_mse, psnr=-10 * jnp.log10(recon_mse), vq_loss=aux["vq_loss"],
                       lr=schedule(state["step"]), hits=aux["hits"], restarted=jnp.sum(dead))
        return new, metrics

    return jax.jit(step, donate_argnums=0)


def train_flops_per_step(config) -> float | None:
    """XLA's FLOP count of one training step at config.batch_size (cost analysis of the compiled step)."""
    from oneflow_jax.training import aot  # pylint: disable=g-import-not-at-top
    cfg = check_config(config)
    tx, schedule = make_optimizer(config.optimizer, config.total_steps)
    state = create_state(cfg, tx, config.seed)
    images = jax.ShapeDtypeStruct((config.batch_size, cfg.image_size, cfg.image_size, 3), jnp.uint8)
    return aot.xla_flops(make_train_step(cfg, tx, schedule, config.seed).lower(state, images).compile())


def window_scalars(metrics: list[dict]) -> dict:
    """The logged scalars of the steps since the last log: means, and codebook use over the whole window."""
    ms = jax.device_get(metrics)
    out = {k: float(np.mean([m[k] for m in ms])) for k in ("loss", "recon_mse", "psnr", "vq_loss", "lr")}
    hits = np.sum([m["hits"] for m in ms], axis=0).astype(np.float64)
    p = hits / hits.sum()
    out.update(codebook_usage=float(np.mean(hits > 0)), perplexity=float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0])))),
               restarted_codes=float(np.sum([m["restarted"] for m in ms])))
    return out


# ------------------------------------------------------------------------------------------------ evaluation
def make_reconstruct(cfg: VQConfig):
    """uint8 images -> (uint8 [K, B, S, S, 3] decoded from the first 1..K token maps, per-scale token agreement of
    encode(decode(encode(x))) with encode(x) [K, B])."""
    def run(m, x):
        tokens = m.encode(x)
        f_hats = jnp.cumsum(jnp.stack([m.embed(k, t) for k, t in enumerate(tokens)]), axis=0)  # [K, B, h, w, C]
        recon = vq.to_uint8(m.decoder(f_hats.reshape((-1,) + f_hats.shape[2:]))).reshape((len(tokens),) + x.shape)
        again = m.encode(vq.to_float(recon[-1]))
        return recon, jnp.stack([jnp.mean(a == b, axis=(1, 2)) for a, b in zip(again, tokens)])
    return jax.jit(lambda params, images: VQModel(cfg).apply({"params": params}, vq.to_float(images), method=run))


def evaluate(cfg: VQConfig, params, images, attributes, workdir: str, batch_size: int, grid: int) -> dict:
    """PSNR (of the mean squared error over all pixels) per number of scales decoded, token round-trip agreement,
    shapes-world attribute recognition of the reconstructions; eval.json and reconstructions.png in workdir."""
    reconstruct, recons, agree = make_reconstruct(cfg), [], []
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        n = len(batch)
        batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], np.uint8)])  # one shape: one jit
        r, a = jax.device_get(reconstruct(params, batch))
        recons.append(r[:, :n])
        agree.append(a[:, :n].sum(1))
    recons = np.concatenate(recons, axis=1)                                   # [K, N, S, S, 3]
    err = (recons.astype(np.float64) - images[None]) / 255.0
    psnr = -10 * np.log10(np.mean(err ** 2, axis=(1, 2, 3, 4)))
    out = dict(num_images=len(images), psnr=float(psnr[-1]),
               psnr_by_scales={str(s): float(v) for s, v in zip(cfg.scales, psnr)},
               token_round_trip={str(s): float(v) for s, v in zip(cfg.scales, np.sum(agree, 0) / len(images))})
    if attributes is not None:
        from oneflow_jax.data import shapes_world  # pylint: disable=g-import-not-at-top
        judged = [shapes_world.judge_image(r) == tuple(a) for r, a in zip(recons[-1], attributes)]
        out["attributes_recognised"] = float(np.mean(judged))
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(out, f, indent=2, sort_keys=True)
    save_grid(os.path.join(workdir, "reconstructions.png"), np.concatenate([images[None, :grid], recons[:, :grid]]))
    return out


def save_grid(path: str, rows, zoom: int = 3, gap: int = 2) -> None:
    """uint8 [R, C, S, S, 3] -> a PNG of R rows by C columns, each image zoomed, grey gaps between them."""
    from PIL import Image      # pylint: disable=g-import-not-at-top
    r, c, s = rows.shape[:3]
    z = s * zoom + gap
    canvas = np.full((r * z + gap, c * z + gap, 3), 128, np.uint8)
    for i in range(r):
        for j in range(c):
            canvas[gap + i * z:(i + 1) * z, gap + j * z:(j + 1) * z] = rows[i, j].repeat(zoom, 0).repeat(zoom, 1)
    Image.fromarray(canvas).save(path)


# ------------------------------------------------------------------------------------------------ the command
def check_config(config) -> VQConfig:
    try:
        cfg = VQConfig.from_dict(config.vq.to_dict())
    except (ValueError, TypeError) as e:
        raise UserError(f"config.vq: {e}") from None
    for key in ("total_steps", "batch_size", "log_every", "ckpt_every", "keep_checkpoints", "eval.batch_size"):
        value = config.eval.batch_size if key == "eval.batch_size" else config[key]
        if int(value) < 1:
            raise UserError(f"config.{key} must be >= 1, got {value}")
    return cfg


def train(config, workdir: str) -> dict:
    """Trains (or resumes) to config.total_steps, then evaluates. Returns the eval scores."""
    cfg = check_config(config)
    # pylint: disable=g-import-not-at-top  (Orbax and TensorFlow: seconds to import, after the config checks)
    from oneflow_jax.training import checkpointing
    from oneflow_jax.training.metrics_logging import MetricLogger
    saved = os.path.join(workdir, "config.json")
    if os.path.exists(saved) and VQConfig.from_dict(checkpointing.load_config(workdir).vq.to_dict()) != cfg:
        raise UserError(f"{saved} has another config.vq than this run's: use a new --workdir")
    os.makedirs(workdir, exist_ok=True)
    checkpointing.save_config(workdir, config)
    images, _ = load_images(config.data, config.data.split, config.data.limit, cfg.image_size)
    tx, schedule = make_optimizer(config.optimizer, config.total_steps)
    state = create_state(cfg, tx, config.seed)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    cli.say(f"VQ tokenizer: {n_params / 1e6:.2f}M parameters, codebook {cfg.codebook_size} x {cfg.code_dim}, "
            f"scales {cfg.scales} ({sum(s * s for s in cfg.scales)} tokens per image); {len(images)} train images")
    ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints, save_every=config.ckpt_every)
    if ckpt.latest_step() is not None:
        state, _, _ = ckpt.restore(state)
        cli.say(f"resumed from checkpoint step {int(state['step'])} in {workdir}")
    start = int(state["step"])
    train_step = make_train_step(cfg, tx, schedule, config.seed)
    logger = MetricLogger(workdir, config.total_steps, name="vq", resume_step=start)
    window, t0 = [], time.time()
    with checkpointing.PreemptionGuard() as guard:
        for step in range(start + 1, config.total_steps + 1):
            pick = np.random.default_rng([config.seed, step]).integers(0, len(images), config.batch_size)
            state, metrics = train_step(state, images[pick])
            window.append(metrics)
            stop = guard.should_stop()
            if step % config.log_every == 0 or step == config.total_steps:
                scalars = window_scalars(window)
                scalars["steps_per_sec"] = len(window) / max(time.time() - t0, 1e-9)
                logger.write_scalars(step, scalars)
                cli.say(progress_line(step, config.total_steps, scalars))
                window, t0 = [], time.time()
            ckpt.save(step, state, force=step == config.total_steps or stop)
            if stop:
                cli.say(f"stopped by a signal at step {step}; checkpoint saved, rerun the command to resume")
                break
    ckpt.close()
    logger.close()
    if int(state["step"]) < config.total_steps:
        return {}
    eval_images, attributes = load_images(config.data, config.eval.split, config.eval.limit, cfg.image_size)
    scores = evaluate(cfg, state["params"], eval_images, attributes, workdir, config.eval.batch_size,
                      config.eval.grid_images)
    by_scale = ", ".join(f"{s}: {v:.1f}" for s, v in scores["psnr_by_scales"].items())
    cli.say(f"eval on {len(eval_images)} '{config.eval.split}' images: PSNR {scores['psnr']:.2f} dB (decoding scales "
            f"up to {by_scale})" + (f"; attributes recognised in {scores['attributes_recognised']:.1%}"
                                    if "attributes_recognised" in scores else "")
            + f"; {workdir}/reconstructions.png")
    return scores


def progress_line(step: int, total: int, s: dict) -> str:
    from oneflow_jax.training.metrics_logging import format_seconds  # pylint: disable=g-import-not-at-top
    sps = s["steps_per_sec"]
    return (f"vq step {step}/{total} | loss {s['loss']:.4f} | PSNR {s['psnr']:.2f} dB | codes used "
            f"{s['codebook_usage']:.0%} (perplexity {s['perplexity']:.0f}) | restarted {int(s['restarted_codes'])} | "
            f"{sps:.2f} steps/s | ETA {format_seconds((total - step) / sps if sps > 0 else float('nan'))}")
