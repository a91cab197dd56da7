"""The AR+FM baseline (reference §7) at shapes_tiny's size: same backbone, codec, data, optimizer and sampler settings
as configs/shapes_tiny.py, model_type 'ar' (oneflow_jax/ar_model.py, ar_objective.py, ar_sampler.py).

python -m oneflow_jax.train --config configs/ar_shapes_tiny.py --workdir workdir/ar_shapes_tiny
Variants: --config configs/ar_shapes_tiny.py:smoke (a few steps, for tests).
"""
import ml_collections

from oneflow_jax.config_lib import sibling_config


def get_config(arg: str | None = None):
    c = sibling_config(__file__, "shapes_tiny.py").get_config(arg)
    c.model_type = "ar"
    # AR-only knobs. cond_t_min: an image followed by text draws t_img ~ U(cond_t_min, 1) (Transfusion's noise cap on
    # conditioning images); others U(0, 1).
    c.ar = ml_collections.ConfigDict(dict(cond_t_min=0.5))
    # objective.image_loss_weight stays shapes_tiny's (4, the OneFlow run's) for an equal-weight comparison;
    # Transfusion used 5 with its VAE latents. OneFlow's noising and condition-dropout knobs are unused by the AR
    # objective.
    return c
