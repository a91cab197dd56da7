"""A Flax AutoencoderKL that loads diffusers checkpoints (SD3 / FLUX VAE: 16 latent channels, scaling + shift), and
`VAECodec`, the image codec built on it (`codec.name = "vae"`).

Mirrors diffusers' `AutoencoderKL` (models/autoencoders/autoencoder_kl.py, vae.py `Encoder`/`Decoder`,
unet_2d_blocks `DownEncoderBlock2D`/`UpDecoderBlock2D`/`UNetMidBlock2D`, resnet `ResnetBlock2D`, the mid-block
single-head `Attention` with group norm and residual). Tensors are NHWC here (NCHW in diffusers).
Flax module names equal diffusers' state-dict names with list indices joined by '_' (`down_blocks.0.resnets.1` ->
`down_blocks_0/resnets_1`), so loading is mechanical: conv weights OIHW -> HWIO, linear [out, in] -> [in, out],
GroupNorm weight -> scale. Encoding returns the mean of the latent Gaussian; latents are normalised as in SD3/FLUX
pipelines: z = (mean - shift_factor) * scaling_factor, and decoding inverts that.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oneflow_jax.convert import safetensors_io
from oneflow_jax.models.codec import PatchGeometry, patchify, run_chunked, unpatchify

WEIGHTS_NAME, CONFIG_NAME = "diffusion_pytorch_model.safetensors", "config.json"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers AutoencoderKL config fields (defaults as there); only DownEncoderBlock2D / UpDecoderBlock2D blocks."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict) -> "VAEConfig":
        n = len(config.get("block_out_channels", (64,)))
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(t != kind for t in config.get(key, [kind] * n)):
                raise ValueError(f"unsupported {key} {config[key]} (only {kind})")
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"unsupported act_fn {config['act_fn']!r} (only silu)")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names and v is not None}
        kwargs["block_out_channels"] = tuple(kwargs.get("block_out_channels", (64,)))
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------- layers
def _conv(features, name, kernel=3, stride=1, padding=1):
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((padding, padding), (padding, padding)),
                   name=name)


def _group_norm(groups, name):
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D without time embedding: norm-silu-conv twice, 1x1 conv shortcut if channels change."""
    out_channels: int
    groups: int

    @nn.compact
    def __call__(self, x):
        h = _conv(self.out_channels, "conv1")(nn.silu(_group_norm(self.groups, "norm1")(x)))
        h = _conv(self.out_channels, "conv2")(nn.silu(_group_norm(self.groups, "norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, "conv_shortcut", kernel=1, padding=0)(x)
        return x + h


class AttentionBlock(nn.Module):
    """diffusers Attention as used by UNetMidBlock2D in VAEs: group norm, one head of width C, residual."""
    groups: int

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = _group_norm(self.groups, "group_norm")(x).reshape(b, h * w, c)
        q, k, v = (nn.Dense(c, name=n)(y) for n in ("to_q", "to_k", "to_v"))
        probs = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / np.sqrt(c), axis=-1)
        out = nn.Dense(c, name="to_out_0")(jnp.einsum("bqk,bkc->bqc", probs, v))
        return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """diffusers UNetMidBlock2D (one layer): resnet, attention, resnet."""
    channels: int
    groups: int
    add_attention: bool

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock2D(self.channels, self.groups, name="resnets_0")(x)
        if self.add_attention:
            x = AttentionBlock(self.groups, name="attentions_0")(x)
        return ResnetBlock2D(self.channels, self.groups, name="resnets_1")(x)


class Downsample(nn.Module):
    """diffusers Downsample2D(padding=0): pad right/bottom by one, 3x3 conv with stride 2."""
    channels: int

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, "conv", stride=2, padding=0)(x)


class Upsample(nn.Module):
    """diffusers Upsample2D: nearest-neighbour x2, 3x3 conv."""
    channels: int

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, "conv")(x)


class ResnetStage(nn.Module):
    """diffusers DownEncoderBlock2D (resample 'down': a strided-conv downsampler) or UpDecoderBlock2D ('up': a
    nearest-x2 + conv upsampler): `layers` resnets, then the resampler ('': none, the last block)."""
    channels: int
    groups: int
    layers: int
    resample: str

    @nn.compact
    def __call__(self, x):
        for j in range(self.layers):
            x = ResnetBlock2D(self.channels, self.groups, name=f"resnets_{j}")(x)
        if self.resample == "down":
            return Downsample(self.channels, name="downsamplers_0")(x)
        if self.resample == "up":
            return Upsample(self.channels, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """diffusers Encoder (double_z): conv_in, down blocks, mid block, GroupNorm-SiLU-conv_out to 2 x latent channels."""
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg, groups, n = self.cfg, self.cfg.norm_num_groups, len(self.cfg.block_out_channels)
        x = _conv(cfg.block_out_channels[0], "conv_in")(x)
        for i, ch in enumerate(cfg.block_out_channels):
            x = ResnetStage(ch, groups, cfg.layers_per_block, "down" if i < n - 1 else "", name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg.block_out_channels[-1], groups, cfg.mid_block_add_attention, name="mid_block")(x)
        x = nn.silu(_group_norm(groups, "conv_norm_out")(x))
        return _conv(2 * cfg.latent_channels, "conv_out")(x)


class Decoder(nn.Module):
    """diffusers Decoder: conv_in, mid block, up blocks (layers_per_block + 1 resnets each), GroupNorm-SiLU-conv_out."""
    cfg: VAEConfig

    @nn.compact
    def __call__(self, z):
        cfg, groups, n = self.cfg, self.cfg.norm_num_groups, len(self.cfg.block_out_channels)
        x = _conv(cfg.block_out_channels[-1], "conv_in")(z)
        x = MidBlock(cfg.block_out_channels[-1], groups, cfg.mid_block_add_attention, name="mid_block")(x)
        for i, ch in enumerate(reversed(cfg.block_out_channels)):
            x = ResnetStage(ch, groups, cfg.layers_per_block + 1, "up" if i < n - 1 else "", name=f"up_blocks_{i}")(x)
        x = nn.silu(_group_norm(groups, "conv_norm_out")(x))
        return _conv(cfg.out_channels, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """`encode(x)` -> latent mean [B, H/f, W/f, C] (unnormalised); `decode(z)` -> image [B, H, W, 3] in ~[-1, 1]."""
    cfg: VAEConfig

    def setup(self):
        cfg = self.cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, "quant_conv", kernel=1, padding=0)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, "post_quant_conv", kernel=1, padding=0)

    def encode(self, x):
        moments = self.encoder(x)
        if self.cfg.use_quant_conv:
            moments = self.quant_conv(moments)
        return moments[..., :self.cfg.latent_channels]          # DiagonalGaussianDistribution.mean

    def decode(self, z):
        if self.cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x):
        return self.decode(self.encode(x))


# ------------------------------------------------------------------------------------------------ diffusers weights
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def diffusers_name(path: tuple[str, ...]) -> str:
    """Flax param path -> diffusers state-dict name: ('decoder', 'up_blocks_0', 'resnets_1', 'conv1', 'kernel') ->
    'decoder.up_blocks.0.resnets.1.conv1.weight'."""
    parts = [p.rpartition("_")[0] + "." + p.rpartition("_")[2] if p.rpartition("_")[2].isdigit() and "_" in p else p
             for p in path[:-1]]
    return ".".join(parts + ["weight" if path[-1] in ("kernel", "scale") else path[-1]])


def _torch_shape(shape):
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(reversed(shape))


def _dummy(cfg: VAEConfig):
    return jnp.zeros((1, 2 * cfg.downsample_factor, 2 * cfg.downsample_factor, cfg.in_channels), jnp.float32)


def abstract_params(cfg: VAEConfig):
    return jax.eval_shape(lambda: AutoencoderKL(cfg).init(jax.random.key(0), _dummy(cfg)))["params"]


def convert_diffusers_state(tensors, cfg: VAEConfig, source: str = "diffusers state"):
    """{diffusers name: array (torch layout)} -> Flax params (float32). Every missing, unexpected or wrongly shaped
    tensor is reported by its diffusers name. Pre-0.14 attention names (query/key/value/proj_attn, possibly as 1x1
    convs) are accepted."""
    found = {}
    for name, value in tensors.items():
        *scope, leaf_module, leaf = name.split(".")
        leaf_module = _LEGACY_ATTENTION.get(leaf_module, leaf_module)
        name = ".".join(scope + [leaf_module, leaf])
        x = np.asarray(value)
        if x.ndim == 4 and ".attentions." in name:                            # 1x1-conv attention projections
            x = x[:, :, 0, 0]
        found[name] = x
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]
    paths = {diffusers_name(tuple(k.key for k in path)): (tuple(k.key for k in path), leaf.shape) for path, leaf in flat}
    safetensors_io.check_names_and_shapes({k: v.shape for k, v in found.items()},
                                          {k: _torch_shape(shape) for k, (_, shape) in paths.items()}, source)
    params: dict = {}
    for name, (path, _) in paths.items():
        x = found[name].astype(np.float32)
        x = x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T if x.ndim == 2 else x
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = x
    return params


def load_diffusers_vae(directory: str) -> tuple[VAEConfig, dict]:
    """(config, params) from a diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors),
    or a pipeline directory with a `vae/` subfolder (SD3, FLUX). safetensors only."""
    if not os.path.exists(os.path.join(directory, CONFIG_NAME)) and os.path.isdir(os.path.join(directory, "vae")):
        directory = os.path.join(directory, "vae")
    config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} (expected a diffusers AutoencoderKL directory)")
    if not os.path.exists(weights_path):
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME} (only safetensors checkpoints are supported)")
    with open(config_path) as f:
        cfg = VAEConfig.from_diffusers(json.load(f))
    tensors, _ = safetensors_io.load_file(weights_path)
    return cfg, convert_diffusers_state(tensors, cfg, source=weights_path)


def init_params(cfg: VAEConfig, seed: int = 0):
    """Random weights (Flax init) for a VAE of this architecture: for tests and the worked example."""
    return AutoencoderKL(cfg).init(jax.random.key(seed), _dummy(cfg))["params"]


def save_diffusers_vae(directory: str, cfg: VAEConfig, params) -> None:
    """Writes a diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors) that
    `load_diffusers_vae` and diffusers' `AutoencoderKL.from_pretrained` both read: the inverse of the loading map."""
    tensors = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        x = np.asarray(leaf, np.float32)
        tensors[diffusers_name(tuple(k.key for k in path))] = (x.transpose(3, 2, 0, 1) if x.ndim == 4
                                                                else x.T if x.ndim == 2 else x)
    n = len(cfg.block_out_channels)
    config = dict(dataclasses.asdict(cfg), _class_name="AutoencoderKL", act_fn="silu",
                  block_out_channels=list(cfg.block_out_channels), down_block_types=["DownEncoderBlock2D"] * n,
                  up_block_types=["UpDecoderBlock2D"] * n)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    safetensors_io.save_file(tensors, os.path.join(directory, WEIGHTS_NAME), {"format": "pt"})


# ------------------------------------------------------------------------------------------------------------ codec
class VAECodec(PatchGeometry):
    """uint8 images [..., H, W, 3] <-> normalised VAE latents cut into patch_size x patch_size patches,
    [..., num_patches, patch_dim] with patch_dim = patch_size^2 * latent_channels (row-major patches, values ordered
    (row, col, channel) as in codec.PixelPatchCodec). Runs jitted in fixed-size chunks of `batch_size` images.
    Copyable / picklable (params travel as numpy, the jitted functions are rebuilt), for data-loader workers.
    Without weights (`params=None`, codec.path unset) it is shape-only: geometry for aot and FLOP counts."""

    def __init__(self, vae_config: VAEConfig, params, image_size: int, patch_size: int = 2, batch_size: int = 8):
        stride = vae_config.downsample_factor * patch_size
        if image_size % stride:
            raise ValueError(f"image_size {image_size} is not a multiple of the VAE downsampling "
                             f"{vae_config.downsample_factor} x patch_size {patch_size}")
        self.vae_config, self.image_size, self.patch_size, self.batch_size = vae_config, image_size, patch_size, batch_size
        self.params = None if params is None else jax.tree_util.tree_map(np.asarray, params)

    @classmethod
    def from_config(cls, config) -> "VAECodec":
        """config: ConfigDict(name='vae', path=<diffusers VAE dir>, image_size, patch_size=2, batch_size=8, and
        optionally latent_channels / downsample_factor: checked against the weights, or, without a path, the
        geometry of a shape-only codec)."""
        get = (lambda k, d=None: getattr(config, k, d)) if dataclasses.is_dataclass(config) else config.get
        channels, down = get("latent_channels"), get("downsample_factor")
        if get("path"):
            vae_config, params = load_diffusers_vae(config.path)
            for field, ours, theirs in (("latent_channels", channels, vae_config.latent_channels),
                                        ("downsample_factor", down, vae_config.downsample_factor)):
                if ours is not None and ours != theirs:
                    raise ValueError(f"config.codec.{field}={ours} but the VAE at {config.path} has {theirs}")
        elif channels is None or down is None:
            raise ValueError("codec 'vae' needs codec.path (a diffusers AutoencoderKL directory), or "
                             "codec.latent_channels and codec.downsample_factor for a shape-only codec")
        else:
            levels = int(down).bit_length()        # downsample_factor = 2 ** (levels - 1)
            if 2 ** (levels - 1) != down:
                raise ValueError(f"codec.downsample_factor must be a power of two, got {down}")
            vae_config, params = VAEConfig(latent_channels=channels, block_out_channels=(0,) * levels), None
        return cls(vae_config, params, config.image_size, get("patch_size", 2), get("batch_size", 8))

    @property
    def downsample(self) -> int:
        return self.vae_config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.vae_config.latent_channels

    @property
    def image_channels(self) -> int:
        return self.vae_config.in_channels

    @functools.cached_property
    def _fns(self):
        if self.params is None:
            raise ValueError("this VAE codec has no weights (codec.path is not set): it only knows the latent geometry")
        model, cfg = AutoencoderKL(self.vae_config), self.vae_config
        encode = jax.jit(lambda p, x: (model.apply({"params": p}, x, method=AutoencoderKL.encode) - cfg.shift_factor)
                         * cfg.scaling_factor)
        decode = jax.jit(lambda p, z: model.apply({"params": p}, z / cfg.scaling_factor + cfg.shift_factor,
                                                  method=AutoencoderKL.decode))
        return encode, decode

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_fns", None)
        return state

    def _chunked(self, fn, x):
        out = run_chunked(lambda chunk: fn(self.params, chunk), x, self.batch_size)
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def encode_patches(self, params, images):
        """The jax function under `encode`: uint8 images [n, H, W, 3] -> latent patches [n, num_patches, patch_dim],
        for callers that jit and shard it themselves (the precompute, encoding inside the train step)."""
        z = self._fns[0](params, images.astype(jnp.float32) / 127.5 - 1.0)
        return patchify(z, self.patch_size)

    def encode(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.shape[-3:] != self.image_shape:
            raise ValueError(f"expected images of shape [..., {self.image_shape}], got {images.shape}")
        lead = images.shape[:-3]
        x = images.reshape((-1,) + self.image_shape).astype(np.float32) / 127.5 - 1.0
        z = self._chunked(self._fns[0], x)                                     # [N, h, w, C]
        return patchify(z, self.patch_size).reshape(*lead, self.num_patches, self.patch_dim)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        latents = np.asarray(latents, dtype=np.float32)
        if latents.shape[-2:] != (self.num_patches, self.patch_dim):
            raise ValueError(f"expected latents [..., {self.num_patches}, {self.patch_dim}], got {latents.shape}")
        lead = latents.shape[:-2]
        z = unpatchify(latents.reshape(-1, self.num_patches, self.patch_dim), self.grid, self.patch_size)
        x = self._chunked(self._fns[1], z)
        x = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
        return x.reshape(*lead, *self.image_shape)
