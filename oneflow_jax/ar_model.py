"""The AR+FM baseline network (reference §7, Transfusion-style): OneFlow's backbone and input embedding, causal over
text, bidirectional inside each image block, with two heads:
  q_logits  [B, L, V]  next-token logits (position j predicts the text token at j + 1)
  velocity  [B, L, D]  flow-matching velocity for every latent patch
No insertion head. `__call__` runs a packed training batch (mask from segment_ids + block_ids); `decode` runs one
chunk of new positions against a KV cache (the sampler's prefill, text steps and image Euler steps).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from oneflow_jax.model import Backbone, Dense, ModelConfig, attention_mask, timestep_embedding

MODEL_INPUTS = ("tokens", "is_patch", "patch_index", "patches", "patch_t", "segment_ids", "positions", "block_ids")


class ARModel(nn.Module):
    """Inputs as OneFlowModel's plus block_ids [B, L] (0 = text, k > 0 = the k-th image block of the row)."""
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                          ("vocab", "embed")))
        self.patch_in = Dense(cfg.d_model, ("patch", "embed"), cfg, use_bias=True)
        self.time_mlp_in = Dense(cfg.d_model, ("time", "embed"), cfg, use_bias=True)
        self.time_mlp_out = Dense(cfg.d_model, ("embed", "embed_out"), cfg, use_bias=True)
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("patch_grid", "embed"))
        self.row_embed = self.param("patch_row_embed", init, (cfg.patch_grid[0], cfg.d_model), cfg.param_dtype)
        self.col_embed = self.param("patch_col_embed", init, (cfg.patch_grid[1], cfg.d_model), cfg.param_dtype)
        self.backbone = Backbone(cfg)
        if not cfg.tie_embeddings:
            self.token_head = Dense(cfg.vocab_size, ("embed", "vocab"), cfg)
        self.patch_out = Dense(cfg.patch_dim, ("embed", "patch"), cfg, use_bias=True, zero_init=True)

    def embed_inputs(self, batch):
        """Same scheme as OneFlowModel.embed_inputs: tokens; patch-in + t_img embedding + 2-D position on patches."""
        cfg = self.cfg
        tok = self.embed(batch["tokens"])
        t_emb = self.time_mlp_out(nn.silu(self.time_mlp_in(timestep_embedding(batch["patch_t"], cfg.time_embed_dim))))
        idx = batch["patch_index"]
        pos2d = (jnp.take(self.row_embed, idx // cfg.patch_grid[1], axis=0)
                 + jnp.take(self.col_embed, idx % cfg.patch_grid[1], axis=0)).astype(cfg.dtype)
        img = self.patch_in(batch["patches"].astype(cfg.dtype)) + t_emb + pos2d
        x = jnp.where(batch["is_patch"][..., None], img, tok)
        return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

    def __call__(self, batch):
        x = self.embed_inputs(batch)
        mask = attention_mask(batch["segment_ids"], causal=True, block_ids=batch.get("block_ids"))
        return self.heads(self.backbone(x, mask, batch["positions"]))

    def decode(self, batch, cache, write_pos, mask):
        """One chunk [B, C] (tokens, is_patch, patch_index, patches, patch_t, positions) against `cache` = (k, v)
        [n_layers, B, S, kv_heads, head_dim]: writes its keys/values at write_pos [B, C] and attends under `mask`
        [B, 1, C, S]. Returns (heads, new cache)."""
        x = self.embed_inputs(batch)
        h, cache = self.backbone(x, mask, batch["positions"], cache=cache, write_pos=write_pos)
        return self.heads(h), cache

    def heads(self, h):
        q_logits = self.embed.attend(h) if self.cfg.tie_embeddings else self.token_head(h)
        q_logits = nn.with_logical_constraint(q_logits, ("activation_batch", "activation_length", "activation_vocab"))
        return dict(q_logits=q_logits, velocity=self.patch_out(h))


def empty_cache(cfg: ModelConfig, batch_size: int, length: int, dtype=jnp.float32):
    shape = (cfg.n_layers, batch_size, length, cfg.n_kv_heads, cfg.dim_per_head)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def model_inputs(batch):
    return {k: batch[k] for k in MODEL_INPUTS}
