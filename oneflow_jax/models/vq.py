"""A multi-scale residual VQ image tokenizer: VAR's scheme (Tian et al. 2024, arXiv 2404.02905, Sec. 3.2, Alg. 1-2),
the image half of the NextFlow-style baseline (reference §7).

An image x [B, 32, 32, 3] is encoded by a small conv encoder E to features f = E(x) [B, h, w, C] (h = w = 32 /
downsample = 8 for shapes-world, C = code_dim). VAR's Alg. 1 quantises f into K token maps r_1..r_K, one per scale
s_k in `scales` (e.g. 1, 2, 4, 8; the last equals the feature size), with ONE codebook Z [V, C] shared by all scales:

    f_rest = f;  f_hat = 0
    for k = 1..K:
        r_k  = argmin_v || down(f_rest, s_k) - Z_v ||^2          nearest code, plain L2 (as VAR: no l2-normalised
                                                                 lookup; shapes-world's codes trained well without it)
        h_k  = phi_k(up(Z[r_k], h))                              up: bicubic resize (none at the last scale)
        f_hat += h_k;  f_rest -= h_k
    x_hat = D(f_hat)                                             a conv decoder D back to pixels

`down` and `up` are torch's area and bicubic (A = -0.75) interpolation, as VAR calls them, written as [out, in]
matrices applied to rows and columns (exact for any sizes). phi_k is VAR's refinement: phi(z) = (1 - m) z +
m conv3x3(z), m = `phi_mix` = 0.5, with `num_phi` convs shared across scales by VAR's rule (scale k uses the phi
whose tick in linspace(1/3n, 1 - 1/3n, n) is nearest to k / (K - 1)); the default 2 shares one phi between scales
1, 2 and one between 4, 8. Alg. 2 (decoding) is the same loop without the argmin: `fhat_from_tokens`.

Training (VAR's quant.py): the decoder reads f + sg(f_hat - f) (straight-through: gradients reach E as if
quantisation were the identity), and the loss is
    L = ||x_hat - x||^2 + (1 / K) sum_k [ ||f_hat_k - sg(f)||^2 + beta ||sg(f_hat_k) - f||^2 ],  beta = 0.25,
with f_hat_k the running reconstruction after scale k: the first term trains Z and the phis, the second (commitment)
E. `codebook_update='ema'` instead moves each code to an EMA of the residuals down(f_rest, s_k) assigned to it (Z
gets no gradient; the first term still trains the phis). 'ema' is the default: on shapes-world it reconstructs as well
as VAR's 'loss' and uses the codebook about twice as evenly (one seed each; docs/results.md, "VQ tokenizer").

Dead codes: the train step counts code hits over a window of `restart_every` steps; at the window's end every code
with no hit is restarted from a random vector the quantiser just saw (down(f_rest, s_k) over the batch and scales).

Public API (arrays are numpy or jax; B images; s_k = scales[k]; C = code_dim):
    encode(cfg, params, images uint8 [B, H, W, 3])  -> [int32 [B, s_k, s_k] for k in 0..K-1]
    decode(cfg, params, token_maps)                 -> uint8 [B, H, W, 3]; given the first n < K maps, it decodes
        their f_hat only (the decoder is trained on all K: such prefixes decode blurred and off-colour)
    fhat_from_tokens(cfg, params, token_maps)       -> float32 [B, h, w, C], the decoder-independent f_hat
    next_scale_inputs(cfg, params, token_maps)      -> [float32 [B, s_{k+1}^2, C] for k in 0..min(n, K-1)-1]
        VAR's teacher-forcing inputs: f_hat after scales 0..k, area-downsampled to scale k+1's size, row-major
        (what the AR model reads to predict r_{k+1}; n = len(token_maps), so a prefix gives the inputs it implies)
    init_params(cfg, seed), load_tokenizer(workdir) -> (VQConfig, params)
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class VQConfig:
    image_size: int = 32
    channels: tuple[int, ...] = (16, 32, 64)   # conv widths per resolution level: 32 px, 16 px, 8 px
    downsample: int = 4                        # image_size / feature size; 2 ** (len(channels) - 1)
    code_dim: int = 16                         # C, the width of f and of every code
    codebook_size: int = 256                   # V, one codebook shared by all scales
    scales: tuple[int, ...] = (1, 2, 4, 8)     # token-map sides, coarse to fine; the last = image_size / downsample
    beta: float = 0.25                         # commitment weight
    codebook_update: str = "ema"               # 'ema' (EMA of the assigned residuals) | 'loss' (codebook term of L)
    ema_decay: float = 0.99                    # codebook_update='ema' only
    num_phi: int = 2                           # refinement convs shared across scales (VAR: 4 for 10 scales)
    phi_mix: float = 0.5                       # phi(z) = (1 - phi_mix) z + phi_mix conv(z) (VAR's quant_resi)
    restart_every: int = 100                   # dead-code window in steps (0: never restart)

    @property
    def feature_size(self) -> int:
        return self.image_size // self.downsample

    @classmethod
    def from_dict(cls, fields) -> "VQConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        fields = dict(fields)
        for key in ("channels", "scales"):
            if key in fields:
                fields[key] = tuple(int(v) for v in fields[key])
        return cls(**fields).validate()

    def validate(self) -> "VQConfig":
        """Raises ValueError naming the first inconsistent field."""
        levels = len(self.channels) - 1
        if self.downsample < 1 or self.downsample != 2 ** levels:
            raise ValueError(f"downsample={self.downsample} must be 2 ** (len(channels) - 1) = {2 ** levels}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size={self.image_size} is not a multiple of downsample={self.downsample}")
        if not self.scales or list(self.scales) != sorted(set(self.scales)) or self.scales[0] < 1:
            raise ValueError(f"scales={self.scales} must be increasing positive sizes")
        if self.scales[-1] != self.feature_size:
            raise ValueError(f"scales={self.scales} must end at the feature size image_size / downsample = "
                             f"{self.feature_size}")
        if not 1 <= self.num_phi <= len(self.scales):
            raise ValueError(f"num_phi={self.num_phi} must be in [1, len(scales) = {len(self.scales)}]")
        if self.codebook_update not in ("loss", "ema"):
            raise ValueError(f"codebook_update={self.codebook_update!r} must be 'loss' or 'ema'")
        if min(self.channels) < 1 or self.code_dim < 1 or self.codebook_size < 2:
            raise ValueError("channels and code_dim must be >= 1 and codebook_size >= 2")
        return self


# ---------------------------------------------------------------------------------------------------- resizing
def _area_matrix(out: int, size: int) -> np.ndarray:
    """[out, size] rows averaging size -> out like torch's area interpolation (adaptive average pooling)."""
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        lo, hi = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def _separable(x, m: np.ndarray):
    """[B, H, H, C] -> [B, n, n, C]: the [n, H] matrix m applied to rows and columns (the identity when n == H)."""
    return x if m.shape[0] == x.shape[1] else jnp.einsum("ih,bhwc,jw->bijc", jnp.asarray(m), x, jnp.asarray(m))


def area_down(x, s: int):
    """[B, H, W, C] -> [B, s, s, C] by area averaging (the identity when s == H)."""
    return _separable(x, _area_matrix(s, x.shape[1]))


def _cubic_matrix(size: int, s: int, a: float = -0.75) -> np.ndarray:
    """[size, s] rows of torch's bicubic upsampling (align_corners=False, A = -0.75, borders replicated)."""
    def w(d):
        d = abs(d)
        return ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    m = np.zeros((size, s), np.float32)
    for i in range(size):
        src = (i + 0.5) * s / size - 0.5
        x0 = math.floor(src)
        for j in range(-1, 3):
            m[i, min(max(x0 + j, 0), s - 1)] += w(src - (x0 + j))
    return m


def cubic_up(x, size: int):
    """[B, s, s, C] -> [B, size, size, C], bicubic as torch's F.interpolate (the identity when s == size)."""
    return _separable(x, _cubic_matrix(size, x.shape[1]))


def phi_index(k: int, num_scales: int, num_phi: int) -> int:
    """VAR's PhiPartiallyShared: the phi whose tick in linspace(1/3n, 1-1/3n, n) is nearest to k / (K - 1)."""
    ticks = np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
    return int(np.argmin(np.abs(ticks - k / max(num_scales - 1, 1))))


# ------------------------------------------------------------------------------------------------------- layers
def _conv(features, name=None, stride=1):
    return nn.Conv(features, (3, 3), (stride, stride), padding=1, name=name)


def _norm(channels):
    return nn.GroupNorm(num_groups=math.gcd(8, channels))


class ResBlock(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x):
        h = _conv(self.channels)(nn.silu(_norm(x.shape[-1])(x)))
        h = _conv(self.channels)(nn.silu(_norm(self.channels)(h)))
        if x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1))(x)
        return x + h


class Encoder(nn.Module):
    """Pixels in [-1, 1] [B, H, W, 3] -> f [B, H / downsample, W / downsample, code_dim]."""
    cfg: VQConfig

    @nn.compact
    def __call__(self, x):
        ch = self.cfg.channels
        x = _conv(ch[0])(x)
        for i, c in enumerate(ch):
            x = ResBlock(c)(x)
            if i + 1 < len(ch):
                x = _conv(ch[i + 1], stride=2)(x)                 # halve the resolution
        x = ResBlock(ch[-1])(x)
        return nn.Conv(self.cfg.code_dim, (1, 1))(nn.silu(_norm(ch[-1])(x)))


class Decoder(nn.Module):
    """f_hat [B, h, w, code_dim] -> pixels in [-1, 1] (unclipped) [B, H, W, 3]; the encoder mirrored."""
    cfg: VQConfig

    @nn.compact
    def __call__(self, z):
        ch = self.cfg.channels[::-1]
        x = _conv(ch[0])(z)
        x = ResBlock(ch[0])(x)
        for i, c in enumerate(ch):
            x = ResBlock(c)(x)
            if i + 1 < len(ch):
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)   # nearest x2, then a conv
                x = _conv(ch[i + 1])(x)
        return _conv(3)(nn.silu(_norm(ch[-1])(x)))


class Phi(nn.Module):
    """VAR's refinement of an upsampled code map: (1 - mix) z + mix conv3x3(z)."""
    mix: float

    @nn.compact
    def __call__(self, z):
        return (1 - self.mix) * z + self.mix * _conv(z.shape[-1])(z)


class VQModel(nn.Module):
    """Encoder, the multi-scale residual quantiser (codebook + phis) and decoder. Call it for training; the other
    methods (through `apply(..., method=...)`) back the public functions below."""
    cfg: VQConfig

    def setup(self):
        cfg = self.cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.codebook = self.param("codebook", nn.initializers.uniform(2 / cfg.codebook_size),
                                   (cfg.codebook_size, cfg.code_dim))
        self.phis = [Phi(cfg.phi_mix) for _ in range(cfg.num_phi)]

    def _codes(self):
        return sg(self.codebook) if self.cfg.codebook_update == "ema" else self.codebook

    def embed(self, k: int, tokens):
        """h_k = phi(up(Z[r_k])): token map k [B, s_k, s_k] -> its contribution to f_hat [B, h, w, C]."""
        cfg = self.cfg
        up = cubic_up(self._codes()[tokens], cfg.feature_size)
        return self.phis[phi_index(k, len(cfg.scales), cfg.num_phi)](up)

    def quantise(self, f):
        """VAR Alg. 1 on features f [B, h, w, C] -> (token maps, f_hat, aux: vq_loss, hits [V], inputs [N, C])."""
        cfg = self.cfg
        codebook = sg(self.codebook)
        f_rest, f_hat = sg(f), jnp.zeros_like(f)
        tokens, inputs, vq_loss = [], [], 0.0
        for k, s in enumerate(cfg.scales):
            r = area_down(f_rest, s).reshape(-1, cfg.code_dim)           # [B s s, C]
            d = jnp.sum(r * r, 1, keepdims=True) - 2 * r @ codebook.T + jnp.sum(codebook ** 2, 1)
            idx = jnp.argmin(d, axis=1).reshape(f.shape[0], s, s).astype(jnp.int32)
            h = self.embed(k, idx)
            f_hat = f_hat + h
            f_rest = f_rest - sg(h)
            vq_loss += jnp.mean((f_hat - sg(f)) ** 2) + cfg.beta * jnp.mean((sg(f_hat) - f) ** 2)
            tokens.append(idx)
            inputs.append(r)
        if self.is_initializing():                                        # every phi gets its parameters
            for phi in self.phis:
                phi(f_hat)
        inputs = jnp.concatenate(inputs)
        hits = jnp.concatenate([t.reshape(-1) for t in tokens])
        aux = dict(vq_loss=vq_loss / len(cfg.scales), inputs=inputs,
                   hits=jnp.bincount(hits, length=cfg.codebook_size),
                   assigned_sum=jax.ops.segment_sum(inputs, hits, cfg.codebook_size))  # for the EMA update
        return tokens, f_hat, aux

    def __call__(self, x):
        """Pixels in [-1, 1] -> (reconstruction, aux with the tokens); the decoder reads f + sg(f_hat - f)."""
        f = self.encoder(x)
        tokens, f_hat, aux = self.quantise(f)
        return self.decoder(f + sg(f_hat - f)), dict(aux, tokens=tokens, f_hat=f_hat)

    def encode(self, x):
        return self.quantise(self.encoder(x))[0]

    def fhat_from_tokens(self, token_maps):
        """VAR Alg. 2's f_hat: sum of h_k over the given (first n) token maps."""
        f_hat = 0.0
        for k, t in enumerate(token_maps):
            f_hat = f_hat + self.embed(k, t)
        return f_hat

    def decode(self, token_maps):
        return self.decoder(self.fhat_from_tokens(token_maps))

    def next_scale_inputs(self, token_maps):
        scales, out, f_hat = self.cfg.scales, [], 0.0
        for k, t in enumerate(token_maps[:len(scales) - 1]):
            f_hat = f_hat + self.embed(k, t)
            nxt = area_down(f_hat, scales[k + 1])
            out.append(nxt.reshape(nxt.shape[0], -1, nxt.shape[-1]))
        return out


# ----------------------------------------------------------------------------------------------- public functions
def to_float(images):
    """uint8 [B, H, W, 3] -> float32 in [-1, 1]."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def to_uint8(x):
    """[-1, 1] floats -> uint8 (rounded, clipped)."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def init_params(cfg: VQConfig, seed: int = 0):
    """Fresh params. The 'rbg' key compiles ~5x faster than threefry on CPU (its bits may differ across backends)."""
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    return _init(cfg, jax.random.key(seed, impl="rbg"), x)


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg, key, x):
    return VQModel(cfg).init(key, x)["params"]


def _check_maps(cfg: VQConfig, token_maps):
    if not 1 <= len(token_maps) <= len(cfg.scales):
        raise ValueError(f"expected 1..{len(cfg.scales)} token maps, got {len(token_maps)}")
    for k, t in enumerate(token_maps):
        if t.shape[1:] != (cfg.scales[k], cfg.scales[k]):
            raise ValueError(f"token map {k} has shape {t.shape}, expected [B, {cfg.scales[k]}, {cfg.scales[k]}]")


@functools.partial(jax.jit, static_argnums=0)
def encode(cfg: VQConfig, params, images):
    """uint8 images [B, H, W, 3] -> token maps [int32 [B, s, s] for s in cfg.scales]."""
    return VQModel(cfg).apply({"params": params}, to_float(images), method=VQModel.encode)


def fhat_from_tokens(cfg: VQConfig, params, token_maps):
    _check_maps(cfg, token_maps)
    return _fhat(cfg, params, list(token_maps))


@functools.partial(jax.jit, static_argnums=0)
def _fhat(cfg, params, token_maps):
    return VQModel(cfg).apply({"params": params}, token_maps, method=VQModel.fhat_from_tokens)


def decode(cfg: VQConfig, params, token_maps):
    """Token maps (all, or the first n: a coarser image) -> uint8 images [B, H, W, 3]."""
    _check_maps(cfg, token_maps)
    return _decode(cfg, params, list(token_maps))


@functools.partial(jax.jit, static_argnums=0)
def _decode(cfg, params, token_maps):
    return to_uint8(VQModel(cfg).apply({"params": params}, token_maps, method=VQModel.decode))


def next_scale_inputs(cfg: VQConfig, params, token_maps):
    """Token maps (n of them) -> min(n, K - 1) teacher-forcing inputs [B, s_{k+1}^2, C]; input k reads maps 0..k."""
    _check_maps(cfg, token_maps)
    return _next_inputs(cfg, params, list(token_maps))


@functools.partial(jax.jit, static_argnums=0)
def _next_inputs(cfg, params, token_maps):
    return VQModel(cfg).apply({"params": params}, token_maps, method=VQModel.next_scale_inputs)


def load_tokenizer(workdir: str):
    """A train_vq run's (VQConfig, params) from W/config.json and W's latest checkpoint."""
    from oneflow_jax.training import checkpointing   # pylint: disable=g-import-not-at-top  (Orbax only when loading)
    cfg = VQConfig.from_dict(checkpointing.load_config(workdir).vq.to_dict())
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            jax.eval_shape(functools.partial(init_params, cfg)))
    with checkpointing.Checkpointer(workdir, keep=1) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
        state, _, _ = ckpt.restore({"params": abstract}, partial=True)
    return cfg, state["params"]
