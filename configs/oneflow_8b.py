"""OneFlow 8B: Llama 3.1 8B backbone (reference §6: d 4096, 32 layers, 32 heads, 8 KV heads, FFN 14336, untied
Q head); everything else as configs/oneflow_1b.py (sequence 512, batch 4096, 256-px VAE latents, FSDP mesh).

    python -m oneflow_jax.train --config configs/oneflow_8b.py --workdir W ...   (the flags of configs/oneflow_1b.py)
    python -m oneflow_jax.flops --config configs/oneflow_8b.py --json
    python -m oneflow_jax.aot --config configs/oneflow_8b.py [--config.mesh.compile_topology=v5p-256]

Wall clock and scores: not measured (no 8B step has been timed yet).

Variants as in oneflow_1b.py: `cpu`, `tpN` (2, 4 or 8), `slicesN`. At 8B the fp32 params + Adam state are 128 GB:
FSDP over >= 64 chips keeps them under 2 GiB per chip; see docs/pod_scale.md for when tensor parallelism pays.
"""
from oneflow_jax.config_lib import sibling_config

LLAMA_3_1_8B = dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, tie_embeddings=False,
                    rope_scaling=(8.0, 1.0, 4.0, 8192))      # Llama 3.1's llama3 RoPE scaling


def get_config(arg: str | None = None):
    return sibling_config(__file__, "oneflow_1b.py").pod_config(LLAMA_3_1_8B, arg)
