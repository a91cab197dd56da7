"""Packing noised documents into fixed [seq_len] rows (host side).

A row holds several documents back to back; `segment_ids` (1, 2, ... per document, 0 for padding) keep their
attention apart and `positions` restart at 0 for each document (RoPE). Bag deletions go into a separate
[max_deletions] buffer whose `del_gap` indexes the row. Packing happens *after* noising, so rows are filled with the
short X_t rather than the clean documents (reference §4).
"""
from __future__ import annotations

import dataclasses

import numpy as np

# Per-position fields of a noised document and their padding values.
POSITION_FIELDS = ("tokens", "is_patch", "patch_index", "patches", "patch_t", "velocity_target", "patch_weight",
                   "text_weight", "no_insert", "insert_count")


def doc_length(doc) -> int:
    return len(doc["tokens"])


def doc_deletions(doc) -> int:
    return len(doc.get("del_tokens", ()))


def fits(used, extra, limits) -> bool:
    """Whether a row that already uses `used` (per limit of a RowPacker: positions, bag slots, ...) takes `extra`."""
    return all(u + e <= lim for u, e, lim in zip(used, extra, limits))


def doc_patches(doc) -> int:
    return int(np.count_nonzero(doc["is_patch"])) if "is_patch" in doc else 0


def patch_slots(is_patch: np.ndarray, max_patches: int) -> np.ndarray:
    """[max_patches] int32: the row's patch positions in order, then len(is_patch) (out of range) in unused slots."""
    slots = np.full(max_patches, len(is_patch), np.int32)
    where = np.flatnonzero(is_patch)
    if len(where) > max_patches:
        raise ValueError(f"the row holds {len(where)} patches; max_patches is {max_patches}")
    slots[:len(where)] = where
    return slots


def pack_rows(docs, seq_len: int, max_deletions: int, pad_id: int = 0, max_patches: int = 0) -> dict[str, np.ndarray]:
    """Concatenates `docs` into one row of `seq_len` positions (and `max_deletions` bag slots).

    With `max_patches` > 0 the row also gets `patch_slots` [max_patches]: the positions of its latent patches in
    order, then `seq_len` (out of range) in the unused slots; the model computes its image parts (patch-in, t_img
    MLP, velocity head) only there (models.transformer.MixedSequenceModel). Raises ValueError when the documents do not fit:
    choosing which documents share a row is the caller's job (`fits`).
    """
    total = sum(doc_length(d) for d in docs)
    dels = sum(doc_deletions(d) for d in docs)
    patches = sum(doc_patches(d) for d in docs)
    if total > seq_len or dels > max_deletions or (max_patches and patches > max_patches):
        raise ValueError(f"documents need {total} positions / {dels} deletions / {patches} patches; row has "
                         f"{seq_len} / {max_deletions} / {max_patches or 'any'}")
    row: dict[str, np.ndarray] = {}
    for name in POSITION_FIELDS:
        parts = [np.asarray(d[name]) for d in docs if name in d]
        if not parts:
            continue
        ref = parts[0]
        buf = np.zeros((seq_len,) + ref.shape[1:], ref.dtype)
        if name == "tokens":
            buf[:] = pad_id
        if total:
            buf[:total] = np.concatenate(parts)
        row[name] = buf
    row["segment_ids"] = np.zeros(seq_len, np.int32)
    row["positions"] = np.zeros(seq_len, np.int32)
    row["del_tokens"] = np.zeros(max_deletions, np.int32)
    row["del_gap"] = np.zeros(max_deletions, np.int32)
    row["del_valid"] = np.zeros(max_deletions, np.float32)
    if max_patches:
        row["patch_slots"] = patch_slots(row.get("is_patch", np.zeros(seq_len, bool)), max_patches)
    pos = ndel = 0
    for seg, doc in enumerate(docs, start=1):
        n, k = doc_length(doc), doc_deletions(doc)
        row["segment_ids"][pos:pos + n] = seg
        row["positions"][pos:pos + n] = np.arange(n)
        if k:
            row["del_tokens"][ndel:ndel + k] = doc["del_tokens"]
            row["del_gap"][ndel:ndel + k] = np.asarray(doc["del_gap"]) + pos
            row["del_valid"][ndel:ndel + k] = 1.0
        pos += n
        ndel += k
    return row


@dataclasses.dataclass(frozen=True)
class EditFlowPacker:
    """The input pipeline's RowPacker: rows of `seq_len` positions, `max_deletions` bag slots and, with
    `max_patches` > 0, at most that many latent patches (`pack_rows`)."""

    seq_len: int
    max_deletions: int
    pad_id: int = 0
    max_patches: int = 0

    @classmethod
    def from_config(cls, data, pad_id: int) -> "EditFlowPacker":
        return cls(data.seq_len, data.max_deletions, pad_id=pad_id, max_patches=data.max_patches_per_row)

    @property
    def limits(self) -> tuple[int, int, int]:
        return (self.seq_len, self.max_deletions, self.max_patches or self.seq_len)

    def usage(self, doc):
        return (doc_length(doc), doc_deletions(doc), doc_patches(doc))

    def pack(self, docs):
        return pack_rows(docs, self.seq_len, self.max_deletions, pad_id=self.pad_id, max_patches=self.max_patches)
