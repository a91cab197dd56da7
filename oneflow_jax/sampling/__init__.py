"""Sampling: OneFlow's concurrent insertion + flow sampler (`oneflow_sampler`, paper Alg. 1-2), the AR+FM baseline's
KV-cached sampler (`ar_sampler`), and loading a run and turning prompts into documents (`generate`)."""
