"""The AR+FM baseline (reference §7): sequence/targets/mask, loss gradients, KV-cached sampler, and the train /
sample / eval CLIs on AR workdirs (the comparison: test_compare.py)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oneflow_jax.models import ar_transformer as ar_model
from oneflow_jax.objectives import ar_objective
from oneflow_jax.sampling import ar_sampler
from oneflow_jax.models.transformer import ModelConfig, attention_mask, dummy_batch
from oneflow_jax.sampling.oneflow_sampler import SamplerConfig

pytest.register_assert_rewrite("cli_utils")
from cli_utils import read_metrics  # noqa: E402

pytest_plugins = ("cli_utils",)

N = 4
CFG = ModelConfig(vocab_size=24, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, num_patches=N,
                  patch_dim=3, patch_grid=(2, 2), time_embed_dim=16)
SP = ar_objective.ARSpecial(bos=1, eos=2, pad=0, image=4)


def _docs():
    tr = ar_objective.ARTransform(SP, N)
    rng = np.random.default_rng(0)
    lat = lambda k: rng.standard_normal((k, N, 3)).astype(np.float32)
    return [tr([5, 6, 4, 7], lat(1), rng), tr([4, 8, 9], lat(1), rng), tr([10, 4, 11, 4], lat(2), rng)]


@pytest.fixture(scope="module")
def params():
    return ar_model.ARModel(CFG).init(jax.random.key(0), dummy_batch(CFG))["params"]


def test_sequence_targets_at_block_boundaries():
    d = _docs()[0]
    # BOS 5 6 <image> p p p p 7 EOS
    np.testing.assert_array_equal(d["tokens"], [1, 5, 6, 4, 0, 0, 0, 0, 7, 2])
    np.testing.assert_array_equal(d["is_patch"], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0])
    has = d["target_weight"] > 0
    np.testing.assert_array_equal(has, [1, 1, 1, 0, 0, 0, 0, 1, 1, 0])   # BOI predicts no patch; last patch -> 7
    np.testing.assert_array_equal(d["targets"][has], [5, 6, 4, 7, 2])
    np.testing.assert_allclose(d["target_weight"].sum(), 1.0)
    assert (d["patch_t"][4:8] >= 0.5).all()                               # followed by text: conditioning image


def test_image_time_shift_moves_noise_levels_but_keeps_the_conditioning_cap():
    tr = ar_objective.ARTransform(SP, N, cond_t_min=0.5, image_time_shift=4.0)
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((1, N, 3)).astype(np.float32)
    last = [tr([5, 4], lat, rng)["patch_t"][3] for _ in range(400)]         # the image ends the document
    cond = [tr([4, 5], lat, rng)["patch_t"][2] for _ in range(400)]         # an image followed by text
    assert abs(np.median(last) - 0.2) < 0.05                                # shift_time(1/2, 4) = 1/5
    assert min(cond) >= 0.5 and np.median(cond) < 0.75                      # warped inside [cond_t_min, 1]


def test_packed_mask_no_cross_document_and_bidirectional_blocks():
    row = ar_objective.ARPacker(40).pack(_docs())
    seg, blk = row["segment_ids"], row["block_ids"]
    assert sorted(set(blk[blk > 0])) == [1, 2, 3, 4]                      # row-unique block ids
    mask = np.asarray(attention_mask(jnp.asarray(seg)[None], True, jnp.asarray(blk)[None]))[0, 0]
    for q in range(40):
        for k in range(40):
            same = seg[q] == seg[k] and seg[q] > 0
            want = same and (k <= q or (blk[q] == blk[k] and blk[q] > 0))
            assert mask[q, k] == want, (q, k)
    np.testing.assert_allclose(row["target_weight"].sum(), 3.0)           # one per document


def test_loss_gradient_finite(params):
    row = ar_objective.ARPacker(40).pack(_docs())
    batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
    model = ar_model.ARModel(CFG)
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: ar_objective.ar_loss(model, p, batch, 1.0), has_aux=True)(params)
    assert np.isfinite(float(loss)) and float(metrics["num_docs"]) == pytest.approx(3.0)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))
    assert float(optax_norm(grads)) > 0


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(tree)))


def test_cached_decoding_matches_full_recompute(params):
    """Prefill a prefix, then decode the rest one position at a time (and a whole image block as one chunk):
    the logits equal those of one full causal forward."""
    model = ar_model.ARModel(CFG)
    row = ar_objective.ARPacker(12).pack(_docs()[:1])        # BOS 5 6 <image> pppp 7 EOS
    batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
    full = model.apply({"params": params}, ar_model.model_inputs(batch))["q_logits"][0]
    length = 12
    cache = ar_model.empty_cache(CFG, 1, length)
    keys = ("tokens", "is_patch", "patch_index", "patches", "patch_t", "positions")
    chunks = [(0, 3), (3, 4), (4, 8), (8, 9), (9, 10)]
    for a, b in chunks:
        chunk = {k: batch[k][:, a:b] for k in keys}
        q_end = b if batch["is_patch"][0, a] else None
        kpos = jnp.arange(length)
        qpos = jnp.arange(a, b)
        allowed = (kpos[None] < b) if q_end else (kpos[None] <= qpos[:, None])
        out, cache = model.apply({"params": params}, chunk, cache, jnp.arange(a, b)[None], allowed[None, None],
                                 method=ar_model.ARModel.decode)
        np.testing.assert_allclose(out["q_logits"][0], full[a:b], atol=1e-4, rtol=1e-4)


def test_sampler_documents_end_with_eos_and_whole_blocks(params):
    model = ar_model.ARModel(CFG)
    scfg = SamplerConfig(steps=3, max_len=48)
    sample = ar_sampler.make_sampler(model, scfg, SP, N)
    rng = np.random.default_rng(1)
    prompts = [([4], [rng.standard_normal((N, 3))]), ([5, 4], [None]), ([], [])]
    st = ar_sampler.init_state(prompts, 48, SP, N, 3, seed=0)
    final, nfe = sample(params, st, jax.random.key(0))
    final = jax.device_get(final)
    assert int(nfe) >= 1 + 3 + 1                     # prefill + the prompted image's Euler steps + clean pass
    for r, (text, images) in enumerate(ar_sampler.extract_documents(final, SP)):
        n = int(final["length"][r])
        toks, patch = final["tokens"][r, :n], final["is_patch"][r, :n]
        assert n == 48 or (toks[-1] == SP.eos and not patch[-1]), (r, toks)
        assert text.count(SP.image) == len(images) and all(im.shape == (N, 3) for im in images)
        assert (final["patch_t"][r, :n][patch] == 1.0).all()          # every block fully denoised
        if r == 1:
            assert text[:2] == [5, 4] and len(images) >= 1


# ------------------------------------------------------------------------------------------- CLIs


def test_train_sample_eval_on_ar_workdir(cli, tmp_path, png_path):
    wd = tmp_path / "ar"
    res = cli.run("train", "--config=configs/ar_shapes_tiny.py:smoke", f"--workdir={wd}",
                  "--config.total_steps=4", "--config.ckpt_every=2", "--config.log_every=1",
                  "--config.sample_every=2").check()
    rows = read_metrics(wd)
    assert [r["step"] for r in rows] == [1, 2, 3, 4], res
    for step in (2, 4):       # the train loop's periodic samples: 4 captions, 4 generations, 2 free documents
        assert (wd / "samples" / f"step_{step:07d}" / "grid.png").exists()
        assert len((wd / "samples" / f"step_{step:07d}" / "texts.txt").read_text().splitlines()) == 10
    assert all(np.isfinite(r["loss"]) and "text_loss" in r and "image_loss" in r for r in rows)
    assert json.loads((wd / "config.json").read_text())["model_type"] == "ar"
    out = tmp_path / "samples"
    cli.run("sample", f"--workdir={wd}", "--prompt=<image>", f"--image={png_path}", f"--out={out}").check()
    text = (out / "0000_00.txt").read_text()
    assert text.startswith("<image>") and len(list(out.glob("0000_00_img*.png"))) == text.count("<image>")
    res = cli.run("eval", f"--workdir={wd}", "--num_examples=4", "--num_free=1", "--steps=2").check()
    scores = json.loads((wd / "eval" / "step_4.json").read_text())
    assert scores["caption"]["all"]["n"] == 4 and scores["caption"]["nfe_per_batch"] >= 1, res
    # cost as a user feels it: evaluations and latency of one request, throughput at the eval batch size
    for task in ("caption", "generation"):
        assert scores[task]["nfe_per_request"] >= 1 and scores[task]["latency_s"] > 0, res
        assert scores[task]["per_second"] > 0 and scores[task]["warmup_s"] > 0, res
    assert "per request at batch 1" in res.stdout, res
    cli.run("eval", f"--workdir={wd}", "--task=likelihood", "--num_examples=4").check()    # the AR side: exact NLL
    nll = json.loads((wd / "eval" / "likelihood_step_4.json").read_text())
    assert nll["kind"] == "exact NLL (AR+FM)" and nll["documents"] == 4 and np.isfinite(nll["bits_per_token"])


@pytest.fixture(scope="module")
def png_path(tmp_path_factory):
    from PIL import Image
    path = tmp_path_factory.mktemp("png") / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path
