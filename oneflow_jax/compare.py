"""OneFlow vs its baselines (AR+FM, NextFlow-style) at matched training FLOPs, tuned alike, over model sizes and
seeds (evals/compare.py, evals/compare_report.py):

    python -m oneflow_jax.compare --config configs/compare_shapes.py --workdir W [--config.budget=0.5 ...]
        [--sampler '{"temperature": 0.3}'] [--reuse OLD/compare.jsonl]

Trains the VQ tokenizer NextFlow needs (W/vq), tunes lr and image-loss weight for each model, trains the sweep
(resumable), evaluates every checkpoint and writes
W/compare.json, W/compare.md, W/compare.jsonl, W/compare_curves.png and W/compare_parity.png (rewritten after every
run). --report_only trains nothing and reports the finished runs.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from oneflow_jax import cli
from oneflow_jax.evals import compare

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A comparison config (configs/compare_shapes.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory of the comparison: W/runs/..., W/compare.*")
flags.DEFINE_bool("report_only", False, "Train nothing: report the finished runs (e.g. while a sweep still trains).")
flags.DEFINE_string("reuse", None, "An earlier sweep's compare.jsonl (same config and budget): its runs count as "
                    "finished (evaluations and FLOPs imported), e.g. to add a baseline without retraining the others.")
cli.define_sampler_flags()


def main(argv):
    cli.no_extra_args(argv)
    if FLAGS.config is None or FLAGS.workdir is None:
        raise cli.UserError("--config and --workdir are required")
    compare.compare(FLAGS.config, FLAGS.workdir, cli.sampler_overrides(), FLAGS.report_only, FLAGS.reuse)


if __name__ == "__main__":
    app.run(cli.run_cli(main), flags_parser=cli.parse_flags)
