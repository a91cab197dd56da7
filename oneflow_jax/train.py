"""Training: `python -m oneflow_jax.train --config configs/shapes_tiny.py --workdir W [--config.key=value ...]`.

Resumes from W's latest checkpoint when there is one; SIGTERM saves and exits 0 (training/loop.py has the loop).
Multi-process: --coordinator_address/--num_processes/--process_id (CPU processes talk over gloo), or --distributed
to auto-detect (TPU pods, SLURM).
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from oneflow_jax import cli
from oneflow_jax.training import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tb/, samples/.")
cli.define_distributed_flags()


def main(argv):
    cli.no_extra_args(argv)
    if FLAGS.config is None or FLAGS.workdir is None:
        raise cli.UserError("--config and --workdir are required")
    cli.init_distributed()
    loop.train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(cli.run_cli(main), flags_parser=cli.parse_flags)
