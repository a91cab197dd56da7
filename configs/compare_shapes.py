"""OneFlow vs AR+FM and the NextFlow-style baseline on shapes-world at matched training FLOPs, each model tuned alike,
three widths, two seeds (oneflow_jax/evals/compare.py; reference §7-8; the issue's harness).

Command: python -m oneflow_jax.compare --config configs/compare_shapes.py --workdir W [--config.budget=0.5 ...]
    (writes W/compare.json, compare.md, compare_curves.png, compare_parity.png; resumable: rerun to continue)
Wall clock (2-core CPU, 2026-12-03, beside other work): a training takes ~3 min at d64 (16-19 steps/s), ~5 min at
d128, ~12 min at d256; an evaluation of 100 documents 35-120 s (OneFlow) or 8-20 s (AR+FM). The tuning (11 d64 runs
with the edge extensions) took ~55 min, a d64 pair of the sweep ~10 min, a d256 pair ~30 min; the whole sweep (two
seeds) is a few hours in the background, resumable.
Scores: docs/results.md, "FLOP comparison".
Every run is shapes_tiny's recipe (configs/shapes_tiny.py; AR's extras from configs/ar_shapes_tiny.py) at
d_model = width, d_ff = patch head hidden = ff_mult x width; model_type, lr, image-loss weight and seed set per run.
NextFlow's runs take configs/nextflow_shapes_tiny.py's codec, rows, sampler and loss weight on top (compare.overrides)
and one VQ tokenizer, configs/vq_shapes_tiny.py, trained into W/vq (its FLOPs are reported apart).
Variant :tiny is for tests (a few steps of a tiny model, one width, one tuning value).
"""
import ml_collections

from oneflow_jax.config_lib import sibling_config


def get_config(arg: str | None = None):
    c = sibling_config(__file__, "ar_shapes_tiny.py").get_config("smoke" if arg == "tiny" else None)  # + config.ar
    c.model_type = "oneflow"          # set per run by compare.py
    c.budget = 1.0                    # scales compare.steps
    c.log_every = 100
    nf = sibling_config(__file__, "nextflow_shapes_tiny.py").get_config("smoke" if arg == "tiny" else None)
    vq_config = sibling_config(__file__, "vq_shapes_tiny.py").get_config("smoke" if arg == "tiny" else None)
    c.compare = ml_collections.ConfigDict(dict(
        models=("oneflow", "ar", "nextflow"),   # OneFlow, then the baselines it is measured against
        overrides=dict(nextflow=dict(   # per model: config sections on top of the shared one (width, lr... still apply)
            codec=nf.codec.to_dict(), nextflow=nf.nextflow.to_dict(), sampler=nf.sampler.to_dict(),
            data=dict(seq_len=nf.data.seq_len, max_patches_per_row=nf.data.max_patches_per_row),
            objective=dict(image_loss_weight=nf.objective.image_loss_weight), model=dict(patch_head_hidden=0))),
        tokenizer=vq_config,          # the train_vq config of the models with codec 'vq', trained once into W/vq
        steps=3000,                   # training steps of every run at budget 1 (batch 8 x 128 positions)
        widths=(64, 128, 256),        # d_model of each size (n_layers, n_heads as the shared config)
        ff_mult=3,                    # d_ff and patch_head_hidden = ff_mult x width
        seeds=(0, 1),                 # training seeds of the sweep (the first one also tunes)
        tune=ml_collections.ConfigDict(dict(
            lr=(1e-3, 2e-3, 4e-3),    # tried at the smallest width, image-loss weight = objective.image_loss_weight
            extend=2,                 # times an lr past the grid's edge (x2 or /2) is tried when the best is on it
            image_loss_weight=(1.0, 4.0))),   # then tried at each model's best lr
        lr_scaling="inverse_width",   # lr x smallest / width ('inverse_width') or the tuned lr at every width ('constant')
        eval_fractions=(0.125, 0.25, 0.5, 0.75, 1.0),   # checkpoints evaluated, as fractions of the steps
        parity_levels=(0.5, 0.75, 0.9, 1.0),           # parity targets, as fractions of the other model's final score
        metric_set="auto",            # compare.METRIC_SETS: how a checkpoint is scored ('auto': the dataset's own)
        eval_examples=100, eval_batch_size=50,   # eval documents per checkpoint, sampled this many at a time
        latency_prompts=4,            # prompts timed one at a time (batch 1) per task and checkpoint
        useful_flops_batches=50))     # training batches read to measure the useful FLOPs of packed documents
    if arg == "tiny":
        c.compare.update(steps=4, widths=(32,), seeds=(0,), eval_fractions=(1.0,), eval_examples=4,
                         eval_batch_size=4, latency_prompts=1, useful_flops_batches=2)
        c.compare.tune.update(lr=(2e-3,), image_loss_weight=(4.0,), extend=0)
        c.compare.overrides.nextflow.objective.image_loss_weight = 4.0    # the tuned weight: no second tuning run
        c.model.n_layers = 1
        c.data.update(seq_len=64, global_batch_size=4)
        c.sampler.update(max_len=64, steps=4)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of compare_shapes (known: tiny)")
    return c
