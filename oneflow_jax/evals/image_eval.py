"""Image generation on any dataset (`python -m oneflow_jax.eval --task generate | interleaved`): the run's sampler
draws images, FID and CLIP score measure them (evals/fid.py, evals/clip.py), and every image is written as a PNG.

  generate     an image per caption (prompt `{caption} <image>`, the marker's image generated). Captions and the
               real images they are compared with come from the run's eval split (one-image records: the record's
               text and its image; stored latents are decoded by the run's codec) or from a references file (its
               first caption per image). FID: generated vs real images; CLIP score: each image vs its caption.
  interleaved  documents grown from an empty prompt. Each generated image is paired with the text since the
               previous image (or, when that is empty, the text up to the next one) and CLIP scores the pair: the
               any-dataset counterpart of shapes-world's interleaved consistency. FID: every generated image vs the
               real images of the eval split.

The weights are the user's (nothing downloads): `--inception_weights` is pytorch-fid's Inception converted once to
safetensors (`python -m oneflow_jax.convert_weights`), `--clip_weights` a Hugging Face CLIP directory. A metric
without weights is listed under "unavailable" with the flag that enables it. FID is biased upward for small sets:
the report gives the number of images on each side next to it (the field reports it on 10k-50k images).

Across processes (`--distributed` or `--coordinator_address ...`): process p draws items p, p + P, ... and writes its
own PNGs and its partial sums (feature statistics, CLIP sums, rows) under `W/eval/<task>_step_K.parts/`; process 0
merges them (`merge`). Within a process the sampler splits each batch over the local devices. The real
images' statistics are cached next to the report (`fid_reference_*.npz`), so scoring further checkpoints of a run
against the same items encodes only the generated images.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from oneflow_jax.data import datasets
from oneflow_jax.evals import captioning
from oneflow_jax.sampling import generate

CHUNK_BATCHES = 4        # prompts are generated, written and scored this many batches at a time (nothing held)


class ImageMetrics:
    """FID (Inception-v3 pool features) and CLIP score, each present when its weights were given."""

    def __init__(self, inception_weights: str | None, clip_weights: str | None, batch_size: int = 50):
        from oneflow_jax.evals import clip, fid   # the image tasks' imports only
        self.fid_lib = fid
        self.unavailable: dict[str, str] = {}
        # both networks cut their inputs into chunks of batch_size themselves, sharded over the local devices
        self.features = (fid.InceptionFeatures.from_file(inception_weights, batch_size=batch_size)
                         if inception_weights else None)
        self.inception_digest = _file_digest(inception_weights) if inception_weights else None
        self.clip = clip.ClipScorer.from_pretrained(clip_weights, batch_size=batch_size) if clip_weights else None
        if self.features is None:
            self.unavailable["FID"] = ("needs --inception_weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                                       "converted once by python -m oneflow_jax.convert_weights")
        if self.clip is None:
            self.unavailable["CLIP score"] = ("needs --clip_weights: a Hugging Face CLIP directory (config.json, "
                                              "model.safetensors, tokenizer.json), e.g. openai/clip-vit-base-patch32")

    def stats(self):
        return self.fid_lib.FeatureStats() if self.features is not None else None

    def add(self, stats, images: list[np.ndarray]) -> None:
        """Adds uint8 images' Inception features to feature statistics (nothing without FID weights)."""
        if stats is not None and images:
            stats.update(self.features(np.stack(images)))

    def clip_scores(self, images: list[np.ndarray], captions: list[str]) -> list[float]:
        if self.clip is None or not images:
            return []
        return [float(s) for s in self.clip.score(np.stack(images), captions)]


def _file_digest(path: str) -> str:
    sha = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    return sha.hexdigest()


# ------------------------------------------------------------------------------------------------------ what to draw

def dataset_items(run: generate.Run, split: str, limit: int) -> list[tuple[str, str, np.ndarray]]:
    """[(key, caption, real uint8 image)] of the run's split: its one-image records with text."""
    items = []
    for key, image, (caption,) in captioning.dataset_items(run, split, limit):
        image = np.asarray(image)
        items.append((key, caption, image if image.dtype == np.uint8 else run.codec.decode(image.astype(np.float32))))
    return items


def reference_items(run: generate.Run, path: str, image_root: str | None, limit: int):
    """[(key, first caption, real uint8 image)] of a references file (COCO JSONL or annotations JSON)."""
    return [(key, refs[0], image) for key, image, refs in captioning.reference_items(run, path, image_root, limit)]


def image_pairs(text: str, num_images: int) -> list[tuple[str, int]]:
    """(caption, image index) pairs of a generated document: each image with the text since the previous image, or,
    when that is empty, the text up to the next image. An image with no text on either side has no pair."""
    segments = [" ".join(s.split()) for s in text.split(datasets.IMAGE_TOKEN)]
    pairs = []
    for i in range(min(num_images, len(segments) - 1)):
        if segments[i] or segments[i + 1]:
            pairs.append((segments[i] or segments[i + 1], i))
    return pairs


# ------------------------------------------------------------------------------------------------------ one process

def _save_png(image: np.ndarray, path: str) -> None:
    from PIL import Image
    Image.fromarray(np.asarray(image, np.uint8)).save(path)


def generate_part(run: generate.Run, items, sampler_config, batch_size: int, metrics: ImageMetrics, out_dir: str,
                  seed: int = 0, process: int = 0, processes: int = 1) -> dict:
    """This process's share of text-to-image: PNGs in `out_dir` and its partial result (see `merge`)."""
    share = [(i, item) for i, item in enumerate(items) if i % processes == process]
    gen = generate.Generator(run, sampler_config, batch_size)
    prompts = [generate.encode_prompt(f"{caption} {datasets.IMAGE_TOKEN}", [None], run.tokenizer, run.codec)
               for _, (_, caption, _) in share]
    part = _Part(metrics, gen.warm_up(prompts) if prompts else 0.0)
    step = CHUNK_BATCHES * batch_size
    for start in range(0, len(share), step):
        piece = share[start:start + step]
        docs = gen(prompts[start:start + step], seed + piece[0][0])
        made, rows = [], []
        for (i, (key, caption, _)), (_, images) in zip(piece, docs):
            row = {"index": i, "key": key, "caption": caption, "png": f"{i:06d}.png" if images else None}
            if images:                                      # the sampler always fills a prompted marker
                _save_png(images[0], os.path.join(out_dir, row["png"]))
                made.append(images[0])
                rows.append(row)
            part.rows.append(row)
        part.add_generated(made)
        part.add_clip(made, [r["caption"] for r in rows], rows)
    part.finish(gen, len(share))
    return part.to_dict()


def interleaved_part(run: generate.Run, num_documents: int, sampler_config, batch_size: int, metrics: ImageMetrics,
                     out_dir: str, seed: int = 0, process: int = 0, processes: int = 1) -> dict:
    """This process's share of documents grown from an empty prompt (PNGs `{document}_{image}.png`), CLIP-scored on
    their own (caption, image) pairs."""
    share = [i for i in range(num_documents) if i % processes == process]
    gen = generate.Generator(run, sampler_config, batch_size)
    part = _Part(metrics, gen.warm_up([([], [])]) if share else 0.0)
    step = CHUNK_BATCHES * batch_size
    for start in range(0, len(share), step):
        piece = share[start:start + step]
        docs = gen([([], [])] * len(piece), seed + piece[0])
        made, paired, pairs = [], [], []
        for i, (text, images) in zip(piece, docs):
            row = {"index": i, "document": text, "pngs": [f"{i:06d}_{j}.png" for j in range(len(images))], "pairs": []}
            for image, name in zip(images, row["pngs"]):
                _save_png(image, os.path.join(out_dir, name))
            for caption, j in image_pairs(text, len(images)):
                row["pairs"].append({"caption": caption, "png": row["pngs"][j]})
                paired.append(images[j])
            pairs += row["pairs"]
            made += images
            part.rows.append(row)
        part.add_generated(made)
        part.add_clip(paired, [p["caption"] for p in pairs], pairs)
    part.finish(gen, len(share))
    return part.to_dict()


class _Part:
    """One process's running sums: generated images' feature statistics, CLIP sums, rows and sampling cost."""

    def __init__(self, metrics: ImageMetrics, warmup_s: float):
        self.metrics, self.warmup_s = metrics, warmup_s
        self.generated = metrics.stats()
        self.clip = [0.0, 0.0, 0]                        # sum, sum of squares, count
        self.rows: list[dict] = []
        self.images = 0

    def add_generated(self, images) -> None:
        self.images += len(images)
        self.metrics.add(self.generated, images)

    def add_clip(self, images, captions, rows) -> None:
        for row, s in zip(rows, self.metrics.clip_scores(images, captions)):
            row["clip_score"] = s
            self.clip = [self.clip[0] + s, self.clip[1] + s * s, self.clip[2] + 1]

    def finish(self, gen: generate.Generator, requests: int) -> None:
        self.cost = {"requests": requests, "nfe": list(gen.nfe), "seconds": float(sum(gen.seconds)),
                     "warmup_s": self.warmup_s, "batch_size": gen.batch_size}

    def to_dict(self) -> dict:
        return {"rows": self.rows, "generated": self.generated, "images": self.images, "clip": self.clip,
                "cost": self.cost}


# ------------------------------------------------------------------------------------------------ across processes

def save_stats(parts_dir: str, process: int, generated=None, real=None) -> None:
    """Writes this process's feature statistics (`{p}_generated.npz`, `{p}_real.npz`) for process 0's `merge`."""
    for kind, stats in (("generated", generated), ("real", real)):
        if stats is not None:
            stats.save(os.path.join(parts_dir, f"{process}_{kind}.npz"))


def reference_stats(metrics: ImageMetrics, real_items, cache_dir: str, process: int = 0, processes: int = 1):
    """The real images' feature statistics: this process's share, or all of them from the cache when an earlier eval
    of the same items wrote it (`fid_reference_<digest>.npz`, keyed by the items' keys, the image shape and the
    Inception weights file's content)."""
    if metrics.features is None or not real_items:
        return None, None
    digest = hashlib.sha1(json.dumps([[k for k, _, _ in real_items], list(real_items[0][2].shape),
                                      metrics.inception_digest]).encode())
    cache = os.path.join(cache_dir, f"fid_reference_{digest.hexdigest()[:12]}.npz")
    if os.path.exists(cache):
        return metrics.fid_lib.FeatureStats.load(cache), cache
    stats = metrics.stats()
    metrics.add(stats, [image for i, (_, _, image) in enumerate(real_items) if i % processes == process])
    return stats, cache


def merge(parts: list[dict], parts_dir: str, metrics: ImageMetrics, real, real_cache: str | None,
          step: int) -> tuple[dict, list[dict]]:
    """Process 0: (scores, rows) of all processes' parts: FID of the generated images against the real ones (the
    real statistics from the cache, from this process alone, or merged from every process's share), the mean CLIP
    score with its spread, the cost; every row, in order."""
    processes = len(parts)
    generated = metrics.stats()
    if generated is not None:
        for p in range(processes):
            generated.merge(metrics.fid_lib.FeatureStats.load(os.path.join(parts_dir, f"{p}_generated.npz")))
        if real is not None and real_cache and not os.path.exists(real_cache):
            if processes > 1:
                real = metrics.stats()
                for p in range(processes):
                    real.merge(metrics.fid_lib.FeatureStats.load(os.path.join(parts_dir, f"{p}_real.npz")))
            real.save(real_cache)
    rows = sorted((row for part in parts for row in part["rows"]), key=lambda r: r["index"])
    total, square, n = (sum(part["clip"][i] for part in parts) for i in range(3))
    nfe = [x for part in parts for x in part["cost"]["nfe"]]
    requests = sum(part["cost"]["requests"] for part in parts)
    scores = {"step": step, "requests": requests, "images": sum(part["images"] for part in parts)}
    if generated is not None and real is not None and generated.count >= 2 and real.count >= 2:
        scores.update(FID=metrics.fid_lib.fid_from_stats(generated, real),
                      fid_images={"generated": int(generated.count), "real": int(real.count)})
    if n:
        mean = total / n
        scores.update(CLIP_score=mean, clip_score_std=float(np.sqrt(max(square / n - mean * mean, 0.0))), clip_pairs=n)
    scores["unavailable"] = dict(metrics.unavailable)
    scores["cost"] = {"nfe_per_batch": float(np.mean(nfe)) if nfe else None, "processes": processes,
                      "batch_size": parts[0]["cost"]["batch_size"],
                      "per_second": requests / max(max(p["cost"]["seconds"] for p in parts), 1e-9),
                      "warmup_s": max(p["cost"]["warmup_s"] for p in parts)}
    return scores, rows


def format_table(task: str, scores: dict) -> str:
    lines = [f"{task}, step {scores['step']}: {scores['images']} images from {scores['requests']} requests"]
    if "FID" in scores:
        lines.append(f"FID {scores['FID']:.3f} ({scores['fid_images']['generated']} generated vs "
                     f"{scores['fid_images']['real']} real images)")
    if "CLIP_score" in scores:
        lines.append(f"CLIP score {scores['CLIP_score']:.3f} +- {scores['clip_score_std']:.3f} over "
                     f"{scores['clip_pairs']} (caption, image) pairs")
    cost = scores["cost"]
    lines.append(f"{cost['nfe_per_batch']} network evaluations per batch of {cost['batch_size']}, "
                 f"{cost['per_second']:.2f} requests/s, warm-up {cost['warmup_s']:.1f} s")
    if scores["unavailable"]:
        lines.append("not computed: " + "; ".join(f"{k} ({why})" for k, why in scores["unavailable"].items()))
    return "\n".join(lines)
