"""The NextFlow-style baseline's sampler (sampling/nextflow_sampler.py, docs/nextflow.md "Sampling"): KV-cached
scale-by-scale sampling against one uncached forward of the sampled documents (with and without VAR's CFG), K + 1
network evaluations per image, captioning from a prefilled image, and top-k draws (sampling/common.py)."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oneflow_jax.models import vq
from oneflow_jax.models.nextflow_transformer import NextFlowModel, model_inputs
from oneflow_jax.models.transformer import ModelConfig
from oneflow_jax.models.vq_codec import VQCodec
from oneflow_jax.objectives import nextflow_objective
from oneflow_jax.objectives.ar_objective import ARSpecial, ARPacker
from oneflow_jax.sampling import nextflow_sampler as S
from oneflow_jax.sampling.common import SamplerConfig, sample_tokens

SP = ARSpecial(bos=1, eos=2, pad=0, image=4)
SEQ = 112                       # the uncached forward's row length (>= max_len + EOS)
GREEDY = dict(temperature=1e-6, code_temperature=1e-6)
TOL = 1e-3                      # a greedy draw is the argmax up to this (KV-cached vs uncached float error)


def _random_params(init, seed: int):
    """Random weights of `init`'s parameter structure, from its shapes alone (jax.eval_shape: compiling an init costs
    seconds on CPU): N(0, 0.3) everywhere, 1 + N(0, 0.1) for norm scales."""
    def draw(path, leaf):
        scale = "scale" in jax.tree_util.keystr(path)
        return (float(scale) + rng.normal(0, 0.1 if scale else 0.3, leaf.shape)).astype(leaf.dtype)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(init))


@pytest.fixture(scope="module")
def setup():
    vq_cfg = vq.VQConfig(image_size=16, channels=(8, 16, 32), downsample=4, code_dim=8, codebook_size=32,
                         scales=(1, 2, 4)).validate()
    codec = VQCodec(vq_cfg, _random_params(functools.partial(vq.init_params, vq_cfg), 0))
    cfg = ModelConfig(vocab_size=24, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      num_patches=codec.num_patches, patch_dim=codec.patch_dim, patch_grid=codec.grid,
                      image_vocab_size=codec.codebook_size)
    model = NextFlowModel(cfg)
    transform = nextflow_objective.NextFlowTransform(SP, codec.group_sizes)
    packer = ARPacker(SEQ, pad_id=SP.pad, fields=nextflow_objective.POSITION_FIELDS)
    row = lambda tokens, latents: {k: jnp.asarray(v)[None] for k, v in packer.pack([transform(
        np.asarray(tokens, np.int32), np.asarray(latents, np.float32).reshape(-1, codec.num_patches, codec.patch_dim),
        np.random.default_rng(0))]).items()}
    init = lambda: model.init(jax.random.key(0), model_inputs(row([5, 6], [])))["params"]
    params = nn.meta.unbox(_random_params(init, 1))
    # <image> scores as token 23 (greedy text's favourite here) but 5% higher: greedy rows also open images mid-text
    params["token_head"]["kernel"][:, SP.image] = 1.05 * params["token_head"]["kernel"][:, 23]
    forward = jax.jit(lambda p, batch: model.apply({"params": p}, model_inputs(batch)))

    def uncached(tokens, latents):
        """(q_logits, code_logits) [SEQ, V] of one uncached forward over BOS tokens(+blocks) EOS."""
        out = forward(params, row(tokens, latents))
        return np.asarray(out["q_logits"][0], np.float32), np.asarray(out["code_logits"][0], np.float32)

    rng = np.random.default_rng(2)            # a given image: the block latents of random token maps
    given = codec.codes_to_latents([rng.integers(0, codec.codebook_size, (1, s, s)) for s in codec.scales])[0]
    return dict(codec=codec, model=model, params=params, uncached=uncached, given=given)


def _sample(s, prompts, max_len, **sampler):
    scfg = SamplerConfig(max_len=max_len, **sampler)
    sample = S.make_sampler(s["model"], scfg, SP, s["codec"].num_patches, codec=s["codec"])
    state = S.init_state(prompts, max_len, SP, s["codec"].num_patches, s["codec"].patch_dim, seed=0)
    final, nfe = sample(s["params"], state, jax.random.key(0))
    final = jax.device_get(final)
    return state, final, int(nfe), S.extract_documents(final, SP)


def _log_softmax(x):
    return np.asarray(jax.nn.log_softmax(jnp.asarray(x), axis=-1))


def _check_greedy(s, state, final, docs, image_cfg):
    """Every draw of the KV-cached sampler is the argmax of the logits one uncached forward over the sampled document
    gives at that position: text from q_logits (BOS, PAD and a BOI without room banned), codes from code_logits
    (with CFG: l_u + w_g (l_c - l_u), l_u from `BOS <image> block`). Generated blocks hold the features the codec
    computes from their codes (VAR's teacher-forcing inputs). Returns the number of generated images."""
    codec = s["codec"]
    n, off, k_scales = codec.num_patches, codec.group_offsets, len(codec.scales)
    generated = 0
    for r, (tokens, latents) in enumerate(docs):
        q, code = s["uncached"](tokens, latents)
        seq, length, prompt_len = final["tokens"][r], int(final["length"][r]), int(state["prompt_len"][r])
        for j in range(prompt_len, length):
            if final["is_patch"][r, j]:
                continue
            allowed = np.ones(q.shape[-1], bool)
            allowed[[SP.bos, SP.pad]] = False
            allowed[SP.image] = j + n < final["tokens"].shape[1]
            assert allowed[seq[j]] and q[j - 1, seq[j]] >= q[j - 1, allowed].max() - TOL, (r, j)
        starts = [j + 1 for j in range(length) if seq[j] == SP.image and not final["is_patch"][r, j]]
        for start, lat in zip(starts, latents):
            if start < prompt_len:                       # a prompt image: prefilled as given
                np.testing.assert_array_equal(lat, s["given"])
                continue
            generated += 1
            codes = np.rint(lat[:codec.num_codes, -1]).astype(np.int32)
            maps = [codes[off[k]:off[k + 1]].reshape(1, sz, sz) for k, sz in enumerate(codec.scales)]
            np.testing.assert_allclose(lat, codec.codes_to_latents(maps)[0], atol=1e-5)
            l_c = _log_softmax(code[start:start + codec.num_codes])
            if image_cfg != 1.0:
                l_u = _log_softmax(s["uncached"]([SP.image], lat[None])[1][2:2 + codec.num_codes])
                w = np.concatenate([np.full(off[k + 1] - off[k], 1 + (image_cfg - 1) * k / (k_scales - 1))
                                    for k in range(k_scales)])
                l_c = l_u + w[:, None] * (l_c - l_u)
            wrong = np.take_along_axis(l_c, codes[:, None], 1)[:, 0] < l_c.max(-1) - TOL
            assert not wrong.any(), (r, start, np.flatnonzero(wrong))           # block positions drawn off the argmax
    return generated


def _text_steps_and_image_phases(state, final, n):
    """(text steps, image phases) of a run: rows step text together, so the text steps are the most any row sampled;
    an image phase is the pending prompt images (one phase) or a text step in which some row drew `<image>`."""
    steps, phases = 0, set()
    for r in range(final["tokens"].shape[0]):
        j, drawn = int(state["prompt_len"][r]), 0
        if state["pending"][r]:
            phases.add(-1)
            j += n
        while j < int(final["length"][r]):
            drawn += 1
            if final["tokens"][r, j] == SP.image:
                phases.add(drawn)
                j += n
            j += 1
        steps = max(steps, drawn)
    return steps, len(phases)


def test_kv_cached_guided_sampling_equals_uncached_and_costs_k_plus_1_per_image(setup):
    """Greedy, CFG w = 3: a prompt ending in `<image>` to generate, and a captioning prompt (a given image)."""
    codec, n = setup["codec"], setup["codec"].num_patches
    prompts = [([5, 6, SP.image], [None]), ([SP.image], [setup["given"]])]
    state, final, nfe, docs = _sample(setup, prompts, 96, image_cfg=3.0, **GREEDY)
    assert docs[0][0][:3] == [5, 6, SP.image] and len(docs[0][1]) >= 1
    generated = _check_greedy(setup, state, final, docs, image_cfg=3.0)
    steps, phases = _text_steps_and_image_phases(state, final, n)
    k = len(codec.scales)
    assert nfe == 1 + steps + phases * (k + 1), (nfe, steps, phases)     # guidance batched into each evaluation
    assert generated >= 2 and phases >= 2              # the prompt's image, and one opened by a text step
    # captioning: the given image is prefilled and text follows it
    assert docs[1][0][0] == SP.image and len(docs[1][0]) > 1 and len(docs[1][1]) >= 1
    for _, latents in docs:
        for lat in latents:
            assert codec.decode(lat).shape == codec.image_shape


def test_unguided_image_costs_k_plus_1_evaluations_and_decodes(setup):
    codec, n = setup["codec"], setup["codec"].num_patches
    state, final, nfe, docs = _sample(setup, [([SP.image], [None])], 2 + n + 6, **GREEDY)
    assert _check_greedy(setup, state, final, docs, image_cfg=1.0) == 1
    text_drawn = int(final["length"][0]) - int(state["prompt_len"][0]) - n
    assert 1 <= text_drawn <= 6
    assert nfe == 1 + (len(codec.scales) + 1) + text_drawn           # prefill, K + 1 for the image, text steps
    image = codec.decode(docs[0][1][0])
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8


def test_init_state_blanks_a_generated_block_and_needs_the_codec(setup):
    n, dim = setup["codec"].num_patches, setup["codec"].patch_dim
    st = S.init_state([([7, SP.image], [None])], 64, SP, n, dim)
    block = st["patches"][0, 3:3 + n]
    assert st["pending"][0] and st["prompt_len"][0] == 3
    assert (block[:, :-1] == 0).all() and (block[:, -1] == -1).all()
    with pytest.raises(ValueError, match="codec"):
        S.make_sampler(setup["model"], SamplerConfig(), SP, n)


def test_top_k_draws_only_the_k_most_likely():
    log_q = jax.nn.log_softmax(jax.random.normal(jax.random.key(0), (8, 20)) * 2, axis=-1)
    best3 = np.argsort(-np.asarray(log_q), axis=-1)[:, :3]
    for top_p in (1.0, 0.9):
        draw = jax.jit(jax.vmap(lambda key, p=top_p: sample_tokens(key, log_q, 1.0, p, top_k=3)))
        draws = np.asarray(draw(jax.random.split(jax.random.key(1), 64)))                 # [64 draws, 8 rows]
        assert all(np.isin(draws[:, r], best3[r]).all() for r in range(8))
        assert len(np.unique(draws)) > 8                  # still a draw, not the argmax
        np.testing.assert_array_equal(sample_tokens(jax.random.key(2), log_q, 1.0, top_p, top_k=1),
                                      np.argmax(log_q, -1))
    with pytest.raises(ValueError, match="top_k"):
        SamplerConfig(top_k=-1)
