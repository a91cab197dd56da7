"""AR+FM baseline 8B (reference §7) matching configs/oneflow_8b.py (Llama 3.1 8B backbone): that config with
model_type 'ar' and the `ar` section. What differs from OneFlow and why: configs/ar_1b.py.

    python -m oneflow_jax.flops --config configs/ar_8b.py --json
    python -m oneflow_jax.aot --config configs/ar_8b.py:cpu

Wall clock and scores: not measured (no 8B step has been timed yet).

Variants as in oneflow_8b.py: `cpu`, `tpN`, `slicesN`.
"""
from oneflow_jax.config_lib import sibling_config


def get_config(arg: str | None = None):
    return sibling_config(__file__, "ar_1b.py").ar_config("oneflow_8b.py", arg)
