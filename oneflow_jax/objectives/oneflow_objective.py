"""The OneFlow training objective: L = L_text (Edit Flow, Eq. 7) + w * L_image (flow matching), reference §2-3.

A pure function of (params, batch): the host already noised and packed the batch (edit_flow.noise_document,
packing.pack_rows), so the device only runs the network on X_t and reduces.
"""
from __future__ import annotations

import jax.numpy as jnp

from oneflow_jax.objectives import edit_flow
from oneflow_jax.objectives import flow_matching
from oneflow_jax.models.transformer import select_inputs

MODEL_INPUTS = ("tokens", "is_patch", "patch_index", "patches", "patch_t", "segment_ids", "positions")


def model_inputs(batch):
    return select_inputs(batch, MODEL_INPUTS)


def oneflow_loss(model, params, batch, image_loss_weight: float = 1.0, image_loss_space: str = "v"):
    """Returns (loss, metrics) for one packed batch (image_loss_space: see flow_matching.image_loss)."""
    out = model.apply({"params": params}, model_inputs(batch))
    l_text, parts = edit_flow.text_loss(out["pi_logit"], out["lam"], out["q_logits"], batch)
    l_image = flow_matching.image_loss(out["velocity"], batch, image_loss_space)
    loss = l_text + image_loss_weight * l_image
    metrics = dict(loss=loss, text_loss=l_text, image_loss=l_image, **{f"text_{k}": v for k, v in parts.items()},
                   num_docs=jnp.sum(batch["text_weight"]), num_tokens=jnp.sum(batch["segment_ids"] > 0))
    return loss, metrics
