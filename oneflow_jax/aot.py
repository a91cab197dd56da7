"""Fit before you pay: compile a config's train step for its mesh without running it, and print per-device memory
(training/aot.py). Reads no data, tokenizer or VAE weights when config.model.vocab_size is set.

    python -m oneflow_jax.aot --config configs/oneflow_1b.py:cpu [--config.mesh.compile_topology=v5p-256]
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from oneflow_jax import cli
from oneflow_jax.training import aot

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:variant]).", lock_config=True)


def main(argv):
    cli.no_extra_args(argv)
    if FLAGS.config is None:
        raise cli.UserError("--config is required")
    result = aot.compile_train_step(FLAGS.config)
    for line in aot.memory_lines(result):
        cli.say(line)


if __name__ == "__main__":
    app.run(cli.run_cli(main), flags_parser=cli.parse_flags)
