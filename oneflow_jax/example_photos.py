"""The real-data walk-through at CPU size (docs/real_data.md): real photographs in the formats the field uses.

    python -m oneflow_jax.example_photos --out DIR

writes, from the photographs scikit-image ships (`skimage.data`, on disk with the package) and captions written
here:
  DIR/shards/00000.tar, 00001.tar   webdataset shards as img2dataset writes them (NNNN.jpg + .txt + .json)
  DIR/shards/photos.parquet         image bytes + caption columns
  DIR/shards/eval.tar               held-out crops
  DIR/vae/                          a tiny VAE of the SD3 architecture (16 latent channels, no quant convs, SD3's
                                    scale and shift; random weights) in diffusers layout
  DIR/tokenizer.json                a byte-level BPE with Llama 3's special-token names, trained on the captions
  DIR/builder_config.json           the --config of `python -m oneflow_jax.precompute` (and `data.builder_config`)
Then `launch/real_data_example.sh DIR` precomputes, trains (`configs/photos_tiny.py:DIR`), samples and exports.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from absl import app, flags

from oneflow_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Directory to write the example into.")
flags.DEFINE_integer("crops", 6, "Random crops (and flips) per photograph.")

IMAGE_SIZE, IMAGE_TOKEN = 32, "<|reserved_special_token_0|>"
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
# skimage.data name -> captions (one per crop, cycling)
PHOTOS = {
    "astronaut": ["an astronaut in a white space suit", "a smiling astronaut in front of a flag"],
    "coffee": ["a cup of coffee on a saucer", "a white coffee cup with a spoon"],
    "chelsea": ["a tabby cat looking to the side", "a ginger cat with green eyes"],
    "rocket": ["a rocket on the launch pad", "a space rocket under a blue sky"],
    "hubble_deep_field": ["galaxies in the deep field of space", "distant galaxies on a black sky"],
    "immunohistochemistry": ["stained tissue under a microscope", "cells stained brown and blue"],
    "camera": ["a black and white photo of a cameraman", "a man behind a camera on a tripod"],
    "coins": ["old coins on a dark background", "rows of old coins"],
}


def builder_config(directory: str) -> dict:
    """The dataset of the example: pairs from the two tars and the parquet, eval from eval.tar, SD3-style latents."""
    shards = os.path.join(os.path.abspath(directory), "shards")
    return {"name": "photos_example", "image_size": IMAGE_SIZE, "image_field": "jpg", "caption_field": "txt",
            "train_files": [os.path.join(shards, f) for f in ("00000.tar", "00001.tar", "photos.parquet")],
            "eval_files": [os.path.join(shards, "eval.tar")],
            "codec": {"name": "vae", "path": os.path.join(os.path.abspath(directory), "vae"), "patch_size": 2,
                      "dtype": "bfloat16"}}


def _photos() -> dict[str, np.ndarray]:
    try:
        import skimage.data  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise cli.UserError("the example reads scikit-image's bundled photographs: pip install scikit-image") from None
    out = {}
    for name in PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        out[name] = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
    return out


def _crops(image: np.ndarray, n: int, rng) -> list[bytes]:
    """`n` JPEGs: random square crops of 60-100% of the short side, half of them mirrored."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    h, w, _ = image.shape
    out = []
    for _ in range(n):
        s = int(min(h, w) * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crop = image[y:y + s, x:x + s]
        crop = crop[:, ::-1] if rng.random() < 0.5 else crop
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop)).resize((96, 96), Image.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _write_tar(path: str, samples: list[tuple[bytes, str]], start: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i, (jpeg, caption) in enumerate(samples, start):
            for ext, data in (("jpg", jpeg), ("txt", caption.encode()),
                              ("json", json.dumps({"key": f"{i:06d}", "caption": caption}).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _write_tokenizer(path: str, texts: list[str]) -> None:
    """A byte-level BPE (Llama 3's scheme) with its special-token names; <image> is reserved token 0."""
    import tokenizers  # pylint: disable=g-import-not-at-top
    from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(path)


def _write_vae(directory: str) -> None:
    from oneflow_jax.models import vae  # pylint: disable=g-import-not-at-top
    cfg = vae.VAEConfig(block_out_channels=(16, 32, 32), latent_channels=16, norm_num_groups=8, layers_per_block=1,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    vae.save_diffusers_vae(directory, cfg, vae.init_params(cfg, seed=0))


def write_example(directory: str, crops: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    shards = os.path.join(directory, "shards")
    os.makedirs(shards, exist_ok=True)
    train, held_out = [], []
    for name, image in _photos().items():
        jpegs = _crops(image, crops + 1, rng)
        captions = PHOTOS[name]
        train += [(j, captions[i % len(captions)]) for i, j in enumerate(jpegs[:-1])]
        held_out.append((jpegs[-1], captions[0]))
    order = rng.permutation(len(train))
    train = [train[i] for i in order]
    third = len(train) // 3
    _write_tar(os.path.join(shards, "00000.tar"), train[:third], 0)
    _write_tar(os.path.join(shards, "00001.tar"), train[third:2 * third], third)
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    rest = train[2 * third:]
    pq.write_table(pa.table({"jpg": [j for j, _ in rest], "txt": [c for _, c in rest]}),
                   os.path.join(shards, "photos.parquet"))
    _write_tar(os.path.join(shards, "eval.tar"), held_out, 10_000)
    _write_tokenizer(os.path.join(directory, "tokenizer.json"), [c for _, c in train] * 4)
    _write_vae(os.path.join(directory, "vae"))
    config = builder_config(directory)
    with open(os.path.join(directory, "builder_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return {"train": len(train), "eval": len(held_out)}


def main(argv):
    cli.no_extra_args(argv)
    if not FLAGS.out:
        raise cli.UserError("--out is required")
    counts = write_example(FLAGS.out, FLAGS.crops)
    print(f"wrote {counts['train']} training and {counts['eval']} held-out photo-caption pairs, a tiny SD3-architecture "
          f"VAE and a byte-level BPE tokenizer to {FLAGS.out}; next: launch/real_data_example.sh {FLAGS.out}")


if __name__ == "__main__":
    app.run(cli.run_cli(main), flags_parser=cli.parse_flags)
