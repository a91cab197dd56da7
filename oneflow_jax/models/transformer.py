"""The OneFlow transformer: a Llama-3-style backbone over one sequence of text tokens and image-latent patches.

Read top to bottom: RMSNorm -> RoPE -> attention (GQA, bidirectional within a document) -> SwiGLU -> the scanned
block stack (`Backbone`) -> `OneFlowModel`, which embeds the mixed sequence and reads out the four heads:
  pi_logit  [B, L]     logit of P(no insertion in gap j) (reference §2)
  lam       [B, L]     Poisson rate lambda_j > 0 of the insertion count (softplus)
  q_logits  [B, L, V]  Q_j, the distribution of the token to insert (vocabulary incl. `<image>`)
  velocity  [B, L, D]  flow-matching velocity for every latent patch (reference §3); with image_prediction='x' the
                       head predicts the clean latents Y1 and velocity = (Y1_hat - Y_t) / (1 - t_img); the head is
                       linear, or a one-hidden-layer MLP with patch_head_hidden
Text time is *not* an input (paper ablation); each image's own t_img is, added to each of its patches.

Sharding: every parameter and activation names *logical* axes only ('embed', 'heads', 'activation_batch', ...);
`training/sharding.py` holds the one table that maps them onto mesh axes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oneflow_jax.objectives import flow_matching

Dtype = Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int | None = None       # default d_model // n_heads
    d_ff: int = 1024
    rope_theta: float = 10000.0
    # Llama 3.1/3.2 'llama3' RoPE frequency scaling: (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings), e.g. (32.0, 1.0, 4.0, 8192) for Llama 3.2; None = plain RoPE.
    rope_scaling: tuple[float, float, float, int] | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    num_patches: int = 64             # latent patches per image (codec)
    patch_dim: int = 48               # values per latent patch (codec)
    patch_grid: tuple[int, int] = (8, 8)
    time_embed_dim: int = 256
    dtype: str = "float32"            # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"               # 'none' | 'full' | 'dots' | 'dots_no_batch'
    attention_impl: str = "xla"       # jax.nn.dot_product_attention implementation: 'xla' | 'cudnn'
    scan_layers: bool = True
    image_prediction: str = "v"       # what patch_out predicts: 'v' the velocity, or 'x' the clean latents (below)
    cpu_dense_grads: bool = False     # Dense weight gradients from an explicitly transposed input (dense_matmul)
    patch_head_hidden: int = 0        # > 0: the patch head is an MLP, d_model -> this width (GELU) -> patch_dim
    image_vocab_size: int = 0         # NextFlow: classes of the image code head (the VQ codebook size, from the codec)

    def __post_init__(self):
        if self.image_prediction not in ("v", "x"):
            raise ValueError(f"image_prediction must be 'v' or 'x', got {self.image_prediction!r}")
        if self.d_model % self.n_heads and self.head_dim is None:
            raise ValueError(f"d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} not divisible by n_kv_heads {self.n_kv_heads}")
        if self.patch_head_hidden < 0:
            raise ValueError(f"patch_head_hidden must be >= 0 (0: a linear patch head), got {self.patch_head_hidden}")
        if self.patch_grid[0] * self.patch_grid[1] != self.num_patches:
            raise ValueError(f"patch_grid {self.patch_grid} does not hold num_patches {self.num_patches}")
        if self.rope_scaling is not None:       # a JSON / ConfigDict list becomes the hashable tuple
            object.__setattr__(self, "rope_scaling", _llama3_scaling(self.rope_scaling))

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


def dense_matmul(x, kernel, n_in: int):
    """x[..., *in] @ kernel[*in, *out]: the last n_in axes of x contract with the first n_in of kernel."""
    return jax.lax.dot_general(x, kernel, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense_matmul_transposed_grad(x, kernel, n_in: int):
    """dense_matmul with a hand-written backward for XLA:CPU (ModelConfig.cpu_dense_grads).

    The weight gradient is x^T @ g. Left to itself, XLA:CPU transposes g instead of x, inside the elementwise fusion
    that produces g (the SwiGLU or loss gradient), which runs several times slower than a plain copy: a SwiGLU MLP's
    backward took 2.4x longer. Here x^T is materialised first (an optimization barrier keeps XLA from moving the
    transpose), so g is read as it is. Same math; on TPU/GPU leave it off (an extra copy of every Dense input)."""
    return dense_matmul(x, kernel, n_in)


def _dense_fwd(x, kernel, n_in):
    return dense_matmul(x, kernel, n_in), (x, kernel)


def _dense_bwd(n_in, residuals, g):
    x, kernel = residuals
    n_out = kernel.ndim - n_in
    dx = jax.lax.dot_general(g, kernel, ((tuple(range(g.ndim - n_out, g.ndim)), tuple(range(n_in, kernel.ndim))),
                                         ((), ())))
    x_t = jax.lax.optimization_barrier(x.reshape(-1, math.prod(kernel.shape[:n_in])).T)
    dk = (x_t @ g.reshape(-1, math.prod(kernel.shape[n_in:]))).reshape(kernel.shape)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


dense_matmul_transposed_grad.defvjp(_dense_fwd, _dense_bwd)


class Dense(nn.Module):
    """x[..., *in] @ kernel[*in, *out] (+ bias) with a kernel that carries logical axis names `axes`.

    Like nn.DenseGeneral, but the kernel is initialised in its full shape (fan-in over the contracted axes), so
    logical sharding constraints see the real rank.
    """
    features: int | tuple[int, ...]
    axes: tuple
    cfg: ModelConfig
    contract: int = 1            # number of trailing input axes contracted
    use_bias: bool = False
    zero_init: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        out = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = x.shape[x.ndim - self.contract:]
        n_in = len(in_shape)
        init = (nn.initializers.zeros if self.zero_init else nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + len(out)))))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), in_shape + out, cfg.param_dtype)
        matmul = dense_matmul_transposed_grad if cfg.cpu_dense_grads else dense_matmul
        y = matmul(x.astype(cfg.dtype), kernel.astype(cfg.dtype), n_in)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[n_in:]), out,
                              cfg.param_dtype)
            y = y + bias.astype(cfg.dtype)
        return y


class RMSNorm(nn.Module):
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def _llama3_scaling(scaling) -> tuple[float, float, float, int]:
    """ModelConfig.rope_scaling validated and normalised to (factor, low_freq_factor, high_freq_factor, original_max)."""
    try:
        factor, low, high, original = scaling
    except (TypeError, ValueError):
        raise ValueError("rope_scaling must be (factor, low_freq_factor, high_freq_factor, "
                         f"original_max_position_embeddings) or None, got {scaling!r}") from None
    factor, low, high, original = float(factor), float(low), float(high), int(original)
    if not (factor > 0 and 0 < low < high and original > 0):
        raise ValueError(f"rope_scaling {scaling!r}: need factor > 0, 0 < low_freq_factor < high_freq_factor and "
                         "original_max_position_embeddings > 0")
    return factor, low, high, original


def rope_frequencies(half: int, theta: float, scaling=None):
    """[half] float32 inverse frequencies theta^(-i/half); with `scaling` (ModelConfig.rope_scaling) remapped as Llama
    3.1's 'llama3' RoPE (transformers' _compute_llama3_parameters, same float32 ops in the same order): wavelengths
    below original/high_freq_factor stay, those above original/low_freq_factor are divided by `factor`, and the band
    between interpolates smoothly."""
    freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    if scaling is None:
        return freq
    factor, low, high, original = scaling
    wavelen = 2 * math.pi / freq
    scaled = jnp.where(wavelen > original / low, freq / factor, freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x, positions, theta: float, scaling=None):
    """Rotary embedding, Llama 'rotate half' layout. x [B, L, H, Dh], positions [B, L]; `scaling` = ModelConfig's
    rope_scaling (None: plain RoPE)."""
    half = x.shape[-1] // 2
    freq = rope_frequencies(half, theta, scaling)
    angle = positions[..., None].astype(jnp.float32) * freq          # [B, L, half]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(segment_ids, causal: bool = False, block_ids=None):
    """[B, 1, L, L] boolean mask: same document (segment id > 0) and, if `causal`, k <= q except that positions
    sharing a non-zero `block_ids` value (one image block) see each other bidirectionally."""
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    if causal:
        length = segment_ids.shape[1]
        lower = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
        allowed = lower[None]
        if block_ids is not None:
            allowed = allowed | ((block_ids[:, :, None] == block_ids[:, None, :]) & (block_ids[:, None, :] > 0))
        same = same & allowed
    return same[:, None, :, :]


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, mask, positions, kv=None, write_pos=None):
        """kv: optional cache (k, v) [B, S, kv_heads, head_dim]. This chunk's keys/values are written at
        `write_pos` [B, C] (out-of-range = dropped), queries attend over the whole cache under `mask` [B, 1, C, S],
        and (out, new kv) is returned (the AR sampler's KV cache, reference §7)."""
        cfg = self.cfg
        hd = cfg.dim_per_head
        q = Dense((cfg.n_heads, hd), ("embed", "heads", "head_dim"), cfg, name="q")(x)
        k = Dense((cfg.n_kv_heads, hd), ("embed", "kv_heads", "head_dim"), cfg, name="k")(x)
        v = Dense((cfg.n_kv_heads, hd), ("embed", "kv_heads", "head_dim"), cfg, name="v")(x)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
        k = nn.with_logical_constraint(k, ("activation_batch", "activation_length", "activation_kv_heads", None))
        v = nn.with_logical_constraint(v, ("activation_batch", "activation_length", "activation_kv_heads", None))
        q = apply_rope(q, positions, cfg.rope_theta, cfg.rope_scaling)
        k = apply_rope(k, positions, cfg.rope_theta, cfg.rope_scaling)
        if kv is not None:
            rows = jnp.arange(x.shape[0])[:, None]
            k = kv[0].at[rows, write_pos].set(k.astype(kv[0].dtype), mode="drop")
            v = kv[1].at[rows, write_pos].set(v.astype(kv[1].dtype), mode="drop")
        out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                           implementation=cfg.attention_impl)
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
        out = Dense(cfg.d_model, ("heads", "head_dim", "embed"), cfg, contract=2, name="o")(out)
        return out if kv is None else (out, (k, v))


class MLP(nn.Module):
    """SwiGLU feed-forward."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = Dense(cfg.d_ff, ("embed", "mlp"), cfg, name="gate")(x)
        up = Dense(cfg.d_ff, ("embed", "mlp"), cfg, name="up")(x)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
        return Dense(cfg.d_model, ("mlp", "embed"), cfg, name="down")(h)


class Block(nn.Module):
    """Pre-norm transformer block; (carry, None) signature for nn.scan."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, mask, positions, kv=None, write_pos=None):
        """Returns (x, None), or (x, new kv) when given a KV cache (see Attention)."""
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        attn = Attention(cfg, name="attn")(norm("attn_norm")(x), mask, positions, kv, write_pos)
        attn, new_kv = attn if kv is not None else (attn, None)
        x = x + attn
        x = x + MLP(cfg, name="mlp")(norm("mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, new_kv


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Backbone(nn.Module):
    """n_layers blocks (under nn.scan unless cfg.scan_layers is False) and a final RMSNorm.

    With `cache` = (k, v), each [n_layers, B, S, kv_heads, head_dim], the chunk x [B, C] is written into it at
    `write_pos` and (h, new cache) is returned (KV-cached decoding for the AR baseline); otherwise h.
    """
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, mask, positions, cache=None, write_pos=None):
        cfg = self.cfg
        if cache is not None:
            return self._cached(x, mask, positions, cache, write_pos)
        block = Block
        if cfg.remat != "none":
            if cfg.remat not in _REMAT_POLICIES:
                raise ValueError(f"model.remat must be one of none/{'/'.join(_REMAT_POLICIES)}, got {cfg.remat!r}")
            block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(cfg, name="layers")(x, mask, positions)
        else:
            for i in range(cfg.n_layers):
                x, _ = block(cfg, name=f"layers_{i}")(x, mask, positions)
        return RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x)

    def _cached(self, x, mask, positions, cache, write_pos):
        cfg = self.cfg  # inference only: no remat; same parameter names as the training path
        if cfg.scan_layers:
            stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.n_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, new_cache = stack(cfg, name="layers")(x, mask, positions, cache, write_pos)
        else:
            ks, vs = [], []
            for i in range(cfg.n_layers):
                x, (k, v) = Block(cfg, name=f"layers_{i}")(x, mask, positions, (cache[0][i], cache[1][i]), write_pos)
                ks.append(k)
                vs.append(v)
            new_cache = (jnp.stack(ks), jnp.stack(vs))
        return RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x), new_cache


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000, as in DiT / Transfusion). t [...] -> [..., dim]."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (t.astype(jnp.float32) * 1000.0)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


OPTIONAL_INPUTS = ("patch_slots",)     # data.max_patches_per_row > 0 (packing.pack_rows)


def select_inputs(batch, names):
    """The model's inputs out of a training batch: `names`, plus the optional ones the batch has."""
    return {k: batch[k] for k in tuple(names) + OPTIONAL_INPUTS if k in names or k in batch}


def gather_slots(a, slots):
    """a [B, L, ...] at the positions `slots` [B, K] -> [B, K, ...]; an out-of-range slot (unused) reads zeros."""
    index = slots.reshape(slots.shape + (1,) * (a.ndim - 2))
    return jnp.take_along_axis(a, index, axis=1, mode="fill", fill_value=0)


def scatter_slots(a, values, slots):
    """a [B, L, ...] with values [B, K, ...] written at `slots` [B, K]; out-of-range slots are dropped."""
    return a.at[jnp.arange(a.shape[0])[:, None], slots].set(values.astype(a.dtype), mode="drop")


class MixedSequenceModel(nn.Module):
    """The input side shared by OneFlow and the AR baseline: one sequence of text tokens and image patches.

    Subclasses call `setup_inputs()` and `setup_patch_head()` in their `setup` (parameter names stay at the top
    level: embed, patch_in, time_mlp_in/out, patch_row/col_embed, patch_hidden, patch_out), embed a batch with
    `embed_inputs` and read velocities with `image_velocity`. A batch may carry `patch_slots` [B, K] (packing.
    pack_rows: each row's patch positions, then out-of-range fillers): the image parts (patch-in, the t_img MLP, the
    patch head) then run at those K positions instead of all L, which on a text-heavy row with wide pixel patches is
    a large share of the step (docs/results.md); the result is the same.
    """
    cfg: ModelConfig

    def setup_inputs(self):
        cfg = self.cfg
        self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                          ("vocab", "embed")))
        self.patch_in = Dense(cfg.d_model, ("patch", "embed"), cfg, use_bias=True)
        self.time_mlp_in = Dense(cfg.d_model, ("time", "embed"), cfg, use_bias=True)
        self.time_mlp_out = Dense(cfg.d_model, ("embed", "embed_out"), cfg, use_bias=True)
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("patch_grid", "embed"))
        self.row_embed = self.param("patch_row_embed", init, (cfg.patch_grid[0], cfg.d_model), cfg.param_dtype)
        self.col_embed = self.param("patch_col_embed", init, (cfg.patch_grid[1], cfg.d_model), cfg.param_dtype)

    def setup_patch_head(self):
        """patch_out: d_model -> patch_dim, linear; with cfg.patch_head_hidden an MLP through patch_hidden. A linear
        head writes every patch in one d_model-dimensional subspace: with d_model 128 against 768 pixel values per
        patch the tiny model drew squares with soft corners, and the MLP head raised its generation accuracy
        (docs/results.md)."""
        cfg = self.cfg
        if cfg.patch_head_hidden:
            self.patch_hidden = Dense(cfg.patch_head_hidden, ("embed", "mlp"), cfg, use_bias=True)
        self.patch_out = Dense(cfg.patch_dim, ("mlp" if cfg.patch_head_hidden else "embed", "patch"), cfg,
                               use_bias=True, zero_init=True)

    @staticmethod
    def patch_slots(batch):
        """batch['patch_slots'] with every slot that is not a patch position (a filler, or a zero-padded row) moved
        out of range, so only patch positions are ever written; None when the batch has none."""
        slots = batch.get("patch_slots")
        if slots is None:
            return None
        return jnp.where(gather_slots(batch["is_patch"], slots), slots, batch["is_patch"].shape[1])

    def embed_inputs(self, batch):
        """Token embeddings on text positions; patch-in + t_img embedding + 2-D position on patch positions."""
        cfg = self.cfg
        tok = self.embed(batch["tokens"])
        slots = self.patch_slots(batch)
        at = (lambda a: a) if slots is None else functools.partial(gather_slots, slots=slots)
        t_emb = self.time_mlp_out(nn.silu(self.time_mlp_in(timestep_embedding(at(batch["patch_t"]),
                                                                               cfg.time_embed_dim))))
        idx = at(batch["patch_index"])
        pos2d = (jnp.take(self.row_embed, idx // cfg.patch_grid[1], axis=0)
                 + jnp.take(self.col_embed, idx % cfg.patch_grid[1], axis=0)).astype(cfg.dtype)
        img = self.patch_in(at(batch["patches"]).astype(cfg.dtype)) + t_emb + pos2d
        if slots is None:
            x = jnp.where(batch["is_patch"][..., None], img, tok)
        else:
            x = scatter_slots(tok, img, slots)
        return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

    def image_velocity(self, h, batch):
        """The flow-matching velocity v = dY/dt on patch positions (reference §3); with `patch_slots` in the batch
        computed only there (zero elsewhere).

        image_prediction='x' (JiT, arXiv 2511.13720): patch_out predicts the clean latents, which are far simpler than
        noise-carrying velocities for high-dimensional pixel patches, and v = (Y1_hat - Y_t) / (1 - t_img), the exact
        velocity of the straight path through Y_t; 1 - t is clipped at flow_matching.MIN_GAP.
        """
        slots = self.patch_slots(batch)
        at = (lambda a: a) if slots is None else functools.partial(gather_slots, slots=slots)
        h = at(h)
        if self.cfg.patch_head_hidden:
            h = nn.gelu(self.patch_hidden(h))
        v = self.patch_out(h)
        if self.cfg.image_prediction == "x":
            gap = jnp.maximum(1.0 - at(batch["patch_t"]).astype(jnp.float32), flow_matching.MIN_GAP)[..., None]
            v = ((v.astype(jnp.float32) - at(batch["patches"]).astype(jnp.float32)) / gap).astype(v.dtype)
        if slots is None:
            return v
        return scatter_slots(jnp.zeros(batch["is_patch"].shape + v.shape[-1:], v.dtype), v, slots)

    def token_logits(self, h):
        cfg = self.cfg
        q_logits = self.embed.attend(h) if cfg.tie_embeddings else self.token_head(h)
        return nn.with_logical_constraint(q_logits, ("activation_batch", "activation_length", "activation_vocab"))


class OneFlowModel(MixedSequenceModel):
    """Embeds text tokens and image patches into one sequence and returns the OneFlow heads.

    Inputs (all [B, L] unless noted): tokens, is_patch, patch_index (0..num_patches-1), patches [B, L, D] (noisy
    latents Y_t), patch_t (t_img of the patch's image), segment_ids (0 = padding), positions (RoPE index);
    optionally patch_slots [B, K] (MixedSequenceModel).
    """

    def setup(self):
        cfg = self.cfg
        self.setup_inputs()
        self.backbone = Backbone(cfg)
        self.insert_head = Dense(2, ("embed", None), cfg, use_bias=True)  # (pi_logit, lambda_raw)
        if not cfg.tie_embeddings:
            self.token_head = Dense(cfg.vocab_size, ("embed", "vocab"), cfg)
        self.setup_patch_head()

    def __call__(self, batch):
        x = self.embed_inputs(batch)
        h = self.backbone(x, attention_mask(batch["segment_ids"]), batch["positions"])
        ins = self.insert_head(h).astype(jnp.float32)
        return dict(pi_logit=ins[..., 0], lam=jax.nn.softplus(ins[..., 1]), q_logits=self.token_logits(h),
                    velocity=self.image_velocity(h, batch))


def dummy_batch(cfg: ModelConfig, batch_size: int = 1, seq_len: int = 16):
    """A zero batch of the model's input structure, for init and eval_shape."""
    z = lambda dtype, *shape: jnp.zeros((batch_size, seq_len) + shape, dtype)
    return dict(tokens=z(jnp.int32), is_patch=z(jnp.bool_), patch_index=z(jnp.int32),
                patches=z(jnp.float32, cfg.patch_dim), patch_t=z(jnp.float32), segment_ids=z(jnp.int32) + 1,
                positions=jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch_size, seq_len)))
