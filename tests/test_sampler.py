"""Sampler <-> loss consistency: an oracle model that knows the remaining bags rebuilds the target exactly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oneflow_jax.objectives import flow_matching
from oneflow_jax.sampling import oneflow_sampler as S
from oneflow_jax.objectives.edit_flow import SpecialTokens
from oneflow_jax.models.transformer import ModelConfig, OneFlowModel, dummy_batch
from oracle import make_oracle_apply

SP = SpecialTokens(bos=1, pad=0, image=3)
N, D, V = 4, 2, 10


def run_oracle(prompts, targets, latents, steps, seed, max_len=64, **kw):
    cfg = S.SamplerConfig(steps=steps, max_len=max_len, **kw)
    state = S.init_state(prompts, max_len, SP, N, D)
    apply_fn = make_oracle_apply(targets, latents, V, SP.image)
    out, nfe = jax.jit(lambda st, r: S.sample_loop(apply_fn, st, r, cfg, SP, N))(state, jax.random.key(seed))
    return S.extract_documents(jax.device_get(out), SP), int(nfe)


def assert_rebuilt(docs, targets, latents):
    for (tokens, images), tgt, lat in zip(docs, targets, latents):
        assert tokens == list(tgt)
        assert len(images) == len(lat)
        for got, want in zip(images, lat):
            np.testing.assert_allclose(got, want, atol=1e-4)


def test_oracle_rebuilds_documents_from_empty_start():
    rng = np.random.default_rng(0)
    targets = [[5, 6, 3, 7, 8, 9, 3, 5, 5, 6], [3, 4, 4, 4, 4, 4, 7], [8]]
    latents = [rng.standard_normal((t.count(3), N, D)).astype(np.float32) for t in targets]
    for seed in range(3):
        docs, nfe = run_oracle([([], None)] * 3, targets, latents, steps=40, seed=seed)
        assert_rebuilt(docs, targets, latents)
        # text stops at t = 1; an image inserted late needs up to `steps` more Euler steps
        assert 40 <= nfe <= 81


def test_oracle_with_fixed_prompt_only_appends_after_it():
    rng = np.random.default_rng(1)
    img = rng.standard_normal((1, N, D)).astype(np.float32)
    # captioning: prompt = <image> + clean latents; generation: prompt = caption, the image comes from noise
    targets = [[3, 5, 6, 7, 8], [5, 6, 7, 3]]
    latents = [img, rng.standard_normal((1, N, D)).astype(np.float32)]
    prompts = [([3], img), ([5, 6, 7], None)]
    docs, _ = run_oracle(prompts, targets, latents, steps=30, seed=0)
    assert_rebuilt(docs, targets, latents)


def test_oracle_rebuilds_images_under_an_image_time_shift():
    rng = np.random.default_rng(2)
    targets = [[5, 3, 6, 3]]
    latents = [rng.standard_normal((2, N, D)).astype(np.float32)]
    docs, _ = run_oracle([([], None)], targets, latents, steps=24, seed=0, image_time_shift=4.0)
    assert_rebuilt(docs, targets, latents)


@pytest.mark.parametrize("shift", [1.0, 4.0])
def test_image_steps_follow_the_shifted_time_grid(shift):
    """A 'model' whose velocity is the patch's own t: Euler integration gives Y0 + sum_k (t_k+1 - t_k) t_k over the
    grid t_k = shift_time(k / steps), so both the times fed to the network and the step sizes are checked."""
    steps = 8

    def apply_fn(inputs, _segments):
        b, length = inputs["tokens"].shape
        return dict(pi_logit=jnp.full((b, length), 20.0), lam=jnp.full((b, length), 1e-3),
                    q_logits=jnp.zeros((b, length, V)), velocity=jnp.broadcast_to(
                        inputs["patch_t"][..., None], inputs["patches"].shape))

    cfg = S.SamplerConfig(steps=steps, max_len=16, image_time_shift=shift)
    state = S.init_state([([5, 3], [None])], 16, SP, N, D, seed=0)
    out, nfe = jax.jit(lambda st, r: S.sample_loop(apply_fn, st, r, cfg, SP, N))(state, jax.random.key(0))
    grid = flow_matching.shift_time(np.arange(steps + 1) / steps, shift)
    expected = state["patches"][0, 3:3 + N] + np.sum(np.diff(grid) * grid[:-1])
    np.testing.assert_allclose(np.asarray(out["patches"])[0, 3:3 + N], expected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["patch_t"])[0, 3:3 + N], 1.0)
    assert int(nfe) == steps


def test_buffer_overflow_drops_insertions_cleanly():
    targets = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]]
    docs, _ = run_oracle([([], None)], targets, [np.zeros((0, N, D), np.float32)], steps=20, seed=0, max_len=8)
    tokens, _ = docs[0]
    assert len(tokens) == 7  # BOS + 7 fill the buffer; the result is still a subsequence of the target
    it = iter(targets[0])
    assert all(any(t == u for u in it) for t in tokens)


def test_real_model_sampler_with_cfg_compiles_once_and_respects_prompt():
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, num_patches=N,
                      patch_dim=D, patch_grid=(2, 2), time_embed_dim=16)
    model = OneFlowModel(cfg)
    params = model.init(jax.random.key(0), dummy_batch(cfg))["params"]
    scfg = S.SamplerConfig(steps=6, max_len=48, text_cfg=2.0, image_cfg=3.0, temperature=0.8, top_p=0.9)
    run = S.make_sampler(model, scfg, SP, N)
    img = np.ones((1, N, D), np.float32)
    state = S.init_state([([3], img), ([5, 6], None)], 48, SP, N, D)
    out, nfe = run(params, state, jax.random.key(1))
    out2, _ = run(params, S.init_state([([7], None), ([], None)], 48, SP, N, D), jax.random.key(2))
    assert run._cache_size() == 1
    out = jax.device_get(out)
    assert out["length"][0] >= 1 + 1 + N and out["length"][1] >= 3
    np.testing.assert_array_equal(out["tokens"][0, :2], [SP.bos, 3])
    np.testing.assert_array_equal(out["patches"][0, 2:2 + N], img[0])          # prompt image stays clean
    np.testing.assert_array_equal(out["tokens"][1, :3], [SP.bos, 5, 6])
    # no BOS/PAD is ever inserted, and every image block is complete and finished denoising
    for r in range(2):
        n = out["length"][r]
        text = out["tokens"][r, 1:n][~out["is_patch"][r, 1:n]]
        assert not np.isin(text, [SP.bos, SP.pad]).any()
        assert (out["patch_t"][r, :n][out["is_patch"][r, :n]] == 1.0).all()
        assert np.isfinite(out["patches"][r, :n]).all()


def test_init_state_rejects_mismatched_images():
    with pytest.raises(ValueError, match="<image> markers"):
        S.init_state([([3, 3], np.zeros((1, N, D)))], 32, SP, N, D)
    with pytest.raises(ValueError, match="max_len"):
        S.init_state([([5] * 40, None)], 32, SP, N, D)


def recording_oracle(targets, latents, scale_lam=1.0):
    """make_oracle_apply whose lambda is multiplied by `scale_lam`, recording each call's (tokens, length, true
    lambda)."""
    from oracle import oracle_heads
    calls = []

    def heads(tokens, is_patch, patch_t, patches, length):
        pi, lam, q, vel = oracle_heads(tokens, is_patch, patch_t, patches, length, targets, latents, V, SP.image)
        calls.append((tokens.copy(), length.copy(), lam.copy()))
        return pi, lam * np.float32(scale_lam), q, vel

    def apply_fn(inputs, _segments):
        b, L = inputs["tokens"].shape
        shapes = (jax.ShapeDtypeStruct((b, L), jnp.float32), jax.ShapeDtypeStruct((b, L), jnp.float32),
                  jax.ShapeDtypeStruct((b, L, V), jnp.float32), jax.ShapeDtypeStruct((b, L, D), jnp.float32))
        length = jnp.sum(inputs["segment_ids"] > 0, axis=1)
        pi, lam, q, vel = jax.pure_callback(lambda *a: heads(*(np.asarray(x) for x in a)), shapes, inputs["tokens"],
                                            inputs["is_patch"], inputs["patch_t"], inputs["patches"], length)
        return dict(pi_logit=pi, lam=lam, q_logits=q, velocity=vel)
    return apply_fn, calls


def run_recorded(targets, latents, steps, scale_lam=1.0, **kw):
    """(documents, nfe, the oracle's recorded calls) of one sampler run from empty prompts."""
    apply_fn, calls = recording_oracle(targets, latents, scale_lam)
    cfg = S.SamplerConfig(steps=steps, max_len=64, **kw)
    state = S.init_state([([], None)] * len(targets), 64, SP, N, D)
    out, nfe = jax.jit(lambda st, r: S.sample_loop(apply_fn, st, r, cfg, SP, N))(state, jax.random.key(0))
    return S.extract_documents(jax.device_get(out), SP), int(nfe), calls


def call_lengths(calls):
    """[calls, B] state lengths the sampler showed the model, call by call."""
    return np.stack([length for _, length, _ in calls])


def test_one_insertion_per_step_rebuilds_documents_past_the_last_step():
    rng = np.random.default_rng(3)
    targets = [[5, 6, 3, 7, 8, 9, 5, 6, 7, 8, 9, 5], [7, 3, 8]]
    latents = [rng.standard_normal((t.count(3), N, D)).astype(np.float32) for t in targets]
    docs, nfe, calls = run_recorded(targets, latents, steps=6, max_insertions_per_step=1)
    lengths = call_lengths(calls)
    assert_rebuilt(docs, targets, latents)
    growth = np.diff(np.concatenate([lengths, [[1 + len(t) + N * t.count(3) for t in targets]]]), axis=0)
    assert set(np.unique(growth)) <= {0, 1, 1 + N}            # one atom (a token, or <image> + its block) per step
    assert nfe >= len(targets[0]) > 6                          # postponed insertions ran past the 6 scheduled steps
    # without the cap the same 6 steps insert several atoms at once
    _, _, free = run_recorded(targets, latents, steps=6)
    assert np.diff(call_lengths(free), axis=0).max() > 1 + N


def test_finish_threshold_completes_gaps_the_last_step_left_open():
    """A model whose rates are 100x too low leaves most of the text out under Alg. 1; with finish_threshold the
    sampler keeps stepping at t = 1 (rate factor 1) while pi says a gap is unfinished, and rebuilds the text."""
    targets = [[5, 6, 7, 8, 9, 5, 6]]
    latents = [np.zeros((0, N, D), np.float32)]
    short, nfe_alg1, _ = run_recorded(targets, latents, steps=8, scale_lam=0.01)
    assert len(short[0][0]) < len(targets[0]) and nfe_alg1 == 8
    docs, nfe, _ = run_recorded(targets, latents, steps=8, scale_lam=0.01, finish_threshold=0.5)
    assert_rebuilt(docs, targets, latents)
    assert nfe > 8


def _insertion_gaps(targets, order):
    """Runs the capped sampler with every unfinished gap firing each step (lambda scaled 1000x) and returns, per
    insertion, the true lambda of the gap that received the atom and the largest lambda of that state."""
    latents = [np.zeros((0, N, D), np.float32) for _ in targets]
    docs, _, calls = run_recorded(targets, latents, steps=4, scale_lam=1000.0, max_insertions_per_step=1,
                                  finish_threshold=0.5, insertion_order=order)
    assert_rebuilt(docs, targets, latents)
    chosen = []
    for (tok, length, lam), (next_tok, next_length, _) in zip(calls, calls[1:]):
        for r in range(len(targets)):
            if next_length[r] > length[r]:
                p = int(np.argmax(tok[r] != next_tok[r]))         # the new atom sits at p: it filled gap p - 1
                chosen.append((lam[r, p - 1], lam[r, :length[r]].max()))
    return chosen


def test_largest_gap_order_fills_the_gap_with_the_most_missing_atoms_first():
    targets = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 9, 8]]
    chosen = _insertion_gaps(targets, "largest_gap")
    assert len(chosen) >= sum(map(len, targets)) - len(targets)   # the last atoms land after the last recorded call
    assert all(got == best for got, best in chosen)
    assert any(got < best for got, best in _insertion_gaps(targets, "random"))    # random order does not
    with pytest.raises(ValueError, match="insertion_order"):
        S.SamplerConfig(insertion_order="smallest")
