"""OneFlow vs AR+FM on shapes-world at equal model size (oneflow_jax/compare.py; reference §7-8).

python -m oneflow_jax.compare --config configs/compare_shapes.py --workdir W [--config.budget=2.0]
Both runs share everything below (shapes_tiny's model, codec, data, optimizer, sampler); model_type is set per run.
`budget` scales compare.steps. Variant :tiny is for tests (a few steps of a tiny model).
"""
import ml_collections

from oneflow_jax.config_lib import sibling_config


def get_config(arg: str | None = None):
    c = sibling_config(__file__, "ar_shapes_tiny.py").get_config("smoke" if arg == "tiny" else None)  # shapes_tiny + the AR knobs (config.ar)
    c.model_type = "oneflow"          # set per run by compare.py
    c.budget = 1.0
    c.log_every = 25
    # shapes_tiny's codec (16x16 patches), rows of 128 positions, 16 rows, so that both trainings and all
    # evaluations fit ~45 min on a 2-core CPU (~0.6 s/step each model on a quiet machine, ~1 s under load).
    c.data.update(seq_len=128, global_batch_size=16)
    c.sampler.update(max_len=128, votes=1)      # one sample per caption: the comparison of the paper
    c.compare = ml_collections.ConfigDict(dict(
        steps=900,                    # total_steps at budget 1 (~1.05 s/step each model measured under load)
        num_checkpoints=4,            # evaluated checkpoints per model (every steps * budget / num_checkpoints)
        eval_examples=48, eval_batch_size=48, num_free=0,
        sampler_steps=16,             # OneFlow iterations / AR Euler steps per image
        latency_prompts=4))           # single-prompt captioning latency (after a warm-up)
    if arg == "tiny":
        c.compare.update(steps=4, num_checkpoints=2, eval_examples=4, eval_batch_size=4, latency_prompts=2,
                         sampler_steps=4)
        c.data.update(seq_len=64, global_batch_size=4)
        c.sampler.update(max_len=64)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of compare_shapes (known: tiny)")
    return c
