"""The NextFlow-style baseline's objective (NextFlow arXiv 2601.02204; VAR arXiv 2404.02905; docs/nextflow.md):
next-token cross-entropy on text and next-scale cross-entropy on the image codes of one causal decoder, over the
clean document, with the input pipeline and train loop every method shares.

Sequence of one document: BOS, its text, and after every `<image>` (the BOI) the image's block of N positions (the
codec's latents rows, models/vq_codec.py: K scale groups, then the final group), then EOS. Per position:
  targets, target_weight    as AR+FM (ar_objective.text_targets): BOI predicts nothing, the last position of the
                            final group predicts the token after the image (or EOS); per-document mean weights
  code_targets, code_weight the code a block position predicts (the latents' column C; none in the final group)
  block_ids                 one id per (image, group) of the document (made row-unique by the packer): attention
                            is bidirectional inside a group and causal across groups (VAR's block-causal mask)
Condition dropout (`nextflow.cond_drop`, VAR's class dropout for classifier-free guidance): with that probability a
document loses the text before its first image, so the model also learns `BOS <image> block`, what guidance's
unconditional branch runs.

Loss (VAR, NextFlow): L = L_text + image_loss_weight * mean CE over every code target of the batch.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from oneflow_jax.models import nextflow_transformer as nf_model
from oneflow_jax.objectives import ar_objective
from oneflow_jax.objectives.ar_objective import ARSpecial

POSITION_FIELDS = ("tokens", "is_patch", "patch_index", "patches", "targets", "target_weight", "code_targets",
                   "code_weight", "block_ids")
special_tokens = ar_objective.special_tokens       # tokenizer -> ARSpecial(bos, eos, pad, image)


@dataclasses.dataclass(frozen=True)
class NextFlowTransform:
    """DocumentTransform: a clean document and its images' block latents [n_img, N, C + 1] -> its training sequence
    (module docstring). `group_sizes`: positions per group of a block (VQCodec.group_sizes; they sum to N)."""

    special: ARSpecial
    group_sizes: tuple[int, ...]
    cond_drop: float = 0.0

    @property
    def num_patches(self) -> int:
        return int(sum(self.group_sizes))

    def cost(self, num_tokens: int, num_images: int) -> tuple[int, int]:
        return (2 + num_tokens + num_images * self.num_patches, num_images * self.num_patches)

    def __call__(self, tokens, latents, rng: np.random.Generator) -> dict[str, np.ndarray]:
        tokens = np.asarray(tokens, np.int32)
        latents = np.asarray(latents, np.float32)
        is_image = tokens == self.special.image
        n_img, n = int(is_image.sum()), self.num_patches
        if latents.ndim != 3 or latents.shape[:2] != (n_img, n):
            raise ValueError(f"document has {n_img} <image> tokens of {n} positions but latents of shape "
                             f"{latents.shape}")
        if self.cond_drop > 0 and n_img and rng.uniform() < self.cond_drop:
            tokens = tokens[np.argmax(is_image):]                   # the text before the first image goes
        m, dim = 2 + len(tokens) + n_img * n, latents.shape[2]
        out = dict(tokens=np.full(m, self.special.pad, np.int32), is_patch=np.zeros(m, bool),
                   patch_index=np.zeros(m, np.int32), patches=np.zeros((m, dim), np.float32),
                   code_targets=np.zeros(m, np.int32), code_weight=np.zeros(m, np.float32),
                   block_ids=np.zeros(m, np.int32))
        group = np.repeat(np.arange(len(self.group_sizes)), self.group_sizes)      # [N] group of each position
        out["tokens"][0] = self.special.bos
        pos, img = 1, 0
        for tok in tokens:
            out["tokens"][pos] = tok
            pos += 1
            if tok != self.special.image:
                continue
            block, codes = slice(pos, pos + n), latents[img, :, -1]
            out["patches"][block], out["is_patch"][block], out["patch_index"][block] = latents[img], True, np.arange(n)
            out["block_ids"][block] = img * len(self.group_sizes) + group + 1
            out["code_targets"][block] = np.where(codes >= 0, np.rint(codes), 0)
            out["code_weight"][block] = codes >= 0
            img += 1
            pos += n
        out["tokens"][pos] = self.special.eos
        out["targets"], out["target_weight"] = ar_objective.text_targets(out["tokens"], out["is_patch"])
        return out


def make_packer(config, pad_id: int) -> ar_objective.ARPacker:
    """AR+FM's packer over the NextFlow fields (row-unique block ids, per-document RoPE positions)."""
    return ar_objective.ARPacker(config.data.seq_len, pad_id=pad_id, max_patches=config.data.max_patches_per_row,
                                 fields=POSITION_FIELDS)


def pipeline_pieces(config, tokenizer, codec):
    """(NextFlowTransform, packer) for input_pipeline.create_train_iterator, from a resolved run config."""
    transform = NextFlowTransform(special_tokens(tokenizer), tuple(codec.group_sizes), float(config.nextflow.cond_drop))
    return transform, make_packer(config, tokenizer.pad_id)


def nextflow_loss(model, params, batch, image_loss_weight: float = 1.0, image_loss_space: str = "v"):
    """(loss, metrics): per-document mean next-token CE (averaged over documents) + w * the mean code CE over the
    batch's code targets. `image_loss_space` is the flow-matching methods' and unused here."""
    del image_loss_space
    out = model.apply({"params": params}, nf_model.model_inputs(batch))
    l_text, num_docs = ar_objective.text_loss(out["q_logits"], batch)
    w = batch["code_weight"].astype(jnp.float32)
    ce = ar_objective.cross_entropy(out["code_logits"], batch["code_targets"])
    l_image = jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1.0)
    loss = l_text + image_loss_weight * l_image
    return loss, dict(loss=loss, text_loss=l_text, image_loss=l_image, num_docs=num_docs,
                      num_tokens=jnp.sum(batch["segment_ids"] > 0))
