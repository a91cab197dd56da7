"""Precompute the latents of users' image-text files on every device of every process, resumably (data/precompute.py):

    python -m oneflow_jax.precompute --name image_caption_pairs --data_dir D --config '{"name": "cc12m_256",
        "train_files": ["/data/cc12m/00000.tar", ...], "image_size": 256, "image_field": "jpg", "caption_field": "txt",
        "codec": {"name": "vae", "path": "/ckpt/sd3-vae", "patch_size": 2}}'
    MODULE=precompute launch/local_multiprocess.sh 2 --name ... --config ...      (2 processes on this machine)

Process 0 writes the dataset info once every process is done. The same --config goes into `--config.data.builder_config` of `train` (with `data.latents=True`), which then reads
the shards with no other step. Rerun the same command after a crash: finished input files are skipped. The dataset's
tokenizer is a separate step: `python -m oneflow_jax.datasets` with the same flags trains one from the prepared texts
(or bring one: `data.tokenizer_path`).
"""
from __future__ import annotations

import json
import time

import jax
from absl import app, flags

from oneflow_jax import cli
from etils import epath

from oneflow_jax.data import datasets, precompute, sources

FLAGS = flags.FLAGS
flags.DEFINE_enum("name", "image_caption_pairs", ["image_caption_pairs", "interleaved_jsonl"], "The dataset's builder.")
flags.DEFINE_string("config", None, "Builder config fields as a JSON object (name, train_files, image_size, codec...).")
flags.DEFINE_string("data_dir", None, "Where the shards go (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_integer("per_device_batch", 8, "Images per device per encoder call.")
flags.DEFINE_integer("decode_threads", 8, "Host threads decoding and resizing images.")
flags.DEFINE_float("log_every_s", 30.0, "Seconds between progress lines.")
cli.define_distributed_flags()


def _builder_config():
    if not FLAGS.config:
        raise cli.UserError("--config is required (a JSON object: name, train_files, image_size, codec)")
    try:
        fields = json.loads(FLAGS.config)
    except json.JSONDecodeError as e:
        raise cli.UserError(f"--config is not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise cli.UserError("--config must be a JSON object")
    if not fields.get("codec") or not fields.get("image_size"):
        raise cli.UserError("--config needs a codec (e.g. {\"name\": \"vae\", \"path\": DIR}) and an image_size")
    try:
        config = datasets.make_builder_config(FLAGS.name, fields)
    except (TypeError, ValueError) as e:
        raise cli.UserError(f"--config: {e}") from None
    if not config.train_files:
        raise cli.UserError("--config: train_files is empty")
    return config


def main(argv):
    cli.no_extra_args(argv)
    if FLAGS.per_device_batch < 1 or FLAGS.decode_threads < 1:
        raise cli.UserError("--per_device_batch and --decode_threads must be >= 1")
    config = _builder_config()
    cli.init_distributed()
    try:
        for path in (*config.train_files, *config.eval_files):
            sources.format_of(path)
            if not epath.Path(path).exists():
                raise FileNotFoundError(f"input file {path} does not exist")
        builder = datasets.get_builder(FLAGS.name, FLAGS.data_dir, config)
        codec = datasets.make_codec(config.codec, config.image_size)
        _ = builder.info.features        # builds the record features: a bad codec or image_size fails here
    except (FileNotFoundError, ValueError) as e:
        raise cli.UserError(str(e).splitlines()[0]) from None
    if builder.is_prepared():
        cli.say(f"{builder.data_dir} is already prepared: nothing to do")
        return
    units = precompute.units_of(config)
    markers = precompute.read_markers(epath.Path(builder.data_dir), units)
    mine = [u for i, u in enumerate(units) if i % jax.process_count() == jax.process_index() and u not in markers]
    encoder = precompute.DeviceEncoder(codec, FLAGS.per_device_batch, datasets.LATENT_DTYPES[
        datasets.latent_dtype(config.codec)])
    cli.say(f"precompute: {len(units)} input files, {len(markers)} already done; this process "
            f"({jax.process_index()} of {jax.process_count()}) encodes {len(mine)} on {encoder.num_devices} "
            f"device(s), {encoder.batch_size} images per batch -> {builder.data_dir}")
    run = precompute.Precompute(builder, encoder, FLAGS.decode_threads, FLAGS.log_every_s)
    run.run(mine)
    cli.say(f"precompute [process {jax.process_index()}]: {run.encoded} images in {run.batches} batches, "
            f"{100 * run.useful_fraction:.1f}% of encoder FLOPs on real images", every_process=True)
    if jax.process_index() != 0:
        return                                  # process 0 writes the dataset info once every file is done
    directory, waited = epath.Path(builder.data_dir), 0.0
    while len(markers := precompute.read_markers(directory, units)) < len(units):
        if waited % 60 == 0:
            cli.say(f"precompute: waiting for the other processes ({len(markers)} of {len(units)} input files done)")
        time.sleep(1.0)
        waited += 1.0
    totals = precompute.write_metadata(builder, units, {
        "latent_dtype": datasets.latent_dtype(config.codec), **precompute.latent_normalisation(codec)})
    cli.say(f"{builder.data_dir} prepared: " + ", ".join(f"{k}={v.num_examples}" for k, v in
                                                         builder.info.splits.items())
            + f"; {totals['images']} images, skipped {totals['skipped']}")


if __name__ == "__main__":
    app.run(cli.run_cli(main), flags_parser=cli.parse_flags)
