"""Flow matching on image latents (reference §3): Y_t = t Y1 + (1 - t) Y0, target velocity v = Y1 - Y0.

Each image carries its own t_img (fed to the network through the time embedding of its patches); the loss is the
mean squared velocity error over the latent patches of images that are still noisy (t_img < 1).
"""
from __future__ import annotations

import jax.numpy as jnp


def interpolate(clean, noise, t):
    """(Y_t, v) for clean latents Y1, noise Y0 ~ N(0, I), time t (broadcastable). Works on numpy and jax arrays."""
    return t * clean + (1.0 - t) * noise, clean - noise


def euler_step(y, velocity, h):
    """One Euler step of dY/dt = v (Alg. 1, step 1)."""
    return y + h * velocity


def image_loss(velocity, batch):
    """mean over weighted patches of mean_d (v_theta - (Y1 - Y0))^2; velocity [B, L, D]."""
    err = jnp.mean(jnp.square(velocity.astype(jnp.float32) - batch["velocity_target"]), axis=-1)
    w = batch["patch_weight"].astype(jnp.float32)
    return jnp.sum(w * err) / jnp.maximum(jnp.sum(w), 1.0)
