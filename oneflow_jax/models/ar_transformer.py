"""The AR+FM baseline network (reference §7, Transfusion-style): OneFlow's backbone and input embedding, causal over
text, bidirectional inside each image block, with two heads:
  q_logits  [B, L, V]  next-token logits (position j predicts the text token at j + 1)
  velocity  [B, L, D]  flow-matching velocity for every latent patch
No insertion head. `__call__` runs a packed training batch (mask from segment_ids + block_ids); `decode` runs one
chunk of new positions against a KV cache (the sampler's prefill, text steps and image Euler steps).
"""
from __future__ import annotations

import jax.numpy as jnp

from oneflow_jax.models.transformer import Backbone, Dense, MixedSequenceModel, ModelConfig, attention_mask, select_inputs

MODEL_INPUTS = ("tokens", "is_patch", "patch_index", "patches", "patch_t", "segment_ids", "positions", "block_ids")


class ARModel(MixedSequenceModel):
    """Inputs as OneFlowModel's plus block_ids [B, L] (0 = text, k > 0 = the k-th image block of the row)."""

    def setup(self):
        cfg = self.cfg
        self.setup_inputs()
        self.backbone = Backbone(cfg)
        if not cfg.tie_embeddings:
            self.token_head = Dense(cfg.vocab_size, ("embed", "vocab"), cfg)
        self.setup_patch_head()

    def __call__(self, batch):
        x = self.embed_inputs(batch)
        mask = attention_mask(batch["segment_ids"], causal=True, block_ids=batch.get("block_ids"))
        return self.heads(self.backbone(x, mask, batch["positions"]), batch)

    def decode(self, batch, cache, write_pos, mask):
        """One chunk [B, C] (tokens, is_patch, patch_index, patches, patch_t, positions) against `cache` = (k, v)
        [n_layers, B, S, kv_heads, head_dim]: writes its keys/values at write_pos [B, C] and attends under `mask`
        [B, 1, C, S]. Returns (heads, new cache)."""
        x = self.embed_inputs(batch)
        h, cache = self.backbone(x, mask, batch["positions"], cache=cache, write_pos=write_pos)
        return self.heads(h, batch), cache

    def heads(self, h, batch):
        return dict(q_logits=self.token_logits(h), velocity=self.image_velocity(h, batch))


def empty_cache(cfg: ModelConfig, batch_size: int, length: int, dtype=jnp.float32):
    shape = (cfg.n_layers, batch_size, length, cfg.n_kv_heads, cfg.dim_per_head)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def model_inputs(batch):
    return select_inputs(batch, MODEL_INPUTS)
