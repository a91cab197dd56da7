"""Trains the multi-scale residual VQ tokenizer (models/vq.py, VAR's scheme) of the NextFlow-style baseline:

    python -m oneflow_jax.train_vq --config configs/vq_shapes_tiny.py --workdir W [--config.key=value ...]

Rerunning the command resumes from W's latest checkpoint exactly. Writes W/config.json, W/checkpoints/ (Orbax),
W/metrics.jsonl and W/tb, then evaluates on config.eval.split: W/eval.json and W/reconstructions.png
(training/vq_trainer.py says what each holds). `vq.load_tokenizer(W)` loads the result.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from oneflow_jax import cli
from oneflow_jax.training import vq_trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/vq_*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tb/, eval.json, reconstructions.png.")


def main(argv):
    cli.no_extra_args(argv)
    if FLAGS.config is None or FLAGS.workdir is None:
        raise cli.UserError("--config and --workdir are required")
    vq_trainer.train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(cli.run_cli(main), flags_parser=cli.parse_flags)
