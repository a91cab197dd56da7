"""OneFlow vs AR+FM on shapes-world at equal model size and matched training FLOPs (oneflow_jax/evals/compare.py;
reference §7-8).

Command: python -m oneflow_jax.compare --config configs/compare_shapes.py --workdir W [--config.budget=2.0]
    (writes W/compare.json, compare.md, compare.png; resumable)
Wall clock: ~21 min in all on a 2-core CPU at budget 1 when last measured (2026-11-21, with the shapes_tiny settings
of that day); not re-measured with the current ones.
Expected scores: not measured with the current settings. The last run (older settings) left AR+FM at caption 1.00
and OneFlow at 0.08 after 900 steps each, generation ~0.02-0.04 for both: docs/results.md, "FLOP comparison".
Both runs share everything below (shapes_tiny's model, codec, data, optimizer, sampler); model_type is set per run.
`budget` scales compare.steps. Variant :tiny is for tests (a few steps of a tiny model).
"""
import ml_collections

from oneflow_jax.config_lib import sibling_config


def get_config(arg: str | None = None):
    c = sibling_config(__file__, "ar_shapes_tiny.py").get_config("smoke" if arg == "tiny" else None)  # + config.ar
    c.model_type = "oneflow"          # set per run by compare.py
    c.budget = 1.0
    c.log_every = 25
    # shapes_tiny's model and codec at 16 rows of 128 positions, sized for a 2-core CPU
    c.data.update(seq_len=128, global_batch_size=16)
    c.sampler.update(max_len=128, votes=1)      # one sample per caption: the comparison of the paper
    c.compare = ml_collections.ConfigDict(dict(
        steps=900,                    # training steps of each model at budget 1
        num_checkpoints=4,            # checkpoints evaluated per model, evenly spaced
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
