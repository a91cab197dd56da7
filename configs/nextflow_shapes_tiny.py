"""The NextFlow-style baseline (docs/nextflow.md; NextFlow arXiv 2601.02204, VAR arXiv 2404.02905) at shapes_tiny's
size: same backbone, data and optimizer as configs/shapes_tiny.py, model_type 'nextflow' (oneflow_jax/methods/
nextflow.py), images as the multi-scale VQ tokenizer's codes (codec 'vq', trained by configs/vq_shapes_tiny.py).

Command: CONFIG=configs/nextflow_shapes_tiny.py ./launch/local.sh (tokenizer into W/vq, then the model, then eval), or
    python -m oneflow_jax.train_vq --config configs/vq_shapes_tiny.py --workdir workdir/vq_shapes_tiny
    then python -m oneflow_jax.train --config configs/nextflow_shapes_tiny.py --workdir workdir/nextflow_shapes_tiny
    (--config.codec.tokenizer=DIR for a tokenizer trained elsewhere)
Scores and wall clock: docs/results.md, "NextFlow-style baseline".
Variants: --config configs/nextflow_shapes_tiny.py:smoke (a few steps, for tests; its tokenizer is
configs/vq_shapes_tiny.py:smoke's).
"""
import ml_collections

from oneflow_jax.config_lib import sibling_config


def get_config(arg: str | None = None):
    c = sibling_config(__file__, "shapes_tiny.py").get_config(arg)
    c.model_type = "nextflow"
    # the tokenizer as codec: a train_vq run directory; its geometry below is checked against it
    c.codec = ml_collections.ConfigDict(dict(
        name="vq",
        tokenizer="workdir/vq_shapes_tiny",   # train_vq --workdir of configs/vq_shapes_tiny.py
        image_size=32,
        scales=(1, 2, 4, 8),          # token-map sides: 85 codes per image, blocks of 85 + 64 = 149 positions
        code_dim=16,                  # C: features per block position (the codes' width)
        codebook_size=256,            # classes of the code head
        batch_size=8))                # images encoded per jitted call in the input pipeline
    c.nextflow = ml_collections.ConfigDict(dict(
        cond_drop=0.1))               # P(a document loses the text before its first image): image_cfg's unconditional
    c.model.update(patch_head_hidden=0)   # no patch head here (the code head is d_model -> codebook_size)
    c.objective.image_loss_weight = 1.0   # w in L = L_text + w * L_code (mean CE over the batch's codes)
    c.data.update(
        seq_len=256,                  # one caption-image pair (~167 positions) per row; 2-3 image documents dropped
        max_patches_per_row=0)        # no patch-slot limit
    c.sampler.update(
        max_len=512,                  # positions of the sampler's buffer, prompt included (3 images fit)
        temperature=0.1,              # text tokens' temperature
        code_temperature=0.1,         # image codes' temperature
        top_k=0, top_p=1.0,           # top-k (0 = off), then nucleus filtering of every draw
        image_cfg=3.0)                # guidance weight at the last scale, ramped from 1 at the first; 1 = off

    if not arg:
        c.total_steps = 2400          # optimizer steps: with the tokenizer's, ./launch/local.sh fits 15 min on 2 cores
        c.sample_every = 0            # no periodic sample grid (local.sh's eval follows the training)
    if arg == "smoke":
        # configs/vq_shapes_tiny.py:smoke's tokenizer: scales 1, 2, 4 (21 codes, blocks of 21 + 16 = 37 positions)
        c.codec.update(tokenizer="workdir/vq_shapes_tiny_smoke", scales=(1, 2, 4), code_dim=8, codebook_size=32)
        c.data.update(seq_len=64)     # one single-image document per row; the interleaved ones are dropped
        c.sampler.update(max_len=64)
        c.eval.update(num_examples=8, batch_size=8)
    return c
