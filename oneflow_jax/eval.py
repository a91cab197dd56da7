"""shapes-world scores of a run (evals/shapes_eval.py): caption and generation accuracy on seen and held-out
combinations, and interleaved consistency.

    python -m oneflow_jax.eval --workdir W [--step K] [--num_examples N] [--sampler '{"key": value}'] [--steps S]

Prints a table and writes W/eval/step_{K}.json (the scores, a few sampled documents and up to
shapes_eval.MAX_FAILURES wrong captions with their truth).
"""
from __future__ import annotations

import json
import os

from absl import app, flags

from oneflow_jax import cli, config_lib
from oneflow_jax.evals import shapes_eval
from oneflow_jax.sampling import generate

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run directory.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_integer("num_examples", None, "Eval documents (default: config.eval.num_examples).")
flags.DEFINE_integer("num_free", None, "Documents generated from an empty prompt (default: num_examples // 4).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("ema", True, "Use the run's EMA weights when it keeps them (optimizer.ema_decay > 0); "
                  "--noema: the raw trained weights.")
cli.define_sampler_flags()


def main(argv):
    cli.no_extra_args(argv)
    if not FLAGS.workdir:
        raise cli.UserError("--workdir is required")
    for name in ("num_examples", "num_free"):
        if FLAGS[name].value is not None and FLAGS[name].value < (1 if name == "num_examples" else 0):
            raise cli.UserError(f"--{name} must be {'> 0' if name == 'num_examples' else '>= 0'}, got "
                                f"{FLAGS[name].value}")
    overrides = cli.sampler_overrides()
    run = generate.load_run(FLAGS.workdir, FLAGS.step, FLAGS.ema)
    if run.config.data.name != "shapes_world":
        raise cli.UserError(f"eval scores shapes-world runs; this run trained on {run.config.data.name!r}")
    n = FLAGS.num_examples or run.config.eval.num_examples
    scfg = config_lib.sampler_config(run.config, **overrides)
    scores = shapes_eval.evaluate(run, n, n // 4 if FLAGS.num_free is None else FLAGS.num_free, scfg,
                                  run.config.eval.batch_size, FLAGS.seed)
    out = os.path.join(FLAGS.workdir, "eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"step_{run.step}.json"), "w") as f:
        json.dump(scores, f, indent=2)
    print(shapes_eval.format_table(scores))
    print(json.dumps({k: scores[k] for k in ("step", "caption", "generation", "interleaved_consistency")}))


if __name__ == "__main__":
    app.run(cli.run_cli(main), flags_parser=cli.parse_flags)
