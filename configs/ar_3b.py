"""AR+FM baseline 3B (reference §7) matching configs/oneflow_3b.py (Llama 3.2 3B backbone): that config with
model_type 'ar' and the `ar` section. What differs from OneFlow and why: configs/ar_1b.py.

    python -m oneflow_jax.flops --config configs/ar_3b.py --json
    python -m oneflow_jax.aot --config configs/ar_3b.py:cpu

Wall clock and scores: not measured at this scale; one H200 ran the 16-row step as fast as OneFlow's (docs/results.md).

Variants as in oneflow_3b.py: `cpu`, `tpN`, `slicesN`.
"""
from oneflow_jax.config_lib import sibling_config


def get_config(arg: str | None = None):
    return sibling_config(__file__, "ar_1b.py").ar_config("oneflow_3b.py", arg)
