"""The NextFlow-style baseline (NextFlow arXiv 2601.02204, VAR arXiv 2404.02905; docs/nextflow.md): one causal
decoder over text tokens and multi-scale VQ image codes (codec 'vq'), next-token text and next-scale images, the
text + code cross-entropy on clean documents, scale-by-scale KV-cached sampling."""
from __future__ import annotations

import types

import numpy as np

from oneflow_jax.methods.base import Method
from oneflow_jax.models.nextflow_transformer import NextFlowModel
from oneflow_jax.objectives import nextflow_objective
from oneflow_jax.sampling import nextflow_sampler


def batch_structure(config, model_cfg) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (per-row shape, dtype)} of a packed NextFlow row, from the transform and packer the train loop uses on
    a dummy text-only document (the block layout does not change shapes). Every field is per position."""
    tokens = types.SimpleNamespace(bos_id=1, eos_id=2, pad_id=0, image_id=4)     # ids: shapes and dtypes only
    transform, packer = nextflow_objective.pipeline_pieces(config, tokens, types.SimpleNamespace(
        group_sizes=(model_cfg.num_patches,)))
    latents = np.zeros((0, model_cfg.num_patches, model_cfg.patch_dim), np.float32)
    row = packer.pack([transform(np.array([5], np.int32), latents, np.random.default_rng(0))])
    return {k: (v.shape, v.dtype) for k, v in row.items()}


NEXTFLOW = Method(
    name="nextflow", model_class=NextFlowModel, loss=nextflow_objective.nextflow_loss,
    pipeline_pieces=nextflow_objective.pipeline_pieces, batch_structure=batch_structure, sampler=nextflow_sampler,
    special_tokens=nextflow_objective.special_tokens, banned_tokens=lambda tok: tuple(tok.unused_ids), causal=True,
    insert_head=False, end_token=True, torch_export=False, image_codes=True)
