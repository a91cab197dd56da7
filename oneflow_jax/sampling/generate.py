"""From a run directory to documents: load the latest checkpoint, turn text+PNG prompts into sampler states, decode
the results to text (with `<image>` markers) and uint8 images. Shared by `sample`, `eval` and the train loop."""
from __future__ import annotations

import collections
import dataclasses
import os
import time

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from typing import Any
import numpy as np
from PIL import Image

from oneflow_jax.training import checkpointing
from oneflow_jax import config_lib, methods
from oneflow_jax.sampling.common import SamplerConfig
from oneflow_jax.data import tokenizer as tokenizer_lib
from oneflow_jax.cli import UserError


@dataclasses.dataclass
class Run:
    """Everything needed to sample from a trained run."""
    config: config_lib.RunConfig
    model: Any                    # the method's model (methods.Method.model_class)
    params: dict
    codec: object
    tokenizer: tokenizer_lib.Tokenizer
    step: int


def load_run(workdir: str, step: int | None = None, ema: bool = True) -> Run:
    """The run's config, tokenizer and (latest or given) checkpointed params, replicated on the local devices: the
    EMA weights when the run keeps them and `ema` (train_state.restore_params)."""
    if not os.path.isdir(workdir) or not os.path.exists(os.path.join(workdir, "config.json")):
        raise UserError(f"{workdir} is not a training run directory (no config.json)")
    config = config_lib.resolve(checkpointing.load_config(workdir))
    tok_path = tokenizer_lib.find_in_dir(workdir)
    if tok_path is None:
        raise UserError(f"{workdir} has no {tokenizer_lib.MODEL_FILENAME} (or tokenizer.hf.json)")
    try:
        tokenizer = tokenizer_lib.load(tok_path)
    except ValueError as e:
        raise UserError(str(e)) from None
    from oneflow_jax.training.train_state import build_model, restore_params
    model, codec = build_model(config, tokenizer.vocab_size)
    params, restored_step = restore_params(workdir, config, model, step, ema)
    return Run(config, model, params, codec, tokenizer, restored_step)


def load_png(path: str, codec) -> np.ndarray:
    """A PNG (or any PIL-readable image) as uint8 [H, W, 3] at the codec's resolution."""
    if not os.path.exists(path):
        raise UserError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            h, w, _ = codec.image_shape
            if im.size != (w, h):
                im = im.resize((w, h), Image.BICUBIC)
            return np.asarray(im, np.uint8)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot decode image {path}: {e}") from None


def encode_prompt(text: str, images, tokenizer, codec):
    """(token ids, per-marker latents or None) for a prompt; `images` are uint8 arrays, one per `<image>`."""
    ids = tokenizer.encode(text)
    n = ids.count(tokenizer.image_id)
    if n != len(images):
        raise UserError(f"prompt {text!r} has {n} <image> marker(s) but {len(images)} image(s) were given")
    return ids, [None if im is None else codec.encode(im) for im in images]


class Generator:
    """Jitted sampling in fixed batches (one compile per batch size) with the run's method's sampler (OneFlow's
    concurrent sampler, or the AR+FM baseline's KV-cached decoding). `nfe` holds each batch's network evaluations
    and `seconds` each batch's wall clock (sampling and decoding); `warm_up` compiles a batch shape untimed."""

    def __init__(self, run: Run, sampler_config: SamplerConfig, batch_size: int):
        self.run, self.cfg, self.batch_size = run, sampler_config, batch_size
        method = methods.for_config(run.config)
        self.special = method.special_tokens(run.tokenizer)
        self._lib = method.sampler
        self._sample = method.make_sampler(run.model, sampler_config, run.tokenizer, run.codec)
        # The batch is split over this process's devices (data parallel; the run's params are replicated on them)
        # when it divides evenly; a caller's own params (the train loop's) keep their placement.
        devices = jax.local_devices()
        self._batch_sharding = (NamedSharding(Mesh(np.array(devices), ("data",)), P("data"))
                                if len(devices) > 1 and batch_size % len(devices) == 0 else None)
        self.nfe: list[int] = []
        self.seconds: list[float] = []

    def warm_up(self, prompts, params=None) -> float:
        """Compiles (and runs once) the sampler for these prompts' batch shape, so that later calls time sampling
        only; returns the seconds it took (not recorded in `nfe` / `seconds`)."""
        t0 = time.perf_counter()
        self._generate(list(prompts[:self.batch_size]), 0, params, record=False)
        return time.perf_counter() - t0

    def __call__(self, prompts, seed: int = 0, params=None):
        """prompts: [(token ids, latents-or-None per marker)] -> [(text, [uint8 images])] in the same order.
        `params` replaces the run's (the train loop samples its current state with one compiled sampler).

        With sampler `votes` = k > 1, a prompt with images that are all given (a captioning prompt: the output is
        text) is sampled k times, as k rows of the batch, and the sample whose text the most of them share is
        returned (ties: the earliest), i.e. self-consistency decoding at k times the cost. Captions of a tiny model
        fail by sampling accident rather than for want of knowledge (docs/results.md), which a vote removes.
        Prompts that generate an image are sampled once. `self.samples` keeps every prompt's samples in order, the
        first being the one a single draw would have given."""
        votes = [self.cfg.votes if images and all(im is not None for im in images) else 1 for _, images in prompts]
        owner = [i for i, k in enumerate(votes) for _ in range(k)]
        docs = self._generate([prompts[i] for i in owner], seed, params)
        self.samples = [[] for _ in prompts]
        for i, doc in zip(owner, docs):
            self.samples[i].append(doc)
        return [most_common_text(samples) for samples in self.samples]

    def timed(self, prompts, seed: int = 0):
        """`self(prompts, seed)` after an untimed warm-up of the same batch shape: (documents, cost dict) with the
        network evaluations per batch, requests per second and the seconds spent (compilation excluded)."""
        warmup_s = self.warm_up(prompts)
        self.nfe.clear(), self.seconds.clear()
        docs = self(prompts, seed)
        return docs, {"nfe_per_batch": float(np.mean(self.nfe)), "batch_size": self.batch_size,
                      "per_second": len(prompts) / max(sum(self.seconds), 1e-9), "warmup_s": warmup_s,
                      "seconds": float(sum(self.seconds)), "batches": len(self.nfe)}

    def _generate(self, prompts, seed: int, params, record: bool = True):
        params = self.run.params if params is None else params
        out = []
        codec = self.run.codec
        for start in range(0, len(prompts), self.batch_size):
            t0 = time.perf_counter()
            chunk = list(prompts[start:start + self.batch_size])
            real = len(chunk)
            # Pad with copies of the first prompt: a batch runs until its slowest row, and an empty prompt (a whole
            # free document) would be slower than most real rows.
            chunk += [chunk[0]] * (self.batch_size - real)
            try:
                state = self._lib.init_state(chunk, self.cfg.max_len, self.special, codec.num_patches,
                                             codec.patch_dim, seed=seed + start)
            except ValueError as e:           # a prompt that does not fit the buffer, or a marker without latents
                raise UserError(str(e)) from None
            if self._batch_sharding is not None and params is self.run.params:
                state = jax.device_put(state, self._batch_sharding)
            final, nfe = self._sample(params, state, jax.random.fold_in(jax.random.key(seed), start))
            for tokens, latents in self._lib.extract_documents(jax.device_get(final), self.special)[:real]:
                images = [codec.decode(lat) for lat in latents]
                out.append((self.run.tokenizer.decode(tokens), images))
            if record:
                self.nfe.append(int(nfe))
                self.seconds.append(time.perf_counter() - t0)
        return out


def most_common_text(samples):
    """The (text, images) sample whose text occurs most often among `samples` (ties: the earliest)."""
    counts = collections.Counter(text for text, _ in samples)
    return next(sample for sample in samples if counts[sample[0]] == max(counts.values()))


def image_grid(images, cols: int = 8, pad: int = 2) -> np.ndarray:
    """uint8 [H, W, 3] grid of equally sized images (white padding)."""
    if not images:
        return np.full((8, 8, 3), 255, np.uint8)
    h, w, c = images[0].shape
    rows = (len(images) + cols - 1) // cols
    grid = np.full((rows * (h + pad) + pad, min(cols, len(images)) * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = im
    return grid


class TrainSampler:
    """The train loop's periodic samples: a few captioning, generation and free-form prompts -> W/samples/."""

    def __init__(self, config, model, codec, tokenizer, workdir: str, num_each: int = 4):
        from oneflow_jax.data import datasets
        self.workdir = workdir
        records = datasets.load_records(config.data.name, config.eval.split, config.data.data_dir,
                                        limit=num_each) if config.data.name == "shapes_world" else []
        prompts = []
        for rec in records:
            prompts.append(encode_prompt("<image>", [rec["images"][0]], tokenizer, codec))
        for rec in records:
            caption = rec["text"].replace("<image>", "").split(" then ")[0].strip()
            prompts.append(encode_prompt(caption + " <image>", [None], tokenizer, codec))
        prompts += [([], [])] * 2
        self.prompts = prompts
        self.generator = Generator(Run(config, model, None, codec, tokenizer, 0), config_lib.sampler_config(config),
                                   len(prompts))          # compiled once, on the first call

    def __call__(self, step: int, params, logger) -> None:
        docs = self.generator(self.prompts, seed=step, params=params)
        out = os.path.join(self.workdir, "samples", f"step_{step:07d}")
        images = [im for _, ims in docs for im in ims]
        texts = "\n".join(f"{i:02d}: {text}" for i, (text, _) in enumerate(docs))
        if jax.process_index() == 0:
            os.makedirs(out, exist_ok=True)
            Image.fromarray(image_grid(images)).save(os.path.join(out, "grid.png"))
            with open(os.path.join(out, "texts.txt"), "w") as f:
                f.write(texts + "\n")
        logger.write_images(step, {"samples": image_grid(images)})
        logger.write_texts(step, {"samples": texts.replace("\n", "  \n")})
