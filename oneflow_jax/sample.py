"""Sampling: `python -m oneflow_jax.sample --workdir W (--prompt TEXT [--image PNG ...] | --prompts_file F.jsonl)
[--num_samples N --seed S --out DIR --step K --sampler_preset alg1 --sampler '{"steps": 16}' --steps 16]`.

Every `<image>` marker of a prompt is either given (a PNG: conditioning) or generated in place from noise:
  --prompt "a red circle on the left and a blue square on the right <image>"     -> text-to-image
  --prompt "<image>" --image photo.png                                             -> captioning
  --prompt ""                                                                      -> a whole interleaved document
--image files fill the markers in order; a marker left without one, or given `--image -`, is generated. In a
prompts file, `"images": ["a.png", null]` gives the first and generates the second. (The AR+FM baseline can only
generate an image that ends its prompt.)

Writes DIR/{line:04d}_{sample:02d}.txt (the whole document with `<image>` markers; --prompt is line 0) and
DIR/{line:04d}_{sample:02d}_img{j}.png for every image of that document in order (given images included).
"""
from __future__ import annotations

import json
import os

from absl import app, flags
from PIL import Image

from oneflow_jax import cli, config_lib
from oneflow_jax.cli import UserError
from oneflow_jax.sampling import generate

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run directory (latest checkpoint unless --step).")
flags.DEFINE_integer("step", None, "Checkpoint step to sample from (default: latest).")
flags.DEFINE_string("prompt", None, "Prompt text; `<image>` markers take the --image files in order, and are "
                    "generated where none is left (or the file is '-').")
flags.DEFINE_multi_string("image", [], "PNG for the next `<image>` marker of --prompt, or '-' to generate that "
                          "image (repeatable).")
flags.DEFINE_string("prompts_file", None, 'JSONL lines {"prompt": "...", "images": ["a.png", null, ...]} '
                    "(null: generate that image).")
flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("ema", True, "Use the run's EMA weights when it keeps them (optimizer.ema_decay > 0); "
                  "--noema: the raw trained weights.")
flags.DEFINE_string("out", None, "Output directory (default: W/samples/cli).")
flags.DEFINE_integer("batch_size", 8, "Prompts sampled at once (one compile per batch size).")
cli.define_sampler_flags()


def read_prompts() -> list[tuple[str, list[str | None]]]:
    """[(text, [PNG path, or None for an image to generate, per marker])]."""
    if bool(FLAGS.prompt is not None) == bool(FLAGS.prompts_file):
        raise UserError("give exactly one of --prompt or --prompts_file")
    if FLAGS.prompt is not None:
        markers = FLAGS.prompt.count("<image>")
        if len(FLAGS.image) > markers:
            raise UserError(f"--prompt has {markers} <image> marker(s) but {len(FLAGS.image)} --image were given")
        images = [None if p == "-" else p for p in FLAGS.image]
        return [(FLAGS.prompt, images + [None] * (markers - len(images)))]
    if FLAGS.image:
        raise UserError("--image goes with --prompt; put images of --prompts_file lines in their 'images' list")
    if not os.path.exists(FLAGS.prompts_file):
        raise UserError(f"prompts file not found: {FLAGS.prompts_file}")
    base = os.path.dirname(os.path.abspath(FLAGS.prompts_file))
    prompts = []
    with open(FLAGS.prompts_file) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or "prompt" not in obj:
                    raise TypeError('each line is an object {"prompt": "...", "images": [...]}; "prompt" is missing')
                text, images = obj["prompt"], obj.get("images", [])
                if not isinstance(text, str) or not isinstance(images, list):
                    raise TypeError("'prompt' must be a string and 'images' a list")
                if not all(p is None or isinstance(p, str) for p in images):
                    raise TypeError("each entry of 'images' must be a path or null")
            except (json.JSONDecodeError, TypeError) as e:
                raise UserError(f"{FLAGS.prompts_file}:{n}: bad line ({e})") from None
            prompts.append((text, [p if p is None or os.path.isabs(p) else os.path.join(base, p) for p in images]))
    if not prompts:
        raise UserError(f"{FLAGS.prompts_file} has no prompts")
    return prompts


def main(argv):
    cli.no_extra_args(argv)
    if not FLAGS.workdir:
        raise UserError("--workdir is required")
    if FLAGS.num_samples < 1:
        raise UserError("--num_samples must be >= 1")
    prompts = read_prompts()
    overrides = cli.sampler_overrides()
    run = generate.load_run(FLAGS.workdir, FLAGS.step, FLAGS.ema)
    # Validate every prompt (images exist and decode, markers match) before compiling anything.
    encoded, given_images = [], []
    for text, paths in prompts:
        images = [None if p is None else generate.load_png(p, run.codec) for p in paths]
        encoded.append(generate.encode_prompt(text, images, run.tokenizer, run.codec))
        given_images.append(images)
    cfg = config_lib.sampler_config(run.config, **overrides)
    gen = generate.Generator(run, cfg, FLAGS.batch_size)
    jobs = [(line, s) for line in range(len(encoded)) for s in range(FLAGS.num_samples)]
    docs = gen([encoded[line] for line, _ in jobs], seed=FLAGS.seed)
    out = FLAGS.out or os.path.join(FLAGS.workdir, "samples", "cli")
    os.makedirs(out, exist_ok=True)
    for (line, s), (text, images) in zip(jobs, docs):
        stem = os.path.join(out, f"{line:04d}_{s:02d}")
        with open(stem + ".txt", "w") as f:
            f.write(text + "\n")
        for j, im in enumerate(images):
            Image.fromarray(im).save(f"{stem}_img{j}.png")
    print(f"wrote {len(docs)} sample(s) for {len(prompts)} prompt(s) from step {run.step} to {out}")


if __name__ == "__main__":
    app.run(cli.run_cli(main), flags_parser=cli.parse_flags)
