"""A hand-built 'model' that returns the *true* pi, lambda, Q and velocity for reaching a known target document.

Given the current state, it embeds the state's atoms into the target X1 (leftmost greedy match; the state is always
a subsequence of X1), reads each gap's remaining bag and answers: pi = 1[bag empty], lambda = |bag|,
Q = bag frequencies, and for an image at time t the straight-line velocity (Y1 - Y_t) / (1 - t).
"""
import jax
import jax.numpy as jnp
import numpy as np


def oracle_heads(tokens, is_patch, patch_t, patches, length, target_tokens, target_latents, vocab, image_id):
    b, L = tokens.shape
    dim = patches.shape[-1]
    pi = np.zeros((b, L), np.float32)
    lam = np.full((b, L), 1e-3, np.float32)
    q = np.full((b, L, vocab), -1e9, np.float32)
    vel = np.zeros((b, L, dim), np.float32)
    for r in range(b):
        tgt = list(target_tokens[r])
        text_pos = [p for p in range(int(length[r])) if not is_patch[r, p]]
        match, j = [-1], 0
        for p in text_pos[1:]:
            while tgt[j] != tokens[r, p]:
                j += 1
            match.append(j)
            j += 1
        img_of = np.cumsum([t == image_id for t in tgt]) - 1
        for a, p in enumerate(text_pos):
            lo = match[a] + 1
            hi = match[a + 1] if a + 1 < len(match) else len(tgt)
            bag = tgt[lo:hi]
            pi[r, p] = 20.0 if not bag else -20.0
            if bag:
                lam[r, p] = len(bag)
                counts = np.bincount(bag, minlength=vocab)
                q[r, p] = np.where(counts > 0, np.log(np.maximum(counts, 1)), -1e9)
            if a > 0 and tokens[r, p] == image_id:
                y1 = target_latents[r][img_of[match[a]]]
                sl = slice(p + 1, p + 1 + y1.shape[0])
                t = patch_t[r, sl][:, None]
                vel[r, sl] = np.where(t < 1.0, (y1 - patches[r, sl]) / np.maximum(1.0 - t, 1e-6), 0.0)
    return pi, lam, q, vel


def make_oracle_apply(target_tokens, target_latents, vocab, image_id):
    """An apply_fn(inputs, live_len) for sampler.sample_loop backed by `oracle_heads` (pure_callback)."""
    def apply_fn(inputs, _live_len):
        b, L = inputs["tokens"].shape
        dim = inputs["patches"].shape[-1]
        shapes = (jax.ShapeDtypeStruct((b, L), jnp.float32), jax.ShapeDtypeStruct((b, L), jnp.float32),
                  jax.ShapeDtypeStruct((b, L, vocab), jnp.float32), jax.ShapeDtypeStruct((b, L, dim), jnp.float32))
        length = jnp.sum(inputs["segment_ids"] > 0, axis=1)
        cb = lambda *a: oracle_heads(*(np.asarray(x) for x in a), target_tokens, target_latents, vocab, image_id)
        pi, lam, q, vel = jax.pure_callback(cb, shapes, inputs["tokens"], inputs["is_patch"], inputs["patch_t"],
                                            inputs["patches"], length)
        return dict(pi_logit=pi, lam=lam, q_logits=q, velocity=vel)
    return apply_fn
