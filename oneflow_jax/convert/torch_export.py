"""JAX params <-> a PyTorch export directory (model.safetensors + config.json + modeling_oneflow.py + parity check).

Tensor names follow the PyTorch module tree of torch_modeling.py; the scanned `layers` axis is un-stacked:
    embed.weight [V, D]                     patch_in.{weight [D, P], bias}       time_mlp_in / time_mlp_out.{weight, bias}
    patch_row_embed [rows, D]               patch_col_embed [cols, D]
    layers.{i}.attn_norm.weight [D]         layers.{i}.attn.{q,k,v}.weight [H*Dh, D]   layers.{i}.attn.o.weight [D, H*Dh]
    layers.{i}.mlp_norm.weight [D]          layers.{i}.mlp.{gate,up}.weight [F, D]     layers.{i}.mlp.down.weight [D, F]
    final_norm.weight [D]   insert_head.{weight [2, D], bias}   token_head.weight [V, D] (absent if tied)
    patch_out.{weight [P, D], bias}          (patch_head_hidden H: patch_hidden.{weight [H, D], bias}, patch_out [P, H])
Linear weights use torch's [out, in] layout: a Flax kernel [in..., out...] is reshaped to [in, out] and transposed.
The mapping is derived from the Flax param paths (kernel/scale/embedding -> weight), so it follows models/transformer.py.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath

from oneflow_jax.models import transformer as model_lib
from oneflow_jax.convert import safetensors_io

MODELING_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_modeling.py")
WEIGHTS_NAME, CONFIG_NAME, PARITY_INPUTS_NAME = "model.safetensors", "config.json", "parity_inputs.safetensors"
MODELING_NAME, PARITY_SCRIPT_NAME, TOKENIZER_NAME = "modeling_oneflow.py", "parity_check.py", "tokenizer.model"
FORMAT_VERSION = "1"
NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Relative tolerance (max |torch - jax| / max |jax| per output). bfloat16: both sides round every matmul output to
# 8 mantissa bits, in slightly different places, so torch-vs-JAX differences are the size of JAX's own bf16 error
# (JAX bf16 vs JAX f32 on the same weights, the "noise floor", measured at export time): the bf16 tolerance is
# max(5e-2, 2 x noise floor). A layout bug gives O(1).
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}
NOISE_FLOOR_FACTOR = 2.0
_DIRECT_INPUT_AXES = {"attn.o": 2}   # Flax kernels whose input spans two axes ([H, Dh, D])

PARITY_SCRIPT = '''"""Recomputes the JAX outputs stored in parity_inputs.safetensors with modeling_oneflow.py (torch only).
Usage: python parity_check.py [export_dir]; exit status 0 only when every output is within tolerance."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import modeling_oneflow  # noqa: E402

if __name__ == "__main__":
    sys.exit(modeling_oneflow.main(sys.argv[1:]))
'''


class ParityError(RuntimeError):
    """The exported torch model does not reproduce the JAX outputs within tolerance."""


# ------------------------------------------------------------------------------------------------------- naming
@dataclasses.dataclass(frozen=True)
class _Leaf:
    path: tuple[str, ...]      # Flax param path
    name: str                  # torch name; '{i}' stands for the layer index
    n_in: int | None           # input axes of a Dense kernel (None: stored as is)
    stacked: bool              # leading scanned `layers` axis


def _leaf(path: tuple[str, ...]) -> _Leaf:
    parts, stacked = list(path), False
    if parts[0] == "backbone":
        parts = parts[1:]
        if parts[0] == "layers":
            parts[0], stacked = "layers.{i}", True
        elif re.fullmatch(r"layers_\d+", parts[0]):
            parts[0] = "layers." + parts[0].split("_")[1]
    last = parts[-1]
    n_in = None
    if last == "kernel":
        n_in = _DIRECT_INPUT_AXES.get(".".join(parts[-3:-1]), 1)
    if last in ("kernel", "scale", "embedding"):
        parts[-1] = "weight"
    return _Leaf(tuple(path), ".".join(parts), n_in, stacked)


def _paths(tree) -> list[tuple[tuple[str, ...], object]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(k.key for k in path), leaf) for path, leaf in flat]


def _to_torch_layout(x: np.ndarray, n_in: int | None) -> np.ndarray:
    if n_in is None:
        return x
    in_size = math.prod(x.shape[:n_in])
    return np.ascontiguousarray(x.reshape(in_size, -1).T)


def _from_torch_layout(x: np.ndarray, n_in: int | None, shape: tuple[int, ...]) -> np.ndarray:
    if n_in is None:
        return np.asarray(x).reshape(shape)
    return np.asarray(x).T.reshape(shape)


def _torch_shape(shape: tuple[int, ...], n_in: int | None) -> tuple[int, ...]:
    if n_in is None:
        return tuple(shape)
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def abstract_params(cfg: model_lib.ModelConfig):
    """The param tree's shapes (ShapeDtypeStructs, unboxed) for `cfg`, without allocating anything."""
    variables = jax.eval_shape(lambda: model_lib.OneFlowModel(cfg).init(jax.random.key(0), model_lib.dummy_batch(cfg, 1, 4)))
    return nn.meta.unbox(variables["params"])


def expected_shapes(cfg: model_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
    """{torch name: torch-layout shape} of every tensor an export of `cfg` holds."""
    out = {}
    for path, leaf in _paths(abstract_params(cfg)):
        spec = _leaf(path)
        shape = leaf.shape[1:] if spec.stacked else leaf.shape
        for i in range(cfg.n_layers if spec.stacked else 1):
            out[spec.name.format(i=i)] = _torch_shape(shape, spec.n_in)
    return out


def params_to_torch_tensors(params, dtype: str | None = None) -> dict[str, np.ndarray]:
    """Flax params (boxed or not, scanned or not) -> {torch name: numpy array in torch layout}, cast to `dtype`."""
    out = {}
    for path, leaf in _paths(nn.meta.unbox(params)):
        spec = _leaf(path)
        x = np.asarray(jax.device_get(leaf))
        if dtype is not None:
            x = x.astype(NP_DTYPES[dtype])
        layers = [x[i] for i in range(x.shape[0])] if spec.stacked else [x]
        for i, layer in enumerate(layers):
            out[spec.name.format(i=i)] = _to_torch_layout(layer, spec.n_in)
    return out


def torch_tensors_to_params(tensors, cfg: model_lib.ModelConfig, source: str = "tensors", dtype=None):
    """Inverse of params_to_torch_tensors for the param tree of `cfg`; names and shapes are checked first and every
    mismatch is reported by tensor name. Arrays keep the stored dtype unless `dtype` is given."""
    found = {k: tuple(np.shape(v)) for k, v in tensors.items()}
    safetensors_io.check_names_and_shapes(found, expected_shapes(cfg), source)
    return tensors_to_tree(tensors, abstract_params(cfg), dtype)


def tensors_to_tree(tensors, like, dtype=None):
    """{torch name: array} -> a param tree shaped like `like` (any model's unboxed tree or its ShapeDtypeStructs:
    OneFlowModel's, or ARModel's without insert_head). Names and shapes are not checked here."""
    def convert(path, leaf):
        spec = _leaf(tuple(k.key for k in path))
        shape = leaf.shape[1:] if spec.stacked else leaf.shape
        if spec.stacked:
            x = np.stack([_from_torch_layout(tensors[spec.name.format(i=i)], spec.n_in, shape)
                          for i in range(leaf.shape[0])])
        else:
            x = _from_torch_layout(tensors[spec.name], spec.n_in, shape)
        return np.array(x, dtype=dtype or x.dtype)

    return jax.tree_util.tree_map_with_path(convert, like)


# ------------------------------------------------------------------------------------------------- export config
def export_model_config(model_config: dict, dtype: str) -> model_lib.ModelConfig:
    """The ModelConfig used for the export's reference outputs: compute and param dtype = the export dtype, plain XLA
    attention, no remat."""
    names = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
    fields = {k: v for k, v in dict(model_config).items() if k in names}
    fields.update(dtype=dtype, param_dtype=dtype, attention_impl="xla", remat="none")
    fields["patch_grid"] = tuple(fields.get("patch_grid", (8, 8)))
    return model_lib.ModelConfig(**fields)


def config_json(cfg: model_lib.ModelConfig, extra: dict | None = None) -> dict:
    out = dict(architecture="OneFlowModel", format_version=FORMAT_VERSION, **dataclasses.asdict(cfg))
    out["patch_grid"] = list(cfg.patch_grid)
    # llama3 RoPE scaling (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) or null
    out["rope_scaling"] = None if cfg.rope_scaling is None else list(cfg.rope_scaling)
    for k in ("remat", "attention_impl", "scan_layers", "param_dtype"):
        out.pop(k)
    out.update(extra or {})
    return out


# ---------------------------------------------------------------------------------------------------- parity batch
def parity_batch(cfg: model_lib.ModelConfig, image_token_id: int = 4, bos_id: int = 1, seed: int = 0,
                 seq_len: int | None = None) -> dict[str, np.ndarray]:
    """Two packed rows: [doc 1: BOS, text, <image> + its patch block, text | doc 2: BOS, text, <image> + block | pad]
    and [one text-only document | pad], with per-image t_img, positions restarting per document and padding."""
    rng = np.random.default_rng(seed)
    n = cfg.num_patches
    seq_len = seq_len or 2 * n + 24
    rows = []
    layouts = [[[("text", 5), ("image", None), ("text", 3)], [("text", 4), ("image", None)]], [[("text", 9)]]]
    for docs in layouts:
        row = dict(tokens=np.zeros(seq_len, np.int32), is_patch=np.zeros(seq_len, bool),
                   patch_index=np.zeros(seq_len, np.int32), patches=np.zeros((seq_len, cfg.patch_dim), np.float32),
                   patch_t=np.zeros(seq_len, np.float32), segment_ids=np.zeros(seq_len, np.int32),
                   positions=np.zeros(seq_len, np.int32))
        pos = 0
        for seg, doc in enumerate(docs, start=1):
            start = pos
            row["tokens"][pos] = bos_id
            pos += 1
            for kind, count in doc:
                if kind == "text":
                    row["tokens"][pos:pos + count] = rng.integers(5, cfg.vocab_size, count)
                    pos += count
                else:
                    row["tokens"][pos] = image_token_id
                    pos += 1
                    block = slice(pos, pos + n)
                    row["is_patch"][block] = True
                    row["patch_index"][block] = np.arange(n)
                    row["patches"][block] = rng.standard_normal((n, cfg.patch_dim))
                    row["patch_t"][block] = rng.uniform()
                    pos += n
            row["segment_ids"][start:pos] = seg
            row["positions"][start:pos] = np.arange(pos - start)
        if pos > seq_len:
            raise ValueError(f"parity batch needs {pos} positions, seq_len is {seq_len}")
        rows.append(row)
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def jax_outputs(params, cfg: model_lib.ModelConfig, batch) -> dict[str, np.ndarray]:
    """The JAX model's four heads on `batch`, as float32 numpy. Matmuls at full float32 precision: on GPUs JAX's
    default would use TF32 for float32 and miss the 1e-4 tolerance against torch on CPU."""
    with jax.default_matmul_precision("highest"):
        out = model_lib.OneFlowModel(cfg).apply({"params": params}, {k: jnp.asarray(v) for k, v in batch.items()})
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def run_parity_check(out_dir: str, env: dict | None = None) -> dict:
    """Runs `python parity_check.py` inside `out_dir` in a fresh process; returns its report or raises ParityError."""
    if importlib.util.find_spec("torch") is None:
        raise ParityError("the parity check needs PyTorch in this environment: pip install -e '.[torch]'")
    proc = subprocess.run([sys.executable, PARITY_SCRIPT_NAME], cwd=out_dir, capture_output=True, text=True, env=env)
    report = None
    for line in proc.stdout.splitlines():
        if line.startswith("PARITY "):
            report = json.loads(line[len("PARITY "):])
    if proc.returncode != 0 or report is None or not report["passed"]:
        raise ParityError(f"parity check failed in {out_dir} (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return report


# ------------------------------------------------------------------------------------------------------------ export
def export(params, model_config: dict, out_dir: str, tokenizer_path: str | None = None, dtype: str = "float32",
           check: bool = True, extra_config: dict | None = None, image_token_id: int = 4, bos_id: int = 1) -> dict:
    """Writes the PyTorch export of `params` (model config fields as a dict) into `out_dir` and, with `check`, runs
    parity_check.py there; returns the parity report ({} without check). Raises ParityError when parity fails."""
    if dtype not in NP_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(NP_DTYPES)}, got {dtype!r}")
    cfg = export_model_config(model_config, dtype)
    os.makedirs(out_dir, exist_ok=True)
    tensors = params_to_torch_tensors(params, dtype)
    safetensors_io.check_names_and_shapes({k: v.shape for k, v in tensors.items()}, expected_shapes(cfg),
                                          "params (do they match the model config?)")
    safetensors_io.save_file(tensors, os.path.join(out_dir, WEIGHTS_NAME),
                             metadata=dict(format="pt", oneflow_format_version=FORMAT_VERSION, dtype=dtype))
    extra = dict(image_token_id=image_token_id, bos_id=bos_id, **(extra_config or {}))
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(config_json(cfg, extra), f, indent=2)
    shutil.copyfile(MODELING_SOURCE, os.path.join(out_dir, MODELING_NAME))
    with open(os.path.join(out_dir, PARITY_SCRIPT_NAME), "w") as f:
        f.write(PARITY_SCRIPT)
    if tokenizer_path:
        data = epath.Path(tokenizer_path).read_bytes()                   # also from gs:// workdirs
        hf = str(tokenizer_path).endswith(".json")                        # data/hf_tokenizer.py's tokenizer.hf.json
        with open(os.path.join(out_dir, os.path.basename(str(tokenizer_path)) if hf else TOKENIZER_NAME), "wb") as f:
            f.write(data)
        if hf:                                                            # and the plain tokenizer.json inside it
            with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
                json.dump(json.loads(data)["tokenizer"], f)

    batch = parity_batch(cfg, image_token_id=image_token_id, bos_id=bos_id)
    ref_params = torch_tensors_to_params(tensors, cfg, source="export")   # exactly what torch will load
    outputs = jax_outputs(ref_params, cfg, batch)
    tolerance, metadata = TOLERANCE[dtype], dict(dtype=dtype)
    if dtype != "float32":
        f32 = jax_outputs(jax.tree_util.tree_map(lambda x: x.astype(np.float32), ref_params),
                          export_model_config(model_config, "float32"), batch)
        floor = max(_relative(outputs[k], f32[k]) for k in outputs)
        tolerance = max(tolerance, NOISE_FLOOR_FACTOR * floor)
        metadata["jax_noise_floor_rel"] = f"{floor:.3e}"
    stored = {f"inputs.{k}": v for k, v in batch.items()}
    stored.update({f"outputs.{k}": v for k, v in outputs.items()})
    safetensors_io.save_file(stored, os.path.join(out_dir, PARITY_INPUTS_NAME),
                             metadata=dict(metadata, tolerance_rel=f"{tolerance:.6g}"))
    return run_parity_check(out_dir) if check else {}


def _relative(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / max(float(np.abs(ref).max()), 1e-12))


def load_export(out_dir: str, cfg: model_lib.ModelConfig | None = None, dtype=None):
    """Reads an export back into a Flax param tree (scanned layout unless cfg says otherwise); returns (params, cfg)."""
    with open(os.path.join(out_dir, CONFIG_NAME)) as f:
        config = json.load(f)
    cfg = cfg or export_model_config(config, config.get("dtype", "float32"))
    path = os.path.join(out_dir, WEIGHTS_NAME)
    tensors, _ = safetensors_io.load_file(path, expected=expected_shapes(cfg))
    return torch_tensors_to_params(tensors, cfg, source=path, dtype=dtype), cfg
