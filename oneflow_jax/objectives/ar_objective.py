"""The AR+FM baseline's objective (reference §7, Transfusion): next-token cross-entropy on text + flow matching on
image latents, over the *clean* document (no text noising), trained by the same loop and input pipeline as OneFlow
(`ARTransform` / `ARPacker` plug into input_pipeline's DocumentTransform / RowPacker).

Sequence of one document: BOS, its text tokens, and after every `<image>` token (the BOI marker) the image's N latent
patches, then EOS. There is no explicit EOI token: blocks have a fixed length N, so the end of a block carries no
information (Transfusion has BOI/EOI; with a fixed vocabulary and fixed-size blocks we keep BOI = `<image>` only).
EOS ends the document, so the sampler knows when to stop.

Each image gets its own t_img ~ U(0, 1) and noisy latents Y_t (Transfusion), warped by the objective's
`image_time_shift` exactly as OneFlow's images (flow_matching.shift_time). An image followed by more text
(e.g. an image-then-caption document) keeps its t_img in [ar.cond_t_min, 1] instead, Transfusion's cap on the noise of
images that condition text (they cap at t=500/1000), so that captioning learns from mostly-clean images as it sees
them at sampling time (t_img = 1).

Text targets: position j predicts the token at j + 1 of the same document when that is a text token (the last patch
of a block predicts the token after the block; BOI does not predict the first patch; EOS predicts nothing).
`target_weight` = 1 / (targets of the document), so the text loss is a per-document mean averaged over documents,
like OneFlow's Edit Flow loss. No condition dropout: the AR sampler does not use classifier-free guidance.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from oneflow_jax.models import ar_transformer as ar_model
from oneflow_jax.objectives import flow_matching
from oneflow_jax.data import packing

POSITION_FIELDS = ("tokens", "is_patch", "patch_index", "patches", "patch_t", "velocity_target", "patch_weight",
                   "targets", "target_weight", "block_ids")


@dataclasses.dataclass(frozen=True)
class ARSpecial:
    bos: int
    eos: int
    pad: int
    image: int


@dataclasses.dataclass(frozen=True)
class ARTransform:
    """DocumentTransform: a clean document -> its AR training sequence (see the module docstring)."""

    special: ARSpecial
    num_patches: int
    cond_t_min: float = 0.5
    image_time_shift: float = 1.0     # schedule time u -> noise level flow_matching.shift_time(u, s), as OneFlow

    def cost(self, num_tokens: int, num_images: int) -> tuple[int, int]:
        return (2 + num_tokens + num_images * self.num_patches, num_images * self.num_patches)

    def __call__(self, tokens, latents, rng: np.random.Generator) -> dict[str, np.ndarray]:
        tokens = np.asarray(tokens, np.int32)
        latents = np.asarray(latents, np.float32)
        is_image = tokens == self.special.image
        n_img = int(is_image.sum())
        if latents.ndim != 3 or latents.shape[0] != n_img:
            raise ValueError(f"document has {n_img} <image> tokens but latents of shape {latents.shape}")
        n, dim = self.num_patches, latents.shape[2]
        m = 2 + len(tokens) + n_img * n
        out = dict(tokens=np.full(m, self.special.pad, np.int32), is_patch=np.zeros(m, bool),
                   patch_index=np.zeros(m, np.int32), patches=np.zeros((m, dim), np.float32),
                   patch_t=np.zeros(m, np.float32), velocity_target=np.zeros((m, dim), np.float32),
                   patch_weight=np.zeros(m, np.float32), block_ids=np.zeros(m, np.int32),
                   image_index=np.zeros(m, np.int32))
        out["tokens"][0] = self.special.bos
        pos, img = 1, 0
        for i, tok in enumerate(tokens):
            out["tokens"][pos] = tok
            pos += 1
            if tok != self.special.image:
                continue
            t_min = self.cond_t_min if i < len(tokens) - 1 else 0.0       # followed by text: conditioning image
            u_min = flow_matching.unshift_time(t_min, self.image_time_shift)   # cond_t_min bounds the noise level
            t = np.float32(flow_matching.shift_time(rng.uniform(u_min, 1.0), self.image_time_shift))
            noise = rng.standard_normal((n, dim), dtype=np.float32)
            block = slice(pos, pos + n)
            out["patches"][block], out["velocity_target"][block] = flow_matching.interpolate(latents[img], noise, t)
            out["patch_t"][block], out["patch_weight"][block] = t, 1.0
            out["is_patch"][block], out["patch_index"][block], out["block_ids"][block] = True, np.arange(n), img + 1
            out["image_index"][block] = img
            img += 1
            pos += n
        out["tokens"][pos] = self.special.eos
        out["targets"], out["target_weight"] = text_targets(out["tokens"], out["is_patch"])
        return out


def text_targets(tokens, is_patch) -> tuple[np.ndarray, np.ndarray]:
    """(targets, target_weight) of a document's sequence: position j predicts the token at j + 1 when that is a text
    position (so the last position of a block predicts the token after it, and EOS nothing); weights 1 / (targets of
    the document)."""
    has_target = np.zeros(len(tokens), bool)
    has_target[:-1] = ~is_patch[1:]
    targets = np.where(has_target, np.roll(tokens, -1), 0).astype(np.int32)
    return targets, has_target.astype(np.float32) / max(int(has_target.sum()), 1)


@dataclasses.dataclass(frozen=True)
class ARPacker:
    """RowPacker: documents back to back in rows of `seq_len` (segment ids, per-document positions, row-unique
    block ids) and, with `max_patches` > 0, at most that many patches, listed in `patch_slots` (as OneFlow's
    packing.pack_rows). `fields`: the per-position fields of a document that a row carries (the NextFlow baseline
    packs its own)."""

    seq_len: int
    pad_id: int = 0
    max_patches: int = 0
    fields: tuple[str, ...] = POSITION_FIELDS

    @property
    def limits(self) -> tuple[int, int]:
        return (self.seq_len, self.max_patches or self.seq_len)

    def usage(self, doc):
        return (len(doc["tokens"]), packing.doc_patches(doc))

    def pack(self, docs):
        total = sum(len(d["tokens"]) for d in docs)
        if total > self.seq_len:
            raise ValueError(f"documents need {total} positions; the row has {self.seq_len}")
        row = {}
        for name in self.fields:
            ref = docs[0][name]
            buf = np.full((self.seq_len,) + ref.shape[1:], self.pad_id if name == "tokens" else 0, ref.dtype)
            buf[:total] = np.concatenate([d[name] for d in docs])
            row[name] = buf
        row["segment_ids"] = np.zeros(self.seq_len, np.int32)
        row["positions"] = np.zeros(self.seq_len, np.int32)
        pos = blocks = 0
        for seg, doc in enumerate(docs, start=1):
            k = len(doc["tokens"])
            row["segment_ids"][pos:pos + k] = seg
            row["positions"][pos:pos + k] = np.arange(k)
            ids = row["block_ids"][pos:pos + k]
            ids[ids > 0] += blocks
            blocks += int(doc["block_ids"].max(initial=0))
            pos += k
        if self.max_patches:
            row["patch_slots"] = packing.patch_slots(row["is_patch"], self.max_patches)
        return row


def special_tokens(tokenizer) -> ARSpecial:
    return ARSpecial(bos=tokenizer.bos_id, eos=tokenizer.eos_id, pad=tokenizer.pad_id, image=tokenizer.image_id)


def pipeline_pieces(config, tokenizer, codec):
    """(ARTransform, ARPacker) for input_pipeline.create_train_iterator, from a resolved run config."""
    transform = ARTransform(special_tokens(tokenizer), codec.num_patches, float(config.ar.cond_t_min),
                            float(config.objective.image_time_shift))
    return transform, ARPacker(config.data.seq_len, pad_id=tokenizer.pad_id,
                               max_patches=config.data.max_patches_per_row)


def cross_entropy(logits, targets):
    """-log softmax(logits)[targets], in float32: logits [..., V], targets int [...]."""
    logits = logits.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]


def text_loss(q_logits, batch):
    """(per-document mean next-token CE averaged over documents, number of documents) from `targets` and
    `target_weight` (1 / a document's targets, so a document's weights sum to one)."""
    w = batch["target_weight"].astype(jnp.float32)
    num_docs = jnp.sum(w)
    return jnp.sum(w * cross_entropy(q_logits, batch["targets"])) / jnp.maximum(num_docs, 1e-6), num_docs


def ar_loss(model, params, batch, image_loss_weight: float = 1.0, image_loss_space: str = "v"):
    """(loss, metrics): per-document mean next-token CE (averaged over documents) + w * flow-matching MSE."""
    out = model.apply({"params": params}, ar_model.model_inputs(batch))
    l_text, num_docs = text_loss(out["q_logits"], batch)
    l_image = flow_matching.image_loss(out["velocity"], batch, image_loss_space)
    loss = l_text + image_loss_weight * l_image
    return loss, dict(loss=loss, text_loss=l_text, image_loss=l_image, num_docs=num_docs,
                      num_tokens=jnp.sum(batch["segment_ids"] > 0))
