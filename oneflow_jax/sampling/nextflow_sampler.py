"""The NextFlow-style baseline's sampler (docs/nextflow.md, "Sampling"): KV-cached next-token decoding for text and
next-scale prediction for images (VAR, arXiv 2404.02905), in one jitted `lax.while_loop` over a batch of prompts.

Buffers as ar_sampler's: [B, max_len] tokens / is_patch / patch_index, patches [B, max_len, C + 1] (on an image
block's positions the codec's latents: input features in columns :C, the code the position predicts in column C,
-1 in the final group) and a KV cache [n_layers, B, max_len, kv_heads, head_dim].
  * prefill: one forward over the prompts (causal, bidirectional inside each group of a prompt image) fills the cache
    and gives each row's next-token logits;
  * text step (no row is inside an image): every unfinished row samples one token (temperature, top-k, top-p) and
    runs it as a 1-position chunk against the cache; EOS or a full buffer finishes the row; `<image>` (the BOI)
    opens a block at its first group;
  * image step (some row is inside an image): group g of the block runs as ONE chunk of its s_g^2 positions against
    the cache, bidirectional inside the group (VAR's next-scale prediction: every code of scale g at once, from the
    coarser scales and the text before). Its code logits give all codes r_g (code_temperature, top-k, top-p); then,
    on device, f_hat += phi_g(up(Z[r_g])) and the next group's input features (area_down(f_hat, s_{g+1}), or f_hat
    itself for the final group) go into the buffer. The final group writes its K/V and its last position's text
    logits are the next token's. An image costs K + 1 network evaluations (shapes-world, K = 4: 5).
Rows at different groups: an image step runs the smallest group index among the rows inside an image (lax.switch
over the K + 1 static group sizes) and the others wait. As text steps only run while no row is inside an image,
rows enter images together (at the prefill or in one text step) and in fact always share their group; the rule only
keeps a lagging row correct.

CFG (`image_cfg` = w; w = 1 compiles no unconditional pass): the unconditional branch is `BOS <image>` + the block so
far in its own KV cache, run in the same network evaluation as the conditional rows (one batched call over 2B rows;
group 1's chunk also writes BOS and `<image>`): code logits l = l_u + w_g (l_c - l_u), w_g = 1 + (w - 1) (g - 1) /
(K - 1), ramping from 1 at the first scale to w at the last (VAR). The final group draws no codes and runs the
conditional rows only. An image costs K + 1 evaluations, guided or not. `text_cfg` is ignored.
`nfe` counts network evaluations (batched calls; the prefill included). The prefill runs on the smallest of the length
buckets (common.bucket_lengths) that holds every prompt. A prompt may end with an `<image>` whose latents are None:
that image is generated first.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from oneflow_jax.models import nextflow_transformer as nf_model
from oneflow_jax.models.transformer import attention_mask
from oneflow_jax.objectives.ar_objective import ARSpecial
from oneflow_jax.sampling import ar_sampler
from oneflow_jax.sampling.common import SamplerConfig, jit_with_prefill_bucket, next_text_tokens, sample_tokens


def init_state(prompts, max_len: int, special: ARSpecial, num_patches: int, patch_dim: int, seed: int = 0):
    """Host-side buffers for prompts [(token ids without BOS, [latents [N, C + 1] or None per `<image>`])], laid out
    as ar_sampler.init_state's (block_ids: the image's index + 1; the sampler splits them per group). A trailing
    `<image>` with None latents starts its row in image mode (`pending`) with a blank block: zero features (group 1's
    input) and no codes (-1)."""
    st = ar_sampler.init_state(prompts, max_len, special, num_patches, patch_dim, seed)
    for r in np.flatnonzero(st["pending"]):
        block = slice(st["prompt_len"][r], st["prompt_len"][r] + num_patches)
        st["patches"][r, block] = 0.0
        st["patches"][r, block, -1] = -1.0
    return st


def extract_documents(state, special: ARSpecial):
    """[(token ids without BOS and EOS, [latents [N, C + 1] per image])] from a final state (codec.decode reads the
    codes in column C)."""
    return ar_sampler.extract_documents(state, special)


def make_sampler(model: nf_model.NextFlowModel, cfg: SamplerConfig, special: ARSpecial, num_patches: int,
                 banned_tokens=(), codec=None):
    """(params, state, rng) -> (final state with `length`, nfe); jitted once per batch shape and prefill length.
    `codec` (a VQCodec) gives the block layout and the on-device f_hat / next-input helpers; `banned_tokens` are never
    sampled as text (besides BOS and PAD)."""
    if codec is None or not hasattr(codec, "group_sizes"):
        raise ValueError("the nextflow sampler needs the run's VQ codec (make_sampler(..., codec=...))")
    n, sizes, offsets = num_patches, tuple(codec.group_sizes), tuple(codec.group_offsets)
    k_scales = len(sizes) - 1                                  # K scale groups, then the final group (index K)
    if offsets[-1] != n:
        raise ValueError(f"the codec's block has {offsets[-1]} positions, the sampler was given {n}")
    group_of = jnp.asarray(np.repeat(np.arange(k_scales + 1), sizes), jnp.int32)    # [N] group of a block index
    guided = cfg.image_cfg != 1.0                              # static: w = 1 runs no unconditional pass at all
    banned = jnp.asarray([special.bos, special.pad, *banned_tokens], jnp.int32)

    def run(params, st, rng, prefill_len):
        st = {k: jnp.asarray(v) for k, v in st.items()}
        b, length = st["tokens"].shape
        dim = st["patches"].shape[-1]                           # C + 1
        rows, key_pos = jnp.arange(b)[:, None], jnp.arange(length)
        decode = lambda chunk, cache, write_pos, mask: model.apply(
            {"params": params}, chunk, cache, write_pos, mask, method=nf_model.NextFlowModel.decode)
        # Prefill: the first `prefill_len` (static, >= every prompt) positions against an empty cache, one block id
        # per (image, group) as in training (NextFlowTransform).
        pos = jnp.broadcast_to(jnp.arange(prefill_len), (b, prefill_len))
        valid = pos < st["prompt_len"][:, None]
        block_ids = jnp.where(st["is_patch"], (st["block_ids"] - 1) * (k_scales + 1) + group_of[st["patch_index"]] + 1,
                              0)
        mask = attention_mask(valid.astype(jnp.int32), causal=True, block_ids=block_ids[:, :prefill_len])
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, length - prefill_len)))
        chunk = {k: st[k][:, :prefill_len] for k in ("tokens", "is_patch", "patch_index", "patches")}
        chunk["positions"] = pos
        out, cache = decode(chunk, nf_model.empty_cache(model.cfg, b, length), jnp.where(valid, pos, length), mask)
        last = jnp.maximum(st["prompt_len"] - 1, 0)
        f_size = codec.scales[-1]
        carry = dict(tokens=st["tokens"], is_patch=st["is_patch"], patch_index=st["patch_index"],
                     patches=st["patches"], length=st["prompt_len"], group=jnp.where(st["pending"], 0, -1),
                     done=jnp.zeros(b, bool), logits=out["q_logits"][jnp.arange(b), last].astype(jnp.float32),
                     f_hat=jnp.zeros((b, f_size, f_size, dim - 1), jnp.float32), cache=cache, rng=rng,
                     nfe=jnp.int32(1))
        if guided:
            carry["ucache"] = nf_model.empty_cache(model.cfg, b, length)   # BOS <image> block, as long as the
                                                                              # main cache: one batched call

        def text_step(c):
            c = dict(c)
            rng, r_tok = jax.random.split(c["rng"])
            active = ~c["done"]
            cur = c["length"]
            no_room = cur + 1 + n > length            # an image block would not fit: no BOI
            tok = next_text_tokens(r_tok, c["logits"], banned, special.image, no_room, cfg)
            write = jnp.where(active, cur, length)[:, None]
            chunk = dict(tokens=tok[:, None], is_patch=jnp.zeros((b, 1), bool),
                         patch_index=jnp.zeros((b, 1), jnp.int32), patches=jnp.zeros((b, 1, dim), c["patches"].dtype),
                         positions=cur[:, None])
            mask = (key_pos[None, :] <= cur[:, None])[:, None, None, :]
            out, c["cache"] = decode(chunk, c["cache"], write, mask)
            c["tokens"] = c["tokens"].at[rows, write].set(tok[:, None], mode="drop")
            c["length"] = cur + active
            c["logits"] = jnp.where(active[:, None], out["q_logits"][:, 0].astype(jnp.float32), c["logits"])
            # `<image>` opens a blank block: zero features (group 1's input, VAR's start token), no codes yet.
            opens = active & (tok == special.image)
            block = jnp.where(opens[:, None], c["length"][:, None] + jnp.arange(n)[None], length)
            blank = jnp.zeros((n, dim), c["patches"].dtype).at[:, -1].set(-1)
            c["patches"] = c["patches"].at[rows, block].set(blank, mode="drop")
            c["is_patch"] = c["is_patch"].at[rows, block].set(True, mode="drop")
            c["patch_index"] = c["patch_index"].at[rows, block].set(
                jnp.broadcast_to(jnp.arange(n), (b, n)), mode="drop")
            c["group"] = jnp.where(opens, 0, c["group"])
            c["f_hat"] = jnp.where(opens[:, None, None, None], 0.0, c["f_hat"])
            c["done"] = c["done"] | (active & ((tok == special.eos) | (c["length"] >= length)))
            c["rng"], c["nfe"] = rng, c["nfe"] + 1
            return c

        def unconditional_chunk(g, feats, active):
            """Group g of `BOS <image> block so far` for the unconditional rows (cache `ucache`; group 0 also writes
            BOS and `<image>`): (chunk, write positions, mask)."""
            size, off = sizes[g], offsets[g]
            upos = 2 + off + jnp.arange(size)
            chunk = dict(tokens=jnp.full((b, size), special.pad, jnp.int32), is_patch=jnp.ones((b, size), bool),
                         patch_index=jnp.broadcast_to(off + jnp.arange(size), (b, size)), patches=feats,
                         positions=jnp.broadcast_to(upos, (b, size)))
            if g == 0:
                head = dict(tokens=jnp.asarray([special.bos, special.image], jnp.int32), is_patch=jnp.zeros(2, bool),
                            patch_index=jnp.zeros(2, jnp.int32), patches=jnp.zeros((2, dim), feats.dtype),
                            positions=jnp.arange(2))
                chunk = {k: jnp.concatenate([jnp.broadcast_to(head[k], (b,) + head[k].shape), v], axis=1)
                         for k, v in chunk.items()}
                upos = jnp.concatenate([jnp.arange(2), upos])
            write = jnp.where(active[:, None], upos[None], length)
            allowed = (key_pos[None] <= upos[:, None]) | ((upos[:, None] >= 2 + off) & (key_pos[None] < 2 + off + size))
            return chunk, write, jnp.broadcast_to(allowed, (b, 1) + allowed.shape)

        def guided_decode(c, g, chunk, write, mask, active):
            """The conditional chunk and the unconditional one as ONE batched evaluation over 2B rows (the two
            caches stacked for the call); group 0's conditional chunk gets 2 leading positions that write nothing,
            to match the unconditional chunk's BOS and `<image>`. Returns the outputs of the conditional rows and
            the unconditional rows' code logits."""
            uchunk, uwrite, umask = unconditional_chunk(g, chunk["patches"], active)
            extra = uwrite.shape[1] - write.shape[1]
            if extra:
                chunk = {k: jnp.concatenate([v[:, :1]] * extra + [v], axis=1) for k, v in chunk.items()}
                write = jnp.concatenate([jnp.full((b, extra), length, write.dtype), write], axis=1)
                mask = jnp.concatenate([mask[:, :, :1]] * extra + [mask], axis=2)
            both = {k: jnp.concatenate([chunk[k], uchunk[k]]) for k in chunk}
            cache = tuple(jnp.concatenate([x, u], axis=1) for x, u in zip(c["cache"], c["ucache"]))
            out, cache = decode(both, cache, jnp.concatenate([write, uwrite]),
                                jnp.concatenate([mask, jnp.broadcast_to(umask, mask.shape)]))
            c["cache"], c["ucache"] = (tuple(x[:, :b] for x in cache), tuple(x[:, b:] for x in cache))
            size = sizes[g]
            return ({k: v[:b, extra:] for k, v in out.items()}, out["code_logits"][b:, -size:].astype(jnp.float32))

        def group_step(g, c):
            """One network evaluation (over 2B rows with guidance) on group g of the rows whose block is at group g."""
            c = dict(c)
            size, off = sizes[g], offsets[g]
            active = (c["group"] == g) & ~c["done"]
            start = c["length"]                             # the block's first position (after `<image>`)
            idx = start[:, None] + off + jnp.arange(size)[None]
            feats = c["patches"][rows, jnp.minimum(idx, length - 1)]
            chunk = dict(tokens=jnp.full((b, size), special.pad, jnp.int32), is_patch=jnp.ones((b, size), bool),
                         patch_index=jnp.broadcast_to(off + jnp.arange(size), (b, size)), patches=feats,
                         positions=idx)
            mask = jnp.broadcast_to((key_pos[None, :] < (start + off + size)[:, None])[:, None, None, :],
                                    (b, 1, size, length))
            write = jnp.where(active[:, None], idx, length)
            c["nfe"] = c["nfe"] + 1
            if g == k_scales:                               # the final group: the text logits after the image
                out, c["cache"] = decode(chunk, c["cache"], write, mask)
                c["logits"] = jnp.where(active[:, None], out["q_logits"][:, size - 1].astype(jnp.float32),
                                        c["logits"])
                c["length"] = jnp.where(active, start + n, start)
                c["group"] = jnp.where(active, -1, c["group"])
                c["done"] = c["done"] | (active & (c["length"] >= length))
                return c
            if guided:                                      # VAR's CFG with its linear ramp over the scales
                out, u_logits = guided_decode(c, g, chunk, write, mask, active)
                log_q = jax.nn.log_softmax(out["code_logits"].astype(jnp.float32), axis=-1)
                log_u = jax.nn.log_softmax(u_logits, axis=-1)
                w_g = 1.0 + (cfg.image_cfg - 1.0) * g / max(k_scales - 1, 1)
                log_q = log_u + w_g * (log_q - log_u)
            else:
                out, c["cache"] = decode(chunk, c["cache"], write, mask)
                log_q = jax.nn.log_softmax(out["code_logits"].astype(jnp.float32), axis=-1)
            rng, r_code = jax.random.split(c["rng"])
            codes = sample_tokens(r_code, log_q, cfg.code_temperature, cfg.top_p, cfg.top_k).astype(jnp.int32)
            c["patches"] = c["patches"].at[rows, jnp.where(active[:, None], idx, length), dim - 1].set(
                codes.astype(c["patches"].dtype), mode="drop")
            # VAR Alg. 2 on device: f_hat += phi_g(up(Z[r_g])); the next group's inputs from it.
            f_hat = c["f_hat"] + codec.scale_contribution(g, codes)
            nxt = codec.group_inputs(g + 1, f_hat) if g + 1 < k_scales else codec.final_inputs(f_hat)
            nidx = jnp.where(active[:, None], start[:, None] + offsets[g + 1] + jnp.arange(sizes[g + 1])[None], length)
            c["patches"] = c["patches"].at[rows, nidx, :dim - 1].set(nxt.astype(c["patches"].dtype), mode="drop")
            c["f_hat"] = jnp.where(active[:, None, None, None], f_hat, c["f_hat"])
            c["group"] = jnp.where(active, g + 1, c["group"])
            c["rng"] = rng
            return c

        def image_step(c):
            in_image = (c["group"] >= 0) & ~c["done"]
            g = jnp.min(jnp.where(in_image, c["group"], k_scales))
            return jax.lax.switch(g, [lambda c, g=g: group_step(g, c) for g in range(k_scales + 1)], c)

        def body(c):
            in_image = jnp.any((c["group"] >= 0) & ~c["done"])
            return jax.lax.cond(in_image, image_step, text_step, c)

        final = jax.lax.while_loop(lambda c: ~jnp.all(c["done"]), body, carry)
        keys = ("tokens", "is_patch", "patch_index", "patches", "length")
        return {k: final[k] for k in keys}, final["nfe"]

    return jit_with_prefill_bucket(run, cfg)
