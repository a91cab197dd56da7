"""OneFlow 3B: Llama 3.2 3B backbone (reference §6: d 3072, 28 layers, 24 heads, 8 KV heads, FFN 8192, tied
embeddings); everything else as configs/oneflow_1b.py (sequence 512, batch 4096, 256-px VAE latents, FSDP mesh).

    python -m oneflow_jax.train --config configs/oneflow_3b.py --workdir W ...   (the flags of configs/oneflow_1b.py)
    python -m oneflow_jax.flops --config configs/oneflow_3b.py --json
    python -m oneflow_jax.aot --config configs/oneflow_3b.py [--config.mesh.compile_topology=v5p-256]

Wall clock and scores: not measured at this scale. Per chip, one H200 ran the 16-row step in ~0.36 s with cuDNN
attention (docs/results.md, "Throughput and MFU").

Variants as in oneflow_1b.py: `cpu`, `tpN` (N must divide 24 heads and 8 KV heads: 2, 4 or 8), `slicesN`.
"""
from oneflow_jax.config_lib import sibling_config

LLAMA_3_2_3B = dict(d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8, d_ff=8192, tie_embeddings=True,
                    rope_scaling=(32.0, 1.0, 4.0, 8192))     # Llama 3.2's llama3 RoPE scaling


def get_config(arg: str | None = None):
    return sibling_config(__file__, "oneflow_1b.py").pod_config(LLAMA_3_2_3B, arg)
