"""The method registry: which generative method a run trains, chosen in one place.

A `Method` owns everything that differs between methods: its model, its loss, how a clean document becomes a training
sequence (transform) and rows (packer), its sampler, what its FLOP count needs to know and whether it exports to
PyTorch. The rest of the code asks `for_config(config)` once and uses what it returns.

    oneflow  OneFlow: insertion Edit Flow over text + Flow Matching over image latents (the paper's method)
    ar       AR+FM: the autoregressive + flow-matching baseline (Transfusion-style, reference §7)
    nextflow NextFlow-style baseline: next-token text + next-scale VQ image codes (NextFlow / VAR; docs/nextflow.md)
"""
from __future__ import annotations

from oneflow_jax.methods.base import Method
from oneflow_jax.methods.ar_fm import AR_FM
from oneflow_jax.methods.nextflow import NEXTFLOW
from oneflow_jax.methods.oneflow import ONEFLOW

METHODS: dict[str, Method] = {m.name: m for m in (ONEFLOW, AR_FM, NEXTFLOW)}


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def for_config(config) -> Method:
    """The method a run config names (`config.model_type`; OneFlow when the field is absent)."""
    return get(config.get("model_type", "oneflow"))


def pipeline_pieces(config, tokenizer, codec):
    """The run's (DocumentTransform, RowPacker): its method's, wrapped to carry pixels to the train step when
    `data.encode_in_step` (data/encode_in_step.py)."""
    transform, packer = for_config(config).pipeline_pieces(config, tokenizer, codec)
    if config.data.encode_in_step:
        from oneflow_jax.data import encode_in_step  # pylint: disable=g-import-not-at-top
        return encode_in_step.pipeline_pieces(transform, packer, codec, config.data)
    return transform, packer
