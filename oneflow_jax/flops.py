"""Parameters and training FLOPs of a config (training/flops.py; reference §8):

    python -m oneflow_jax.flops --config configs/oneflow_1b.py [--config.key=value ...] [--doc_text_tokens N
        --doc_images M --packing_fill F] [--measure_batches N] [--json]

--measure_batches N reads the run's first N training batches (the dataset is prepared if needed) and adds the useful
count of the documents really packed (flops.measured_useful_flops) as `measured_*`.
"""
from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from oneflow_jax import cli, config_lib
from oneflow_jax.training import flops

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/*.py[:variant]", lock_config=True)
flags.DEFINE_bool("json", False, "Print one JSON object.")
flags.DEFINE_float("doc_text_tokens", None, "Average text tokens per clean document (default: fill a row).")
flags.DEFINE_float("doc_images", None, "Average images per clean document (default: 1 if one fits).")
flags.DEFINE_float("packing_fill", 1.0, "Fraction of row positions holding documents (useful count).")
flags.DEFINE_integer("measure_batches", 0, "Also measure the useful FLOPs on this many real training batches.")


def main(argv):
    cli.no_extra_args(argv)
    if FLAGS.config is None:
        raise cli.UserError("--config is required")
    cfg = config_lib.validate(FLAGS.config)
    doc = None
    if FLAGS.doc_text_tokens is not None or FLAGS.doc_images is not None:
        doc = flops.DocStats(FLAGS.doc_text_tokens or 0, FLAGS.doc_images or 0)
    try:
        out = flops.report(cfg, doc, FLAGS.packing_fill)
    except ValueError as e:
        raise cli.UserError(str(e)) from None
    if FLAGS.measure_batches > 0:
        from oneflow_jax.data import input_pipeline
        from oneflow_jax.training.train_state import build_model
        tok = input_pipeline.get_tokenizer(cfg.data)
        model, codec = build_model(cfg, tok.vocab_size)
        measured = flops.measured_useful_flops(cfg, model.cfg, tok, codec, FLAGS.measure_batches)
        out.update({f"measured_{k}": v for k, v in measured.items()})
        out["measured_useful_flops_fraction"] = measured["useful_train_flops_per_step"] / out["train_flops_per_step"]
    if FLAGS.json:
        print(json.dumps(out, sort_keys=True))
        return
    for key in ("params", "params_non_embedding", "train_flops_per_example", "train_flops_per_step",
                "train_flops_per_step_useful", "useful_flops_fraction", "attention_flops_fraction",
                "expected_sequence_length", "tokens_per_step", *sorted(k for k in out if k.startswith("measured_"))):
        print(f"{key:>36}: {out[key]:.6g}")


if __name__ == "__main__":
    app.run(cli.run_cli(main), flags_parser=cli.parse_flags)
