"""PyTorch export: tensor naming round trip, parity (float32 / bfloat16) in a torch-only process, strict loading
errors, and the `python -m oneflow_jax.export_torch` CLI on a checkpointed workdir."""
import ast
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest

from oneflow_jax.models import transformer as model_lib
from oneflow_jax.convert import safetensors_io
from oneflow_jax.convert import torch_export

torch = pytest.importorskip("torch")
REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL_CONFIG = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, num_patches=4,
                    patch_dim=12, patch_grid=(2, 2), time_embed_dim=16)
# llama3 RoPE scaling at a tiny original context (16): it changes 3 of the 4 frequencies at head_dim 8
ROPE_SCALING = (8.0, 1.0, 4.0, 16)
# A sitecustomize that makes every non-torch third-party package unimportable: "only torch installed".
TORCH_ONLY_SITE = textwrap.dedent("""
    import sys
    class _TorchOnly:
        BLOCKED = ("numpy", "jax", "jaxlib", "flax", "safetensors", "ml_dtypes", "oneflow_jax", "transformers",
                   "diffusers", "sentencepiece")
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ModuleNotFoundError(f"{name} is not installed (torch-only test environment)")
            return None
    sys.meta_path.insert(0, _TorchOnly())
""")


def random_params(cfg, seed=0):
    """Init params plus noise, so that zero-initialised heads (patch_out) and unit norms carry information."""
    init = jax.jit(lambda rng: model_lib.OneFlowModel(cfg).init(rng, model_lib.dummy_batch(cfg))["params"])
    params = nn.meta.unbox(init(jax.random.key(seed)))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        treedef, [np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves])


def assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def load_modeling(directory):
    filename = "modeling_oneflow.py" if os.path.exists(os.path.join(directory, "modeling_oneflow.py")) else \
        "torch_modeling.py"
    spec = importlib.util.spec_from_file_location(f"modeling_oneflow_{abs(hash(str(directory)))}",
                                                  os.path.join(directory, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_only_env(tmp_path):
    site = tmp_path / "torch_only_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(TORCH_ONLY_SITE)
    return dict(os.environ, PYTHONPATH=str(site))


@pytest.fixture(scope="module")
def tiny():
    cfg = model_lib.ModelConfig(**MODEL_CONFIG)
    return cfg, random_params(cfg)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """float32 and bfloat16 exports of the tiny model (each runs its own parity check)."""
    cfg, params = tiny
    out = {}
    for dtype in ("float32", "bfloat16"):
        d = tmp_path_factory.mktemp(f"export_{dtype}")
        out[dtype] = (str(d), torch_export.export(params, MODEL_CONFIG, str(d), dtype=dtype))
    return out


def test_names_cover_scanned_and_unscanned_layouts(tiny):
    cfg, params = tiny
    tensors = torch_export.params_to_torch_tensors(params)
    assert set(tensors) == set(torch_export.expected_shapes(cfg))
    assert tensors["layers.1.attn.q.weight"].shape == (cfg.n_heads * cfg.dim_per_head, cfg.d_model)
    assert tensors["layers.0.attn.o.weight"].shape == (cfg.d_model, cfg.n_heads * cfg.dim_per_head)
    assert tensors["embed.weight"].shape == (cfg.vocab_size, cfg.d_model)
    np.testing.assert_array_equal(tensors["layers.1.mlp.down.weight"], params["backbone"]["layers"]["mlp"]["down"]["kernel"][1].T)
    assert_trees_equal(torch_export.torch_tensors_to_params(tensors, cfg), params)
    # the same weights in the unscanned layout (layers_0, layers_1) get the same names and values
    unscanned_cfg = model_lib.ModelConfig(**MODEL_CONFIG, scan_layers=False)
    unscanned = torch_export.torch_tensors_to_params(tensors, unscanned_cfg)
    assert set(unscanned["backbone"]) == {"layers_0", "layers_1", "final_norm"}
    again = torch_export.params_to_torch_tensors(unscanned)
    assert set(again) == set(tensors)
    for k in tensors:
        np.testing.assert_array_equal(again[k], tensors[k])


def test_tied_embeddings_have_no_token_head():
    """With tie_embeddings torch computes Q logits from embed.weight (nn.Embed.attend); parity is checked by the CLI
    test below, whose run ties them."""
    cfg = model_lib.ModelConfig(**dict(MODEL_CONFIG, tie_embeddings=True))
    names = torch_export.expected_shapes(cfg)
    assert "token_head.weight" not in names and "embed.weight" in names


def test_export_layout_and_float32_parity(exported):
    d, report = exported["float32"]
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors", "modeling_oneflow.py", "parity_check.py",
                                     "parity_inputs.safetensors"]
    assert report["passed"] and report["tolerance"] == 1e-4
    for name in ("pi_logit", "lam", "q_logits", "velocity"):
        assert report["outputs"][name]["rel"] <= 1e-4, (name, report)
    config = json.loads(pathlib.Path(d, "config.json").read_text())
    assert config["dtype"] == "float32" and config["n_layers"] == 2 and config["patch_grid"] == [2, 2]
    assert config["rope_scaling"] is None
    stored, _ = safetensors_io.load_file(os.path.join(d, "parity_inputs.safetensors"))
    segments = stored["inputs.segment_ids"]
    assert stored["inputs.is_patch"].any() and (segments == 2).any() and (segments == 0).any()   # images, 2 docs, pad


def test_bfloat16_parity(exported, tiny):
    d, report = exported["bfloat16"]
    assert report["passed"] and report["tolerance"] == 5e-2          # tiny model: JAX's own bf16 floor is lower
    for name in ("pi_logit", "lam", "q_logits", "velocity"):
        assert report["outputs"][name]["rel"] <= 5e-2, (name, report)
    _, meta = safetensors_io.load_file(os.path.join(d, "parity_inputs.safetensors"))
    assert 1e-3 < float(meta["jax_noise_floor_rel"]) < 2.5e-2
    tensors, _ = safetensors_io.load_file(os.path.join(d, "model.safetensors"))
    assert all(v.dtype == ml_dtypes.bfloat16 for v in tensors.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_through_torch_is_identical(exported, tiny, tmp_path, dtype):
    """export -> torch module -> its state_dict saved by the safetensors package -> JAX params: bit-identical."""
    from safetensors.torch import save_file
    cfg, params = tiny
    d, _ = exported[dtype]
    module = load_modeling(d)
    model = module.OneFlowModel.from_pretrained(d)
    assert model.embed.weight.dtype == module.TORCH_DTYPES[dtype]
    path = str(tmp_path / "from_torch.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    tensors, _ = safetensors_io.load_file(path, expected=torch_export.expected_shapes(cfg))
    back = torch_export.torch_tensors_to_params(tensors, cfg)
    want = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(torch_export.NP_DTYPES[dtype]), params)
    assert_trees_equal(back, want)
    assert_trees_equal(torch_export.load_export(d)[0], want)


def test_parity_check_runs_with_only_torch_and_fails_on_wrong_outputs(exported, tmp_path):
    d, _ = exported["float32"]
    env = torch_only_env(tmp_path)
    proc = subprocess.run([sys.executable, "parity_check.py"], cwd=d, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "velocity" in proc.stdout and "max_abs" in proc.stdout
    # corrupt one stored JAX output: the check must fail (exit status 1 -> ParityError naming the output)
    bad = tmp_path / "bad_export"
    bad.mkdir()
    for name in os.listdir(d):
        (bad / name).write_bytes(pathlib.Path(d, name).read_bytes())
    stored, meta = safetensors_io.load_file(str(bad / "parity_inputs.safetensors"))
    stored = {k: np.array(v) for k, v in stored.items()}
    stored["outputs.lam"][0, 3] += 1e-2 * np.abs(stored["outputs.lam"]).max()
    safetensors_io.save_file(stored, str(bad / "parity_inputs.safetensors"), meta)
    with pytest.raises(torch_export.ParityError, match=r"(?s)\(exit 1\).*lam [^\n]* FAIL"):
        torch_export.run_parity_check(str(bad))


def test_rope_scaling_export_parity(tiny, tmp_path):
    """llama3 RoPE scaling in an export: config.json carries it, load_export reads it back, torch reproduces JAX
    (float32, the export's own parity batch), and the same export with rope_scaling dropped from config.json fails
    its parity check (torch really applies the field)."""
    _, params = tiny
    d = tmp_path / "scaled"
    torch_export.export(params, dict(MODEL_CONFIG, rope_scaling=ROPE_SCALING), str(d), check=False)
    config = json.loads((d / "config.json").read_text())
    assert config["rope_scaling"] == [8.0, 1.0, 4.0, 16]
    assert torch_export.load_export(str(d))[1].rope_scaling == ROPE_SCALING
    module = load_modeling(str(d))
    passed, report = module.parity_check(str(d))
    assert passed and all(r["rel"] <= 1e-4 for r in report.values()), report
    (d / "config.json").write_text(json.dumps(dict(config, rope_scaling=None)))
    passed, report = module.parity_check(str(d))
    assert not passed and report["q_logits"]["rel"] > 1e-3, report


def test_mlp_patch_head_export_parity(tmp_path):
    """patch_head_hidden: the patch head's hidden layer gets its torch names and shapes, torch reproduces the JAX
    velocities (tanh GELU on both sides), and config.json carries the width."""
    model_config = dict(MODEL_CONFIG, patch_head_hidden=24, image_prediction="x")
    cfg = model_lib.ModelConfig(**model_config)
    names = torch_export.expected_shapes(cfg)
    assert names["patch_hidden.weight"] == (24, cfg.d_model) and names["patch_out.weight"] == (cfg.patch_dim, 24)
    report = torch_export.export(random_params(cfg, seed=1), model_config, str(tmp_path))
    assert report["passed"] and report["outputs"]["velocity"]["rel"] <= 1e-4, report
    assert json.loads((tmp_path / "config.json").read_text())["patch_head_hidden"] == 24


@pytest.mark.parametrize("scaling", [None, ROPE_SCALING, (32.0, 1.0, 4.0, 8192)])
def test_rope_matches_torch_modeling(scaling):
    """model.apply_rope (jitted, as in the model) vs torch_modeling.apply_rope at OneFlow's positions (< 512), plain and
    with llama3 scaling (the tiny test one and Llama 3.2's at head_dim 64). XLA's jitted pow rounds a few frequencies
    1 ulp away from torch's (plain RoPE too), hence the float32-noise tolerance. Plain RoPE is bit-identical to the
    formula before rope_scaling existed."""
    from oneflow_jax.convert import torch_modeling
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 40, 3, 64)).astype(np.float32)
    positions = np.stack([np.arange(40), rng.integers(0, 512, 40)]).astype(np.int32)
    rope = jax.jit(lambda x, positions: model_lib.apply_rope(x, positions, 500000.0, scaling))
    got = np.asarray(rope(x, positions))
    want = torch_modeling.apply_rope(torch.from_numpy(x), torch.from_numpy(positions).long(), 500000.0, scaling)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=2e-4)
    np.testing.assert_allclose(jax.jit(model_lib.rope_frequencies, static_argnums=(0, 1, 2))(32, 500000.0, scaling),
                               torch_modeling.rope_frequencies(32, 500000.0, scaling).numpy(), rtol=1e-6, atol=0)
    if scaling is None:
        def rope_before(x, positions):                          # model.apply_rope before rope_scaling, verbatim
            jnp = jax.numpy
            half = x.shape[-1] // 2
            freq = 1.0 / 500000.0 ** (jnp.arange(half, dtype=jnp.float32) / half)
            angle = positions[..., None].astype(jnp.float32) * freq
            sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
            x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
            return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
        np.testing.assert_array_equal(got, np.asarray(jax.jit(rope_before)(x, positions)))
    else:
        plain = np.asarray(model_lib.apply_rope(x, positions, 500000.0))
        assert np.abs(got - plain).max() > 0.5                 # the remap changes the rotation materially


def test_modeling_file_imports_only_torch_and_stdlib():
    tree = ast.parse((REPO / "oneflow_jax" / "convert" / "torch_modeling.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    assert roots - set(sys.stdlib_module_names) == {"torch"}, roots


def test_no_pickle_in_conversion_code():
    paths = [p for name in ("torch_modeling.py", "torch_export.py", "export_torch.py", "safetensors_io.py",
                            "import_llama.py", "vae.py") for p in (REPO / "oneflow_jax").rglob(name)]
    assert len(paths) == 7, paths          # the conversion modules and their two commands
    for path in paths:
        src = path.read_text()
        assert "torch.load" not in src and "import pickle" not in src, path


def test_truncated_and_mismatched_files_name_the_tensor(exported, tiny, tmp_path):
    cfg, _ = tiny
    d, _ = exported["float32"]
    data = pathlib.Path(d, "model.safetensors").read_bytes()
    header, _, _ = safetensors_io.read_header(os.path.join(d, "model.safetensors"))
    last = max(header, key=lambda k: header[k]["data_offsets"][1])          # the tensor stored last
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in os.listdir(d):
        (cut / name).write_bytes(pathlib.Path(d, name).read_bytes())
    (cut / "model.safetensors").write_bytes(data[:-16])
    with pytest.raises(safetensors_io.SafetensorsError, match=f"truncated.*{last}"):
        torch_export.load_export(str(cut))
    module = load_modeling(d)
    with pytest.raises(ValueError, match=f"truncated.*{last}"):
        module.OneFlowModel.from_pretrained(str(cut))
    # a tensor with the wrong shape and a missing one are named by both loaders
    tensors, _ = safetensors_io.load_file(os.path.join(d, "model.safetensors"))
    tensors = dict(tensors)
    tensors["layers.1.attn.k.weight"] = np.zeros((3, cfg.d_model), np.float32)
    del tensors["final_norm.weight"]
    safetensors_io.save_file(tensors, str(cut / "model.safetensors"))
    with pytest.raises(safetensors_io.SafetensorsError, match=r"(?s)missing tensor 'final_norm.weight'.*"
                                                              r"'layers.1.attn.k.weight' has shape \(3, 32\)"):
        torch_export.load_export(str(cut))
    with pytest.raises(ValueError, match=r"(?s)missing tensor 'final_norm.weight'.*'layers.1.attn.k.weight'"):
        module.OneFlowModel.from_pretrained(str(cut))
    # the safetensors package itself reads our files (format compliance)
    from safetensors.numpy import load_file
    assert set(load_file(os.path.join(d, "parity_inputs.safetensors"))) >= {"inputs.tokens", "outputs.velocity"}


def test_cli_exports_a_checkpointed_run(tmp_path, capsys):
    """A workdir like train.py's (config.json, tokenizer.model, an Orbax step) -> the CLI's main -> a checked export."""
    import ml_collections

    from oneflow_jax import config_lib
    from oneflow_jax.training import checkpointing
    from oneflow_jax.training import sharding
    from oneflow_jax.data import tokenizer as tokenizer_lib
    from oneflow_jax.models.codec import make_codec
    from oneflow_jax.training.loop import create_sharded_state, make_optimizer

    workdir, out = tmp_path / "run", tmp_path / "export"
    spec = importlib.util.spec_from_file_location("shapes_tiny", REPO / "configs" / "shapes_tiny.py")
    shapes_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shapes_tiny)
    config = shapes_tiny.get_config("smoke")
    config.model.update(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, tie_embeddings=True)
    tok = tokenizer_lib.train_tokenizer(["a red circle above a blue square", "two green triangles left of it"] * 20,
                                        vocab_size=24, model_type="word")
    tokenizer_lib.save_to_dir(tok, str(workdir))
    checkpointing.save_config(str(workdir), config)
    model = model_lib.OneFlowModel(config_lib.model_config(config, tok.vocab_size, make_codec(config.codec)))
    tx, _ = make_optimizer(config.optimizer, config.total_steps)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    assert config.optimizer.ema_decay > 0
    state, _ = create_sharded_state(model, tx, mesh, seed=0, ema_decay=config.optimizer.ema_decay)
    state["ema_params"] = jax.tree_util.tree_map(lambda p: 0.5 * p, state["params"])   # as if trained
    with checkpointing.Checkpointer(str(workdir), keep=1, async_save=False) as ckpt:
        ckpt.save(3, state, force=True)
    from oneflow_jax import export_torch
    assert export_torch.main([f"--workdir={workdir}", f"--out={out}"]) == 0       # the CLI entry point, in-process
    assert "parity ok" in capsys.readouterr().out
    assert (out / "tokenizer.model").read_bytes() == (workdir / "tokenizer.model").read_bytes()
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["tie_embeddings"] and config_json["source_step"] == 3 and config_json["source_weights"] == "ema"
    assert config_json["image_token_id"] == tok.image_id
    raw = export_torch.load_params(str(workdir), ema=False)[2]                 # --noema
    assert_trees_equal(jax.tree_util.tree_map(np.asarray, raw), jax.tree_util.tree_map(np.asarray, state["params"]))
    params, _ = torch_export.load_export(str(out))
    assert_trees_equal(params, jax.tree_util.tree_map(np.asarray, state["ema_params"]))   # the EMA weights
    # a run directory without checkpoints: a one-line error and exit status 2 (in-process: same code path)
    empty = tmp_path / "empty"
    checkpointing.save_config(str(empty), config)
    tokenizer_lib.save_to_dir(tok, str(empty))
    assert export_torch.main([f"--workdir={empty}", f"--out={tmp_path / 'unused'}"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
