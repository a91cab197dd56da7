"""Prepare a dataset (ArrayRecord shards through its tfds builder, data/datasets.py) and its tokenizer once, e.g.
before a multi-host run:

    python -m oneflow_jax.datasets --name shapes_world [--config '{"num_train": 2000}'] [--data_dir DIR]
    python -m oneflow_jax.datasets --name interleaved_jsonl \
        --config '{"name": "mine", "train_files": ["docs.jsonl"], "image_size": 256}'
"""
from __future__ import annotations

import json

from absl import app, flags

from oneflow_jax import cli
from oneflow_jax.data import datasets

FLAGS = flags.FLAGS
flags.DEFINE_enum("name", "shapes_world", sorted(datasets.BUILDERS), "The dataset's builder.")
flags.DEFINE_string("config", None, "Builder config fields as a JSON object.")
flags.DEFINE_string("data_dir", None, "Where the shards go (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_bool("no_tokenizer", False, "Skip training / caching the dataset's tokenizer.")


def main(argv):
    cli.no_extra_args(argv)
    try:
        fields = json.loads(FLAGS.config) if FLAGS.config else None
    except json.JSONDecodeError as e:
        raise cli.UserError(f"--config is not JSON: {e}") from None
    config = datasets.make_builder_config(FLAGS.name, fields) if fields else None
    builder = datasets.ensure_prepared(FLAGS.name, FLAGS.data_dir, config)
    print(f"{builder.name}/{builder.builder_config.name if builder.builder_config else ''} prepared at "
          f"{builder.data_dir}: " + ", ".join(f"{k}={v.num_examples}" for k, v in builder.info.splits.items()))
    if not FLAGS.no_tokenizer:
        print(f"tokenizer: {datasets.dataset_tokenizer(FLAGS.name, FLAGS.data_dir, config)}")


if __name__ == "__main__":
    app.run(cli.run_cli(main), flags_parser=cli.parse_flags)
