"""AR+FM, the autoregressive baseline (reference §7): the same backbone under a causal mask with a next-token head
and a velocity head, next-token cross-entropy + flow matching on clean documents, KV-cached sampling."""
from __future__ import annotations

import types

import numpy as np

from oneflow_jax.methods.base import Method
from oneflow_jax.models.ar_transformer import ARModel
from oneflow_jax.objectives import ar_objective
from oneflow_jax.sampling import ar_sampler


def batch_structure(config, model_cfg) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (per-row shape, dtype)} of a packed AR+FM row, from the transform and packer the train loop uses on a
    dummy text-only document. Every field is per position."""
    tokens = types.SimpleNamespace(bos_id=1, eos_id=2, pad_id=0, image_id=4)     # ids: shapes and dtypes only
    transform, packer = ar_objective.pipeline_pieces(config, tokens, types.SimpleNamespace(
        num_patches=model_cfg.num_patches))
    latents = np.zeros((0, model_cfg.num_patches, model_cfg.patch_dim), np.float32)
    row = packer.pack([transform(np.array([5], np.int32), latents, np.random.default_rng(0))])
    return {k: (v.shape, v.dtype) for k, v in row.items()}


AR_FM = Method(
    name="ar", model_class=ARModel, loss=ar_objective.ar_loss, pipeline_pieces=ar_objective.pipeline_pieces,
    batch_structure=batch_structure, sampler=ar_sampler, special_tokens=ar_objective.special_tokens,
    banned_tokens=lambda tok: tuple(tok.unused_ids), causal=True, insert_head=False, end_token=True, torch_export=False)
