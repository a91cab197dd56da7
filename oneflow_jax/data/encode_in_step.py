"""Encoding images inside the jitted train step (`data.encode_in_step`): small runs on pixel records, no precompute.

The host pipeline stays as it is except for what stands in for the latents. The flow-matching noising is linear in
the clean latents Y1 (flow_matching.interpolate: Y_t = t Y1 + (1 - t) Y0, v = Y1 - Y0), so the host noises each
document with Y1 = 0 and the step adds the clean part back once the images are encoded on the devices:

  host    `PixelCarrier` (the pipeline's codec) hands the decoded uint8 images through unencoded;
          `InStepTransform` runs the method's transform on zero latents, then keeps the images that still have patch
          positions (`image_index` says which) as `pixels`;
          `InStepPacker` packs rows as the method's packer does and adds `pixels` [images_per_row, H, W, 3] and the
          row's `image_index` [seq_len];
  device  `add_clean_latents(batch, encode)`: Y1 = encode(pixels), gathered per patch position;
          patches += patch_t * Y1 and velocity_target += Y1.

The result equals the host-encoded batch up to float rounding (tests/test_encode_in_step.py). The encoder's FLOPs run
in the step but are not in the analytic FLOP count; `aot` compiles the step without them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from oneflow_jax.models import codec as codec_lib


class PixelCarrier:
    """The pipeline's codec under encode_in_step: the latent geometry of `codec`, but `encode` returns the images."""

    def __init__(self, codec):
        self.codec = codec

    def __getattr__(self, name):                   # image_shape, num_patches, patch_dim, grid ... of the real codec
        if name == "codec":
            raise AttributeError(name)
        return getattr(self.codec, name)

    def encode(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(images)


@dataclasses.dataclass(frozen=True)
class InStepTransform:
    """DocumentTransform: the method's transform on zero latents; the images it kept travel on as `pixels`."""

    inner: Any
    num_patches: int
    patch_dim: int
    image_shape: tuple[int, int, int]

    def __getattr__(self, name):                   # cost(...) and whatever else the pipeline asks the transform
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, tokens, images, rng: np.random.Generator) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        n = len(images) if images.ndim == 4 else 0       # no image: the pipeline passes zeros [0, N, D]
        doc = dict(self.inner(tokens, np.zeros((n, self.num_patches, self.patch_dim), np.float32), rng))
        kept = np.unique(doc["image_index"][doc["is_patch"]])
        rank = np.zeros(max(n, 1), np.int32)
        rank[kept] = np.arange(len(kept), dtype=np.int32)
        doc["image_index"] = np.where(doc["is_patch"], rank[doc["image_index"]], 0).astype(np.int32)
        doc["pixels"] = images[kept].astype(np.uint8) if n else np.zeros((0,) + self.image_shape, np.uint8)
        return doc


@dataclasses.dataclass(frozen=True)
class InStepPacker:
    """RowPacker: the method's packer, plus each row's `pixels` and the row slot of every patch (`image_index`)."""

    inner: Any
    images_per_row: int
    image_shape: tuple[int, int, int]

    @property
    def limits(self):
        return self.inner.limits

    def usage(self, doc):
        return self.inner.usage(doc)

    def pack(self, docs) -> dict[str, np.ndarray]:
        row = self.inner.pack(docs)
        seq_len = len(row["tokens"])
        pixels = np.zeros((self.images_per_row,) + tuple(self.image_shape), np.uint8)
        index = np.zeros(seq_len, np.int32)
        pos = slot = 0
        for doc in docs:
            m, k = len(doc["tokens"]), len(doc["pixels"])
            if slot + k > self.images_per_row:
                raise ValueError(f"the row holds more than {self.images_per_row} images")
            pixels[slot:slot + k] = doc["pixels"]
            index[pos:pos + m] = np.where(doc["is_patch"], doc["image_index"] + slot, 0)
            pos, slot = pos + m, slot + k
        row.update(pixels=pixels, image_index=index)
        return row


def pipeline_pieces(transform, packer, codec, data) -> tuple[InStepTransform, InStepPacker]:
    """Wraps a method's (transform, packer) for encode_in_step; rows hold at most patches / num_patches images."""
    per_row = (data.max_patches_per_row or data.seq_len) // codec.num_patches
    return (InStepTransform(transform, codec.num_patches, codec.patch_dim, tuple(codec.image_shape)),
            InStepPacker(packer, max(per_row, 1), tuple(codec.image_shape)))


def encoder(codec) -> Callable[[jax.Array], jax.Array]:
    """uint8 images [n, H, W, 3] -> latent patches [n, num_patches, patch_dim], a jax function (weights as
    constants): the pixel-patch codec's normalisation, or the VAE's normalised mean."""
    if isinstance(codec, codec_lib.PixelPatchCodec):
        return lambda x: codec_lib.patchify(x.astype(jnp.float32) / 127.5 - 1.0, codec.patch_size)
    params = jax.tree_util.tree_map(jnp.asarray, codec.params)
    return lambda x: codec.encode_patches(params, x)


def add_clean_latents(batch: dict, encode: Callable) -> dict:
    """The device half: encode the rows' images and add Y1 to the zero-latent noising (module docstring)."""
    batch = dict(batch)
    pixels, index = batch.pop("pixels"), batch.pop("image_index")
    rows, slots = pixels.shape[:2]
    clean = encode(pixels.reshape((rows * slots,) + pixels.shape[2:]))             # [rows * slots, N, D]
    n, dim = clean.shape[1:]
    clean = clean.reshape(rows, slots * n, dim)
    where = index * n + batch["patch_index"]                                      # [rows, seq_len]
    clean = jnp.take_along_axis(clean, where[..., None], axis=1)
    clean = jnp.where(batch["is_patch"][..., None], clean, 0.0)
    batch["patches"] = batch["patches"] + batch["patch_t"][..., None] * clean
    batch["velocity_target"] = batch["velocity_target"] + clean
    return batch
