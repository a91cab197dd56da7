"""Flow matching on image latents (reference §3): Y_t = t Y1 + (1 - t) Y0, target velocity v = Y1 - Y0.

Each image carries its own t_img (fed to the network through the time embedding of its patches); the loss is the
mean squared velocity error over the latent patches of images that are still noisy (t_img < 1).

Loss space. With uniform t the velocity error ||v_theta - v||^2 = ||Y1_hat - Y1||^2 / (1 - t)^2 puts most of its
weight on nearly clean images (t > 0.8 carries ~85% of it): fine detail. `space="x"` measures the same error in
clean-latent units, ||v_theta - v||^2 (1 - t)^2 = ||Y1_hat - Y1||^2, weighting every noise level alike, which is
where layout and colour (decided at small t) are learnt. (1 - t) is clipped at MIN_GAP in both directions.

Time shift. Latents that are very redundant (flat-coloured 8x8 pixel patches, high-resolution VAE latents) are
decided almost entirely at small t: averaging a patch's 192 values beats the noise long before t is large. SD3's
timestep shift (Esser et al. 2024; also "simple diffusion") moves both training and sampling time there:
the schedule's time u in [0, 1] becomes the noise level t = u / (u + s (1 - u)) (s = 1: identity; s = 4: u = 1/2 ->
t = 1/5), so training draws and sampler steps concentrate at the noisy end. The network is always told t.
"""
from __future__ import annotations

import jax.numpy as jnp

MIN_GAP = 0.05          # 1 - t is clipped here wherever it divides or weights (x-prediction, loss space "x")
LOSS_SPACES = ("v", "x")


def interpolate(clean, noise, t):
    """(Y_t, v) for clean latents Y1, noise Y0 ~ N(0, I), time t (broadcastable). Works on numpy and jax arrays."""
    return t * clean + (1.0 - t) * noise, clean - noise


def shift_time(u, shift: float):
    """Schedule time u -> noise-level time t = u / (u + s (1 - u)); u = 0 and 1 are fixed points."""
    if shift == 1.0:
        return u
    return u / (u + shift * (1.0 - u))


def unshift_time(t, shift: float):
    """Inverse of `shift_time`: u = s t / (1 + (s - 1) t)."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def euler_step(y, velocity, h):
    """One Euler step of dY/dt = v (Alg. 1, step 1)."""
    return y + h * velocity


def image_loss(velocity, batch, space: str = "v"):
    """mean over weighted patches of mean_d (v_theta - (Y1 - Y0))^2, times max(1 - t_img, MIN_GAP)^2 in space "x";
    velocity [B, L, D]."""
    if space not in LOSS_SPACES:
        raise ValueError(f"image loss space must be one of {LOSS_SPACES}, got {space!r}")
    err = jnp.mean(jnp.square(velocity.astype(jnp.float32) - batch["velocity_target"]), axis=-1)
    if space == "x":
        err = err * jnp.square(jnp.maximum(1.0 - batch["patch_t"].astype(jnp.float32), MIN_GAP))
    w = batch["patch_weight"].astype(jnp.float32)
    return jnp.sum(w * err) / jnp.maximum(jnp.sum(w), 1.0)
