"""The NextFlow-style baseline (docs/nextflow.md): the VQ codec's block latents against the tokenizer, the transform's
targets and condition dropout, VAR's block-causal mask on a packed row, the KV-cached decode, the loss, and the run
config. One tokenizer for the whole file: configs/vq_shapes_tiny.py:smoke's geometry (scales 1, 2, 4: blocks of
1 + 4 + 16 + 16 = 37 positions), written as a train_vq run directory."""
from __future__ import annotations

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from oneflow_jax import config_lib, methods
from oneflow_jax.training import vq_trainer
from oneflow_jax.data import datasets, shapes_world
from oneflow_jax.models import codec as codec_lib
from oneflow_jax.models import nextflow_transformer as nf_model
from oneflow_jax.models import vq
from oneflow_jax.models.transformer import ModelConfig, attention_mask, dummy_batch
from oneflow_jax.objectives import ar_objective, nextflow_objective
from oneflow_jax.training import checkpointing, train_state

pytest.register_assert_rewrite("cli_utils")
pytest_plugins = ("cli_utils",)

SP = ar_objective.ARSpecial(bos=1, eos=2, pad=0, image=4)
SMOKE = "configs/nextflow_shapes_tiny.py:smoke"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A train_vq run directory (config.json + a checkpoint of the train state) of the smoke tokenizer. Its weights
    are fresh, the codebook spread like features (as tests/test_vq.py: a fresh one puts most vectors on one code);
    tests/test_vq.py trains the tokenizer, here only its codes matter."""
    config = config_lib.load_config_file("configs/vq_shapes_tiny.py:smoke")
    cfg = vq_trainer.check_config(config)
    tx, _ = vq_trainer.make_optimizer(config.optimizer, config.total_steps)
    state = vq_trainer.create_state(cfg, tx, seed=0)
    codebook = np.random.default_rng(1).standard_normal(state["params"]["codebook"].shape).astype(np.float32)
    state["params"] = dict(state["params"], codebook=jnp.asarray(codebook))
    workdir = tmp_path_factory.mktemp("vq") / "run"
    checkpointing.save_config(workdir, config)
    with checkpointing.Checkpointer(workdir, keep=1) as ckpt:
        ckpt.save(1, state, force=True)
    return str(workdir)


@pytest.fixture(scope="module")
def codec(tokenizer_dir):
    return codec_lib.make_codec(dict(name="vq", tokenizer=tokenizer_dir, image_size=32, scales=(1, 2, 4), code_dim=8,
                                     codebook_size=32))


@pytest.fixture(scope="module")
def images():
    return np.concatenate([shapes_world.generate_document("train", i).images for i in range(3)])[:3]


@pytest.fixture(scope="module")
def latents(codec, images):
    return codec.encode(images)


def test_codec_geometry_and_shape_only_codec(codec, tokenizer_dir):
    assert codec.group_sizes == (1, 4, 16, 16) and codec.group_offsets == (0, 1, 5, 21, 37)
    assert (codec.num_codes, codec.num_patches, codec.patch_dim, codec.grid) == (21, 37, 9, (1, 37))
    assert codec.codebook_size == 32 and codec.image_shape == (32, 32, 3)
    shape_only = codec_lib.make_codec(dict(name="vq", image_size=32, scales=(1, 2, 4), code_dim=8, codebook_size=32))
    assert (shape_only.group_sizes, shape_only.patch_dim) == (codec.group_sizes, codec.patch_dim)
    with pytest.raises(ValueError, match="no tokenizer"):
        shape_only.encode(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"codec\.codebook_size=64 but the tokenizer .* has 32"):
        codec_lib.make_codec(dict(name="vq", tokenizer=tokenizer_dir, image_size=32, codebook_size=64))
    clone = copy.deepcopy(codec)                       # what a data-loader worker gets: numpy params, no jitted fns
    assert "_fns" not in clone.__dict__ and isinstance(clone.params["codebook"], np.ndarray)


def test_codec_latents_are_the_tokenizers_features_and_codes(codec, images, latents):
    cfg, params = codec.vq_config, codec.params
    tokens = vq.encode(cfg, params, images)
    off, c = codec.group_offsets, cfg.code_dim
    assert latents.shape == (3, 37, 9) and latents.dtype == np.float32
    codes = np.concatenate([np.asarray(t).reshape(3, -1) for t in tokens], 1)
    np.testing.assert_array_equal(latents[:, :off[-2], c], codes)                     # column C: the codes
    assert (latents[:, off[-2]:, c] == -1).all()                                      # final group: none
    assert len(np.unique(codes)) > 3
    np.testing.assert_array_equal(latents[:, 0, :c], 0.0)                             # group 0: VAR's start
    for g, want in enumerate(vq.next_scale_inputs(cfg, params, tokens), start=1):     # teacher forcing
        np.testing.assert_allclose(latents[:, off[g]:off[g + 1], :c], want, rtol=0, atol=1e-6)
    f_hat = np.asarray(vq.fhat_from_tokens(cfg, params, tokens)).reshape(3, -1, c)
    np.testing.assert_allclose(latents[:, off[-2]:, :c], f_hat, rtol=0, atol=1e-6)    # final: all of f_hat
    np.testing.assert_array_equal(codec.decode(latents), vq.decode(cfg, params, tokens))
    np.testing.assert_array_equal(codec.codes_to_latents(tokens), latents)

    @jax.jit
    def teacher_forced(codes):                          # what the sampler computes on device, scale by scale
        f_hat = jnp.zeros((3, 4, 4, c))
        feats = []
        for k in range(len(cfg.scales)):
            feats.append(codec.group_inputs(k, f_hat))
            f_hat = f_hat + codec.scale_contribution(k, codes[:, off[k]:off[k + 1]])
        return jnp.concatenate(feats + [codec.final_inputs(f_hat)], 1)
    np.testing.assert_array_equal(teacher_forced(codes), latents[..., :c])


def test_transform_targets(codec, latents):
    tr = nextflow_objective.NextFlowTransform(SP, codec.group_sizes)
    d = tr([5, 6, 4, 7], latents[:1], np.random.default_rng(0))
    n, off = codec.num_patches, codec.group_offsets
    assert len(d["tokens"]) == 4 + 2 + n                                     # BOS 5 6 <image> block 7 EOS
    np.testing.assert_array_equal(d["tokens"][:4], [1, 5, 6, 4])
    np.testing.assert_array_equal(d["tokens"][-2:], [7, 2])
    block = slice(4, 4 + n)
    assert d["is_patch"][block].all() and d["is_patch"].sum() == n
    np.testing.assert_array_equal(d["patch_index"][block], np.arange(n))
    np.testing.assert_array_equal(d["patches"][block], latents[0])
    np.testing.assert_array_equal(d["code_targets"][block][:off[-2]], latents[0, :off[-2], -1])
    np.testing.assert_array_equal(d["code_weight"][block], np.arange(n) < off[-2])   # codes, none in the final group
    has = d["target_weight"] > 0
    where = np.flatnonzero(has)
    np.testing.assert_array_equal(where, [0, 1, 2, 3 + n, 4 + n])           # BOI predicts nothing; nor the block ...
    np.testing.assert_array_equal(d["targets"][where], [5, 6, 4, 7, 2])     # ... but its last position: the 7
    np.testing.assert_allclose(d["target_weight"].sum(), 1.0)
    ids = d["block_ids"][block]
    for g in range(len(codec.group_sizes)):                                 # one id per group, distinct
        assert len(set(ids[off[g]:off[g + 1]])) == 1
    assert len(set(ids)) == len(codec.group_sizes) and (d["block_ids"][~d["is_patch"]] == 0).all()
    d2 = tr([8, 4, 4], latents[1:3], np.random.default_rng(0))              # two images: the second's ends with EOS
    assert d2["targets"][-2] == 2 and d2["target_weight"][-2] > 0
    assert len(set(d2["block_ids"][d2["is_patch"]])) == 2 * len(codec.group_sizes)


def test_condition_dropout_removes_the_text_before_the_first_image(codec, latents):
    drop = nextflow_objective.NextFlowTransform(SP, codec.group_sizes, cond_drop=1.0)
    keep = nextflow_objective.NextFlowTransform(SP, codec.group_sizes, cond_drop=0.0)
    rng = np.random.default_rng(0)
    text = lambda d: d["tokens"][~d["is_patch"]].tolist()
    assert text(keep([5, 6, 4, 7, 4], latents[:2], rng)) == [1, 5, 6, 4, 7, 4, 2]
    dropped = drop([5, 6, 4, 7, 4], latents[:2], rng)
    assert text(dropped) == [1, 4, 7, 4, 2]                                  # only the text before the first image
    np.testing.assert_array_equal(dropped["patches"][dropped["is_patch"]], latents[:2].reshape(-1, 9))
    assert text(drop([5, 6], latents[:0], rng)) == [1, 5, 6, 2]              # no image: nothing to drop
    some = nextflow_objective.NextFlowTransform(SP, codec.group_sizes, cond_drop=0.25)
    rate = np.mean([len(text(some([5, 6, 4], latents[:1], rng))) == 3 for _ in range(400)])
    assert 0.17 < rate < 0.33, rate


def _row(codec, latents, docs, seq_len):
    tr = nextflow_objective.NextFlowTransform(SP, codec.group_sizes)
    rng = np.random.default_rng(0)
    packed = [tr(tokens, latents[sel], rng) for tokens, sel in docs]
    return ar_objective.ARPacker(seq_len, fields=nextflow_objective.POSITION_FIELDS).pack(packed)


def test_block_causal_mask_on_a_packed_row(codec, latents):
    row = _row(codec, latents, [([5, 4, 7], slice(0, 1)), ([4, 8, 4, 9], slice(1, 3))], 160)
    mask = np.asarray(attention_mask(jnp.asarray(row["segment_ids"])[None], True,
                                     jnp.asarray(row["block_ids"])[None]))[0, 0]
    seg, patch = row["segment_ids"], row["is_patch"]
    group = np.where(patch, np.searchsorted(codec.group_offsets, row["patch_index"], side="right") - 1, -1)
    image = np.where(patch, np.cumsum(patch & (row["patch_index"] == 0)) - 1, -1)        # image of the row
    assert image.max() == 2 and len(set(row["block_ids"][patch])) == 3 * len(codec.group_sizes)
    same_doc = (seg[:, None] == seg[None, :]) & (seg[:, None] > 0)
    assert not (mask & ~same_doc).any()                                      # nothing across documents
    q_img, k_img = image[:, None], image[None, :]
    q_grp, k_grp = group[:, None], group[None, :]
    both = patch[:, None] & patch[None, :] & same_doc
    assert not mask[both & (q_img == k_img) & (k_grp > q_grp)].any()         # never a finer scale of its image
    assert not mask[both & (k_img > q_img)].any()                            # never a later image
    assert mask[both & (q_img == k_img) & (k_grp <= q_grp)].all()            # every coarser scale and its own group
    assert mask[both & (k_img < q_img)].all()                                # earlier images, whole
    text_after = ~patch[:, None] & patch[None, :] & same_doc & (np.arange(160)[:, None] > np.arange(160)[None, :])
    assert text_after.sum() > 0 and mask[text_after].all()                   # text after an image sees all its block
    assert not mask[~patch[:, None] & patch[None, :] & same_doc & ~text_after].any()   # text before it: nothing


def _model(codec, vocab=16):
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                      num_patches=codec.num_patches, patch_dim=codec.patch_dim, patch_grid=codec.grid,
                      image_vocab_size=codec.codebook_size)
    model = nf_model.NextFlowModel(cfg)
    return model, jax.jit(model.init)(jax.random.key(0, impl="rbg"), dummy_batch(cfg))["params"]


def test_loss_decreases_and_cached_decode_matches_the_forward(codec, latents):
    model, params = _model(codec)
    assert set(params) == {"embed", "code_in", "block_pos_embed", "backbone", "token_head", "code_head"}
    row = _row(codec, latents, [([5, 6, 4, 7], slice(0, 1))], 50)           # 43 positions + padding
    batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
    tx = optax.adam(3e-3)

    @jax.jit
    def step(p, opt):
        (_, metrics), grads = jax.value_and_grad(
            lambda p: nextflow_objective.nextflow_loss(model, p, batch, 1.0), has_aux=True)(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, metrics
    opt, history = tx.init(params), []
    p = params
    for _ in range(5):
        p, opt, metrics = step(p, opt)
        history.append(jax.device_get(metrics))
    assert set(history[0]) == {"loss", "text_loss", "image_loss", "num_docs", "num_tokens"}
    assert history[0]["num_docs"] == 1 and history[0]["num_tokens"] == 43
    for key in ("loss", "text_loss", "image_loss"):
        assert history[-1][key] < 0.9 * history[0][key], (key, [h[key] for h in history])

    # decode: the row in two chunks of 25 against a KV cache (the split is a group boundary: 4 + 21) equals the
    # training forward on every real position
    full = jax.jit(model.apply)({"params": params}, nf_model.model_inputs(batch))
    mask = attention_mask(batch["segment_ids"], True, batch["block_ids"])
    cache = nf_model.empty_cache(model.cfg, 1, 50)
    decode = jax.jit(lambda c, chunk, pos, m: model.apply({"params": params}, chunk, c, pos, m,
                                                          method=nf_model.NextFlowModel.decode))
    outs = []
    for start in (0, 25):
        sl = slice(start, start + 25)
        chunk = {k: batch[k][:, sl] for k in ("tokens", "is_patch", "patch_index", "patches", "positions")}
        out, cache = decode(cache, chunk, jnp.arange(start, start + 25)[None], mask[:, :, sl])
        outs.append(out)
    real = row["segment_ids"] > 0
    for key in ("q_logits", "code_logits"):
        got = np.concatenate([np.asarray(o[key])[0] for o in outs])
        np.testing.assert_allclose(got[real], np.asarray(full[key])[0][real], rtol=1e-4, atol=1e-4)


def test_run_config_builds_the_model_and_rejects_what_it_cannot_do(tokenizer_dir):
    config = config_lib.load_config_file(SMOKE)
    config.codec.tokenizer = tokenizer_dir
    cfg = config_lib.validate(config, jax.device_count())
    model, codec = train_state.build_model(cfg, 40)
    assert isinstance(model, nf_model.NextFlowModel)
    assert (model.cfg.image_vocab_size, model.cfg.num_patches, model.cfg.patch_dim) == (32, 37, 9)
    assert cfg.data.seq_len >= 2 + 14 + codec.num_patches                     # a caption and its image fit a row
    structure = methods.for_config(cfg).batch_structure(cfg, model.cfg)
    assert set(structure) == set(nextflow_objective.POSITION_FIELDS) | {"segment_ids", "positions"}
    assert structure["patches"] == ((cfg.data.seq_len, 9), np.float32)
    wrong = config_lib.load_config_file(SMOKE)
    wrong.model_type = "ar"
    with pytest.raises(config_lib.UserError, match="'nextflow' method and the 'vq' codec go together"):
        config_lib.resolve(wrong)
    with pytest.raises(ValueError, match="codec 'vq' does not precompute latents"):
        datasets.make_codec(dict(name="vq", tokenizer=tokenizer_dir), 32)


def test_local_sh_trains_tokenizer_then_model_evaluates_and_resumes_exactly(cli, tmp_path):
    """`CONFIG=configs/nextflow_shapes_tiny.py ./launch/local.sh` as a user runs it (smoke sizes): the tokenizer is
    trained first into W/vq, the model names it, the eval table is printed; then a rerun from the step-2 checkpoint
    retraces the same losses (the transform's condition dropout is seeded per document, like every method's)."""
    from cli_utils import REPO, exact_metrics
    wd = tmp_path / "run"
    env = dict(cli.env(1), CONFIG=SMOKE, VQ_CONFIG="configs/vq_shapes_tiny.py:smoke", WORKDIR=str(wd),
               OFJ_EXTRAS=os.environ.get("OFJ_EXTRAS", "torch,test"))     # the test venv's extras: no reinstall
    args = ["--config.total_steps=4", "--config.ckpt_every=2", "--config.log_every=1"]
    result = cli._start(["bash", "launch/local.sh", *args], env).wait(600)
    assert result.returncode == 0, str(result)
    assert (wd / "vq" / "eval.json").exists()
    assert json.loads((wd / "config.json").read_text())["codec"]["tokenizer"] == str(wd / "vq")
    scores = json.loads((wd / "eval" / "step_4.json").read_text())
    assert scores["generation"]["all"]["n"] > 0 and scores["generation"]["nfe_per_request"] >= 4, scores
    assert "shapes-world eval @ step 4" in result.stdout, str(result)

    rerun = tmp_path / "rerun"
    shutil.copytree(wd, rerun)
    shutil.rmtree(rerun / "checkpoints" / "4")
    cpu_flags = next(line.split('"')[1] for line in (REPO / "launch" / "local.sh").read_text().splitlines()
                     if line.startswith("CPU_FLAGS="))           # local.sh's XLA flags: the same numerics
    env = dict(cli.env(1))
    env["XLA_FLAGS"] = f"{cpu_flags} {env['XLA_FLAGS']}"
    cli._start(cli._module_args("train", [f"--config={SMOKE}", f"--workdir={rerun}",
                                          f"--config.codec.tokenizer={wd / 'vq'}", *args]), env).wait().check()
    assert exact_metrics(rerun) == exact_metrics(wd)
