"""The concurrent sampler (paper Alg. 1-2, reference §5): text grows by insertions while images denoise.

One iteration, with h = 1 / steps and one network evaluation on the current state:
  1. every image with t_img < 1 takes an Euler step Y += h v(Y, t_img), t_img += h (with an image time shift s,
     the step runs in schedule time: t_img goes from shift_time(u) to shift_time(u + h), flow_matching);
  2. while t < 1, every gap i inserts at most one atom: iff Bernoulli(1 - pi_i) and
     Bernoulli(min(1, h * kappa_dot(t) / (1 - kappa(t)) * lambda_i)); the atom a ~ Q_i, and a = `<image>` splices in
     a block of fresh N(0, I) latents with t_img = 0;
  3. t += h; repeat while t < 1 or any t_img < 1.
Optional departures from Alg. 1 (off by default; docs/objective.md lists them, docs/results.md has the numbers);
the vote over several samples (`votes`) lives in sampling/generate.py:
  * `max_insertions_per_step` = k caps the insertions of one sequence in one step at k; a step's excess, picked
    uniformly at random, is postponed. Atoms inserted in the same step are drawn independently from their gaps' bag
    marginals, so two gaps can both take the same clause's words; one at a time (k = 1) each insertion sees the
    previous ones, like the continuous-time chain's own jumps.
    `insertion_order` = "largest_gap" keeps, instead, the insertions into the gaps with the largest rate lambda
    (by the model's own count, the most atoms still missing).
  * `finish_threshold` = p: once t reaches 1, sequences in which some gap still has 1 - pi > p take more steps.
    Alg. 1 gives each gap one last chance at t = 1 - h, so a gap the model is sure is unfinished can end empty.
  After the last step (t = 1) the rate factor is 1: a postponed or unfinished gap inserts iff Bernoulli(1 - pi).
  * `insertion_rule` = "confident" replaces step 2 and the text time grid: every open gap whose Q is no wider than
    its own count of missing atoms inserts at once (`_confident_insertions`); images keep their Euler steps.
Text CFG is Eq. 12 (geometric mixing of lambda and Q between the conditional pass and the one without the prompt's
images), image CFG mixes velocities with the pass without text; both unconditional passes lay the document out again
as training's condition dropout does (`dropped_view`). Everything lives in fixed [B, max_len] buffers so the loop is
one jitted `lax.while_loop` that compiles once per shape and runs a batch of prompts at once; each network
evaluation runs on the smallest length bucket that holds the live sequence (`common.run_bucketed`).

The state is a dict of arrays: tokens, is_patch, patch_index, patches [B, L, D], patch_t, length [B] (positions in
use) and prompt_len [B] (the fixed prefix: insertions happen only in the gap after its last atom and later).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from oneflow_jax.objectives import edit_flow
from oneflow_jax.objectives import flow_matching
from oneflow_jax.objectives.edit_flow import SpecialTokens
from oneflow_jax.sampling.common import (NEG, SamplerConfig, bucket_lengths, check_markers, prompt_buffers,
                                         run_bucketed, sample_tokens)

# ----------------------------------------------------------------------------------------------------------------
# Host side: prompts in, documents out.

def init_state(prompts, max_len: int, special: SpecialTokens, num_patches: int, patch_dim: int, seed: int = 0):
    """Fixed-size state for a batch of prompts; each prompt is (token ids without BOS, images).

    `images` holds one entry per `<image>` marker: clean latents [N, D] (a given image: t_img = 1, fixed) or None
    (an image to generate in place: N(0, I) noise at t_img = 0). Every prompt token is fixed.
    """
    b = len(prompts)
    noise_rng = np.random.default_rng(seed)
    st = prompt_buffers(b, max_len, special.pad, patch_dim, length=((b,), np.int32), prompt_len=((b,), np.int32))
    for r, (tokens, images) in enumerate(prompts):
        tokens, images = list(tokens), [] if images is None else list(images)
        check_markers(r, tokens, images, special.image)
        pos, img = 1, 0
        st["tokens"][r, 0] = special.bos
        for tok in tokens:
            need = 1 + (num_patches if tok == special.image else 0)
            if pos + need > max_len:
                raise ValueError(f"prompt {r} does not fit into sampler.max_len={max_len}")
            st["tokens"][r, pos] = tok
            pos += 1
            if tok == special.image:
                block = slice(pos, pos + num_patches)
                st["is_patch"][r, block] = True
                st["patch_index"][r, block] = np.arange(num_patches)
                if images[img] is None:
                    st["patches"][r, block] = noise_rng.standard_normal((num_patches, patch_dim))
                    st["patch_t"][r, block] = 0.0
                else:
                    st["patches"][r, block] = np.asarray(images[img]).reshape(num_patches, patch_dim)
                img += 1
                pos += num_patches
        st["length"][r] = st["prompt_len"][r] = pos
    return st


def extract_documents(state, special: SpecialTokens):
    """[(token ids without BOS, [latents [N, D] per image in order])] from a final state."""
    docs = []
    tokens, is_patch, patches = (np.asarray(state[k]) for k in ("tokens", "is_patch", "patches"))
    for r in range(tokens.shape[0]):
        n = int(state["length"][r])
        text = [int(t) for t, p in zip(tokens[r, 1:n], is_patch[r, 1:n]) if not p]
        images, pos = [], 1
        while pos < n:
            if not is_patch[r, pos] and tokens[r, pos] == special.image:
                end = pos + 1
                while end < n and is_patch[r, end]:
                    end += 1
                images.append(patches[r, pos + 1:end])
                pos = end
            else:
                pos += 1
        docs.append((text, images))
    return docs


# ----------------------------------------------------------------------------------------------------------------
# Device side.

def _model_inputs(state):
    length = state["tokens"].shape[1]
    valid = jnp.arange(length)[None, :] < state["length"][:, None]
    return dict(tokens=state["tokens"], is_patch=state["is_patch"], patch_index=state["patch_index"],
                patches=state["patches"], patch_t=state["patch_t"], segment_ids=valid.astype(jnp.int32),
                positions=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), state["tokens"].shape))


def dropped_view(state, inputs, drop):
    """Model inputs with the positions where `drop` [B, L] is True removed, as training's condition dropout removes
    them (edit_flow.noise_document): the rest moved left, contiguous RoPE positions, one document. Returns (inputs,
    text_src, patch_src): where each position reads its heads in the compacted sequence -- a gap whose owner was
    removed reads the nearest kept atom on its left (BOS reads the first gap after a removed prompt image)."""
    b, length = state["tokens"].shape
    pos = jnp.arange(length)[None, :]
    rows = jnp.arange(b)[:, None]
    keep = (pos < state["length"][:, None]) & ~drop
    new_idx = jnp.cumsum(keep, axis=1) - 1
    dest = jnp.where(keep, new_idx, length)
    fills = dict(tokens=0, is_patch=False, patch_index=0, patches=0.0, patch_t=1.0)   # past the end: masked out
    out = {k: jnp.full_like(inputs[k], fill).at[rows, dest].set(inputs[k], mode="drop") for k, fill in fills.items()}
    out["segment_ids"] = (pos < jnp.sum(keep, axis=1, keepdims=True)).astype(jnp.int32)
    out["positions"] = jnp.broadcast_to(pos, (b, length)).astype(jnp.int32)
    text_src = jax.lax.cummax(jnp.where(keep & ~state["is_patch"], new_idx, 0), axis=1)
    return out, text_src, jnp.maximum(new_idx, 0)


def condition_masks(state, special: SpecialTokens):
    """What each guidance weight's unconditional pass removes, as training's condition dropout does:
    text CFG (drop_images_prob) the prompt's images (`<image>` tokens and blocks), image CFG (drop_text_prob) every
    text token but BOS, generated or given; generated content otherwise stays visible."""
    pos = jnp.arange(state["tokens"].shape[1])[None, :]
    valid = pos < state["length"][:, None]
    image_atom = state["is_patch"] | (state["tokens"] == special.image)
    prompt = (pos > 0) & (pos < state["prompt_len"][:, None])
    return dict(text=valid & prompt & image_atom, image=valid & (pos > 0) & ~image_atom)


def _noisy_patches(state):
    """[B, L]: the patches of images still being denoised (t_img < 1) within the live sequence."""
    pos = jnp.arange(state["tokens"].shape[1])[None, :]
    return state["is_patch"] & (pos < state["length"][:, None]) & (state["patch_t"] < 1.0)


def _heads(out):
    log_q = jax.nn.log_softmax(out["q_logits"].astype(jnp.float32), axis=-1)
    log_lam = jnp.log(jnp.maximum(out["lam"].astype(jnp.float32), 1e-30))
    return out["pi_logit"].astype(jnp.float32), log_lam, log_q, out["velocity"].astype(jnp.float32)


def unconditional_heads(apply_fn, state, drop, live_len=None):
    """(pi_logit, log lambda, log Q, velocity) of the pass with `drop` removed, read back at each position of the
    conditional sequence (dropped_view)."""
    inputs, text_src, patch_src = dropped_view(state, _model_inputs(state), drop)
    pi_logit, log_lam, log_q, velocity = _heads(apply_fn(inputs, live_len))
    take = lambda x, src: jnp.take_along_axis(x, src.reshape(src.shape + (1,) * (x.ndim - 2)), axis=1)
    return take(pi_logit, text_src), take(log_lam, text_src), take(log_q, text_src), take(velocity, patch_src)


def _guided_heads(apply_fn, state, cfg: SamplerConfig, special: SpecialTokens):
    """Heads of the conditional pass, with Eq. 12 text guidance (log lambda and log Q mixed geometrically with the
    pass that does not see the prompt's images) and image guidance v = v_u + w (v_c - v_u) (the pass without text).
    Returns (pi_logit, lambda, log Q, velocity, network evaluations)."""
    pi_logit, log_lam, log_q, velocity = _heads(apply_fn(_model_inputs(state), state["length"]))
    passes = 1
    masks = condition_masks(state, special)
    if cfg.text_cfg != 1.0:
        _, log_lam_u, log_q_u, _ = unconditional_heads(apply_fn, state, masks["text"], state["length"])
        w = cfg.text_cfg        # Eq. 12: lambda^w * lambda_u^(1-w), Q ∝ Q^w * Q_u^(1-w)
        log_lam = w * log_lam + (1 - w) * log_lam_u
        log_q = jax.nn.log_softmax(w * log_q + (1 - w) * log_q_u, axis=-1)
        passes += 1
    if cfg.image_cfg != 1.0:       # only while some image is still noisy (captioning batches never pay for it)
        noisy = jnp.any(_noisy_patches(state))
        v_u = jax.lax.cond(noisy, lambda: unconditional_heads(apply_fn, state, masks["image"], state["length"])[3],
                           lambda: velocity)
        velocity = v_u + cfg.image_cfg * (velocity - v_u)
        passes += noisy.astype(jnp.int32)
    return pi_logit, jnp.exp(log_lam), log_q, velocity, passes


def _insert(state, insert, new_tok, rng, special: SpecialTokens, num_patches: int):
    """Splices the chosen atoms into the fixed buffers. insert/new_tok [B, L] are indexed by the gap owner's text
    position; an image atom's gap physically starts after its block."""
    b, length = state["tokens"].shape
    pos = jnp.arange(length)[None, :]
    owns_block = (~state["is_patch"]) & (state["tokens"] == special.image) & (pos < state["length"][:, None])
    anchor = jnp.minimum(pos + jnp.where(owns_block, num_patches, 0), length - 1)   # last position of the atom
    size = jnp.where(insert, jnp.where(new_tok == special.image, 1 + num_patches, 1), 0)
    rows = jnp.arange(b)[:, None]
    size_at = jnp.zeros((b, length), jnp.int32).at[rows, anchor].add(size)
    tok_at = jnp.zeros((b, length), jnp.int32).at[rows, anchor].add(jnp.where(insert, new_tok, 0))
    # Keep a prefix of insertions whose total still fits the buffer (all later ones are dropped this step).
    size_at = jnp.where(state["length"][:, None] + jnp.cumsum(size_at, axis=1) <= length, size_at, 0)
    shift = jnp.cumsum(size_at, axis=1) - size_at
    old_valid = pos < state["length"][:, None]
    new_pos = jnp.where(old_valid, pos + shift, length)                           # `length` = dropped
    new = {}
    for k in ("tokens", "is_patch", "patch_index", "patches", "patch_t"):
        fill = special.pad if k == "tokens" else (1.0 if k == "patch_t" else 0)
        buf = jnp.full_like(state[k], fill)
        new[k] = buf.at[rows, new_pos].set(state[k], mode="drop")
    ins_pos = jnp.where(size_at > 0, pos + shift + 1, length)
    new["tokens"] = new["tokens"].at[rows, ins_pos].set(tok_at, mode="drop")
    new["is_patch"] = new["is_patch"].at[rows, ins_pos].set(False, mode="drop")
    # Fresh image blocks: noise with t_img = 0 right after their new <image> token. Most steps insert no image, and
    # drawing the noise for every possible block costs as much as a network evaluation: only done when one is.
    is_img = (size_at > 1)[..., None]

    def fresh_blocks(new):
        k = jnp.arange(num_patches)[None, None, :]
        block_pos = jnp.where(is_img, (pos + shift + 2)[..., None] + k, length).reshape(b, -1)
        dim = state["patches"].shape[-1]
        noise = jax.random.normal(rng, (b, length * num_patches, dim), jnp.float32)
        new = dict(new)
        new["is_patch"] = new["is_patch"].at[rows, block_pos].set(True, mode="drop")
        new["patch_index"] = new["patch_index"].at[rows, block_pos].set(
            jnp.broadcast_to(k, (b, length, num_patches)).reshape(b, -1), mode="drop")
        new["patch_t"] = new["patch_t"].at[rows, block_pos].set(0.0, mode="drop")
        new["patches"] = new["patches"].at[rows, block_pos].set(noise.astype(state["patches"].dtype), mode="drop")
        return new

    new = jax.lax.cond(jnp.any(is_img), fresh_blocks, lambda new: new, new)
    new["length"] = state["length"] + jnp.sum(size_at, axis=1)
    new["prompt_len"] = state["prompt_len"]
    return new


def sample_loop(apply_fn: Callable, state, rng, cfg: SamplerConfig, special: SpecialTokens, num_patches: int,
                banned_tokens=()):
    """Runs the sampler to completion. apply_fn(inputs, live_len) -> model heads (live_len [B]: positions in use, for
    the length bucket). Returns (state, network evaluations)."""
    h = 1.0 / cfg.steps
    length = state["tokens"].shape[1]
    pos = jnp.arange(length)[None, :]
    banned = jnp.asarray([special.bos, special.pad, *banned_tokens], jnp.int32)
    confident = cfg.insertion_rule == "confident"

    cap = cfg.max_insertions_per_step
    # Postponed insertions need up to one step per buffer position; unfinished gaps up to `steps` more; the
    # confident rule inserts at least one atom per step while a gap is open, so at most one step per position.
    max_iterations = 2 * cfg.steps + 1 + (length if cap or confident else 0)

    def cond(carry):
        st, i, _, _, pending_text = carry
        text_time = (i < cfg.steps) & (not confident)
        return (text_time | jnp.any(_noisy_patches(st)) | jnp.any(pending_text)) & (i < max_iterations)

    def body(carry):
        st, i, rng, nfe, pending_text = carry
        text_left = pending_text        # confident: rows whose text is neither done nor stopped by a full buffer
        rng, r_gate, r_rate, r_tok, r_noise, r_pick = jax.random.split(rng, 6)
        pi_logit, lam, log_q, velocity, passes = _guided_heads(apply_fn, st, cfg, special)
        # 2. (decided first: both steps read the same evaluation) Insertions in the gaps from the prompt's last atom on.
        valid = pos < st["length"][:, None]
        text_pos = valid & ~st["is_patch"] & (pos >= st["prompt_len"][:, None] - 1)
        # If the prompt ends in an image block, its gap belongs to that image's <image> token position.
        owner = text_pos | _block_owner_of_prompt_end(st, special, num_patches, pos)
        log_q = jax.nn.log_softmax(log_q.at[..., banned].set(NEG), axis=-1)
        p_open = jax.nn.sigmoid(-pi_logit)                                                   # 1 - pi
        if confident:
            insert, pending_text, writing = _confident_insertions(owner, p_open, lam, log_q, cfg)
        else:   # Alg. 1 at text time t = i h < 1 (then t = 1: rate factor 1 for postponed / unfinished gaps)
            t = i.astype(jnp.float32) * h
            scale = edit_flow.insertion_rate_scale(jnp.minimum(t, 1.0 - h), cfg.kappa_power)
            gate = jax.random.uniform(r_gate, pi_logit.shape) < p_open
            rate = (jax.random.uniform(r_rate, lam.shape) < jnp.minimum(1.0, h * scale * lam)) | (i >= cfg.steps)
            unfinished = jnp.zeros_like(pending_text)
            if cfg.finish_threshold > 0:
                unfinished = jnp.any(owner & (p_open > cfg.finish_threshold), axis=1)
            insert = gate & rate & owner & ((i < cfg.steps) | pending_text | unfinished)[:, None]
            pending_text = unfinished
        if cap:   # keep `cap` of the chosen gaps (at random, or those with the largest rate lambda); the rest wait
            priority = -lam if cfg.insertion_order == "largest_gap" else jax.random.uniform(r_pick, insert.shape)
            rank = jnp.argsort(jnp.argsort(jnp.where(insert, priority, jnp.inf)))
            pending_text = pending_text | (jnp.sum(insert, axis=1) > cap)
            insert = insert & (rank < cap)
        new_tok = sample_tokens(r_tok, log_q, cfg.temperature, cfg.top_p).astype(jnp.int32)
        # 1. Euler step on every noisy image: schedule time u += h, noise level t = shift_time(u). With
        # `images_wait_for_text`, a row's images stay at their noise level while this evaluation still saw an open gap.
        moving = _noisy_patches(st)
        if confident and cfg.images_wait_for_text:
            moving = moving & ~(writing & text_left)[:, None]
        st = dict(st)
        u_next = flow_matching.unshift_time(st["patch_t"], cfg.image_time_shift) + h
        t_next = jnp.where(u_next > 1.0 - 1e-4, 1.0, flow_matching.shift_time(u_next, cfg.image_time_shift))
        step = (t_next - st["patch_t"])[..., None]
        st["patches"] = jnp.where(moving[..., None], flow_matching.euler_step(st["patches"], velocity, step),
                                  st["patches"])
        st["patch_t"] = jnp.where(moving, t_next, st["patch_t"])
        grown = jax.lax.cond(jnp.any(insert), lambda s: _insert(s, insert, new_tok, r_noise, special, num_patches),
                             lambda s: s, st)         # a step that inserts nothing moves no buffer
        # A row that chose insertions of which none fit its buffer is full: it has no more text to write.
        pending_text = pending_text & ((grown["length"] > st["length"]) | ~jnp.any(insert, axis=1))
        return grown, i + 1, rng, nfe + passes, pending_text

    state = {k: jnp.asarray(v) for k, v in state.items()}
    carry = (state, jnp.int32(0), rng, jnp.int32(0), jnp.ones(state["length"].shape, bool) if confident
             else jnp.zeros(state["length"].shape, bool))
    state, _, _, nfe, _ = jax.lax.while_loop(cond, body, carry)
    return state, nfe


def _confident_insertions(owner, p_open, lam, log_q, cfg: SamplerConfig):
    """The 'confident' rule: which gaps insert this step, and which rows still have text to write.

    A gap is open while the model expects more than `gap_threshold` atoms missing there: E[k_i] = (1 - pi_i)
    lambda_i, the two insertion heads together (a gap with 1 - pi = 0.3 but lambda = 7 is missing half a caption).
    Atoms drawn in one step come from each gap's own marginal Q_i, so inserting in two gaps at once is safe only where
    Q_i is no more spread than the gap's own count of missing atoms: the effective number of choices exp(H(Q_i))
    against E[k_i | k_i > 0] = lambda_i (a gap missing "red circle" may split Q between the two; a gap missing one
    colour may not split it between two colours). An open gap inserts iff max(1, lambda_i) / exp(H(Q_i)) >=
    parallel_confidence; the most confident open gap inserts regardless, so every step makes progress. A row's
    text is done when no gap expects more after this step: no open gap was left waiting, and every gap that took an
    atom expected at most one more (E[k_i] - 1 <= gap_threshold), so a finished caption costs no evaluation to
    confirm it. Returns (insert [B, L], text left after this step [B], an open gap at this evaluation [B])."""
    entropy = -jnp.sum(jnp.exp(log_q) * log_q, axis=-1)
    confidence = jnp.where(owner, jnp.maximum(lam, 1.0) * jnp.exp(-entropy), -1.0)
    expected = p_open * lam
    is_open = owner & (expected > cfg.gap_threshold)
    best = is_open & (confidence >= jnp.max(jnp.where(is_open, confidence, -1.0), axis=1, keepdims=True))
    best = best & (jnp.cumsum(best, axis=1) == 1)                      # one of them on ties
    insert = is_open & ((confidence >= cfg.parallel_confidence) | best)
    more = is_open & (~insert | (expected - 1.0 > cfg.gap_threshold))
    return insert, jnp.any(more, axis=1), jnp.any(is_open, axis=1)


def _block_owner_of_prompt_end(st, special, num_patches, pos):
    """True at the `<image>` token whose block ends the prompt (its gap is the first free one)."""
    end = st["prompt_len"][:, None]
    return ((~st["is_patch"]) & (st["tokens"] == special.image) & (pos + num_patches == end - 1)
            & (pos < st["length"][:, None]))


def make_sampler(model, cfg: SamplerConfig, special: SpecialTokens, num_patches: int, banned_tokens=()):
    """jit(params, state, rng) -> (state, nfe) for a Flax OneFlowModel; the network runs on length buckets."""
    def run(params, state, rng):
        buckets = bucket_lengths(state["tokens"].shape[1], cfg.length_buckets)
        apply_fn = lambda inputs, live: run_bucketed(lambda x: model.apply({"params": params}, x), inputs, live,
                                                     buckets)
        return sample_loop(apply_fn, state, rng, cfg, special, num_patches, banned_tokens)
    return jax.jit(run)
