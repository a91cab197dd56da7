"""The NextFlow-style baseline's network (NextFlow arXiv 2601.02204, VAR arXiv 2404.02905; docs/nextflow.md): the
OneFlow / AR+FM backbone, causal over the row and bidirectional inside each group of an image block, with
  embeddings  text positions: the token embedding; block positions: Dense(C -> d) of their input features
              (patches[..., :C]; column C, the code, is never read) + a learned embedding of their index in the block
              (0..N-1: which scale and where in it; index 0 is VAR's start token)
  q_logits     [B, L, V]      next-token logits (as AR+FM; tied to the embedding or a token head)
  code_logits  [B, L, V_img]  the code of the block position (V_img = the tokenizer's codebook size)
`__call__` runs a packed training batch; `decode` runs one chunk of new positions against a KV cache (the sampler's
prefill, text steps and one step per block group), exactly as ARModel.decode.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from oneflow_jax.models import ar_transformer
from oneflow_jax.models.transformer import Backbone, Dense, MixedSequenceModel, attention_mask, select_inputs

MODEL_INPUTS = ("tokens", "is_patch", "patch_index", "patches", "segment_ids", "positions", "block_ids")
empty_cache = ar_transformer.empty_cache          # (cfg, batch_size, length) -> zero (k, v) caches


class NextFlowModel(MixedSequenceModel):
    """Inputs [B, L]: tokens, is_patch, patch_index (0..N-1 in the block), patches [B, L, C + 1], segment_ids,
    positions, block_ids (0 = text, else one id per (image, group) of the row)."""

    def setup(self):
        cfg = self.cfg
        if cfg.image_vocab_size < 1:
            raise ValueError("NextFlowModel needs ModelConfig.image_vocab_size (the VQ codebook size) > 0")
        self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                          ("vocab", "embed")))
        self.code_in = Dense(cfg.d_model, ("patch", "embed"), cfg, use_bias=True)
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("patch_grid", "embed"))
        self.block_pos = self.param("block_pos_embed", init, (cfg.num_patches, cfg.d_model), cfg.param_dtype)
        self.backbone = Backbone(cfg)
        if not cfg.tie_embeddings:
            self.token_head = Dense(cfg.vocab_size, ("embed", "vocab"), cfg)
        self.code_head = Dense(cfg.image_vocab_size, ("embed", "vocab"), cfg)

    def __call__(self, batch):
        x = self.embed_inputs(batch)
        mask = attention_mask(batch["segment_ids"], causal=True, block_ids=batch.get("block_ids"))
        return self.heads(self.backbone(x, mask, batch["positions"]))

    def decode(self, batch, cache, write_pos, mask):
        """One chunk [B, S_c] (tokens, is_patch, patch_index, patches, positions) against `cache` = (k, v)
        [n_layers, B, S, kv_heads, head_dim]: writes its keys/values at write_pos [B, S_c] and attends under `mask`
        [B, 1, S_c, S]. Returns (dict(q_logits, code_logits), new cache)."""
        x = self.embed_inputs(batch)
        h, cache = self.backbone(x, mask, batch["positions"], cache=cache, write_pos=write_pos)
        return self.heads(h), cache

    def embed_inputs(self, batch):
        """Token embeddings on text positions; Dense(features) + block-position embedding on block positions."""
        cfg = self.cfg
        tok = self.embed(batch["tokens"])
        features = batch["patches"][..., :cfg.patch_dim - 1].astype(cfg.dtype)
        img = self.code_in(features) + jnp.take(self.block_pos, batch["patch_index"], axis=0).astype(cfg.dtype)
        x = jnp.where(batch["is_patch"][..., None], img, tok)
        return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

    def heads(self, h):
        code_logits = nn.with_logical_constraint(self.code_head(h),
                                                 ("activation_batch", "activation_length", "activation_vocab"))
        return dict(q_logits=self.token_logits(h), code_logits=code_logits)


def model_inputs(batch):
    return select_inputs(batch, MODEL_INPUTS)
