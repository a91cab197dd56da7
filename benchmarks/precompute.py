"""Latent precompute throughput (data/precompute.py): encoded images/s per device for a VAE of the SD3 architecture
(random weights; the FLOPs do not depend on them) and the fraction of encoder FLOPs spent on real images.

python benchmarks/precompute.py [--image_size 256] [--files 3] [--images_per_file 9] [--per_device_batch 4]
    [--vae sd3|tiny] [--out benchmarks/results/precompute_<date>.jsonl]

It writes `--files` webdataset shards of random-crop JPEGs (scikit-image's photographs when installed, else noise),
runs the precompute loop of one process over them on every local device, and prints one JSON line: images/s per
device in steady state (after the first, compiling batch) and end to end, the encoder's FLOPs per image (XLA's cost
analysis of the compiled batch), the achieved TFLOP/s per device, and useful_fraction = images / (batches x batch).
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import tarfile
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from oneflow_jax.data import datasets, precompute
from oneflow_jax.models import vae

SD3 = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
           scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
TINY = dict(SD3, block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8)


def _photos(n: int, size: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    try:
        import skimage.data
        sources = [np.asarray(getattr(skimage.data, k)()) for k in ("astronaut", "coffee", "chelsea", "rocket")]
    except ImportError:
        sources = [rng.integers(0, 256, (size * 2, size * 2, 3), dtype=np.uint8)]
    out = []
    for i in range(n):
        im = sources[i % len(sources)]
        s = int(min(im.shape[:2]) * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, im.shape[0] - s + 1), rng.integers(0, im.shape[1] - s + 1)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(im[y:y + s, x:x + s])).resize((size + 16, size + 16)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def _write_tars(directory: str, files: int, per_file: int, size: int) -> list[str]:
    photos, paths = _photos(files * per_file, size), []
    for f in range(files):
        paths.append(os.path.join(directory, f"{f:05d}.tar"))
        with tarfile.open(paths[-1], "w") as tar:
            for i in range(per_file):
                for ext, data in (("jpg", photos[f * per_file + i]), ("txt", f"photo {i}".encode())):
                    info = tarfile.TarInfo(f"{f:03d}{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return paths


class _TimedEncoder(precompute.DeviceEncoder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.times = []

    def __call__(self, images):
        t0 = time.perf_counter()
        out = super().__call__(images)
        self.times.append(time.perf_counter() - t0)
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--files", type=int, default=3)
    p.add_argument("--images_per_file", type=int, default=9)
    p.add_argument("--per_device_batch", type=int, default=4)
    p.add_argument("--vae", choices=("sd3", "tiny"), default="sd3")
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = vae.VAEConfig(**(SD3 if args.vae == "sd3" else TINY))
        vae.save_diffusers_vae(os.path.join(tmp, "vae"), cfg, vae.init_params(cfg))
        files = _write_tars(tmp, args.files, args.images_per_file, args.image_size)
        config = datasets.make_builder_config("image_caption_pairs", {
            "name": "bench", "train_files": files, "image_size": args.image_size, "image_field": "jpg",
            "caption_field": "txt", "codec": {"name": "vae", "path": os.path.join(tmp, "vae"), "patch_size": 2}})
        builder = datasets.get_builder("image_caption_pairs", os.path.join(tmp, "data"), config)
        codec = datasets.make_codec(config.codec, config.image_size)
        encoder = _TimedEncoder(codec, args.per_device_batch, datasets.LATENT_DTYPES["bfloat16"])
        x = jax.ShapeDtypeStruct((encoder.batch_size, args.image_size, args.image_size, 3), np.uint8)
        cost = encoder._fn.lower(encoder._params, x).compile().cost_analysis()   # pylint: disable=protected-access
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops_per_image = float(cost.get("flops", 0.0)) / encoder.batch_size
        run = precompute.Precompute(builder, encoder, decode_threads=4, log_every_s=1e9)
        t0 = time.perf_counter()
        run.run(precompute.units_of(config))
        wall = time.perf_counter() - t0

    steady = encoder.times[1:] or encoder.times
    steady_rate = len(steady) * encoder.batch_size / sum(steady) / encoder.num_devices
    row = {
        "benchmark": "precompute", "date": datetime.date.today().isoformat(), "vae": args.vae,
        "image_size": args.image_size, "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
        "host": platform.node(), "cpus": os.cpu_count(), "devices": encoder.num_devices,
        "batch": encoder.batch_size, "images": run.encoded, "batches": run.batches,
        "images_per_s_per_device_steady": round(steady_rate, 4),
        "images_per_s_per_device_end_to_end": round(run.encoded / wall / encoder.num_devices, 4),
        "first_batch_s": round(encoder.times[0], 2), "wall_s": round(wall, 2),
        "encoder_gflop_per_image": round(flops_per_image / 1e9, 2),
        "achieved_tflops_per_device": round(steady_rate * flops_per_image / 1e12, 4),
        "useful_fraction": round(run.useful_fraction, 4),
    }
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
