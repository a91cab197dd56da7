"""The AR+FM baseline (reference §7) at shapes_tiny's size: same backbone, codec, data, optimizer and sampler settings
as configs/shapes_tiny.py, model_type 'ar' (oneflow_jax/methods/ar_fm.py: models/ar_transformer.py,
objectives/ar_objective.py, sampling/ar_sampler.py).

Command: python -m oneflow_jax.train --config configs/ar_shapes_tiny.py --workdir workdir/ar_shapes_tiny
    then python -m oneflow_jax.eval --workdir workdir/ar_shapes_tiny
Scores (2026-12-03, seed 0, 100 eval documents, EMA; docs/results.md, "Sampling frontier"): caption 0.99, generation
0.97, interleaved consistency 0.92; training ~13 min on a 2-core CPU beside other runs.
Variants: --config configs/ar_shapes_tiny.py:smoke (a few steps, for tests).
"""
import ml_collections

from oneflow_jax.config_lib import sibling_config


def get_config(arg: str | None = None):
    c = sibling_config(__file__, "shapes_tiny.py").get_config(arg)
    c.model_type = "ar"
    # cond_t_min: an image followed by text draws t_img ~ U(cond_t_min, 1), others U(0, 1); in [0, 1)
    c.ar = ml_collections.ConfigDict(dict(cond_t_min=0.5))
    # objective.image_loss_weight stays shapes_tiny's (equal weights); OneFlow's noising knobs are unused by AR
    c.sampler.temperature = 0.1       # next-token temperature (AR's sampler ignores the insertion-rule fields)
    return c
