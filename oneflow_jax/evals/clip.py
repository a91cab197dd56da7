"""CLIP score in JAX: a Flax Linen CLIP equal to Hugging Face `transformers.CLIPModel`, loaded from a checkpoint
directory in HF layout, and `ClipScorer`, which embeds batches of images and captions sharded over all local devices.

    scorer = ClipScorer.from_pretrained("/data/clip-vit-base-patch32")
    scores = scorer.score(images, captions)    # images: [n, H, W, 3] uint8 (or float in [0, 1]); one score per pair

CLIP score (torchmetrics `CLIPScore`, https://lightning.ai/docs/torchmetrics/stable/multimodal/clip_score.html) is
100 * max(cos(image_embedding, text_embedding), 0) per pair; a data set's CLIP score is the mean over its pairs. The
CLIPScore paper (Hessel et al. 2021, https://arxiv.org/abs/2104.08718) uses w * max(cos, 0) with w = 2.5 instead:
multiply ours by 0.025 for that. Only the embeddings of a batch are held, so callers stream any number of batches.

Checkpoint directory (e.g. `huggingface-cli download openai/clip-vit-base-patch32 --local-dir DIR`): `config.json`
(a `CLIPConfig`: text_config, vision_config, projection_dim), `model.safetensors` (or sharded with
`model.safetensors.index.json`; never pickle files) and `tokenizer.json` (read with the `tokenizers` library).

The network mirrors transformers' models/clip/modeling_clip.py: `CLIPTextTransformer` (token + position embeddings,
pre-LN encoder layers with a causal and padding mask, final LayerNorm, pooling at the end-of-text token),
`CLIPVisionTransformer` (patch conv without bias, class token, position embeddings, `pre_layrnorm` (sic), encoder,
`post_layernorm` on the class token) and `CLIPModel`'s bias-free projections and `logit_scale`. Flax module names equal
HF state-dict names with list indices joined by '_' (`encoder.layers.3` -> `encoder/layers_3`), so converting a
checkpoint is mechanical: linear [out, in] -> kernel [in, out], conv OIHW -> HWIO, LayerNorm weight -> scale.

Text: captions are tokenised with CLIP's BPE, wrapped in <|startoftext|> ... <|endoftext|>, truncated to the context
length (max_position_embeddings, 77) keeping the closing <|endoftext|> as OpenAI's `clip.tokenize(truncate=True)`
does (torchmetrics cuts the ids at 77 instead, dropping <|endoftext|> with a warning), and right-padded with
<|endoftext|> (HF's CLIP pad token) to the context length, so one compiled shape serves every batch.

Images: CLIP's preprocessing done in JAX, on device: bicubic resize of the shorter side to image_size, centre crop,
scale to [0, 1], normalise with CLIP's mean / std. The resize is `jax.image.resize(..., "bicubic")` (Keys a = -0.5 with
antialiasing when shrinking), not PIL's, and values are clipped but not rounded to uint8 in between, so inputs are close
to, but not bit-equal with, those of HF's `CLIPImageProcessor` (the test measures the difference).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from oneflow_jax.cli import UserError
from oneflow_jax.convert import safetensors_io

CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME, TOKENIZER_NAME = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)          # transformers.image_utils.OPENAI_CLIP_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)          # transformers.image_utils.OPENAI_CLIP_STD
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
_GET = "huggingface-cli download openai/clip-vit-base-patch32 --local-dir DIR on a machine with internet " \
       "(https://huggingface.co/openai/clip-vit-base-patch32)"


# ---------------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """One transformer tower (CLIPTextConfig or CLIPVisionConfig fields; defaults as in transformers). Text towers
    use vocab_size, max_position_embeddings and eos_token_id; vision towers image_size, patch_size, num_channels."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3


_TEXT_DEFAULTS = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    text: TowerConfig
    vision: TowerConfig
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_hf(cls, config: dict) -> "ClipConfig":
        """From a CLIPConfig config.json dict. As in CLIPConfig, `text_config_dict` / `vision_config_dict` (older
        files) override `text_config` / `vision_config`; missing fields take transformers' defaults."""
        names = {f.name for f in dataclasses.fields(TowerConfig)}

        def tower(kind, defaults):
            d = dict(config.get(f"{kind}_config") or {}, **(config.get(f"{kind}_config_dict") or {}))
            d = dict(defaults, **{k: v for k, v in d.items() if k in names and v is not None})
            for key in ("image_size", "patch_size"):                  # [n, n] is accepted by transformers too
                if isinstance(d.get(key), (list, tuple)):
                    if len(set(d[key])) != 1:
                        raise ValueError(f"{kind}_config.{key}={d[key]}: only square images / patches are supported")
                    d[key] = d[key][0]
            if not isinstance(d.get("eos_token_id", 0), int):
                raise ValueError(f"text_config.eos_token_id={d['eos_token_id']!r}: only a single id is supported")
            if d.get("hidden_act", "quick_gelu") not in _ACTIVATIONS:
                raise ValueError(f"{kind}_config.hidden_act={d['hidden_act']!r} is not one of {sorted(_ACTIVATIONS)}")
            return TowerConfig(**d)

        return cls(tower("text", _TEXT_DEFAULTS), tower("vision", _VISION_DEFAULTS),
                   config.get("projection_dim") or 512, config.get("logit_scale_init_value") or 2.6592)


# ---------------------------------------------------------------------------------------------------------- layers
_ACTIVATIONS = {                                          # transformers.activations.ACT2FN
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),                          # OpenAI CLIP
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),                            # torch's exact erf GELU
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _layer_norm(cfg: TowerConfig, name: str):
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, name=name)


class Attention(nn.Module):
    """CLIPAttention: q/k/v/out projections with bias, softmax(q k^T / sqrt(head_dim) + mask) v."""
    cfg: TowerConfig

    @nn.compact
    def __call__(self, x, bias=None):
        b, t, d = x.shape
        heads = self.cfg.num_attention_heads
        q, k, v = (nn.Dense(d, name=n)(x).reshape(b, t, heads, d // heads) for n in ("q_proj", "k_proj", "v_proj"))
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) * (d // heads) ** -0.5
        if bias is not None:
            logits = logits + bias
        out = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, axis=-1), v)
        return nn.Dense(d, name="out_proj")(out.reshape(b, t, d))


class MLP(nn.Module):
    """CLIPMLP: fc1, activation, fc2."""
    cfg: TowerConfig

    @nn.compact
    def __call__(self, x):
        h = _ACTIVATIONS[self.cfg.hidden_act](nn.Dense(self.cfg.intermediate_size, name="fc1")(x))
        return nn.Dense(self.cfg.hidden_size, name="fc2")(h)


class EncoderLayer(nn.Module):
    """CLIPEncoderLayer (pre-LN): x + attn(ln1(x)), then x + mlp(ln2(x))."""
    cfg: TowerConfig

    @nn.compact
    def __call__(self, x, bias=None):
        x = x + Attention(self.cfg, name="self_attn")(_layer_norm(self.cfg, "layer_norm1")(x), bias)
        return x + MLP(self.cfg, name="mlp")(_layer_norm(self.cfg, "layer_norm2")(x))


class Encoder(nn.Module):
    """CLIPEncoder: num_hidden_layers encoder layers."""
    cfg: TowerConfig

    @nn.compact
    def __call__(self, x, bias=None):
        for i in range(self.cfg.num_hidden_layers):
            x = EncoderLayer(self.cfg, name=f"layers_{i}")(x, bias)
        return x


class TextEmbeddings(nn.Module):
    """CLIPTextEmbeddings: token embedding + learned position embedding of positions 0..T-1."""
    cfg: TowerConfig

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.cfg
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding")(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embedding")
        return tokens + positions(jnp.arange(input_ids.shape[-1]))


def eos_positions(input_ids, eos_token_id: int):
    """Where CLIPTextTransformer pools: configs with the legacy eos_token_id == 2 (before transformers PR #24773) take
    the argmax of the ids (<|endoftext|> is CLIP's highest id), others the first position holding eos_token_id."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class TextTransformer(nn.Module):
    """CLIPTextTransformer -> pooled [B, hidden]: the final-LayerNorm state at the end-of-text token."""
    cfg: TowerConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        t = input_ids.shape[-1]
        x = TextEmbeddings(self.cfg, name="embeddings")(input_ids)
        # create_causal_mask: query i sees key j iff j <= i and key j is not padding; additive bias, dtype-min
        visible = jnp.tril(jnp.ones((t, t), bool))[None] & attention_mask.astype(bool)[:, None, :]
        bias = jnp.where(visible, 0.0, jnp.finfo(x.dtype).min)[:, None]               # [B, 1, T, T]
        x = Encoder(self.cfg, name="encoder")(x, bias)
        x = _layer_norm(self.cfg, "final_layer_norm")(x)
        return x[jnp.arange(x.shape[0]), eos_positions(input_ids, self.cfg.eos_token_id)]


class VisionEmbeddings(nn.Module):
    """CLIPVisionEmbeddings: non-overlapping patch conv (no bias), class token first, learned position embeddings."""
    cfg: TowerConfig

    @nn.compact
    def __call__(self, pixels):                                                       # [B, S, S, C], normalised
        cfg = self.cfg
        if pixels.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"pixels of shape {pixels.shape}, expected [B, {cfg.image_size}, {cfg.image_size}, C]")
        p = cfg.patch_size
        patches = nn.Conv(cfg.hidden_size, (p, p), (p, p), padding="VALID", use_bias=False,
                          name="patch_embedding")(pixels)
        patches = patches.reshape(pixels.shape[0], -1, cfg.hidden_size)              # row-major, as torch flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,))
        x = jnp.concatenate([jnp.broadcast_to(cls, (patches.shape[0], 1, cfg.hidden_size)), patches], axis=1)
        positions = nn.Embed(x.shape[1], cfg.hidden_size, name="position_embedding")
        return x + positions(jnp.arange(x.shape[1]))


class VisionTransformer(nn.Module):
    """CLIPVisionTransformer -> pooled [B, hidden]: post_layernorm of the class token."""
    cfg: TowerConfig

    @nn.compact
    def __call__(self, pixels):
        x = VisionEmbeddings(self.cfg, name="embeddings")(pixels)
        x = Encoder(self.cfg, name="encoder")(_layer_norm(self.cfg, "pre_layrnorm")(x))
        return _layer_norm(self.cfg, "post_layernorm")(x[:, 0])


class CLIP(nn.Module):
    """CLIPModel. `get_image_features(pixels)` / `get_text_features(ids, mask)` -> unnormalised projected embeddings
    [B, projection_dim]; `__call__` -> CLIPModel's logits_per_image [B_img, B_txt] (= logits_per_text transposed).
    pixels: preprocessed, NHWC [B, image_size, image_size, 3] (NCHW in transformers)."""
    cfg: ClipConfig

    def setup(self):
        self.text_model = TextTransformer(self.cfg.text)
        self.vision_model = VisionTransformer(self.cfg.vision)
        self.visual_projection = nn.Dense(self.cfg.projection_dim, use_bias=False)
        self.text_projection = nn.Dense(self.cfg.projection_dim, use_bias=False)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.cfg.logit_scale_init_value), ())

    def get_image_features(self, pixels):
        return self.visual_projection(self.vision_model(pixels))

    def get_text_features(self, input_ids, attention_mask):
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def __call__(self, pixels, input_ids, attention_mask):
        image, text = _normalize(self.get_image_features(pixels)), _normalize(self.get_text_features(input_ids,
                                                                                                      attention_mask))
        return jnp.exp(self.logit_scale) * image @ text.T


def _normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def clip_score(image_embeds, text_embeds) -> np.ndarray:
    """Per pair (row i with row i): 100 * max(cos(image, text), 0), torchmetrics' CLIP score. numpy in, numpy out."""
    image, text = np.asarray(image_embeds, np.float64), np.asarray(text_embeds, np.float64)
    cos = np.sum(image * text, axis=-1) / (np.linalg.norm(image, axis=-1) * np.linalg.norm(text, axis=-1))
    return (100.0 * np.maximum(cos, 0.0)).astype(np.float32)


# -------------------------------------------------------------------------------------------------- preprocessing
def resized_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """transformers.image_transforms.get_resize_output_image_size(default_to_square=False): the short side becomes
    `shortest_edge`, the long side int(shortest_edge * long / short) (truncated, as there)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def preprocess(images, image_size: int):
    """[B, H, W, 3] uint8 in 0..255 or float in [0, 1] -> CLIP pixels [B, image_size, image_size, 3] float32:
    bicubic resize of the shorter side (jax.image.resize, antialiased; clipped to [0, 1] as PIL's uint8 output is),
    centre crop with top = (h - size) // 2, left = (w - size) // 2 (transformers' center_crop), normalise."""
    x = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)
    b, h, w, c = x.shape
    new_h, new_w = resized_shape(h, w, image_size)
    if (new_h, new_w) != (h, w):
        x = jnp.clip(jax.image.resize(x, (b, new_h, new_w, c), method="bicubic"), 0.0, 1.0)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    x = x[:, top:top + image_size, left:left + image_size]
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


# ----------------------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(directory: str, context_length: int):
    """tokenizer.json as a `tokenizers.Tokenizer` that truncates to `context_length` (the post-processor's
    <|startoftext|> / <|endoftext|> included, so the closing token survives) and does not pad (`tokenize` pads)."""
    import tokenizers
    path = os.path.join(directory, TOKENIZER_NAME)
    if not os.path.exists(path):
        how = (f"write it with: python -c \"from transformers import AutoTokenizer as T; "
               f"T.from_pretrained('{directory}').save_pretrained('{directory}')\""
               if os.path.exists(os.path.join(directory, "vocab.json")) else f"get it with {_GET}")
        raise UserError(f"{path} not found: {how}")
    tokenizer = tokenizers.Tokenizer.from_file(path)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=context_length)
    return tokenizer


def tokenize(tokenizer, captions: list[str], context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """captions -> (input_ids, attention_mask), both int32 [n, context_length], right-padded with <|endoftext|>."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    if eos is None:
        raise UserError(f"the tokenizer has no {EOS_TOKEN} token: not a CLIP tokenizer.json")
    ids = np.full((len(captions), context_length), eos, np.int32)
    mask = np.zeros((len(captions), context_length), np.int32)
    for i, encoding in enumerate(tokenizer.encode_batch(list(captions))):
        n = len(encoding.ids)
        if not n or encoding.ids[-1] != eos:
            raise UserError(f"tokenizer.json does not end captions with {EOS_TOKEN} (its post_processor should add "
                            f"{BOS_TOKEN} / {EOS_TOKEN}): {captions[i]!r} -> {encoding.tokens}")
        ids[i, :n], mask[i, :n] = encoding.ids, 1
    return ids, mask


# ---------------------------------------------------------------------------------------------------- HF weights
def hf_name(path: tuple[str, ...]) -> str:
    """Flax param path -> HF state-dict name: ('text_model', 'encoder', 'layers_0', 'self_attn', 'q_proj', 'kernel')
    -> 'text_model.encoder.layers.0.self_attn.q_proj.weight'."""
    parts = [re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in path[:-1]]
    return ".".join(parts + ["weight" if path[-1] in ("kernel", "scale", "embedding") else path[-1]])


def _torch_shape(leaf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a Flax param in torch layout: dense kernels [in, out] are [out, in], conv HWIO is OIHW."""
    if leaf_name == "kernel":
        return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(reversed(shape))
    return tuple(shape)


def _dummy_inputs(cfg: ClipConfig):
    s = cfg.vision.image_size
    return (jax.ShapeDtypeStruct((1, s, s, cfg.vision.num_channels), jnp.float32),
            jax.ShapeDtypeStruct((1, 1), jnp.int32), jax.ShapeDtypeStruct((1, 1), jnp.int32))


def abstract_params(cfg: ClipConfig):
    return jax.eval_shape(lambda *x: CLIP(cfg).init(jax.random.key(0), *x), *_dummy_inputs(cfg))["params"]


def convert_hf_state(tensors, cfg: ClipConfig, source: str = "CLIP state") -> dict:
    """{HF CLIPModel name: array (torch layout)} -> Flax params (float32). Missing, unexpected or wrongly shaped tensors
    are reported by HF name; `*.position_ids` buffers (saved by older transformers) are ignored."""
    found = {k: v for k, v in tensors.items() if not k.endswith(".position_ids")}
    paths = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]:
        keys = tuple(k.key for k in path)
        paths[hf_name(keys)] = keys, _torch_shape(keys[-1], leaf.shape)
    safetensors_io.check_names_and_shapes({k: tuple(v.shape) for k, v in found.items()},
                                          {k: shape for k, (_, shape) in paths.items()}, source)
    params: dict = {}
    for name, (keys, _) in paths.items():
        x = np.array(found[name], np.float32)                      # a copy, no longer tied to the memory map
        if keys[-1] == "kernel":                                    # torch layout -> Flax layout
            x = np.ascontiguousarray(x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T)
        node = params
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = x
    return params


def load(directory: str):
    """(ClipConfig, params, tokenizers.Tokenizer) from a HF CLIP directory (config.json, model.safetensors or its
    sharded index, tokenizer.json). A missing directory or file is a one-line UserError naming it."""
    if not os.path.isdir(directory):
        raise UserError(f"CLIP checkpoint directory {directory} not found: get it with {_GET}")
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(config_path):
        raise UserError(f"{config_path} not found: expected a Hugging Face CLIPModel directory; get one with {_GET}")
    weights = [os.path.join(directory, n) for n in (WEIGHTS_NAME, INDEX_NAME)]
    if not any(os.path.exists(p) for p in weights):
        raise UserError(f"{weights[0]} not found (only safetensors are read, never .bin / pickle files): get it with "
                        f"{_GET}")
    with open(config_path) as f:
        cfg = ClipConfig.from_hf(json.load(f))
    tokenizer = load_tokenizer(directory, cfg.text.max_position_embeddings)
    tensors = safetensors_io.load_sharded(directory, WEIGHTS_NAME, INDEX_NAME)
    return cfg, convert_hf_state(tensors, cfg, source=directory), tokenizer


def init_params(cfg: ClipConfig, seed: int = 0):
    """Random weights (Flax init) for a CLIP of this architecture: for tests."""
    dummy = [jnp.zeros(x.shape, x.dtype) for x in _dummy_inputs(cfg)]
    return CLIP(cfg).init(jax.random.key(seed), *dummy)["params"]


# -------------------------------------------------------------------------------------------------------- scorer
class ClipScorer:
    """CLIP embeddings and scores, jitted and sharded over the batch across `devices` (default: all local devices;
    a 'data' mesh axis, params replicated). Inputs are cut into chunks of at most `batch_size`; a short chunk is padded
    to a multiple of the device count and the padding dropped. Each new image size (H, W) or chunk size compiles once.
    Matmuls run at `precision` ('highest': float32, no TF32 / bf16 passes on GPU and TPU)."""

    def __init__(self, cfg: ClipConfig, params, tokenizer, batch_size: int = 64, devices=None,
                 precision: str = "highest"):
        self.cfg, self.tokenizer, self.precision = cfg, tokenizer, precision
        devices = list(devices if devices is not None else jax.local_devices())
        self.mesh = Mesh(np.array(devices), ("data",))
        self.num_devices = len(devices)
        self.batch_size = -(-batch_size // self.num_devices) * self.num_devices
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        model, size = CLIP(cfg), cfg.vision.image_size
        self._image_fn = jax.jit(lambda p, x: model.apply({"params": p}, preprocess(x, size),
                                                          method=CLIP.get_image_features))
        self._text_fn = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask,
                                                                 method=CLIP.get_text_features))

    @classmethod
    def from_pretrained(cls, directory: str, **kwargs) -> "ClipScorer":
        """A scorer over a HF CLIP checkpoint directory (see `load`); kwargs as for the constructor."""
        cfg, params, tokenizer = load(directory)
        return cls(cfg, params, tokenizer, **kwargs)

    def _batched(self, fn, *arrays) -> np.ndarray:
        """fn(params, *chunk) over chunks of batch_size rows, each padded to the device multiple, sharded on 'data'."""
        n, out = len(arrays[0]), []
        for start in range(0, n, self.batch_size):
            chunk = [a[start:start + self.batch_size] for a in arrays]
            pad = -len(chunk[0]) % self.num_devices
            chunk = [np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else a for a in chunk]
            with jax.default_matmul_precision(self.precision):
                y = fn(self.params, *jax.device_put(chunk, self.batch_sharding))
            out.append(np.asarray(y)[:len(y) - pad])
        return np.concatenate(out) if out else np.zeros((0, self.cfg.projection_dim), np.float32)

    def image_embeddings(self, images) -> np.ndarray:
        """[n, H, W, 3] uint8 (0..255) or float (0..1) images, any H, W -> [n, projection_dim] float32: CLIPModel's
        get_image_features (projected, not normalised) of the CLIP-preprocessed images."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != self.cfg.vision.num_channels:
            raise ValueError(f"expected images [n, H, W, {self.cfg.vision.num_channels}], got shape {images.shape}")
        if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"expected uint8 images in 0..255 or float images in [0, 1], got dtype {images.dtype}")
        return self._batched(self._image_fn, images)

    def text_embeddings(self, captions) -> np.ndarray:
        """list of n strings -> [n, projection_dim] float32: get_text_features (projected, not normalised)."""
        if isinstance(captions, str):
            raise ValueError("expected a list of captions, got one string")
        ids, mask = tokenize(self.tokenizer, list(captions), self.cfg.text.max_position_embeddings)
        return self._batched(self._text_fn, ids, mask)

    def score(self, images, captions) -> np.ndarray:
        """CLIP score of each (images[i], captions[i]) pair: [n] float32, 100 * max(cos, 0) (see the module
        docstring; the mean over pairs is the data set's score)."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions: score pairs one to one")
        return clip_score(self.image_embeddings(images), self.text_embeddings(captions))
