"""The multi-scale residual VQ tokenizer (models/vq.py, VAR's scheme) of the NextFlow-style baseline on shapes-world,
sized to train on a 2-core CPU in a few minutes.

Command: python -m oneflow_jax.train_vq --config configs/vq_shapes_tiny.py --workdir workdir/vq_shapes_tiny
What it reaches, and in how long: docs/results.md, "VQ tokenizer".
Variants: --config configs/vq_shapes_tiny.py:smoke (a few steps, for tests).
"""
import ml_collections


def get_config(arg: str | None = None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1200              # optimizer steps
    c.batch_size = 32                 # images per step
    c.log_every = 50
    c.ckpt_every = 500
    c.keep_checkpoints = 2

    # every field: oneflow_jax/models/vq.py, VQConfig
    c.vq = ml_collections.ConfigDict(dict(
        image_size=32,
        channels=(16, 32, 64),        # conv widths at 32, 16 and 8 px (3 levels: downsample 4)
        downsample=4,                 # 32 px -> 8x8 features
        code_dim=16,
        codebook_size=256,
        scales=(1, 2, 4, 8),          # token maps 1x1 .. 8x8 (85 tokens per image); must end at 32 / downsample
        beta=0.25,                    # commitment weight
        codebook_update="ema",        # 'ema': codes move to an EMA of their residuals | 'loss': VAR's codebook loss
        ema_decay=0.99,               # 'ema' only
        num_phi=2,                    # refinement convs shared across the 4 scales
        phi_mix=0.5,                  # phi(z) = (1 - mix) z + mix conv(z)
        restart_every=100))           # steps without a hit after which a code is restarted (0 = never)

    c.optimizer = ml_collections.ConfigDict(dict(lr=2e-3, min_lr_ratio=0.1, warmup_steps=50, b1=0.9, b2=0.99,
                                                 grad_clip=1.0))

    c.data = ml_collections.ConfigDict(dict(
        name="shapes_world", data_dir=ml_collections.FieldReference(None, field_type=str), split="train",
        limit=0))                     # records read from the split (0 = all); their images are held in memory

    c.eval = ml_collections.ConfigDict(dict(split="eval", limit=0,   # records (0 = all 1000)
                                            batch_size=250, grid_images=16))

    if arg == "smoke":
        c.total_steps, c.batch_size, c.log_every, c.ckpt_every = 6, 8, 2, 3
        c.vq.update(channels=(8, 8, 8, 16), downsample=8, code_dim=8, codebook_size=32, scales=(1, 2, 4),
                    restart_every=3, codebook_update="loss")   # the rule the default does not use: tests see both
        c.data.limit = 64
        c.eval.update(limit=16, batch_size=16, grid_images=4)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of vq_shapes_tiny (known: smoke)")
    return c
