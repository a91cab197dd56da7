"""Llama-3 import: a random-weight tiny `LlamaForCausalLM` (built here, nothing downloaded) -> our backbone.

Causal vs bidirectional: HF Llama is causal, OneFlow bidirectional. The comparison runs our `Backbone` directly with
`model.attention_mask(segment_ids, causal=True)` (the model's own mask function with its causal switch), so every
position must reproduce HF's final hidden state and, through `OneFlowModel.token_logits`, its logits. Llama 3.1 / 3.2's
'llama3' RoPE scaling is checked the same way, on a tiny model whose original context (16) is short enough for the
remap to change its frequencies.
"""
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oneflow_jax import import_llama as import_llama_cli
from oneflow_jax.convert import import_llama
from oneflow_jax.convert import safetensors_io
from oneflow_jax.models import transformer as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128)
THETA = 500000.0
# llama3 RoPE scaling at a tiny original context: at head_dim 12 every frequency but the highest is divided by 8 and
# the highest is interpolated (its wavelength 2*pi lies between 16/4 and 16/1).
SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=16)
OUR_SCALING = (8.0, 1.0, 4.0, 16)


def ours(tie: bool, **overrides) -> model_lib.ModelConfig:
    fields = dict(vocab_size=96, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=80, rope_theta=THETA,
                  norm_eps=1e-5, tie_embeddings=tie, num_patches=4, patch_dim=48, patch_grid=(2, 2), time_embed_dim=32)
    fields.update(overrides)
    return model_lib.ModelConfig(**fields)


def hf_model(tmp_path, tie: bool, seed: int = 0, rope_scaling=None, **save_kwargs):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**HF, tie_word_embeddings=tie, rope_theta=THETA,   # 4.x and 5.x accept both
                                      **({} if rope_scaling is None else dict(rope_scaling=rope_scaling)))
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():                      # non-trivial norms (HF initialises them to 1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / f"llama_tie{tie}"
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    return model, str(path)


def hf_outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), output_hidden_states=True)
    return out.hidden_states[-1].numpy(), out.logits.numpy()      # final (normed) hidden state, logits


def our_causal_outputs(params, cfg, ids, segment_ids=None, positions=None):
    ids = jnp.asarray(ids)
    segment_ids = jnp.ones_like(ids) if segment_ids is None else jnp.asarray(segment_ids)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape) if positions is None else jnp.asarray(positions)
    return jax.device_get(_causal_forward(cfg, params, ids, segment_ids, positions))


@functools.partial(jax.jit, static_argnums=0)
def _causal_forward(cfg, params, ids, segment_ids, positions):
    x = jnp.take(params["embed"]["embedding"], ids, axis=0)
    mask = model_lib.attention_mask(segment_ids, causal=True)
    h = model_lib.Backbone(cfg).apply({"params": params["backbone"]}, x, mask, positions)
    q_logits = model_lib.OneFlowModel(cfg).apply({"params": params}, h, method=model_lib.OneFlowModel.token_logits)
    return h, q_logits


def test_backbone_matches_hf_llama_at_every_position(tmp_path):
    tie = True                               # Llama 3.2 1B ties; the untied LM head is checked in the sharded test
    model, path = hf_model(tmp_path, tie)
    cfg = ours(tie)
    params = import_llama.import_params(path, cfg, seed=0)
    ids = np.random.default_rng(0).integers(0, HF["vocab_size"], (2, 24))
    want_h, want_logits = hf_outputs(model, ids)
    got_h, got_logits = our_causal_outputs(params, cfg, ids)
    np.testing.assert_allclose(got_h, want_h, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    # the imported tensors are exactly the checkpoint's (no permutation of q/k: both use the rotate-half RoPE)
    sd = model.state_dict()
    np.testing.assert_array_equal(params["backbone"]["layers"]["attn"]["q"]["kernel"][1].reshape(48, -1),
                                  sd["model.layers.1.self_attn.q_proj.weight"].numpy().T)
    np.testing.assert_array_equal(params["embed"]["embedding"], sd["model.embed_tokens.weight"].numpy())
    assert ("token_head" in params) == (not tie)
    # fresh heads stay at their initialisation (patch_out is zero-initialised)
    assert not np.any(np.asarray(params["patch_out"]["kernel"]))


def test_packed_documents_match_separate_hf_runs(tmp_path):
    """Two documents in one row (segment ids, positions restarting at 0): each matches HF on that document alone."""
    model, path = hf_model(tmp_path, tie=True, seed=1)
    cfg = ours(True)
    params = import_llama.import_params(path, cfg)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, HF["vocab_size"], 10), rng.integers(0, HF["vocab_size"], 7)
    row = np.concatenate([a, b, np.zeros(3, np.int64)])[None]
    segment_ids = np.array([[1] * 10 + [2] * 7 + [0] * 3])
    positions = np.array([list(range(10)) + list(range(7)) + [0] * 3])
    got_h, _ = our_causal_outputs(params, cfg, row, segment_ids, positions)
    np.testing.assert_allclose(got_h[0, :10], hf_outputs(model, a[None])[0][0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_h[0, 10:17], hf_outputs(model, b[None])[0][0], rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint_imports_identically(tmp_path):
    """... of an untied model: lm_head becomes the Q head (token_head), the embedding stays the embedding."""
    model, single = hf_model(tmp_path / "one", tie=False, seed=2)
    _, sharded = hf_model(tmp_path / "many", tie=False, seed=2, max_shard_size="20KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    cfg = ours(False)
    a, b = import_llama.import_params(single, cfg), import_llama.import_params(sharded, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    sd = model.state_dict()
    np.testing.assert_array_equal(a["token_head"]["kernel"], sd["lm_head.weight"].numpy().T)
    np.testing.assert_array_equal(a["embed"]["embedding"], sd["model.embed_tokens.weight"].numpy())
    assert not np.array_equal(sd["lm_head.weight"].numpy(), sd["model.embed_tokens.weight"].numpy())


def test_mismatches_are_reported_clearly(tmp_path):
    _, path = hf_model(tmp_path, tie=True)
    with pytest.raises(import_llama.ConfigMismatch, match=r"(?s)n_kv_heads=4 but the checkpoint's num_key_value_heads=2"
                                                          r".*d_ff=64 but the checkpoint's intermediate_size=80"):
        import_llama.import_params(path, ours(True, d_ff=64, n_kv_heads=4))
    # a tensor with a wrong shape is named
    tensors, meta = safetensors_io.load_file(os.path.join(path, "model.safetensors"))
    tensors = {k: np.array(v) for k, v in tensors.items()}
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1]
    safetensors_io.save_file(tensors, os.path.join(path, "model.safetensors"), meta)
    with pytest.raises(safetensors_io.SafetensorsError, match=r"layers\.1\.mlp\.up\.weight' has shape \(79, 48\)"):
        import_llama.import_params(path, ours(True))
    # a truncated file names the tensor that no longer fits
    data = open(os.path.join(path, "model.safetensors"), "rb").read()
    open(os.path.join(path, "model.safetensors"), "wb").write(data[:len(data) // 2])
    with pytest.raises(safetensors_io.SafetensorsError, match=r"truncated: tensor 'model\."):
        import_llama.import_params(path, ours(True))
    # pickle checkpoints are refused
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        import_llama.import_params(path, ours(True))


def tiny_run_config(tmp_path, base: str = "shapes_tiny.py", tie: bool = True, image_size: int = 8,
                    patch_size: int = 4, extra: str = "") -> str:
    """configs/<base>:smoke (shapes_tiny, or ar_shapes_tiny = shapes_tiny + model_type 'ar' + its `ar` section) at
    the tiny Llama's architecture, written as a config file for the CLI."""
    path = tmp_path / f"llama_tiny_{base}"
    path.write_text(textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("base_config", {os.path.abspath("configs/" + base)!r})
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)

        def get_config(arg=None):
            c = base.get_config("smoke")
            c.codec.update(image_size={image_size}, patch_size={patch_size})   # 8 / 4: 2x2 patches of 48 values, as ours()
            c.model.update(vocab_size=96, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=80,
                           rope_theta={THETA}, norm_eps=1e-5, tie_embeddings={tie})
            {extra}
            return c
    """))
    return str(path)


def restore_like_train(workdir):
    """(config, model, state, metadata) restored as `python -m oneflow_jax.train` resumes: the saved config, the
    model train_state.build_model picks for its model_type, and that model's abstract train state."""
    import ml_collections

    from oneflow_jax.training import checkpointing
    from oneflow_jax.training import sharding
    from oneflow_jax.training import train_state
    config = checkpointing.load_config(str(workdir))
    run_model, _ = train_state.build_model(config, 96)
    tx, _ = train_state.make_optimizer(config.optimizer, config.total_steps)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    ema_decay = config.optimizer.get("ema_decay", 0.0)
    with checkpointing.Checkpointer(str(workdir), keep=1, async_save=False) as ckpt:
        state, meta, step = ckpt.restore(train_state.abstract_train_state(run_model, tx, mesh, ema_decay)[0])
    assert step == 0 and int(state["step"]) == 0
    if ema_decay > 0:       # the EMA starts at the imported weights
        jax.tree_util.tree_map(np.testing.assert_array_equal, state["ema_params"], state["params"])
    return config, run_model, state, meta


def test_cli_writes_a_step0_checkpoint_train_can_resume(tmp_path):
    model, hf_dir = hf_model(tmp_path, tie=True)
    config_path = tiny_run_config(tmp_path)
    workdir = tmp_path / "run"
    assert import_llama_cli.main([f"--hf_dir={hf_dir}", f"--config={config_path}", f"--workdir={workdir}"]) == 0
    assert json.loads((workdir / "config.json").read_text())["model"]["d_ff"] == 80

    _, run_model, state, meta = restore_like_train(workdir)
    assert isinstance(run_model, model_lib.OneFlowModel) and "insert_head" in state["params"]
    assert meta["imported_from"] == os.path.abspath(hf_dir)
    np.testing.assert_array_equal(np.asarray(state["params"]["backbone"]["final_norm"]["scale"]),
                                  model.state_dict()["model.norm.weight"].numpy())
    # a second import into the same workdir is refused
    assert import_llama_cli.main([f"--hf_dir={hf_dir}", f"--config={config_path}", f"--workdir={workdir}"]) == 2


def test_cli_imports_the_ar_baseline_for_its_training_run(tmp_path):
    """An AR+FM baseline config (ar_shapes_tiny: model_type 'ar' + its `ar` section) imports into ARModel's tree, no
    insert_head, restorable as the AR training run resumes. The AR model is causal over text, so its own forward on a
    text-only row (mask from segment_ids + block_ids, as in training) matches HF directly: backbone hidden states and
    next-token logits, here through an untied Q head (token_head = lm_head)."""
    from oneflow_jax.models.ar_transformer import ARModel
    model, hf_dir = hf_model(tmp_path, tie=False, seed=4)
    workdir = tmp_path / "run"
    argv = [f"--hf_dir={hf_dir}", f"--config={tiny_run_config(tmp_path, 'ar_shapes_tiny.py', tie=False)}",
            f"--workdir={workdir}"]
    assert import_llama_cli.main(argv) == 0
    config, run_model, state, _ = restore_like_train(workdir)
    assert config.model_type == "ar" and config.ar.cond_t_min == 0.5 and isinstance(run_model, ARModel)
    params = state["params"]
    assert "insert_head" not in params and "token_head" in params
    assert not np.any(np.asarray(params["patch_out"]["kernel"]))           # a fresh (zero-initialised) head

    ids = np.random.default_rng(4).integers(0, HF["vocab_size"], (2, 24))
    batch = dict(model_lib.dummy_batch(run_model.cfg, *ids.shape), tokens=jnp.asarray(ids, jnp.int32),
                 block_ids=jnp.zeros(ids.shape, jnp.int32))
    forward = jax.jit(functools.partial(run_model.apply, mutable="intermediates",
                                       capture_intermediates=lambda m, _: isinstance(m, model_lib.Backbone)))
    out, captured = forward({"params": params}, batch)
    want_h, want_logits = hf_outputs(model, ids)
    np.testing.assert_allclose(captured["intermediates"]["backbone"]["__call__"][0], want_h, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["q_logits"], want_logits, rtol=1e-4, atol=1e-4)


def test_llama3_rope_scaling_matches_hf_llama(tmp_path):
    """A Llama 3.1-style checkpoint (llama3 RoPE scaling) imports into a config with the same rope_scaling and matches
    HF at 48 positions; the same weights under plain RoPE do not, so the remap is what makes them match."""
    model, path = hf_model(tmp_path, tie=True, seed=3, rope_scaling=SCALING)
    assert import_llama.rope_scaling(import_llama.read_hf_config(path)) == OUR_SCALING
    cfg = ours(True, rope_scaling=OUR_SCALING)
    params = import_llama.import_params(path, cfg)
    ids = np.random.default_rng(3).integers(0, HF["vocab_size"], (2, 48))
    want_h, want_logits = hf_outputs(model, ids)
    got_h, got_logits = our_causal_outputs(params, cfg, ids)
    np.testing.assert_allclose(got_h, want_h, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    plain_h, plain_logits = our_causal_outputs(params, ours(True), ids)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(plain_h, want_h, rtol=1e-4, atol=1e-4)
    pairs = (("hidden scaled", got_h, want_h), ("hidden plain", plain_h, want_h),
             ("logits scaled", got_logits, want_logits), ("logits plain", plain_logits, want_logits))
    errors = {name: np.abs(a - b).max() for name, a, b in pairs}
    print("llama3 RoPE vs HF, max abs diff: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert errors["hidden plain"] > 10 * 1e-4 and errors["hidden plain"] > 1000 * errors["hidden scaled"]
    # a config without the scaling (or with another one) is refused, and so is a checkpoint without it
    with pytest.raises(import_llama.ConfigMismatch,
                       match=r"rope_scaling=None but the checkpoint's RoPE scaling .* is llama3 "
                             r"\(8\.0, 1\.0, 4\.0, 16\)$"):
        import_llama.import_params(path, ours(True))
    with pytest.raises(import_llama.ConfigMismatch, match=r"rope_scaling=\(32\.0, 1\.0, 4\.0, 16\)"):
        import_llama.import_params(path, ours(True, rope_scaling=(32.0, 1.0, 4.0, 16)))
    plain_hf = {k: v for k, v in import_llama.read_hf_config(path).items()
                if k not in ("rope_parameters", "rope_scaling")}
    with pytest.raises(import_llama.ConfigMismatch,
                       match=r"rope_scaling=\(8\.0, 1\.0, 4\.0, 16\) but .* is none \(plain RoPE\)"):
        import_llama.check_config(dict(plain_hf, rope_theta=THETA), cfg)


def test_rope_frequencies_equal_transformers_llama3(tmp_path):
    """model.rope_frequencies against transformers' own llama3 inverse frequencies (the Llama 3.2 1B / 3.1 8B
    shapes and the tiny test one); any RoPE type other than default / llama3 is refused with one line."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for head_dim, theta, scaling in ((64, 500000.0, (32.0, 1.0, 4.0, 8192)), (128, 500000.0, (8.0, 1.0, 4.0, 8192)),
                                     (12, THETA, OUR_SCALING)):
        hf = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, rope_theta=theta,
                                      max_position_embeddings=131072,
                                      rope_scaling=dict(zip(("factor", "low_freq_factor", "high_freq_factor",
                                                             "original_max_position_embeddings"), scaling),
                                                        rope_type="llama3"))
        want = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")[0].numpy()
        got = np.asarray(model_lib.rope_frequencies(head_dim // 2, theta, scaling))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
        plain = np.asarray(model_lib.rope_frequencies(head_dim // 2, theta))
        assert np.sum(~np.isclose(plain, want, rtol=1e-6)) >= head_dim // 8        # the remap changes frequencies
    _, path = hf_model(tmp_path, tie=True)
    hf_config = json.loads(open(os.path.join(path, "config.json")).read())
    hf_config.pop("rope_parameters", None)
    hf_config["rope_scaling"] = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)
    open(os.path.join(path, "config.json"), "w").write(json.dumps(hf_config))
    with pytest.raises(import_llama.ConfigMismatch, match=r"^the checkpoint uses 'yarn' RoPE scaling; [^\n]*$"):
        import_llama.import_params(path, ours(True))


@pytest.mark.parametrize("size", ["1b", "3b", "8b"])
def test_published_llama_configs_match_configs_oneflow(size):
    """The published Llama 3.2 1B / 3B and 3.1 8B config.json fields (transformers 4.x layout, llama3 RoPE scaling)
    against configs/oneflow_<size>.py: architecture and RoPE scaling equal."""
    from oneflow_jax import config_lib
    from oneflow_jax.models.codec import make_codec
    if not os.path.exists(f"configs/oneflow_{size}.py"):
        pytest.skip(f"configs/oneflow_{size}.py not present")
    config = config_lib.load_config_file(f"configs/oneflow_{size}.py")
    cfg = config_lib.model_config(config, config.model.vocab_size, make_codec(config.codec))
    d, layers, heads, ffn, tied, factor = {"1b": (2048, 16, 32, 8192, True, 32.0),
                                           "3b": (3072, 28, 24, 8192, True, 32.0),
                                           "8b": (4096, 32, 32, 14336, False, 8.0)}[size]
    published = dict(model_type="llama", hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=8, head_dim=d // heads, intermediate_size=ffn, vocab_size=128256,
                     rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=tied, hidden_act="silu",
                     max_position_embeddings=131072,
                     rope_scaling=dict(factor=factor, high_freq_factor=4.0, low_freq_factor=1.0,
                                       original_max_position_embeddings=8192, rope_type="llama3"))
    import_llama.check_config(published, cfg)
    assert import_llama.rope_settings(published) == (500000.0, "llama3")
    assert cfg.rope_scaling == import_llama.rope_scaling(published) == (factor, 1.0, 4.0, 8192)


def _tokenizer_json(directory, vocab_size: int):
    """A Metaspace BPE tokenizer.json of exactly `vocab_size` ids with Llama 3's special-token names."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from oneflow_jax.data import shapes_world as sw
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>"]
    texts = [sw.generate_document("train", i).text.replace("<image>", " ") for i in range(300)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    n = tok.get_vocab_size()          # a closed corpus runs out of merges: more reserved tokens, as Llama 3 has
    tok.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(2, 2 + vocab_size - n)])
    assert tok.get_vocab_size() == vocab_size
    tok.save(os.path.join(directory, "tokenizer.json"))


def test_import_picks_up_the_directorys_tokenizer_and_train_runs_on_it(tmp_path):
    """import -> train -> sample with no other file: the HF directory's tokenizer.json (<image> as a reserved
    special token, so the vocabulary keeps the checkpoint's 96 rows) becomes the run's tokenizer."""
    from oneflow_jax.data import tokenizer as tokenizer_lib
    model, hf_dir = hf_model(tmp_path, tie=True)
    _tokenizer_json(hf_dir, 96)
    workdir = tmp_path / "run"
    for name, ok in (("<|nope|>", False), ("<|reserved_special_token_1|>", True)):
        config_path = tiny_run_config(tmp_path, image_size=32, patch_size=16,   # shapes-world's 32-px images
                                      extra=f"c.data.image_token = {name!r}")
        argv = [f"--hf_dir={hf_dir}", f"--config={config_path}", f"--workdir={workdir}"]
        assert import_llama_cli.main(argv) == (0 if ok else 2)      # a token the file lacks: one line, no run
    tok = tokenizer_lib.load_from_dir(str(workdir))
    assert tok.vocab_size == 96 and tok.id_to_piece(tok.image_id) == "<|reserved_special_token_1|>"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for cmd in (["train", f"--config={config_path}", f"--workdir={workdir}", "--config.total_steps=2"],
                ["sample", f"--workdir={workdir}", "--prompt=a red circle", f"--out={tmp_path}/s"]):
        res = subprocess.run([sys.executable, "-m", f"oneflow_jax.{cmd[0]}", *cmd[1:]], capture_output=True,
                             text=True, timeout=600, env=env, cwd=REPO)
        assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "s" / "0000_00.txt").read_text().startswith("a red circle")


def test_added_image_token_grows_the_embedding_by_its_mean_row(tmp_path):
    model, hf_dir = hf_model(tmp_path, tie=False, seed=2)
    params = import_llama.import_params(hf_dir, ours(tie=False, vocab_size=97))
    emb = np.asarray(model.state_dict()["model.embed_tokens.weight"].numpy())
    got = np.asarray(params["embed"]["embedding"])
    np.testing.assert_array_equal(got[:96], emb)
    np.testing.assert_allclose(got[96], emb.mean(0), rtol=1e-6, atol=1e-7)
    with pytest.raises(import_llama.ConfigMismatch, match="vocab_size=95"):
        import_llama.import_params(hf_dir, ours(tie=False, vocab_size=95))
