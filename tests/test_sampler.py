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

    def apply_fn(inputs, _live_len):
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


@pytest.mark.parametrize("field, value, words", [("temperature", -1.0, "temperature"), ("top_p", 0.0, "top_p"),
                                                  ("code_temperature", 0.0, "code_temperature"),
                                                  ("image_cfg", -2.0, "image_cfg"), ("max_len", 1, "max_len")])
def test_sampler_config_rejects_values_that_would_sample_nonsense(field, value, words):
    with pytest.raises(ValueError, match=words):
        S.SamplerConfig(**{field: value})


def test_init_state_rejects_mismatched_images():
    with pytest.raises(ValueError, match="<image> markers"):
        S.init_state([([3, 3], np.zeros((1, N, D)))], 32, SP, N, D)
    with pytest.raises(ValueError, match="max_len"):
        S.init_state([([5] * 40, None)], 32, SP, N, D)


def recording_oracle(targets, latents, scale_lam=1.0):
    """make_oracle_apply whose lambda is multiplied by `scale_lam`, recording each call's inputs and true lambda (a
    dict: tokens, is_patch, patch_t, length, lam)."""
    from oracle import oracle_heads
    calls = []

    def heads(tokens, is_patch, patch_t, patches, length):
        pi, lam, q, vel = oracle_heads(tokens, is_patch, patch_t, patches, length, targets, latents, V, SP.image)
        calls.append(dict(tokens=tokens.copy(), is_patch=is_patch.copy(), patch_t=patch_t.copy(),
                          length=length.copy(), lam=lam.copy()))
        return pi, lam * np.float32(scale_lam), q, vel

    def apply_fn(inputs, _live_len):
        b, L = inputs["tokens"].shape
        shapes = (jax.ShapeDtypeStruct((b, L), jnp.float32), jax.ShapeDtypeStruct((b, L), jnp.float32),
                  jax.ShapeDtypeStruct((b, L, V), jnp.float32), jax.ShapeDtypeStruct((b, L, D), jnp.float32))
        length = jnp.sum(inputs["segment_ids"] > 0, axis=1)
        pi, lam, q, vel = jax.pure_callback(lambda *a: heads(*(np.asarray(x) for x in a)), shapes, inputs["tokens"],
                                            inputs["is_patch"], inputs["patch_t"], inputs["patches"], length)
        return dict(pi_logit=pi, lam=lam, q_logits=q, velocity=vel)
    return apply_fn, calls


def run_recorded(targets, latents, steps, scale_lam=1.0, seed=0, **kw):
    """(documents, nfe, the oracle's recorded calls) of one sampler run from empty prompts."""
    apply_fn, calls = recording_oracle(targets, latents, scale_lam)
    cfg = S.SamplerConfig(steps=steps, max_len=64, **kw)
    state = S.init_state([([], None)] * len(targets), 64, SP, N, D)
    out, nfe = jax.jit(lambda st, r: S.sample_loop(apply_fn, st, r, cfg, SP, N))(state, jax.random.key(seed))
    return S.extract_documents(jax.device_get(out), SP), int(nfe), calls


def call_lengths(calls):
    """[calls, B] state lengths the sampler showed the model, call by call."""
    return np.stack([c["length"] for c in calls])


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
    for call, after in zip(calls, calls[1:]):
        tok, length, lam = call["tokens"], call["length"], call["lam"]
        for r in range(len(targets)):
            if after["length"][r] > length[r]:
                p = int(np.argmax(tok[r] != after["tokens"][r]))   # the new atom sits at p: it filled gap p - 1
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


# ------------------------------------------------------------------------------------------------ confident rule

def test_confident_rule_rebuilds_documents_in_far_fewer_evaluations_than_atoms():
    """The oracle's Q is exactly its bag, so every open gap is confident: each evaluation fills every open gap at
    once (the text at most doubles per step; a random pick from a bag splits it unevenly) and the rule stops as soon
    as no gap expects more, without a confirming pass."""
    rng = np.random.default_rng(4)
    targets = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 4, 4, 4], [9, 8, 7], [6]]
    latents = [np.zeros((0, N, D), np.float32) for _ in targets]
    docs, nfe, calls = run_recorded(targets, latents, steps=8, insertion_rule="confident")
    assert_rebuilt(docs, targets, latents)
    lengths = np.concatenate([call_lengths(calls), [[1 + len(t) for t in targets]]])
    assert nfe == len(calls) <= 8 < len(targets[0])                  # 13 tokens in at most 8 evaluations
    assert (np.diff(lengths[:, 0]) >= 1).all()                       # every evaluation inserted: no confirming pass
    assert np.diff(lengths[:, 0]).max() > 1
    # with an image: the text is done early, its image takes `steps` Euler steps from its insertion
    targets = [[5, 3, 6, 7]]
    latents = [rng.standard_normal((1, N, D)).astype(np.float32)]
    docs, nfe = run_oracle([([], None)], targets, latents, steps=8, seed=0, insertion_rule="confident")
    assert_rebuilt(docs, targets, latents)
    assert 8 < nfe <= 8 + 3


def test_confident_rule_inserts_one_atom_where_q_is_spread_wider_than_the_gap():
    """A gap missing one atom whose Q splits between two colours is not confident: only the most confident open gap
    inserts, one atom per evaluation."""
    def apply_fn(inputs, _live_len):
        b, length = inputs["tokens"].shape
        n = jnp.sum(inputs["segment_ids"] > 0, axis=1, keepdims=True)      # every gap open until BOS + 4 atoms
        q = jnp.full((b, length, V), -1e9).at[..., 5].set(0.0).at[..., 6].set(0.0)   # two equally likely tokens
        return dict(pi_logit=jnp.where(n < 5, -20.0, 20.0) * jnp.ones((b, length)),
                    lam=jnp.where(n == 1, 2.0, 1.0) * jnp.ones((b, length)), q_logits=q,
                    velocity=jnp.zeros(inputs["patches"].shape))

    cfg = S.SamplerConfig(steps=4, max_len=16, insertion_rule="confident")
    state = S.init_state([([], None)], 16, SP, N, D)
    out, nfe = jax.jit(lambda st, r: S.sample_loop(apply_fn, st, r, cfg, SP, N))(state, jax.random.key(0))
    # one atom per evaluation (4), then one evaluation that finds every gap closed
    assert int(out["length"][0]) == 5 and int(nfe) == 5
    # the same gaps with Q on one token are confident: both gaps of [BOS, a] insert at once, and as each expected one
    # atom (lambda = 1) the text is done: BOS + 3 atoms in 2 evaluations
    one = lambda inputs, live: {**apply_fn(inputs, live), "q_logits": jnp.full((1, 16, V), -1e9).at[..., 5].set(0.0)}
    out, nfe = jax.jit(lambda st, r: S.sample_loop(one, st, r, cfg, SP, N))(state, jax.random.key(0))
    assert int(out["length"][0]) == 4 and int(nfe) == 2



def test_images_wait_for_text_keeps_every_image_at_noise_until_the_text_is_written():
    """images_wait_for_text: while an evaluation still sees an open gap, the row's images take no Euler step (they
    stay N(0, I) at t_img = 0), so each image denoises from its finished text, as text-to-image examples train it;
    the document is still rebuilt exactly, and its images then take their `steps` Euler steps together. Without the
    option the images move while the text is being written."""
    rng = np.random.default_rng(5)
    targets = [[5, 6, 3, 7, 8, 9, 3, 5, 5, 6]]
    latents = [rng.standard_normal((2, N, D)).astype(np.float32)]

    def run(wait):
        """Per evaluation: (text complete, noise levels of the live image patches); the number of evaluations."""
        docs, nfe, calls = run_recorded(targets, latents, steps=8, seed=1, insertion_rule="confident",
                                        images_wait_for_text=wait)
        assert_rebuilt(docs, targets, latents)
        seen = []
        for c in calls:
            n = int(c["length"][0])
            live = ~c["is_patch"][0, 1:n]
            seen.append(([int(t) for t in c["tokens"][0, 1:n][live]] == targets[0],
                         c["patch_t"][0, :n][c["is_patch"][0, :n]]))
        return seen, nfe

    seen, nfe = run(wait=True)
    writing = [t for done, t in seen if not done]
    assert writing and any(t.size for t in writing)                # images were inserted while the text was written
    assert all((t == 0.0).all() for t in writing)
    assert nfe == len(writing) + 8                                  # then 8 Euler steps, every image at once
    seen, _ = run(wait=False)
    assert any((t > 0.0).any() for done, t in seen if not done)


# ------------------------------------------------------------------------------------------------ guidance

def _random_model():
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, num_patches=N,
                      patch_dim=D, patch_grid=(2, 2), time_embed_dim=16)
    model = OneFlowModel(cfg)
    params = model.init(jax.random.key(0), dummy_batch(cfg))["params"]
    leaves, tree = jax.tree.flatten(params)     # zero-initialised heads perturbed, so every output depends on input
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return lambda inputs: model.apply({"params": params}, inputs)


def _plain_heads(apply, prompt, max_len=24, patch_t=None):
    """The model's heads on a document laid out from scratch (the dropped document, built by hand)."""
    st = S.init_state([prompt], max_len, SP, N, D)
    if patch_t is not None:
        st["patch_t"] = np.where(st["is_patch"], patch_t, st["patch_t"]).astype(np.float32)
    return jax.device_get(apply(S._model_inputs({k: jnp.asarray(v) for k, v in st.items()})))


def test_text_guidance_pass_is_the_document_without_the_prompt_images():
    """Captioning `<image>` + generated text: the unconditional pass must equal the plain model on BOS + the
    generated text (training's drop_images), BOS reading the first gap (owned by the prompt's `<image>`)."""
    apply = _random_model()
    img = np.random.default_rng(0).standard_normal((1, N, D)).astype(np.float32)
    st = S.init_state([([3], img)], 24, SP, N, D)                       # BOS <image> block | prompt_len 6
    st["tokens"][0, 6:9], st["length"][0] = [5, 7, 8], 9                 # three generated tokens
    st = {k: jnp.asarray(v) for k, v in st.items()}
    masks = S.condition_masks(st, SP)
    pi_u, log_lam_u, log_q_u, _ = jax.device_get(
        S.unconditional_heads(lambda x, _live: apply(x), st, masks["text"]))
    want = _plain_heads(apply, ([5, 7, 8], None))                        # BOS 5 7 8
    cond_pos, plain_pos = [0, 1, 6, 7, 8], [0, 0, 1, 2, 3]             # <image>'s gap is BOS's in the dropped doc
    np.testing.assert_allclose(pi_u[0, cond_pos], want["pi_logit"][0, plain_pos], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(log_lam_u[0, cond_pos], np.log(want["lam"][0, plain_pos]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(log_q_u[0, cond_pos], jax.nn.log_softmax(want["q_logits"][0, plain_pos]),
                               rtol=1e-5, atol=1e-5)
    # and the conditional heads differ: the image is seen there
    cond = jax.device_get(apply(S._model_inputs(st)))
    assert np.abs(cond["pi_logit"][0, 6:9] - want["pi_logit"][0, 1:4]).max() > 1e-3


def test_image_guidance_pass_is_the_document_without_its_text():
    """Text-to-image `5 6 <image>` with the image at t = 0.3: the unconditional velocity must equal the plain model
    on BOS + `<image>` + the same noisy block (training's drop_text)."""
    apply = _random_model()
    st = S.init_state([([5, 6, 3], [None])], 24, SP, N, D, seed=3)       # BOS 5 6 <image> block
    st["patch_t"][0, 4:4 + N] = 0.3
    block = st["patches"][0, 4:4 + N]
    st = {k: jnp.asarray(v) for k, v in st.items()}
    v_u = jax.device_get(S.unconditional_heads(lambda x, _live: apply(x), st, S.condition_masks(st, SP)["image"])[3])
    want = _plain_heads(apply, ([3], [block]), patch_t=0.3)              # BOS <image> block
    np.testing.assert_allclose(v_u[0, 4:4 + N], want["velocity"][0, 2:2 + N], rtol=1e-5, atol=1e-5)
    cond = jax.device_get(apply(S._model_inputs(st)))
    assert np.abs(cond["velocity"][0, 4:4 + N] - v_u[0, 4:4 + N]).max() > 1e-4


def test_length_buckets_give_the_full_length_heads_on_the_live_positions():
    from oneflow_jax.sampling.common import bucket_lengths, run_bucketed
    apply = _random_model()
    st = S.init_state([([5, 6, 3], [None]), ([7], None)], 48, SP, N, D)
    inputs = S._model_inputs({k: jnp.asarray(v) for k, v in st.items()})
    assert bucket_lengths(48, 3) == (16, 24, 48) and bucket_lengths(80, 1) == (80,)
    full = jax.device_get(apply(inputs))
    got = jax.device_get(jax.jit(lambda x, n: run_bucketed(apply, x, n, (16, 24, 48)))(inputs, st["length"]))
    live = np.arange(48)[None, :] < st["length"][:, None]
    for k in ("pi_logit", "lam", "q_logits", "velocity"):
        assert got[k].shape == full[k].shape
        np.testing.assert_allclose(got[k][live], full[k][live], rtol=1e-5, atol=1e-5)


def test_confident_rule_stops_a_row_whose_buffer_is_full():
    """A model that always wants more text: the row fills its buffer and stops, instead of running to the cap."""
    def apply_fn(inputs, _live_len):
        b, length = inputs["tokens"].shape
        return dict(pi_logit=jnp.full((b, length), -20.0), lam=jnp.full((b, length), 3.0),
                    q_logits=jnp.zeros((b, length, V)).at[..., 5].set(20.0), velocity=jnp.zeros(inputs["patches"].shape))

    cfg = S.SamplerConfig(steps=4, max_len=16, insertion_rule="confident")
    out, nfe = jax.jit(lambda st, r: S.sample_loop(apply_fn, st, r, cfg, SP, N))(
        S.init_state([([], None)], 16, SP, N, D), jax.random.key(0))
    assert int(out["length"][0]) == 16 and int(nfe) <= 6      # 1 -> 2 -> 4 -> 8 -> 16, then one that finds it full
