"""AR+FM baseline 3B (reference §7) matching configs/oneflow_3b.py (Llama 3.2 3B backbone): that config with
model_type 'ar' and the `ar` section. What differs from OneFlow and why: configs/ar_1b.py.

    python -m oneflow_jax.flops --config configs/ar_3b.py --json
    python -m oneflow_jax.train --config configs/ar_3b.py:cpu --workdir /tmp/x --config.compile_only=True

Variants as in oneflow_3b.py: `cpu`, `tpN`, `slicesN`.
"""
import importlib.util
import os


def _base():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ar_1b.py")
    spec = importlib.util.spec_from_file_location("ar_1b_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str | None = None):
    return _base().ar_config("oneflow_3b.py", arg)
