"""Image codecs: pixels <-> the latent patch sequence the transformer sees.

Every codec maps uint8 images [..., H, W, 3] to float32 latent patches [..., num_patches, patch_dim] (row-major
patch order over a `grid` of (rows, cols)) and back. The flow-matching objective and the sampler only ever see
latent patches, so swapping the codec (pixel patches now, an SD3/FLUX VAE later) changes nothing else. The `vq` codec
(models/vq_codec.py) is the NextFlow-style baseline's: its "patches" are the positions of an image block.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def patchify(x: np.ndarray, patch_size: int) -> np.ndarray:
    """[..., H, W, C] -> [..., (H/p)*(W/p), p*p*C], patches in row-major order, values (row, col, channel)."""
    *lead, h, w, c = x.shape
    p = patch_size
    x = x.reshape(*lead, h // p, p, w // p, p, c)
    x = np.moveaxis(x, -4, -3)  # [..., h/p, w/p, p, p, c]
    return x.reshape(*lead, (h // p) * (w // p), p * p * c)


def unpatchify(z: np.ndarray, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """Inverse of `patchify`: [..., rows*cols, p*p*C] -> [..., rows*p, cols*p, C]."""
    *lead, _, dim = z.shape
    (rows, cols), p = grid, patch_size
    c = dim // (p * p)
    z = z.reshape(*lead, rows, cols, p, p, c)
    z = np.moveaxis(z, -3, -4)  # [..., rows, p, cols, p, c]
    return z.reshape(*lead, rows * p, cols * p, c)


def run_chunked(fn, x: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """[fn(chunk)] over x in chunks of `batch_size` (jitted codecs: VAECodec, VQCodec); a short last chunk is padded
    to the next power of two only, so one image costs one call, not batch_size, and at most log2(batch_size) + 1
    shapes compile."""
    out = []
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        size = min(batch_size, 1 << max(len(chunk) - 1, 0).bit_length())
        pad = size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(fn(chunk))[:len(chunk) - pad])
    return out


class PatchGeometry:
    """The latent geometry every codec shares: square images of `image_size` pixels, `downsample`d to latents of
    `latent_channels` channels and cut into `patch_size` x `patch_size` patches (row-major)."""

    @property
    def grid(self) -> tuple[int, int]:
        n = self.image_size // (self.downsample * self.patch_size)
        return (n, n)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.latent_channels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.image_channels)


@dataclasses.dataclass(frozen=True)
class PixelPatchCodec(PatchGeometry):
    """Normalised pixels cut into non-overlapping patches: the identity 'VAE' used for shapes-world.

    pixel p in [0, 255] -> p / 127.5 - 1 in [-1, 1]; a patch is its p*p*C values flattened (row, col, channel).
    """

    image_size: int = 32
    patch_size: int = 4
    channels: int = 3

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    downsample = 1          # pixels are the latents

    @property
    def latent_channels(self) -> int:
        return self.channels

    @property
    def image_channels(self) -> int:
        return self.channels

    def encode(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.shape[-3:] != self.image_shape:
            raise ValueError(f"expected images of shape [..., {self.image_shape}], got {images.shape}")
        return patchify(images.astype(np.float32) / 127.5 - 1.0, self.patch_size)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        latents = np.asarray(latents, dtype=np.float32)
        if latents.shape[-2:] != (self.num_patches, self.patch_dim):
            raise ValueError(f"expected latents [..., {self.num_patches}, {self.patch_dim}], got {latents.shape}")
        x = unpatchify(latents, self.grid, self.patch_size)
        return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_codec(config) -> PixelPatchCodec:
    """Builds the codec named by `config.codec` (a ConfigDict with `name` and its fields)."""
    get = (lambda k, d: getattr(config, k, d)) if dataclasses.is_dataclass(config) else config.get
    name = get("name", "pixel_patch")
    if name == "pixel_patch":
        return PixelPatchCodec(image_size=config.image_size, patch_size=config.patch_size, channels=get("channels", 3))
    if name == "vae":                     # an SD3 / FLUX-style diffusers AutoencoderKL (models/vae.py)
        from oneflow_jax.models.vae import VAECodec
        return VAECodec.from_config(config)
    if name == "vq":                      # the NextFlow-style baseline's multi-scale VQ tokenizer (models/vq_codec.py)
        from oneflow_jax.models.vq_codec import VQCodec
        return VQCodec.from_config(config)
    raise ValueError(f"unknown codec {name!r}; known: 'pixel_patch', 'vae', 'vq'")
