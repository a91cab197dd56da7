"""The AR+FM baseline's sampler (reference §7): KV-cached next-token decoding for text, Euler steps for images.

One jitted `lax.while_loop` over a batch of prompts in fixed [B, max_len] buffers with a per-layer KV cache
[n_layers, B, max_len, kv_heads, head_dim]:
  * prefill: one forward over the prompts (causal, bidirectional inside prompt images) fills the cache and gives each
    row's next-token logits;
  * text step (no row is inside an image): every unfinished row samples one token, runs it as a 1-position chunk
    against the cache (writing its K/V) and gets the next logits; EOS or a full buffer finishes the row;
    `<image>` (the BOI) opens a block of N fresh N(0, I) latents at t_img = 0;
  * image step (some row is inside an image): those rows run their N-patch block against the cache (bidirectional in
    the block), `steps` Euler steps Y += dt v(Y, t) (dt = h, uneven under an image time shift), then once more
    with the clean latents at t_img = 1, which writes the block's final K/V into the cache and gives the logits
    after the block (last patch position). Other rows wait. An image costs steps + 1 network evaluations.
`nfe` counts batched forward passes (prefill included). The prefill runs on the smallest of the length buckets
(common.bucket_lengths) that holds every prompt, so prompts of similar length share one compile. No classifier-free
guidance (config text_cfg / image_cfg are
ignored). A prompt may end with an `<image>` whose latents are None: that image is generated first.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from oneflow_jax.models import ar_transformer as ar_model
from oneflow_jax.objectives import flow_matching
from oneflow_jax.objectives.ar_objective import ARSpecial
from oneflow_jax.models.transformer import attention_mask
from oneflow_jax.sampling.common import (SamplerConfig, check_markers, jit_with_prefill_bucket, next_text_tokens,
                                         prompt_buffers)


def init_state(prompts, max_len: int, special: ARSpecial, num_patches: int, patch_dim: int, seed: int = 0):
    """Host-side buffers for prompts [(token ids without BOS, [latents [N, D] or None per `<image>`])].

    prompt_len = positions to prefill; a trailing `<image>` with None latents gets noise in its block and starts the
    row in image mode (`pending`)."""
    b = len(prompts)
    rng = np.random.default_rng(seed)
    st = prompt_buffers(b, max_len, special.pad, patch_dim, block_ids=((b, max_len), np.int32),
                        prompt_len=((b,), np.int32), pending=((b,), bool))
    for r, (tokens, images) in enumerate(prompts):
        tokens, images = list(tokens), list(images or [])
        check_markers(r, tokens, images, special.image)
        pos, img = 1, 0
        st["tokens"][r, 0] = special.bos
        for i, tok in enumerate(tokens):
            if pos + 1 + (num_patches if tok == special.image else 0) > max_len:
                raise ValueError(f"prompt {r} does not fit into sampler.max_len={max_len}")
            st["tokens"][r, pos] = tok
            pos += 1
            if tok != special.image:
                continue
            block = slice(pos, pos + num_patches)
            st["is_patch"][r, block], st["patch_index"][r, block] = True, np.arange(num_patches)
            st["block_ids"][r, block] = img + 1
            if images[img] is None:
                if i != len(tokens) - 1:
                    raise ValueError(f"prompt {r}: only a trailing <image> can be generated (latents None)")
                st["patches"][r, block] = rng.standard_normal((num_patches, patch_dim))
                st["patch_t"][r, block] = 0.0
                st["pending"][r] = True
                img += 1
                break
            st["patches"][r, block] = np.asarray(images[img]).reshape(num_patches, patch_dim)
            img += 1
            pos += num_patches
        st["prompt_len"][r] = pos
    return st


def extract_documents(state, special: ARSpecial):
    """[(token ids without BOS and EOS, [latents [N, D] per image])] from a final state."""
    docs = []
    tokens, is_patch, patches = (np.asarray(state[k]) for k in ("tokens", "is_patch", "patches"))
    for r in range(tokens.shape[0]):
        n = int(state["length"][r])
        text, images, pos = [], [], 1
        while pos < n:
            tok = int(tokens[r, pos])
            if is_patch[r, pos]:
                pos += 1
                continue
            if tok == special.eos:
                break
            text.append(tok)
            if tok == special.image:
                end = pos + 1
                while end < n and is_patch[r, end]:
                    end += 1
                if end > pos + 1:
                    images.append(patches[r, pos + 1:end])
                else:
                    text.pop()          # a marker whose block never started (buffer full): not an image
                pos = end
            else:
                pos += 1
        docs.append((text, images))
    return docs


def make_sampler(model: ar_model.ARModel, cfg: SamplerConfig, special: ARSpecial, num_patches: int,
                 banned_tokens=()):
    """(params, state, rng) -> (final state with `length`, nfe); jitted once per batch shape and prefill length.
    `banned_tokens` are never sampled (besides BOS and PAD)."""
    n, steps, h = num_patches, cfg.steps, 1.0 / cfg.steps
    banned = jnp.asarray([special.bos, special.pad, *banned_tokens], jnp.int32)

    def run(params, st, rng, prefill_len):
        st = {k: jnp.asarray(v) for k, v in st.items()}
        b, length = st["tokens"].shape
        rows, key_pos = jnp.arange(b)[:, None], jnp.arange(length)
        decode = lambda chunk, cache, write_pos, mask: model.apply({"params": params}, chunk, cache, write_pos, mask,
                                                                   method=ar_model.ARModel.decode)
        # Prefill: the first `prefill_len` (static, >= every prompt) positions against an empty cache.
        pos = jnp.broadcast_to(jnp.arange(prefill_len), (b, prefill_len))
        valid = pos < st["prompt_len"][:, None]
        mask = attention_mask(valid.astype(jnp.int32), causal=True, block_ids=st["block_ids"][:, :prefill_len])
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, length - prefill_len)))
        chunk = {k: st[k][:, :prefill_len] for k in ("tokens", "is_patch", "patch_index", "patches", "patch_t")}
        chunk["positions"] = pos
        cache = ar_model.empty_cache(model.cfg, b, length)
        out, cache = decode(chunk, cache, jnp.where(valid, pos, length), mask)
        last = jnp.maximum(st["prompt_len"] - 1, 0)
        logits = out["q_logits"][jnp.arange(b), last].astype(jnp.float32)
        carry = dict(tokens=st["tokens"], is_patch=st["is_patch"], patch_index=st["patch_index"],
                     patches=st["patches"], patch_t=st["patch_t"], length=st["prompt_len"],
                     img_step=jnp.where(st["pending"], 0, -1), done=jnp.zeros(b, bool), logits=logits,
                     cache=cache, rng=rng, nfe=jnp.int32(1))

        def text_step(c):
            c = dict(c)
            rng, r_tok = jax.random.split(c["rng"])
            active = ~c["done"]
            cur = c["length"]
            no_room = cur + 1 + n > length            # an image block would not fit: no BOI
            tok = next_text_tokens(r_tok, c["logits"], banned, special.image, no_room, cfg)
            write = jnp.where(active, cur, length)[:, None]
            chunk = dict(tokens=tok[:, None], is_patch=jnp.zeros((b, 1), bool), patch_index=jnp.zeros((b, 1), jnp.int32),
                         patches=jnp.zeros((b, 1, c["patches"].shape[-1]), c["patches"].dtype),
                         patch_t=jnp.ones((b, 1), jnp.float32), positions=cur[:, None])
            mask = (key_pos[None, :] <= cur[:, None])[:, None, None, :]
            out, c["cache"] = decode(chunk, c["cache"], write, mask)
            c["tokens"] = c["tokens"].at[rows, write].set(tok[:, None], mode="drop")
            c["length"] = cur + active
            c["logits"] = jnp.where(active[:, None], out["q_logits"][:, 0].astype(jnp.float32), c["logits"])
            opens = active & (tok == special.image)
            block = jnp.where(opens[:, None], c["length"][:, None] + jnp.arange(n)[None], length)
            noise = jax.random.normal(jax.random.fold_in(r_tok, 1), (b, n, c["patches"].shape[-1]), jnp.float32)
            c["patches"] = c["patches"].at[rows, block].set(noise.astype(c["patches"].dtype), mode="drop")
            c["patch_t"] = c["patch_t"].at[rows, block].set(0.0, mode="drop")
            c["is_patch"] = c["is_patch"].at[rows, block].set(True, mode="drop")
            c["patch_index"] = c["patch_index"].at[rows, block].set(
                jnp.broadcast_to(jnp.arange(n), (b, n)), mode="drop")
            c["img_step"] = jnp.where(opens, 0, c["img_step"])
            c["done"] = c["done"] | (active & ((tok == special.eos) | (c["length"] >= length)))
            c["rng"], c["nfe"] = rng, c["nfe"] + 1
            return c

        def image_step(c):
            c = dict(c)
            active = (c["img_step"] >= 0) & ~c["done"]
            final = c["img_step"] >= steps
            start = c["length"]
            idx = jnp.minimum(start[:, None] + jnp.arange(n)[None], length - 1)
            y = c["patches"][rows, idx]
            noise_level = lambda k: flow_matching.shift_time(k.astype(jnp.float32) * h, cfg.image_time_shift)
            t = jnp.where(final, 1.0, noise_level(c["img_step"]))
            chunk = dict(tokens=jnp.full((b, n), special.pad, jnp.int32), is_patch=jnp.ones((b, n), bool),
                         patch_index=jnp.broadcast_to(jnp.arange(n), (b, n)), patches=y,
                         patch_t=jnp.broadcast_to(t[:, None], (b, n)), positions=idx)
            mask = (key_pos[None, :] < (start + n)[:, None])[:, None, None, :]
            write = jnp.where(active[:, None], idx, length)
            out, c["cache"] = decode(chunk, c["cache"], write, mask)
            moving = active & ~final
            t_new = jnp.where(final | (c["img_step"] + 1 >= steps), 1.0, noise_level(c["img_step"] + 1))
            y_new = flow_matching.euler_step(y, out["velocity"].astype(jnp.float32), (t_new - t)[:, None, None])
            c["patches"] = c["patches"].at[rows, jnp.where(moving[:, None], idx, length)].set(
                y_new.astype(c["patches"].dtype), mode="drop")
            c["patch_t"] = c["patch_t"].at[rows, jnp.where(active[:, None], idx, length)].set(
                jnp.broadcast_to(t_new[:, None], (b, n)), mode="drop")
            ends = active & final
            c["logits"] = jnp.where(ends[:, None], out["q_logits"][:, n - 1].astype(jnp.float32), c["logits"])
            c["length"] = jnp.where(ends, start + n, start)
            c["img_step"] = jnp.where(ends, -1, jnp.where(active, c["img_step"] + 1, c["img_step"]))
            c["done"] = c["done"] | (ends & (c["length"] >= length))
            c["nfe"] = c["nfe"] + 1
            return c

        def body(c):
            in_image = jnp.any((c["img_step"] >= 0) & ~c["done"])
            return jax.lax.cond(in_image, image_step, text_step, c)

        final = jax.lax.while_loop(lambda c: ~jnp.all(c["done"]), body, carry)
        keys = ("tokens", "is_patch", "patch_index", "patches", "patch_t", "length")
        return {k: final[k] for k in keys}, final["nfe"]

    return jit_with_prefill_bucket(run, cfg)
