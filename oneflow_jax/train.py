"""Training: `python -m oneflow_jax.train --config configs/shapes_tiny.py --workdir W [--config.key=value ...]`.

Resumes from W's latest checkpoint when there is one; SIGTERM saves and exits 0 (training/loop.py has the loop).
Multi-process: --coordinator_address/--num_processes/--process_id (CPU processes talk over gloo), or --distributed
to auto-detect (TPU pods, SLURM).
"""
from __future__ import annotations

import os

import jax
from absl import app, flags
from ml_collections import config_flags

from oneflow_jax import cli
from oneflow_jax.training import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tb/, samples/.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs (jax.distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM).")


def init_distributed() -> None:
    """jax.distributed for multi-process runs; CPU processes talk over gloo."""
    if FLAGS.coordinator_address or FLAGS.num_processes:
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()


def main(argv):
    cli.no_extra_args(argv)
    if FLAGS.config is None or FLAGS.workdir is None:
        raise cli.UserError("--config and --workdir are required")
    init_distributed()
    loop.train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(cli.run_cli(main), flags_parser=cli.parse_flags)
