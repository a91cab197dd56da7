"""Host noising (X1 -> X_t, bags) and the Eq. 7 loss against a brute-force reference."""
import jax.numpy as jnp
import numpy as np
import pytest

from oneflow_jax.objectives import edit_flow
from oneflow_jax.objectives import flow_matching
from oneflow_jax.data import packing
from oneflow_jax.models.codec import PixelPatchCodec
from oneflow_jax.objectives.edit_flow import NoisingConfig, SpecialTokens

SP = SpecialTokens(bos=1, pad=0, image=3)
N, D = 4, 6


def random_doc(rng, n_text=12, n_img=2, vocab=20):
    toks = list(rng.integers(5, vocab, size=n_text))
    for _ in range(n_img):
        toks.insert(int(rng.integers(0, len(toks) + 1)), SP.image)
    return np.asarray(toks, np.int32), rng.standard_normal((n_img, N, D)).astype(np.float32)


@pytest.mark.parametrize("k", [1.0, 3.0])
def test_kept_fraction_matches_kappa(k):
    rng = np.random.default_rng(0)
    cfg = NoisingConfig(kappa_power=k)
    toks = np.arange(5, 205, dtype=np.int32)  # 200 text tokens, no images
    for t in (0.2, 0.5, 0.8):
        kept = [len(edit_flow.noise_document(toks, np.zeros((0, N, D)), rng, cfg, SP, times=(t, []))["tokens"]) - 1
                for _ in range(50)]
        frac = np.mean(kept) / len(toks)
        stderr = np.sqrt(t ** k * (1 - t ** k) / (50 * len(toks)))
        assert abs(frac - t ** k) < 4 * stderr + 1e-3, (t, frac, t ** k)


@pytest.mark.parametrize("schedule", ["interleaved", "independent"])
def test_merge_bags_recovers_x1(schedule):
    rng = np.random.default_rng(1)
    cfg = NoisingConfig(schedule=schedule, mixed_gen_prob=0.2)
    for _ in range(200):
        toks, lat = random_doc(rng, n_text=int(rng.integers(0, 15)), n_img=int(rng.integers(0, 3)))
        x_t = edit_flow.noise_document(toks, lat, rng, cfg, SP)
        np.testing.assert_array_equal(edit_flow.merge_bags(x_t, SP), toks)
        # counts and weights are consistent with the bags
        text = ~x_t["is_patch"]
        assert x_t["insert_count"].sum() == len(x_t["del_tokens"])
        np.testing.assert_allclose(x_t["text_weight"][text].sum(), 1.0, rtol=1e-6)
        np.testing.assert_array_equal(x_t["no_insert"][text], x_t["insert_count"][text] == 0)


def test_deleted_image_lands_in_its_gap_as_image_token():
    toks = np.asarray([5, 6, SP.image, 7, 8, SP.image, 9], np.int32)
    lat = np.random.default_rng(0).standard_normal((2, N, D)).astype(np.float32)
    # keep all text, delete the first image, keep the second at t_img = 0.5
    x_t = edit_flow.noise_document(toks, lat, np.random.default_rng(0), NoisingConfig(), SP,
                                   times=(1.0, [-1.0, 0.5]))
    text_tokens = [t for t, p in zip(x_t["tokens"], x_t["is_patch"]) if not p]
    assert text_tokens == [SP.bos, 5, 6, 7, 8, SP.image, 9]
    # the deleted <image> sits in the gap right after token 6 (sequence position 2)
    assert list(x_t["del_tokens"]) == [SP.image] and list(x_t["del_gap"]) == [2]
    assert x_t["insert_count"][2] == 1 and x_t["no_insert"][2] == 0
    # the kept image: N patch positions at t = 0.5 with Y_t = t Y1 + (1 - t) Y0 and v = Y1 - Y0
    start = list(x_t["tokens"]).index(SP.image) + 1
    block = slice(start, start + N)
    assert x_t["is_patch"][block].all() and (x_t["patch_t"][block] == 0.5).all()
    y0 = lat[1] - x_t["velocity_target"][block]
    np.testing.assert_allclose(x_t["patches"][block], 0.5 * lat[1] + 0.5 * y0, atol=1e-6)
    np.testing.assert_array_equal(x_t["patch_index"][block], np.arange(N))


def test_understanding_examples_are_image_first_pairs_with_a_clean_image_and_noisy_text():
    text_first = np.asarray([5, 6, 7, 8, 9, 10, 11, SP.image], np.int32)
    lat = np.random.default_rng(0).standard_normal((1, N, D)).astype(np.float32)
    rng = np.random.default_rng(0)
    cfg = NoisingConfig(task_mix=dict(understanding=1.0))
    kept_text = []
    for _ in range(300):
        x_t = edit_flow.noise_document(text_first, lat, rng, cfg, SP)
        patches = x_t["is_patch"]
        assert x_t["tokens"][1] == SP.image                                   # laid out image first
        assert patches.sum() == N and (x_t["patch_t"][patches] == 1.0).all() and x_t["patch_weight"].sum() == 0
        np.testing.assert_array_equal(x_t["patches"][patches], lat[0])      # exactly the clean latents
        np.testing.assert_array_equal(edit_flow.merge_bags(x_t, SP), [SP.image, 5, 6, 7, 8, 9, 10, 11])
        kept_text.append((~patches).sum() - 2)                                # minus BOS and <image>
    assert abs(np.mean(kept_text) / 7 - 0.5) < 0.05                          # t_text ~ U[0, 1], kappa = t
    # a document with two images is never a captioning example: it follows the interleaved schedule as written
    two = np.asarray([5, SP.image, 6, SP.image], np.int32)
    lat2 = np.zeros((2, N, D), np.float32)
    deleted = [len(edit_flow.noise_document(two, lat2, rng, cfg, SP)["del_tokens"]) for _ in range(400)]
    assert 0.2 < np.mean(np.asarray(deleted) > 0) < 0.9


def test_generation_examples_keep_the_caption_and_follow_the_image_schedule():
    toks = np.asarray([SP.image, 5, 6, 7, 8], np.int32)
    lat = np.random.default_rng(0).standard_normal((1, N, D)).astype(np.float32)
    rng = np.random.default_rng(0)
    cfg = NoisingConfig(task_mix=dict(generation=1.0))
    t_imgs = []
    for _ in range(2000):
        x_t = edit_flow.noise_document(toks, lat, rng, cfg, SP)
        assert list(x_t["del_tokens"]) in ([], [SP.image])                    # the text is whole
        np.testing.assert_array_equal(edit_flow.merge_bags(x_t, SP), [5, 6, 7, 8, SP.image])   # text first
        t = x_t["patch_t"][x_t["is_patch"]].reshape(-1, N)[:, 0]
        t_imgs += list(t) + [-1.0] * len(x_t["del_tokens"])
    t_imgs = np.asarray(t_imgs)
    # deleted w.p. 1/4 (the interleaved schedule's P(tau_img < 0)), else t_img ~ U[0, 1]
    assert abs(np.mean(t_imgs < 0) - 0.25) < 0.03 and abs(np.mean(t_imgs[t_imgs >= 0]) - 0.5) < 0.03
    with pytest.raises(ValueError, match="task_mix.generation"):
        NoisingConfig(task_mix=dict(generation=1.5))
    with pytest.raises(ValueError, match="unknown objective.task_mix"):
        NoisingConfig(task_mix=dict(captioning=0.5))
    with pytest.raises(ValueError, match="must be <= 1"):
        NoisingConfig(task_mix=dict(understanding=0.6, generation=0.5))


def test_condition_dropout_removes_one_modality():
    toks = np.asarray([5, 6, SP.image, 7], np.int32)
    lat = np.zeros((1, N, D), np.float32)
    no_img = edit_flow.noise_document(toks, lat, np.random.default_rng(0), NoisingConfig(drop_images_prob=1.0), SP)
    np.testing.assert_array_equal(edit_flow.merge_bags(no_img, SP), [5, 6, 7])
    no_text = edit_flow.noise_document(toks, lat, np.random.default_rng(0), NoisingConfig(drop_text_prob=1.0), SP)
    np.testing.assert_array_equal(edit_flow.merge_bags(no_text, SP), [SP.image])


def brute_force_text_loss(docs, pi_logit, lam, q_logits):
    """Eq. 7 written literally, one document and one gap at a time."""
    per_doc = []
    for d, (pl, la, ql) in enumerate(zip(pi_logit, lam, q_logits)):
        doc = docs[d]
        text_pos = [j for j in range(len(doc["tokens"])) if not doc["is_patch"][j]]
        total = 0.0
        for j in text_pos:
            bag = [int(a) for a, g in zip(doc["del_tokens"], doc["del_gap"]) if g == j]
            pi = 1 / (1 + np.exp(-pl[j]))
            total += -(np.log(pi) if not bag else np.log(1 - pi))
            if bag:
                total += la[j] - len(bag) * np.log(la[j])
                logq = ql[j] - np.log(np.sum(np.exp(ql[j])))
                total += -sum(logq[a] for a in bag)
        per_doc.append(total / len(text_pos))
    return np.mean(per_doc)


def test_text_loss_matches_brute_force():
    rng = np.random.default_rng(3)
    vocab, seq_len, max_del = 20, 96, 64
    for trial in range(5):
        docs = [edit_flow.noise_document(*random_doc(rng, n_text=int(rng.integers(1, 12)), n_img=1), rng,
                                         NoisingConfig(), SP) for _ in range(4)]
        rows = [packing.pack_rows(docs[:2], seq_len, max_del), packing.pack_rows(docs[2:], seq_len, max_del)]
        batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
        pi_logit = rng.normal(size=(2, seq_len)).astype(np.float32)
        lam = np.exp(rng.normal(size=(2, seq_len))).astype(np.float32)
        q_logits = rng.normal(size=(2, seq_len, vocab)).astype(np.float32)
        loss, _ = edit_flow.text_loss(pi_logit, lam, q_logits, batch)
        # slice each document's outputs back out of its row
        per_doc_out = []
        for r, row in enumerate(rows):
            for seg in (1, 2):
                idx = np.nonzero(row["segment_ids"] == seg)[0]
                per_doc_out.append((pi_logit[r, idx], lam[r, idx], q_logits[r, idx]))
        ref = brute_force_text_loss(docs, *zip(*per_doc_out))
        np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_image_loss_and_interpolation():
    rng = np.random.default_rng(0)
    y1, y0 = rng.normal(size=(2, 5, D)).astype(np.float32)
    y_t, v = flow_matching.interpolate(y1, y0, 0.3)
    np.testing.assert_allclose(flow_matching.euler_step(y_t, v, 0.7), y1, atol=1e-6)  # straight path
    batch = dict(velocity_target=jnp.asarray(v)[None], patch_weight=jnp.asarray([[1, 1, 0, 1, 0]], jnp.float32))
    pred = jnp.asarray(v)[None] + 1.0
    np.testing.assert_allclose(float(flow_matching.image_loss(pred, batch)), 1.0, rtol=1e-6)


def test_image_loss_in_clean_latent_space_is_the_x_error():
    """space="x": the velocity error times (1 - t)^2 is the squared error of the clean latents implied by v_theta
    (Y1_hat = Y_t + (1 - t) v_theta), per patch, whatever each patch's t."""
    rng = np.random.default_rng(1)
    y1, y0, y1_hat = rng.normal(size=(3, 4, D)).astype(np.float32)
    t = np.array([0.0, 0.4, 0.8, 0.9], np.float32)[:, None]
    y_t, v = flow_matching.interpolate(y1, y0, t)
    v_theta = (y1_hat - y_t) / (1 - t)
    batch = dict(velocity_target=jnp.asarray(v)[None], patch_weight=jnp.ones((1, 4), jnp.float32),
                 patch_t=jnp.asarray(t[:, 0])[None])
    x_err = np.mean(np.square(y1_hat - y1))
    np.testing.assert_allclose(float(flow_matching.image_loss(jnp.asarray(v_theta)[None], batch, "x")), x_err,
                               rtol=1e-5)
    v_err = np.mean(np.mean(np.square(y1_hat - y1), axis=-1) / np.square(1 - t[:, 0]))
    np.testing.assert_allclose(float(flow_matching.image_loss(jnp.asarray(v_theta)[None], batch)), v_err, rtol=1e-5)
    with pytest.raises(ValueError, match="loss space"):
        flow_matching.image_loss(jnp.asarray(v_theta)[None], batch, "eps")


def test_time_shift_is_a_monotone_warp_with_an_inverse():
    u = np.linspace(0.0, 1.0, 101)
    for s in (1.0, 0.5, 4.0):
        t = flow_matching.shift_time(u, s)
        assert t[0] == 0.0 and t[-1] == 1.0 and np.all(np.diff(t) > 0)
        np.testing.assert_allclose(flow_matching.unshift_time(t, s), u, atol=1e-12)
    assert flow_matching.shift_time(0.5, 4.0) == pytest.approx(0.2)       # s = 4 spends half the time below t = 0.2


def test_noising_puts_images_at_the_shifted_noise_level():
    rng = np.random.default_rng(3)
    tokens, latents = random_doc(rng, n_text=6, n_img=2)
    cfg = NoisingConfig(image_time_shift=4.0)
    out = edit_flow.noise_document(tokens, latents, np.random.default_rng(0), cfg, SP, times=(1.0, [0.5, 1.0]))
    t = out["patch_t"][out["is_patch"]].reshape(2, N)
    np.testing.assert_allclose(t[0], 0.2, rtol=1e-6)
    np.testing.assert_array_equal(t[1], 1.0)                       # a clean image stays clean conditioning
    y_t, v = (out[k][out["is_patch"]].reshape(2, N, D)[0] for k in ("patches", "velocity_target"))
    np.testing.assert_allclose(y_t + 0.8 * v, latents[0], atol=1e-5)   # Y_t on the straight path at t = 0.2
    with pytest.raises(ValueError, match="image_time_shift"):
        NoisingConfig(image_time_shift=0.0)


def test_pixel_codec_round_trip():
    codec = PixelPatchCodec(image_size=8, patch_size=4)
    img = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    lat = codec.encode(img)
    assert lat.shape == (2, 4, 48) and lat.min() >= -1 and lat.max() <= 1
    np.testing.assert_array_equal(codec.decode(lat), img)
    np.testing.assert_array_equal(lat[0, 1], (img[0, :4, 4:8].astype(np.float32) / 127.5 - 1).reshape(-1))


def test_a_run_config_with_the_replaced_clean_images_prob_says_what_replaced_it():
    from oneflow_jax import config_lib
    from oneflow_jax.cli import UserError
    config = config_lib.load_config_file("configs/shapes_tiny.py")
    config.objective.clean_images_prob = 0.6
    with pytest.raises(UserError, match="task_mix.understanding replaced clean_images_prob"):
        config_lib.resolve(config)
