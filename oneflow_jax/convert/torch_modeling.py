"""OneFlow in pure PyTorch: the same forward as oneflow_jax/models/transformer.py (OneFlowModel), for exported checkpoints.

This file is copied verbatim into every export directory as `modeling_oneflow.py`; it imports torch and the Python
standard library only (no JAX, numpy or safetensors package), so an export runs anywhere torch does:

    from modeling_oneflow import OneFlowModel
    model = OneFlowModel.from_pretrained("export_dir")          # reads config.json + model.safetensors
    out = model(tokens=..., is_patch=..., patch_index=..., patches=..., patch_t=..., segment_ids=..., positions=...)
    out["pi_logit"], out["lam"], out["q_logits"], out["velocity"]

Every op mirrors models/transformer.py, including where it computes in float32 (RMSNorm, RoPE, attention logits and softmax, the
timestep embedding) and where it casts back to the compute dtype, so bfloat16 exports track JAX closely too.
`python parity_check.py` (written next to this file) recomputes the outputs stored in parity_inputs.safetensors.
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PARITY_INPUTS_NAME = "parity_inputs.safetensors"
X_PREDICTION_MIN_GAP = 0.05     # flow_matching.MIN_GAP: 1 - t_img is clipped here for image_prediction="x"
INPUT_NAMES = ("tokens", "is_patch", "patch_index", "patches", "patch_t", "segment_ids", "positions")
OUTPUT_NAMES = ("pi_logit", "lam", "q_logits", "velocity")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


# ----------------------------------------------------------------------------------------------- safetensors (no pickle)
def load_safetensors(path):
    """Reads a safetensors file into {name: tensor} (+ its string metadata), one aligned buffer per tensor; errors
    name the tensor when the file is truncated or a byte range disagrees with the tensor's dtype and shape."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file or truncated header ({size} bytes)")
        header = json.loads(f.read(n).decode("utf-8"))
        metadata = header.pop("__metadata__", None) or {}
        start, data_size = 8 + n, size - 8 - n
        tensors = {}
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if entry["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']!r}")
            dtype, shape = _ST_DTYPES[entry["dtype"]], entry["shape"]
            begin, end = entry["data_offsets"]
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes:
                raise ValueError(f"{path}: tensor {name!r} ({entry['dtype']} {shape}) should take {nbytes} bytes, "
                                 f"its offsets span {end - begin}")
            if end > data_size:
                raise ValueError(f"{path}: file truncated: tensor {name!r} needs data bytes {begin}..{end}, the "
                                 f"data section holds {data_size}")
            f.seek(start + begin)
            buf = bytearray(f.read(nbytes))
            tensors[name] = (torch.frombuffer(buf, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)).reshape(shape)
    return tensors, metadata


# ------------------------------------------------------------------------------------------------------------ layers
class OneFlowConfig:
    """The model fields of config.json (names as in model.ModelConfig)."""

    def __init__(self, vocab_size, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=None, d_ff=1024,
                 rope_theta=10000.0, rope_scaling=None, norm_eps=1e-5, tie_embeddings=False, num_patches=64,
                 patch_dim=48, patch_grid=(8, 8), time_embed_dim=256, dtype="float32", image_prediction="v",
                 patch_head_hidden=0, **_ignored):
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim or d_model // n_heads
        self.d_ff, self.rope_theta, self.norm_eps, self.tie_embeddings = d_ff, rope_theta, norm_eps, tie_embeddings
        # model.ModelConfig.rope_scaling: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
        self.rope_scaling = None if rope_scaling is None else tuple(rope_scaling)
        self.num_patches, self.patch_dim, self.patch_grid = num_patches, patch_dim, tuple(patch_grid)
        self.time_embed_dim, self.dtype, self.image_prediction = time_embed_dim, dtype, image_prediction
        self.patch_head_hidden = patch_head_hidden

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            return cls(**json.load(f))


class RMSNorm(nn.Module):
    """model.RMSNorm: float32 statistics, output in the input dtype."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_frequencies(half, theta, scaling=None):
    """model.rope_frequencies: float32 theta^(-i/half), with `scaling` remapped as Llama 3.1's 'llama3' RoPE."""
    freq = 1.0 / theta ** (torch.arange(half, dtype=torch.float32) / half)
    if scaling is None:
        return freq
    factor, low, high, original = scaling
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > original / low, freq / factor, freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x, positions, theta, scaling=None):
    """model.apply_rope: Llama 'rotate half' rotary embedding in float32. x [B, L, H, Dh], positions [B, L]."""
    half = x.shape[-1] // 2
    freq = rope_frequencies(half, theta, scaling)
    angle = positions[..., None].float() * freq
    sin, cos = torch.sin(angle)[:, :, None, :], torch.cos(angle)[:, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attention_mask(segment_ids):
    """model.attention_mask (bidirectional): [B, 1, L, L], True where query and key share a document (id > 0)."""
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    return same[:, None, :, :]


class Attention(nn.Module):
    """model.Attention: GQA (query head h reads kv head h // (n_heads / n_kv_heads)); jax.nn.dot_product_attention's
    XLA path: float32 logits and softmax, masked logits set to -0.7 * float32 max (a fully masked padding row
    therefore averages all values, as in JAX)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.o = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)

    def forward(self, x, mask, positions):
        cfg = self.cfg
        b, length, _ = x.shape
        q = self.q(x).view(b, length, cfg.n_heads, cfg.head_dim)
        k = self.k(x).view(b, length, cfg.n_kv_heads, cfg.head_dim)
        v = self.v(x).view(b, length, cfg.n_kv_heads, cfg.head_dim)
        q = apply_rope(q, positions, cfg.rope_theta, cfg.rope_scaling)
        k = apply_rope(k, positions, cfg.rope_theta, cfg.rope_scaling)
        groups = cfg.n_heads // cfg.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        logits = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * (1.0 / math.sqrt(cfg.head_dim))
        logits = logits.masked_fill(~mask, -0.7 * torch.finfo(torch.float32).max)
        probs = torch.softmax(logits, dim=-1).to(v.dtype)
        out = torch.einsum("bhts,bshd->bthd", probs, v)
        return self.o(out.reshape(b, length, cfg.n_heads * cfg.head_dim))


class MLP(nn.Module):
    """model.MLP: SwiGLU."""

    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """model.Block: pre-norm attention + SwiGLU with residuals."""

    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, mask, positions):
        x = x + self.attn(self.attn_norm(x), mask, positions)
        return x + self.mlp(self.mlp_norm(x))


def timestep_embedding(t, dim, max_period=10000.0):
    """model.timestep_embedding: sinusoidal embedding of 1000 * t, [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ------------------------------------------------------------------------------------------------------------- model
class OneFlowModel(nn.Module):
    """model.OneFlowModel: embeds text tokens and image patches into one sequence and returns the four heads
    pi_logit [B, L], lam [B, L] (softplus), q_logits [B, L, V], velocity [B, L, patch_dim]."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.patch_in = nn.Linear(cfg.patch_dim, d)
        self.time_mlp_in = nn.Linear(cfg.time_embed_dim, d)
        self.time_mlp_out = nn.Linear(d, d)
        self.patch_row_embed = nn.Parameter(torch.zeros(cfg.patch_grid[0], d))
        self.patch_col_embed = nn.Parameter(torch.zeros(cfg.patch_grid[1], d))
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(d, cfg.norm_eps)
        self.insert_head = nn.Linear(d, 2)
        self.token_head = None if cfg.tie_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)
        # model.MixedSequenceModel.setup_patch_head: linear, or an MLP through patch_hidden (tanh GELU, as Flax's)
        self.patch_hidden = nn.Linear(d, cfg.patch_head_hidden) if cfg.patch_head_hidden else None
        self.patch_out = nn.Linear(cfg.patch_head_hidden or d, cfg.patch_dim)

    @property
    def dtype(self):
        return self.embed.weight.dtype

    def embed_inputs(self, tokens, is_patch, patch_index, patches, patch_t):
        cfg = self.cfg
        tok = self.embed(tokens.long())
        t_emb = self.time_mlp_out(F.silu(self.time_mlp_in(timestep_embedding(patch_t, cfg.time_embed_dim)
                                                            .to(self.dtype))))
        idx = patch_index.long()
        pos2d = self.patch_row_embed[idx // cfg.patch_grid[1]] + self.patch_col_embed[idx % cfg.patch_grid[1]]
        img = self.patch_in(patches.to(self.dtype)) + t_emb + pos2d
        return torch.where(is_patch.bool()[..., None], img, tok)

    def forward(self, tokens, is_patch, patch_index, patches, patch_t, segment_ids, positions):
        x = self.embed_inputs(tokens, is_patch, patch_index, patches, patch_t)
        mask = attention_mask(segment_ids)
        positions = positions.long()
        for layer in self.layers:
            x = layer(x, mask, positions)
        h = self.final_norm(x)
        ins = self.insert_head(h).float()
        q_logits = h @ self.embed.weight.T if self.token_head is None else self.token_head(h)
        h_img = h if self.patch_hidden is None else F.gelu(self.patch_hidden(h), approximate="tanh")
        velocity = self.patch_out(h_img)
        if self.cfg.image_prediction == "x":  # the head predicts clean latents: v = (Y1_hat - Y_t) / (1 - t_img)
            gap = torch.clamp(1.0 - patch_t.float(), min=X_PREDICTION_MIN_GAP)[..., None]
            velocity = ((velocity.float() - patches.float()) / gap).to(velocity.dtype)
        return dict(pi_logit=ins[..., 0], lam=F.softplus(ins[..., 1]), q_logits=q_logits, velocity=velocity)

    @classmethod
    def from_pretrained(cls, directory, dtype=None):
        """Builds the model from `directory`/config.json and loads `directory`/model.safetensors strictly (every
        tensor present, none extra, shapes equal). `dtype` ('float32' | 'bfloat16') overrides the exported dtype."""
        cfg = OneFlowConfig.from_json(os.path.join(directory, CONFIG_NAME))
        model = cls(cfg).to(TORCH_DTYPES[dtype or cfg.dtype])
        tensors, _ = load_safetensors(os.path.join(directory, WEIGHTS_NAME))
        model.load_tensors(tensors, source=os.path.join(directory, WEIGHTS_NAME))
        return model.eval()

    def load_tensors(self, tensors, source="state dict"):
        """Copies {name: tensor} into the parameters, raising a ValueError that names every missing, unexpected or
        wrongly shaped tensor."""
        own = self.state_dict()
        problems = [f"missing tensor {k!r} (expected shape {tuple(v.shape)})" for k, v in own.items() if k not in tensors]
        problems += [f"unexpected tensor {k!r}" for k in tensors if k not in own]
        problems += [f"tensor {k!r} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}"
                     for k, v in own.items() if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
        if problems:
            raise ValueError(f"{source}: {len(problems)} tensor mismatch(es):\n  " + "\n  ".join(problems))
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(tensors[k])


# ------------------------------------------------------------------------------------------------------ parity check
def parity_check(directory=".", tolerance=None):
    """Recomputes the outputs stored in parity_inputs.safetensors; prints max abs and relative differences
    (relative = max |torch - jax| / max |jax|, per output) and returns (passed, report)."""
    model = OneFlowModel.from_pretrained(directory)
    stored, metadata = load_safetensors(os.path.join(directory, PARITY_INPUTS_NAME))
    tol = float(tolerance if tolerance is not None else metadata["tolerance_rel"])
    inputs = {k: stored[f"inputs.{k}"] for k in INPUT_NAMES}
    with torch.no_grad():
        out = model(**inputs)
    report, passed = {}, True
    print(f"parity check ({model.dtype}, tolerance {tol:g} relative):")
    for name in OUTPUT_NAMES:
        ref, got = stored[f"outputs.{name}"].float(), out[name].float()
        if ref.shape != got.shape:
            raise ValueError(f"output {name!r}: torch shape {tuple(got.shape)} != stored {tuple(ref.shape)}")
        max_abs = (got - ref).abs().max().item()
        rel = max_abs / max(ref.abs().max().item(), 1e-12)
        ok = rel <= tol and math.isfinite(max_abs)
        passed &= ok
        report[name] = dict(max_abs=max_abs, rel=rel, ok=ok)
        print(f"  {name:10s} max_abs {max_abs:.3e}  rel {rel:.3e}  {'ok' if ok else 'FAIL'}")
    print("PARITY " + json.dumps(dict(passed=passed, tolerance=tol, dtype=str(model.dtype), outputs=report)))
    return passed, report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    directory = argv[0] if argv else os.path.dirname(os.path.abspath(__file__))
    passed, _ = parity_check(directory)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
