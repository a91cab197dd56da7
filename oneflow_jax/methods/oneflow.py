"""OneFlow (the paper's method): the bidirectional model with insertion and velocity heads, the joint Edit Flow +
Flow Matching loss on noised, packed documents, and the concurrent sampler (Alg. 1-2)."""
from __future__ import annotations

import numpy as np

from oneflow_jax.data import packing
from oneflow_jax.methods.base import Method
from oneflow_jax.models.transformer import OneFlowModel
from oneflow_jax.objectives import edit_flow, oneflow_objective
from oneflow_jax.sampling import oneflow_sampler


def special_tokens(tokenizer) -> edit_flow.SpecialTokens:
    return edit_flow.SpecialTokens(bos=tokenizer.bos_id, pad=tokenizer.pad_id, image=tokenizer.image_id)


def pipeline_pieces(config, tokenizer, codec):
    """Noising X1 -> X_t (objective section) and Edit Flow packing (data section)."""
    transform = edit_flow.EditFlowTransform(config.objective.noising,
                                            special_tokens(tokenizer), codec.num_patches)
    return transform, packing.EditFlowPacker.from_config(config.data, tokenizer.pad_id)


def batch_structure(config, model_cfg) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (per-row shape, dtype)} of a packed OneFlow row, from the real noising + packing code on a dummy
    document (so keys and dtypes cannot drift from what the input pipeline feeds the step)."""
    data = config.data
    special = edit_flow.SpecialTokens(bos=1, pad=0, image=4)
    latents = np.zeros((1, model_cfg.num_patches, model_cfg.patch_dim), np.float32)
    doc = edit_flow.noise_document(np.array([5, 4], np.int32), latents, np.random.default_rng(0),
                                   edit_flow.NoisingConfig(), special, times=(0.5, np.array([0.5])))
    row = packing.pack_rows([doc], packing.doc_length(doc), max(packing.doc_deletions(doc), 1),
                            max_patches=data.max_patches_per_row and model_cfg.num_patches)
    per_position = set(packing.POSITION_FIELDS) | {"segment_ids", "positions"}
    length = lambda k: (data.seq_len if k in per_position else data.max_patches_per_row if k == "patch_slots"
                        else data.max_deletions)
    return {k: ((length(k),) + v.shape[1:], v.dtype) for k, v in row.items()}


ONEFLOW = Method(
    name="oneflow", model_class=OneFlowModel, loss=oneflow_objective.oneflow_loss, pipeline_pieces=pipeline_pieces,
    batch_structure=batch_structure, sampler=oneflow_sampler, special_tokens=special_tokens,
    banned_tokens=lambda tok: (tok.eos_id, *tok.unused_ids),     # OneFlow documents have no EOS
    causal=False, insert_head=True, end_token=False, torch_export=True)
