"""Model: segment isolation in packed rows, finite gradients of the full objective, and fsdp+tensor sharding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from oneflow_jax.objectives import edit_flow
from oneflow_jax.objectives import oneflow_objective as objective
from oneflow_jax.data import packing
from oneflow_jax.training import sharding
from oneflow_jax.objectives.edit_flow import NoisingConfig, SpecialTokens
from oneflow_jax.models.transformer import ModelConfig, OneFlowModel, attention_mask, dummy_batch

SP = SpecialTokens(bos=1, pad=0, image=3)
CFG = ModelConfig(vocab_size=32, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, num_patches=4,
                  patch_dim=6, patch_grid=(2, 2), time_embed_dim=16)


def make_row(rng, docs_tokens, seq_len=64, max_del=64, times=None, max_patches=0):
    docs = []
    for toks in docs_tokens:
        toks = np.asarray(toks, np.int32)
        lat = rng.standard_normal((int((toks == SP.image).sum()), 4, 6)).astype(np.float32)
        docs.append(edit_flow.noise_document(toks, lat, rng, NoisingConfig(), SP, times=times and (
            times[0], [times[1]] * len(lat))))
    return packing.pack_rows(docs, seq_len, max_del, max_patches=max_patches)


@pytest.fixture(scope="module")
def params():
    return OneFlowModel(CFG).init(jax.random.key(0), dummy_batch(CFG))["params"]


def test_segment_isolation(params):
    model = OneFlowModel(CFG)
    doc_a = [5, 6, SP.image, 7, 8]
    row1 = make_row(np.random.default_rng(0), [doc_a, [9, 10, 11, SP.image]], times=(1.0, 0.5))
    row2 = make_row(np.random.default_rng(0), [doc_a, [12, 13, SP.image, 14, 15, 16]], times=(1.0, 0.5))
    seg_a = row1["segment_ids"] == 1
    np.testing.assert_array_equal(row1["tokens"][seg_a], row2["tokens"][seg_a])
    assert not np.array_equal(row1["tokens"], row2["tokens"])
    out1 = model.apply({"params": params}, {k: jnp.asarray(row1[k])[None] for k in objective.MODEL_INPUTS})
    out2 = model.apply({"params": params}, {k: jnp.asarray(row2[k])[None] for k in objective.MODEL_INPUTS})
    for name in ("pi_logit", "lam", "q_logits", "velocity"):
        np.testing.assert_allclose(np.asarray(out1[name])[0][seg_a], np.asarray(out2[name])[0][seg_a], atol=1e-5)
        # ... while document B's outputs do change
    assert not np.allclose(np.asarray(out1["q_logits"])[0][~seg_a], np.asarray(out2["q_logits"])[0][~seg_a])


def test_attention_mask_causal_with_image_blocks():
    seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 0]])
    block = jnp.asarray([[0, 1, 1, 0, 0, 0, 0]])
    m = np.asarray(attention_mask(seg, causal=True, block_ids=block))[0, 0]
    assert m[1, 2] and m[2, 1]            # inside an image block: bidirectional
    assert not m[0, 1] and m[3, 0]        # text: causal
    assert not m[4, 3] and not m[:, 6].any()  # other document, padding


def test_objective_gradients_finite(params):
    rng = np.random.default_rng(1)
    rows = [make_row(rng, [[5, 6, SP.image, 7], [8, 9, 10, 11, 12]]) for _ in range(2)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    model = OneFlowModel(CFG)
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: objective.oneflow_loss(model, p, batch), has_aux=True)(params)
    assert np.isfinite(float(loss)) and float(metrics["text_loss"]) > 0
    assert float(metrics["num_docs"]) == pytest.approx(4.0)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_fsdp_tensor_sharding_on_8_devices():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    model = OneFlowModel(CFG)
    batch = dummy_batch(CFG, batch_size=4, seq_len=16)
    abstract = jax.eval_shape(model.init, jax.random.key(0), batch)
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(abstract), mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), batch)
    p = nn.meta.unbox(variables["params"])
    spec = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    layers = p["backbone"]["layers"]
    assert spec(layers["attn"]["q"]["kernel"]) == (None, "fsdp", "tensor", None)       # [layers, embed, heads, hd]
    assert spec(layers["attn"]["k"]["kernel"]) == (None, "fsdp", "tensor", None)
    assert spec(layers["attn"]["o"]["kernel"]) == (None, "tensor", None, "fsdp")
    assert spec(layers["mlp"]["gate"]["kernel"]) == (None, "fsdp", "tensor")
    assert spec(layers["mlp"]["down"]["kernel"]) == (None, "tensor", "fsdp")
    assert spec(p["embed"]["embedding"]) == ("tensor", "fsdp")
    assert spec(p["token_head"]["kernel"]) == ("fsdp", "tensor")
    assert spec(layers["attn_norm"]["scale"]) == (None, None)
    # every parameter actually lands on the mesh with the table's layout: the sharded init equals the plain one
    plain = nn.meta.unbox(model.init(jax.random.key(0), batch)["params"])
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(p)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # a sharded forward matches the single-device one
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        out = jax.jit(model.apply)({"params": p}, batch)
    ref = model.apply({"params": plain}, batch)
    np.testing.assert_allclose(np.asarray(out["q_logits"]), np.asarray(ref["q_logits"]), atol=1e-4)


def test_x_prediction_turns_the_clean_latent_estimate_into_the_path_velocity(params):
    """image_prediction='x': patch_out estimates Y1 and the velocity is (Y1_hat - Y_t) / max(1 - t, 0.05), the
    straight-path velocity through Y_t; with Y1_hat = Y1 exactly it equals the flow-matching target Y1 - Y0."""
    import dataclasses
    cfg = dataclasses.replace(CFG, image_prediction="x")
    rng = np.random.default_rng(0)
    y1, y0 = rng.standard_normal((2, 4, 6)).astype(np.float32)
    t = np.array([0.0, 0.3, 0.9, 0.99], np.float32)          # one image per patch; 0.99 is clipped to 1 - 0.05
    y_t = t[:, None] * y1 + (1 - t[:, None]) * y0
    batch = dummy_batch(cfg, 1, 4)
    batch.update(is_patch=jnp.ones((1, 4), bool), patch_index=jnp.arange(4)[None], patches=jnp.asarray(y_t)[None],
                 patch_t=jnp.asarray(t)[None])
    # a head that outputs exactly Y1 at every patch: zero kernel, one bias per call
    for i in range(4):
        p = jax.tree_util.tree_map(lambda x: x, nn.meta.unbox(params))
        p["patch_out"] = dict(kernel=jnp.zeros_like(p["patch_out"]["kernel"]), bias=jnp.asarray(y1[i]))
        v = np.asarray(OneFlowModel(cfg).apply({"params": p}, batch)["velocity"])[0, i]
        expected = (y1[i] - y_t[i]) / max(1 - t[i], 0.05)
        np.testing.assert_allclose(v, expected, rtol=1e-5, atol=1e-5)
        if t[i] < 0.95:
            np.testing.assert_allclose(v, y1[i] - y0[i], rtol=1e-4, atol=1e-4)
    v_pred = OneFlowModel(CFG).apply({"params": p}, batch)["velocity"]       # 'v': the head itself is the velocity
    np.testing.assert_allclose(np.asarray(v_pred)[0, 3], y1[3], rtol=1e-6)


def test_cpu_dense_grads_give_the_same_gradients(params):
    """ModelConfig.cpu_dense_grads only changes how XLA lays out the weight-gradient matmuls: loss and every gradient
    match the default path, on one device and on an fsdp x tensor mesh (reshaped, sharded inputs)."""
    import dataclasses
    rng = np.random.default_rng(2)
    rows = [make_row(rng, [[5, 6, SP.image, 7], [8, 9, 10, 11, 12]]) for _ in range(4)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    p = nn.meta.unbox(params)

    def loss_and_grads(cfg):
        return jax.jit(jax.value_and_grad(lambda q: objective.oneflow_loss(OneFlowModel(cfg), q, batch)[0]))(p)

    ref_loss, ref_grads = loss_and_grads(CFG)
    fast = dataclasses.replace(CFG, cpu_dense_grads=True)
    loss, grads = loss_and_grads(fast)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(ref_grads), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        _, sharded_grads = loss_and_grads(fast)
    for a, b in zip(jax.tree_util.tree_leaves(ref_grads), jax.tree_util.tree_leaves(sharded_grads)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_patch_slots_give_the_same_loss_and_gradients():
    """With `patch_slots` in the batch (data.max_patches_per_row) the image parts run at those slots only: on a data x
    fsdp x tensor mesh, loss and every gradient equal the all-positions computation on one device, and the velocity
    is the same on patch positions and zero elsewhere (also in a zero-padded row, whose slots all point at 0)."""
    import dataclasses
    cfg = dataclasses.replace(CFG, n_layers=1, image_prediction="x", patch_head_hidden=16)
    rng = np.random.default_rng(3)
    docs = [[5, 6, SP.image, 7], [8, SP.image, 9, 10, SP.image], [11, 12, 13]]
    rows = [make_row(rng, [docs[i % 3], docs[(i + 1) % 3]], times=(0.5, 0.5), max_patches=14) for i in range(3)]
    rows.append({k: np.zeros_like(v) for k, v in rows[0].items()})   # how the pipeline pads a block (slots all 0)
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    assert 0 < int(batch["is_patch"].sum(1).max()) < 14                          # fillers in every row
    full = {k: v for k, v in batch.items() if k != "patch_slots"}
    assert "patch_slots" in objective.model_inputs(batch) and "patch_slots" not in objective.model_inputs(full)
    model = OneFlowModel(cfg)
    p = nn.meta.unbox(model.init(jax.random.key(1), dummy_batch(cfg))["params"])
    p["patch_out"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(2), p["patch_out"]["kernel"].shape)

    @jax.jit
    def loss_grads_velocity(q, b):
        (loss, _), grads = jax.value_and_grad(lambda q: objective.oneflow_loss(model, q, b, 4.0, "x"), has_aux=True)(q)
        return loss, grads, model.apply({"params": q}, objective.model_inputs(b))["velocity"]

    ref_loss, ref_grads, v_full = loss_grads_velocity(p, full)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        loss, grads, v_slots = loss_grads_velocity(p, batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(ref_grads), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-5)   # float32 sums reordered
    is_patch, v_full, v_slots = np.asarray(batch["is_patch"]), np.asarray(v_full), np.asarray(v_slots)
    np.testing.assert_allclose(v_slots[is_patch], v_full[is_patch], rtol=1e-5, atol=1e-6)
    assert np.abs(v_full[is_patch]).max() > 0 and not v_slots[~is_patch].any()
