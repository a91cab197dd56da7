"""oneflow_jax.training.flops: exact parameter counts, analytic FLOPs vs XLA's cost analysis, X_t moments vs the real noising,
the CLI, the MFU arithmetic."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from oneflow_jax import config_lib
from oneflow_jax.training import aot
from oneflow_jax.objectives import edit_flow
from oneflow_jax.training import flops
from oneflow_jax.models.transformer import ModelConfig, OneFlowModel, dummy_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path, arg=None):
    import importlib.util
    spec = importlib.util.spec_from_file_location("cfg_under_test", os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_model_config(**kw):
    base = dict(vocab_size=97, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=160, num_patches=16,
                patch_dim=12, patch_grid=(4, 4), time_embed_dim=32)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=True), dict(scan_layers=False, head_dim=24),
                                dict(n_kv_heads=4, patch_grid=(2, 8)), dict(patch_head_hidden=40)])
def test_param_count_equals_the_real_tree(kw):
    cfg = tiny_model_config(**kw)
    shapes = jax.eval_shape(lambda r: OneFlowModel(cfg).init(r, dummy_batch(cfg)), jax.random.key(0))
    real = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert flops.params(cfg) == real
    b = flops.param_breakdown(cfg)
    assert flops.params_non_embedding(cfg) == real - b["embed"] - b["token_head"] - b["patch_pos"]


@pytest.mark.parametrize("model_kw,max_patches", [
    (dict(), 48), (dict(), 0), (dict(tie_embeddings=True, d_model=256, n_heads=4, n_kv_heads=4, d_ff=1024), 0)])
def test_analytic_flops_match_xla_cost_analysis(model_kw, max_patches):
    """The compiled train step (loss grad + AdamW) on one CPU device: XLA counts every dot (2mnk) and elementwise op.
    Unscanned layers: XLA's cost analysis counts a scan (while loop) body once. max_patches 48: the image parts at
    48 patch slots per row, 0: at all 128 positions."""
    config = load_config("configs/shapes_tiny.py")
    config.model.update(vocab_size=512, scan_layers=False, remat="none", **model_kw)
    config.data.max_patches_per_row = max_patches
    config.mesh.data = 1
    config.data.global_batch_size = 4
    result = aot.compile_train_step(config, jax.devices()[:1])
    xla = aot.xla_flops(result.compiled)
    analytic = flops.train_flops_per_step(result.model_cfg, config.data)
    assert abs(analytic / xla - 1) < 0.10, (analytic, xla)


def test_ar_step_computes_dense_attention():
    """The AR baseline's compiled step computes every attention score (a masked dense softmax): the device count,
    attention not halved, is the one that matches XLA's; the causal-skipping count is below both."""
    config = load_config("configs/ar_shapes_tiny.py")
    config.model.update(vocab_size=512, scan_layers=False, remat="none", d_model=64, n_heads=2, n_kv_heads=2,
                        d_ff=128, patch_head_hidden=64)
    config.mesh.data = 1
    config.data.update(global_batch_size=4, seq_len=256, max_patches_per_row=48)
    result = aot.compile_train_step(config, jax.devices()[:1])
    xla = aot.xla_flops(result.compiled)
    dense = flops.train_flops_per_step(result.model_cfg, config.data, "ar")
    causal = flops.train_flops_per_step(result.model_cfg, config.data, "ar", causal_skipping=True)
    assert abs(dense / xla - 1) < 0.10, (dense, xla)
    assert causal < 0.9 * dense and abs(dense / xla - 1) < abs(causal / xla - 1), (dense, causal, xla)
    assert dense == pytest.approx(flops.train_flops_per_step(result.model_cfg, config.data, "oneflow")
                                  - 4 * 256 * 3 * 2 * 64 * 2, rel=1e-9)        # only the insert head differs


def test_nextflow_params_and_step_flops_match_the_real_tree_and_xla():
    """The NextFlow-style model (a shape-only VQ codec: geometry, no tokenizer): the parameter count equals its
    tree, and the analytic device FLOPs of its compiled step match XLA's cost analysis."""
    from oneflow_jax.models.nextflow_transformer import NextFlowModel
    config = load_config("configs/nextflow_shapes_tiny.py")
    config.codec.tokenizer = None
    config.model.update(vocab_size=512, scan_layers=False, remat="none", d_model=64, n_heads=2, n_kv_heads=2, d_ff=128)
    config.mesh.data = 1
    config.data.update(global_batch_size=2)
    result = aot.compile_train_step(config, jax.devices()[:1])
    cfg = result.model_cfg
    assert cfg.num_patches == 149 and cfg.patch_dim == 17 and cfg.image_vocab_size == 256
    batch = {k: v[:, :16] for k, v in dummy_batch(cfg).items()}
    shapes = jax.eval_shape(lambda r: NextFlowModel(cfg).init(r, batch), jax.random.key(0))
    assert flops.params(cfg, "nextflow") == sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    analytic = flops.train_flops_per_step(cfg, config.data, "nextflow")
    xla = aot.xla_flops(result.compiled)
    assert abs(analytic / xla - 1) < 0.10, (analytic, xla)


def test_attention_and_heads_are_counted_at_every_position():
    cfg = tiny_model_config()
    row = flops.train_flops_per_row(cfg, 128)
    assert row["attention"] == 4 * 128 ** 2 * cfg.n_heads * cfg.dim_per_head * cfg.n_layers * 3
    assert row["token_head"] == 2 * cfg.d_model * cfg.vocab_size * 128 * 3
    assert row["patch_in"] == 2 * cfg.patch_dim * cfg.d_model * 128 * 2       # data input: no input gradient
    ar = flops.train_flops_per_row(cfg, 128, "ar")                      # dense, as XLA computes it
    assert ar["attention"] == row["attention"] and ar["insert_head"] == 0
    assert flops.train_flops_per_row(cfg, 128, "ar", causal_skipping=True)["attention"] == row["attention"] / 2
    assert flops.train_flops_per_row(cfg, 128, causal_skipping=True)["attention"] == row["attention"]
    assert flops.params(cfg, "ar") == flops.params(cfg) - (2 * cfg.d_model + 2)
    data = config_lib.DataConfig(seq_len=128, global_batch_size=8)
    assert flops.train_flops_per_step(cfg, data) == pytest.approx(8 * sum(row.values()))
    slots = flops.train_flops_per_row(cfg, 128, patch_slots=32)          # data.max_patches_per_row: image parts
    for part in ("patch_in", "time_mlp_in", "time_mlp_out", "patch_out"):
        assert slots[part] == row[part] / 4
    assert slots["backbone"] == row["backbone"] and slots["token_head"] == row["token_head"]


@pytest.mark.parametrize("objective", [
    dict(schedule="interleaved", kappa_power=1.0),
    dict(schedule="interleaved", kappa_power=2.0, mixed_gen_prob=0.2, drop_images_prob=0.1, drop_text_prob=0.1),
    dict(schedule="interleaved", kappa_power=1.0, task_mix=dict(understanding=0.7)),        # 2 images: no task
    dict(schedule="interleaved", kappa_power=1.0, task_mix=dict(understanding=0.7), n_img=1),
    dict(schedule="interleaved", kappa_power=2.0, task_mix=dict(understanding=0.4, generation=0.6),
         mixed_gen_prob=0.2, n_img=1),
    dict(schedule="interleaved", kappa_power=1.0, task_mix=dict(generation=0.5), n_img=1),
    dict(schedule="independent", kappa_power=1.0)])
def test_expected_xt_matches_the_noising(objective):
    objective = dict(objective)
    n_img = objective.pop("n_img", 2)
    noising = edit_flow.NoisingConfig(**objective)
    special = edit_flow.SpecialTokens(bos=1, pad=0, image=4)
    n_text, num_patches = 40, 8
    tokens = np.full(n_text + n_img, 7, np.int32)
    tokens[[5, 30][:n_img]] = special.image
    latents = np.zeros((n_img, num_patches, 3), np.float32)
    rng = np.random.default_rng(0)
    lengths = np.array([len(edit_flow.noise_document(tokens, latents, rng, noising, special)["tokens"])
                        for _ in range(4000)], np.float64)
    want = flops.expected_xt(flops.DocStats(n_text, n_img), num_patches, noising)
    assert lengths.mean() == pytest.approx(want["length"], rel=0.02)
    assert (lengths ** 2).mean() == pytest.approx(want["length_sq"], rel=0.04)


def test_interleaved_schedule_keeps_three_quarters_of_the_text():
    """tau ~ U[0, 2], t = min(tau, 1): E[kappa(t)] = 1/2 * 1/2 + 1/2 * 1 = 3/4 for kappa(t) = t."""
    doc = flops.DocStats(100, 0)
    inter = flops.expected_xt(doc, 16, edit_flow.NoisingConfig())
    indep = flops.expected_xt(doc, 16, edit_flow.NoisingConfig(schedule="independent"))
    assert inter["text_kept"] == pytest.approx(75, rel=1e-3)
    assert indep["text_kept"] == pytest.approx(50, rel=1e-3)


def test_useful_flops_drop_padding_and_cross_document_attention():
    cfg = tiny_model_config()
    data = config_lib.DataConfig(seq_len=256, global_batch_size=4)
    config = ml_collections.ConfigDict(dict(
        model_type="oneflow", model=dict(vocab_size=97, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=160,
                                         time_embed_dim=32),
        codec=dict(name="pixel_patch", image_size=16, patch_size=4), data=dict(seq_len=256, global_batch_size=4), objective={}))
    full = flops.report(config)
    half = flops.report(config, packing_fill=0.5)
    assert full["train_flops_per_step"] == flops.train_flops_per_step(flops.model_config_from(config), data)
    assert full["train_flops_per_step_useful"] < full["train_flops_per_step"]
    assert half["train_flops_per_step_useful"] == pytest.approx(full["train_flops_per_step_useful"] / 2)
    assert cfg.num_patches == full["num_patches"]


def test_vae_geometry_without_weights():
    config = load_config("configs/oneflow_1b.py")
    assert config.codec.path is None
    cfg = flops.model_config_from(config)
    assert (cfg.num_patches, cfg.patch_dim, cfg.patch_grid) == (256, 64, (16, 16))


def test_vocab_from_the_tokenizer_when_the_config_says_0(monkeypatch):
    from oneflow_jax.data import input_pipeline
    config = load_config("configs/shapes_tiny.py")
    assert config.model.vocab_size == 0
    monkeypatch.setattr(input_pipeline, "get_tokenizer", lambda c: type("T", (), dict(vocab_size=33))())
    assert flops.model_config_from(config).vocab_size == 33


def test_throughput_metrics_and_peaks():
    m = flops.throughput_metrics(8e12, 2.0, 4, 1e12)
    assert m["tflops_per_sec"] == pytest.approx(4.0) and m["mfu"] == pytest.approx(4.0)
    kinds = {"TPU v5 lite": 197e12, "TPU v4": 275e12, "NVIDIA H100 80GB HBM3": 989e12, "cpu": None}
    for kind, peak in kinds.items():
        assert flops.peak_flops_per_device(type("D", (), dict(device_kind=kind))()) == peak
    assert flops.resolve_peak_flops(5.0) == (5.0, "config.peak_flops")


def test_cli_prints_one_json_object():
    proc = subprocess.run([sys.executable, "-m", "oneflow_jax.flops", "--config", "configs/oneflow_1b.py", "--json",
                           "--config.data.global_batch_size=8"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    for key in ("params", "params_non_embedding", "train_flops_per_example", "train_flops_per_step",
                "train_flops_per_step_useful", "tokens_per_step", "attention_flops_fraction"):
        assert key in out
    assert out["tokens_per_step"] == 8 * 512
    assert out["train_flops_per_step"] == pytest.approx(8 * out["train_flops_per_example"])
