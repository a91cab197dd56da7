"""The real-data walk-through at CPU size (docs/real_data.md): real photographs from webdataset and parquet shards,
SD3-style VAE latents precomputed in bfloat16, a byte-level BPE tokenizer.json with Llama 3's special tokens.

Command: launch/real_data_example.sh DIR (writes DIR with `python -m oneflow_jax.example_photos`, precomputes,
trains with `--config configs/photos_tiny.py:DIR`, samples and exports). `arg` is that directory.
Everything else is shapes_tiny's smoke model: the point is the data path, not the samples. The VAE has the SD3
architecture (16 latent channels) with downsampling 4: 32 px -> 8x8x16 latents -> 16 patches of 64 values.
"""
import os

from oneflow_jax import example_photos
from oneflow_jax.config_lib import sibling_config


def get_config(arg: str | None = None):
    directory = os.path.abspath(arg or "workdir/photos_example")
    c = sibling_config(__file__, "shapes_tiny.py").get_config("smoke")
    c.total_steps, c.log_every, c.ckpt_every, c.sample_every = 20, 5, 10, 0
    c.eval_every, c.eval.val_batches = 10, 1      # the held-out photos (eval.tar) as the validation set
    builder = example_photos.builder_config(directory)
    builder.update(train_files=tuple(builder["train_files"]), eval_files=tuple(builder["eval_files"]))  # overridable
    c.codec = dict({k: v for k, v in builder["codec"].items() if k != "dtype"}, image_size=example_photos.IMAGE_SIZE)
    c.data.update(
        name="image_caption_pairs", builder_config=builder,   # the --config of `python -m oneflow_jax.precompute`
        latents=True,                                         # records hold the precomputed latents
        tokenizer_path=os.path.join(directory, "tokenizer.json"),
        image_token=example_photos.IMAGE_TOKEN,               # tokenizer.json's token that <image> maps to
        max_patches_per_row=64, seq_len=128, global_batch_size=8)
    c.eval.update(num_examples=8, batch_size=8)
    return c
