"""Captioning on any dataset (`python -m oneflow_jax.eval --task caption`): the run's sampler captions each image
(prompt `<image>`), and COCO's caption metrics score the captions (evals/caption_metrics.py).

What is captioned, and against which references:
  * by default the run's own dataset, split `eval.split`: every record with one image; its reference is the
    record's text without the `<image>` marker (an image-caption pair gives one reference);
  * with `references`: a COCO-style JSONL (`{"image": PATH, "captions": [...]}`) or a COCO annotations JSON; images
    are read from `image_root` (default: the file's folder), centre-cropped and resized to the codec's size.
"""
from __future__ import annotations

import os

import numpy as np

from oneflow_jax.cli import UserError
from oneflow_jax.data import datasets, sources
from oneflow_jax.evals import caption_metrics
from oneflow_jax.sampling import generate


def split_records(run: generate.Run, split: str) -> list[dict]:
    """The decoded records of a split of the run's own dataset (`datasets.load_records`)."""
    data = run.config.data
    config = (datasets.make_builder_config(data.name, dict(data.builder_config)) if data.builder_config is not None
              else None)
    try:
        return datasets.load_records(data.name, split, data.data_dir, config=config)
    except ValueError as e:
        raise UserError(f"the run's {split!r} split cannot be read: {e}") from None


def dataset_items(run: generate.Run, split: str, limit: int) -> list[tuple[str, np.ndarray, list[str]]]:
    """[(key, image (uint8 pixels or latents), [reference])] of the run's dataset split, one-image records only."""
    records = split_records(run, split)
    items = []
    for i, record in enumerate(records):
        if len(record["images"]) != 1:
            continue
        reference = " ".join(record["text"].replace(datasets.IMAGE_TOKEN, " ").split())
        if reference:
            items.append((f"{split}/{i}", record["images"][0], [reference]))
        if len(items) == limit:
            break
    if not items:
        raise UserError(f"the {split!r} split has no one-image record with a caption to evaluate on")
    return items


def reference_items(run: generate.Run, path: str, image_root: str | None, limit: int):
    """[(key, uint8 image, references)] from a references file (`caption_metrics.load_references`)."""
    references = caption_metrics.load_references(path)
    root = image_root or os.path.dirname(os.path.abspath(path))
    items = []
    for key, refs in list(references.items())[:limit]:
        try:
            image = sources.image_from(key, root, run.codec.image_size)
        except Exception as e:  # pylint: disable=broad-except  (missing or undecodable image: name it, stop)
            raise UserError(f"{path}: image {key!r} (under {root}) cannot be read: {e}") from None
        items.append((key, image, refs))
    return items


def prompt(image: np.ndarray, run: generate.Run):
    """A captioning prompt: `<image>` with the image's latents (precomputed latents pass as they are)."""
    if image.dtype == np.uint8:
        return generate.encode_prompt(datasets.IMAGE_TOKEN, [image], run.tokenizer, run.codec)
    return run.tokenizer.encode(datasets.IMAGE_TOKEN), [np.asarray(image, np.float32)]


def caption_of(document: str) -> str:
    """The generated caption: the document's text with its image markers removed, whitespace normalised."""
    return " ".join(document.replace(datasets.IMAGE_TOKEN, " ").split())


def caption_rows(run: generate.Run, items, sampler_config, batch_size: int, seed: int = 0):
    """(rows, cost): a caption per item (key, caption, references), and the sampling cost (`Generator.timed`)."""
    gen = generate.Generator(run, sampler_config, batch_size)
    docs, cost = gen.timed([prompt(image, run) for _, image, _ in items], seed)
    return [{"key": key, "caption": caption_of(text), "references": refs}
            for (key, _, refs), (text, _) in zip(items, docs)], cost


def score_rows(rows: list[dict]) -> dict:
    """Corpus metrics of caption rows, and how many captions came out empty."""
    scores = caption_metrics.score({r["key"]: [r["caption"]] for r in rows},
                                   {r["key"]: r["references"] for r in rows})
    scores["empty_captions"] = sum(not r["caption"] for r in rows)
    return scores


def evaluate(run: generate.Run, items, sampler_config, batch_size: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """(scores, rows): corpus metrics with the sampling cost, and one row per image (key, caption, references)."""
    rows, cost = caption_rows(run, items, sampler_config, batch_size, seed)
    return {**score_rows(rows), "step": run.step, "cost": cost}, rows


def format_table(scores: dict) -> str:
    names = [k for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if k in scores]
    lines = [f"captioning, step {scores['step']}: {scores['n']} images, tokenizer {scores['tokenizer']}",
             " | ".join(f"{k} {scores[k]:.4f}" for k in names)]
    if scores["unavailable"]:
        lines.append("not computed: " + "; ".join(f"{k} ({why})" for k, why in scores["unavailable"].items()))
    return "\n".join(lines)
