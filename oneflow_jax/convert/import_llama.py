"""Initialise a OneFlow or AR-baseline model's backbone from a Hugging Face Llama-3 checkpoint (safetensors only):

    python -m oneflow_jax.import_llama --hf_dir DIR --config configs/oneflow_1b.py --workdir W [--seed S]
    python -m oneflow_jax.import_llama --hf_dir DIR --config configs/ar_1b.py --workdir W [--seed S]

The paper starts its 1B models, OneFlow and the AR+FM baseline alike, from Llama 3.2 1B (reference §6, §7). The
model is the one the train loop builds for config.model_type (train_state.build_model: OneFlowModel, or ARModel with no
insert_head). DIR holds config.json and model.safetensors (or shards listed in model.safetensors.index.json).
Mapping (HF -> ours, both [out, in] torch layout, see torch_export):
    model.embed_tokens.weight                 -> embed.weight
    model.layers.{i}.input_layernorm          -> layers.{i}.attn_norm        self_attn.{q,k,v,o}_proj -> attn.{q,k,v,o}
    model.layers.{i}.post_attention_layernorm -> layers.{i}.mlp_norm         mlp.{gate,up,down}_proj  -> mlp.{gate,up,down}
    model.norm.weight                         -> final_norm.weight
    lm_head.weight (or the tied embedding)    -> token_head.weight (the Q head), unless config.model.tie_embeddings
New heads (insert_head for OneFlow, patch_in/out, time_mlp_*, patch row/col embeddings) keep their fresh
initialisation.
No q/k permutation: HF Llama and model.apply_rope both use the 'rotate half' RoPE layout (checked numerically in
tests/test_import_llama.py against LlamaForCausalLM's hidden states under a causal mask). Llama 3.1 / 3.2's 'llama3'
RoPE frequency scaling must equal config.model.rope_scaling (model.rope_frequencies computes it as transformers does);
other RoPE types are refused.

The CLI writes W/config.json and a step-0 checkpoint of the full train state (fresh optimizer state) of that model,
so `python -m oneflow_jax.train --config ... --workdir W` starts training from the imported weights.
"""
from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oneflow_jax import cli
from oneflow_jax.models import transformer as model_lib
from oneflow_jax.convert import safetensors_io
from oneflow_jax.convert import torch_export

_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.q.weight",
    "self_attn.k_proj.weight": "attn.k.weight",
    "self_attn.v_proj.weight": "attn.v.weight",
    "self_attn.o_proj.weight": "attn.o.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
}


class ConfigMismatch(ValueError):
    """The HF checkpoint's architecture does not match the OneFlow model config."""


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{hf_dir}: no config.json (expected a Hugging Face Llama checkpoint directory)")
    with open(path) as f:
        return json.load(f)


def rope_settings(hf: dict) -> tuple[float, str]:
    """(rope_theta, rope_type) from a transformers 4.x (rope_theta + rope_scaling) or 5.x (rope_parameters) config."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), rope_type


def rope_scaling(hf: dict) -> tuple[float, float, float, int] | None:
    """The checkpoint's RoPE scaling as ModelConfig.rope_scaling: None for plain RoPE, (factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings) for 'llama3' (Llama 3.1 / 3.2); ConfigMismatch otherwise."""
    _, rope_type = rope_settings(hf)
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ConfigMismatch(f"the checkpoint uses {rope_type!r} RoPE scaling; model.apply_rope implements plain RoPE "
                             "and 'llama3' scaling only")
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if params.get(k) is None]
    if missing:
        raise ConfigMismatch(f"the checkpoint's llama3 RoPE scaling lacks {', '.join(missing)}")
    return float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"]), \
        int(params["original_max_position_embeddings"])


def check_config(hf: dict, cfg: model_lib.ModelConfig) -> None:
    """Raises ConfigMismatch listing every architecture field where the HF config and `cfg` disagree."""
    if hf.get("model_type", "llama") != "llama":
        raise ConfigMismatch(f"expected a Llama checkpoint, got model_type={hf.get('model_type')!r}")
    theta, _ = rope_settings(hf)
    scaling = rope_scaling(hf)
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    pairs = [("d_model", cfg.d_model, "hidden_size", hf["hidden_size"]),
             ("n_layers", cfg.n_layers, "num_hidden_layers", hf["num_hidden_layers"]),
             ("n_heads", cfg.n_heads, "num_attention_heads", hf["num_attention_heads"]),
             ("n_kv_heads", cfg.n_kv_heads, "num_key_value_heads", hf.get("num_key_value_heads", hf["num_attention_heads"])),
             ("head_dim", cfg.dim_per_head, "head_dim", head_dim),
             ("d_ff", cfg.d_ff, "intermediate_size", hf["intermediate_size"]),
             ("rope_theta", cfg.rope_theta, "rope_theta", theta),
             ("norm_eps", cfg.norm_eps, "rms_norm_eps", hf.get("rms_norm_eps", 1e-6))]
    problems = [f"config.model.{ours}={a} but the checkpoint's {theirs}={b}" for ours, a, theirs, b in pairs
                if not np.isclose(a, b, rtol=1e-6, atol=0)]
    if cfg.vocab_size < hf["vocab_size"]:         # more is fine: rows for added tokens (`<image>`), see import_params
        problems.append(f"config.model.vocab_size={cfg.vocab_size} but the checkpoint's vocab_size={hf['vocab_size']}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            problems.append(f"the checkpoint has {flag}=true; the model has no attention/MLP biases")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r}; the model's MLP is SwiGLU (silu)")
    ours = cfg.rope_scaling
    if (ours is None) != (scaling is None) or (ours is not None and not np.allclose(ours, scaling, rtol=1e-6, atol=0)):
        theirs = "none (plain RoPE)" if scaling is None else f"llama3 {scaling}"
        problems.append(f"config.model.rope_scaling={ours} but the checkpoint's RoPE scaling (factor, low_freq_factor, "
                        f"high_freq_factor, original_max_position_embeddings) is {theirs}")
    if problems:
        raise ConfigMismatch("Llama checkpoint does not match the model config:\n  " + "\n  ".join(problems))


def llama_tensors(hf_dir: str, n_layers: int) -> dict[str, np.ndarray]:
    """HF Llama tensors renamed to torch_export names; `lm_head.weight` -> `token_head.weight` when present."""
    hf = safetensors_io.load_sharded(hf_dir, "model.safetensors", "model.safetensors.index.json")
    out, used = {}, set()

    def take(hf_name, ours):
        if hf_name not in hf:
            raise safetensors_io.SafetensorsError(f"{hf_dir}: missing tensor {hf_name!r} (needed for {ours!r})")
        out[ours] = hf[hf_name]
        used.add(hf_name)

    take("model.embed_tokens.weight", "embed.weight")
    take("model.norm.weight", "final_norm.weight")
    for i in range(n_layers):
        for theirs, ours in _LAYER_MAP.items():
            take(f"model.layers.{i}.{theirs}", f"layers.{i}.{ours}")
    if "lm_head.weight" in hf:
        take("lm_head.weight", "token_head.weight")
    unused = sorted(k for k in hf if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if unused:
        raise safetensors_io.SafetensorsError(f"{hf_dir}: tensors with no place in the model: {unused[:10]}"
                                              f"{' ...' if len(unused) > 10 else ''}")
    return out


@functools.partial(jax.jit, static_argnums=0)
def _init_params(model, rng):
    return model.init(rng, model_lib.dummy_batch(model.cfg, 1, 4))["params"]


def import_params(hf_dir: str, model, seed: int = 0):
    """`model`'s full param tree (unboxed numpy, cfg.param_dtype): the backbone, embedding and Q head from `hf_dir`,
    every other parameter freshly initialised with `seed`.

    `model`: the Flax module the run trains, as train_state.build_model returns it for config.model_type
    (OneFlowModel, or the AR baseline's ARModel, which has no insert_head); a bare ModelConfig means OneFlowModel."""
    if isinstance(model, model_lib.ModelConfig):
        model = model_lib.OneFlowModel(model)
    cfg = model.cfg
    check_config(read_hf_config(hf_dir), cfg)
    loaded = llama_tensors(hf_dir, cfg.n_layers)
    if not cfg.tie_embeddings:
        loaded.setdefault("token_head.weight", loaded["embed.weight"])     # a tied HF model's LM head
    else:
        loaded.pop("token_head.weight", None)
    for name in ("embed.weight", "token_head.weight"):   # tokens the tokenizer added (`<image>`): the mean row
        if name in loaded and loaded[name].shape[0] < cfg.vocab_size:
            w = np.asarray(loaded[name], np.float32)
            extra = np.repeat(w.mean(0, keepdims=True), cfg.vocab_size - w.shape[0], axis=0)
            loaded[name] = np.concatenate([w, extra]).astype(np.asarray(loaded[name]).dtype)
    fresh = nn.meta.unbox(_init_params(model, jax.random.key(seed)))
    tensors = torch_export.params_to_torch_tensors(fresh)
    safetensors_io.check_names_and_shapes({k: v.shape for k, v in loaded.items()},
                                          {k: v.shape for k, v in tensors.items()}, hf_dir, allow_missing=True)
    param_dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    for name, value in loaded.items():
        tensors[name] = np.asarray(value).astype(param_dtype)
    return torch_export.tensors_to_tree(tensors, fresh, jnp.dtype(cfg.param_dtype))


# ------------------------------------------------------------------------------------------------------- into a run
def import_to_workdir(hf_dir: str, config, workdir: str, seed: int | None = None) -> int:
    """Writes `workdir`/config.json and a step-0 train-state checkpoint holding the imported params."""
    from oneflow_jax import config_lib
    from oneflow_jax.training import checkpointing, sharding
    from oneflow_jax.training.train_state import abstract_train_state, build_model, initial_state, make_optimizer

    from oneflow_jax.data import tokenizer as tokenizer_lib
    hf = read_hf_config(hf_dir)
    config_dict, config = config, config_lib.resolve(config)
    tok = None                        # the directory's tokenizer.json becomes the run's tokenizer (unless the config
    tok_file = os.path.join(hf_dir, "tokenizer.json")       # names one), `<image>` as config.data.image_token
    if not config.data.tokenizer_path and os.path.exists(tok_file):
        try:
            tok = tokenizer_lib.load(tok_file, config.data.image_token)
        except ValueError as e:
            raise cli.UserError(str(e)) from None
    vocab = config.model.get("vocab_size", 0) or (tok.vocab_size if tok else hf["vocab_size"])
    if tok is not None and vocab != tok.vocab_size:
        raise cli.UserError(f"{tok_file} has {tok.vocab_size} ids (<image> included) but config.model.vocab_size="
                            f"{vocab}: set --config.model.vocab_size={tok.vocab_size} (or 0)")
    # The model the train loop builds for config.model_type (OneFlowModel or ARModel), so the checkpoint's tree is the one
    # the training run restores.
    model, _ = build_model(config, vocab)
    params = import_params(hf_dir, model, config.seed if seed is None else seed)
    mesh = sharding.make_mesh(config.mesh)
    tx, _ = make_optimizer(config.optimizer, config.total_steps)
    ema_decay = config.optimizer.ema_decay
    abstract, shardings = abstract_train_state(model, tx, mesh, ema_decay)
    params = jax.device_put(params, shardings["params"])
    init = jax.jit(lambda p: initial_state(p, tx, ema_decay), out_shardings=shardings)
    state = init(params)
    checkpointing.save_config(workdir, config_dict)
    with checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints, async_save=False) as ckpt:
        if ckpt.latest_step() is not None:
            raise cli.UserError(f"{workdir} already has checkpoints (step {ckpt.latest_step()}); "
                                       "import into a new workdir")
        ckpt.save(0, state, metadata=dict(imported_from=os.path.abspath(hf_dir)), force=True)
    if tok is not None:
        tokenizer_lib.save_to_dir(tok, workdir)
    return 0
