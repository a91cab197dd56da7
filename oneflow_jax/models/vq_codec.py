"""`VQCodec` (`codec.name = "vq"`): the multi-scale residual VQ tokenizer (models/vq.py, VAR arXiv 2404.02905
Alg. 1-2) as the image codec of the NextFlow-style baseline (docs/nextflow.md, "The image block").

An image becomes one *block* of N = sum_k s_k^2 + s_K^2 positions in K + 1 groups (scales s_1..s_K, 0-based group
index g below; group g < K predicts token map r_g, group K is the final group):

    group g = 0       1 position      input zeros                                   predicts r_0
    group g = 1..K-1  s_g^2           area_down(f_hat_{g-1}, s_g), row-major        predicts r_g
    group K (final)   s_K^2           f_hat_{K-1} (the whole reconstruction)        predicts no code

with f_hat_k = sum_{j <= k} phi_j(up(Z[r_j])). The codec's "latents" of an image are [N, C + 1]: the C input features
of every position, and in column C the code the position predicts (-1 in the final group; float32 holds them
exactly). `encode` / `decode` run on the host, jitted, in fixed chunks of `batch_size` images (as VAECodec);
`scale_contribution`, `group_inputs` and `final_inputs` are jnp functions for the sampler's jitted loop (the
tokenizer's params enter as constants). Copyable / picklable for data-loader workers: params travel as numpy, the
jitted functions are rebuilt. Without a tokenizer (`codec.tokenizer` unset) the codec is shape-only: its geometry
serves aot and FLOP counts, and encoding raises.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from oneflow_jax.models import vq
from oneflow_jax.models.codec import run_chunked
from oneflow_jax.models.vq import VQConfig, VQModel


class VQCodec:
    """uint8 images [..., H, W, 3] <-> block latents [..., N, C + 1] (module docstring)."""

    def __init__(self, vq_config: VQConfig, params, batch_size: int = 8):
        self.vq_config, self.batch_size = vq_config, batch_size
        self.params = None if params is None else jax.tree_util.tree_map(np.asarray, params)

    @classmethod
    def from_config(cls, config) -> "VQCodec":
        """config: name='vq', tokenizer=<train_vq run dir>, image_size, and optionally scales / code_dim /
        codebook_size (checked against the tokenizer; without one, the geometry of a shape-only codec)."""
        get = (lambda k, d=None: getattr(config, k, d)) if dataclasses.is_dataclass(config) else config.get
        scales = get("scales")
        geometry = dict(image_size=get("image_size"), scales=None if scales is None else tuple(int(s) for s in scales),
                        code_dim=get("code_dim"), codebook_size=get("codebook_size"))
        batch_size = get("batch_size", 8) or 8
        if get("tokenizer"):
            try:
                vq_config, params = vq.load_tokenizer(get("tokenizer"))
            except FileNotFoundError as e:
                raise FileNotFoundError(f"codec.tokenizer={get('tokenizer')} is not a train_vq run: {e}") from None
            for field, ours in geometry.items():
                theirs = getattr(vq_config, field)
                if ours is not None and ours != theirs:
                    raise ValueError(f"config.codec.{field}={ours} but the tokenizer at {get('tokenizer')} has "
                                     f"{theirs}")
            return cls(vq_config, params, batch_size)
        missing = [k for k, v in geometry.items() if v is None]
        if missing:
            raise ValueError(f"codec 'vq' needs codec.tokenizer (a train_vq run directory), or {', '.join(missing)} "
                             "for a shape-only codec")
        down = geometry["image_size"] // geometry["scales"][-1]
        levels = max(down.bit_length() - 1, 0)                     # downsample = 2 ** levels (checked by validate)
        return cls(VQConfig(channels=(1,) * (levels + 1), downsample=down, **geometry).validate(), None, batch_size)

    # ------------------------------------------------------------------------------------------------ geometry
    @property
    def scales(self) -> tuple[int, ...]:
        return self.vq_config.scales

    @property
    def code_dim(self) -> int:
        return self.vq_config.code_dim

    @property
    def codebook_size(self) -> int:
        return self.vq_config.codebook_size

    @property
    def image_size(self) -> int:
        return self.vq_config.image_size

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """Positions per group: s_g^2 for the K scales, then s_K^2 for the final group."""
        return tuple(s * s for s in self.scales) + (self.scales[-1] ** 2,)

    @property
    def group_offsets(self) -> tuple[int, ...]:
        """Where each group starts in the block (K + 2 entries: the last is N)."""
        return tuple(int(x) for x in np.cumsum((0,) + self.group_sizes))

    @property
    def num_codes(self) -> int:
        """Code positions per block (sum_k s_k^2): every position but the final group's."""
        return self.group_offsets[-2]

    @property
    def num_patches(self) -> int:
        return self.group_offsets[-1]

    @property
    def patch_dim(self) -> int:
        return self.code_dim + 1

    @property
    def grid(self) -> tuple[int, int]:
        return (1, self.num_patches)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    # ------------------------------------------------------------------------------- device helpers (jnp, jittable)
    def _check_params(self):
        if self.params is None:
            raise ValueError("this VQ codec has no tokenizer (codec.tokenizer is not set): it only knows the geometry")

    def _apply(self, fn, *args):
        self._check_params()
        params = jax.tree_util.tree_map(jnp.asarray, self.params)      # numpy -> constants under jit
        return VQModel(self.vq_config).apply({"params": params}, *args, method=fn)

    def scale_contribution(self, k: int, codes):
        """h_k = phi_k(up(Z[r_k])): codes int [B, s_k^2] (row-major) of scale k (0-based) -> [B, h, w, C]."""
        s = self.scales[k]
        return self._apply(VQModel.embed, k, codes.reshape(codes.shape[0], s, s))

    def group_inputs(self, g: int, f_hat):
        """Input features of group g in 1..K-1: area_down(f_hat, s_g) [B, s_g^2, C], f_hat [B, h, w, C] the sum of the
        contributions of scales 0..g-1 (VAR's teacher-forcing input). g = 0 gives the zeros of the first group."""
        s = self.scales[g]
        if g == 0:
            return jnp.zeros((f_hat.shape[0], 1, f_hat.shape[-1]), f_hat.dtype)
        return vq.area_down(f_hat, s).reshape(f_hat.shape[0], s * s, f_hat.shape[-1])

    def final_inputs(self, f_hat):
        """Input features of the final group: f_hat after all K scales [B, h, w, C] -> [B, s_K^2, C] (row-major)."""
        return f_hat.reshape(f_hat.shape[0], -1, f_hat.shape[-1])

    def block_latents(self, token_maps):
        """Token maps [int [B, s_k, s_k] for k < K] -> block latents [B, N, C + 1] (jnp; features + code column)."""
        batch = token_maps[0].shape[0]
        f_hat = jnp.zeros((batch, self.scales[-1], self.scales[-1], self.code_dim), jnp.float32)
        features = []
        for k, tokens in enumerate(token_maps):
            features.append(self.group_inputs(k, f_hat))
            f_hat = f_hat + self.scale_contribution(k, tokens.reshape(batch, -1))
        features.append(self.final_inputs(f_hat))
        codes = [t.reshape(batch, -1) for t in token_maps] + [jnp.full((batch, self.group_sizes[-1]), -1, jnp.int32)]
        return jnp.concatenate([jnp.concatenate(features, 1),
                                jnp.concatenate(codes, 1)[..., None].astype(jnp.float32)], -1)

    # ---------------------------------------------------------------------------------------------- host side
    @functools.cached_property
    def _fns(self):
        self._check_params()
        encode = jax.jit(lambda images: self.block_latents(self._apply(VQModel.encode, vq.to_float(images))))
        decode = jax.jit(lambda codes: vq.to_uint8(self._apply(VQModel.decode, self._split_codes(codes))))
        return encode, decode, jax.jit(self.block_latents)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_fns", None)
        return state

    def _split_codes(self, codes):
        """[B, num_codes] -> token maps [[B, s_k, s_k]]."""
        off = self.group_offsets
        return [codes[:, off[k]:off[k + 1]].reshape(-1, s, s) for k, s in enumerate(self.scales)]

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 images [..., H, W, 3] -> float32 block latents [..., N, C + 1]."""
        images = np.asarray(images)
        if images.shape[-3:] != self.image_shape:
            raise ValueError(f"expected images of shape [..., {self.image_shape}], got {images.shape}")
        lead = images.shape[:-3]
        flat = images.reshape((-1,) + self.image_shape).astype(np.uint8)
        out = run_chunked(self._fns[0], flat, self.batch_size)
        z = np.concatenate(out) if out else np.zeros((0, self.num_patches, self.patch_dim), np.float32)
        return z.reshape(*lead, self.num_patches, self.patch_dim)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Block latents [..., N, C + 1] -> uint8 images [..., H, W, 3], from the codes in column C."""
        latents = np.asarray(latents, np.float32)
        if latents.shape[-2:] != (self.num_patches, self.patch_dim):
            raise ValueError(f"expected latents [..., {self.num_patches}, {self.patch_dim}], got {latents.shape}")
        lead = latents.shape[:-2]
        codes = np.rint(latents.reshape(-1, self.num_patches, self.patch_dim)[:, :self.num_codes, -1]).astype(np.int32)
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"latents hold codes outside [0, {self.codebook_size}) in column {self.code_dim}")
        out = run_chunked(self._fns[1], codes, self.batch_size)
        x = np.concatenate(out) if out else np.zeros((0,) + self.image_shape, np.uint8)
        return x.reshape(*lead, *self.image_shape)

    def codes_to_latents(self, token_maps) -> np.ndarray:
        """Token maps [int [B, s_k, s_k]] (vq.encode's output) -> float32 block latents [B, N, C + 1]."""
        for k, (t, s) in enumerate(zip(token_maps, self.scales)):
            if np.shape(t)[1:] != (s, s):
                raise ValueError(f"token map {k} has shape {np.shape(t)}, expected [B, {s}, {s}]")
        if len(token_maps) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} token maps, got {len(token_maps)}")
        return np.asarray(self._fns[2]([jnp.asarray(t, jnp.int32) for t in token_maps]))
