"""shapes-world scores (spec: caption accuracy, generation accuracy, interleaved consistency), seen vs held-out:
`evaluate` samples a run on the eval split and scores it with the dataset's judge; `format_table` prints it
(`python -m oneflow_jax.eval`).
"""
from __future__ import annotations

import dataclasses
import re
import time

import numpy as np

from oneflow_jax.cli import UserError
from oneflow_jax.data import shapes_world as sw
from oneflow_jax.sampling import generate

MAX_FAILURES = 20          # wrong captions kept in W/eval/step_K.json (examples.caption_failures)
ATTRS = ("left_color", "left_shape", "right_color", "right_shape")
_SIDE = {side: re.compile(rf"a (\w+) (\w+) on the {side}") for side in ("left", "right")}


def loose_attributes(text: str | None):
    """Best-effort attributes of a caption that may not parse exactly (for per-attribute accuracy)."""
    if not text:
        return (None,) * 4
    exact = sw.parse_caption(text)
    if exact:
        return exact
    out = []
    for side in ("left", "right"):
        m = _SIDE[side].search(text)
        out += [m.group(1), m.group(2)] if m else [None, None]
    return tuple(out)


def first_caption(document: str) -> str | None:
    """The caption a captioning prompt produced: the text of the document's first chunk, markers removed."""
    pairs = sw.document_pairs(document)
    return pairs[0][0] if pairs else None


def _score(rows, group=None):
    rows = [r for r in rows if group is None or r["held_out"] == group]
    if not rows:
        return None
    out = {"n": len(rows), "accuracy": float(np.mean([r["correct"] for r in rows]))}
    for i, a in enumerate(ATTRS):
        out[a] = float(np.mean([r["pred"][i] == r["true"][i] for r in rows]))
    return out


def evaluate(run: generate.Run, num_examples: int, num_free: int, sampler_config, batch_size: int, seed: int = 0,
             latency_requests: int = 8):
    """Returns the score dict (also used by the train loop and the FLOP comparison).

    Cost, compilation excluded (each shape is compiled by a warm-up call first, whose time is `warmup_s`): network
    evaluations per request, throughput at `batch_size` (requests/s over the whole task) and the median latency of
    `latency_requests` requests sampled one at a time (batch 1; 0 = skip)."""
    from oneflow_jax.data import datasets
    cfg = run.config
    records = datasets.load_records(cfg.data.name, cfg.eval.split, cfg.data.data_dir, limit=num_examples)
    if not records:
        raise UserError("the eval split is empty")
    gen = generate.Generator(run, sampler_config, batch_size)
    tok, codec = run.tokenizer, run.codec
    truths = [(tuple(r["attributes"][0]), bool(r["image_held_out"][0])) for r in records]
    caption_texts = [sw.caption(sw.ImageSpec(*_objects(t))) for t, _ in truths]
    cap_prompts = [generate.encode_prompt("<image>", [r["images"][0]], tok, codec) for r in records]
    gen_prompts = [generate.encode_prompt(c + " <image>", [None], tok, codec) for c in caption_texts]

    cap_docs, cap_cost = gen.timed(cap_prompts, seed)
    captions = [_caption_row(doc, truth, held) for (doc, _), (truth, held) in zip(cap_docs, truths)]
    single = [_caption_row(samples[0][0], truth, held) for samples, (truth, held) in zip(gen.samples, truths)]

    gen_docs, gen_cost = gen.timed(gen_prompts, seed + 1)
    images = []
    for (doc, ims), (truth, held) in zip(gen_docs, truths):
        pred = sw.judge_image(ims[0]) if ims else (None,) * 4
        images.append(dict(pred=tuple(pred), true=truth, held_out=held, correct=tuple(pred) == truth))

    free_docs, free_cost = gen.timed([([], [])] * num_free, seed + 2) if num_free else ([], {})
    agree = parsed = total = 0
    for doc, ims in free_docs:
        for text, idx in sw.document_pairs(doc):
            attributes = sw.parse_caption(text or "")
            total += 1
            parsed += attributes is not None
            if attributes is not None and idx is not None and idx < len(ims):
                agree += int(attributes == tuple(sw.judge_image(ims[idx])))

    if latency_requests:
        one = generate.Generator(run, sampler_config, 1)
        cap_cost.update(_latency(one, cap_prompts[:latency_requests], seed))
        gen_cost.update(_latency(one, gen_prompts[:latency_requests], seed + 1))
    return {
        "step": run.step,
        "caption": {"all": _score(captions), "seen": _score(captions, False), "held_out": _score(captions, True),
                    "votes": sampler_config.votes, **cap_cost},
        # the first of each image's samples alone: what one draw gives (the same as "caption" without a vote)
        "caption_one_sample": {"all": _score(single), "seen": _score(single, False),
                               "held_out": _score(single, True)},
        "generation": {"all": _score(images), "seen": _score(images, False), "held_out": _score(images, True),
                       **gen_cost},
        # parsed: the fraction of pairs whose text is a whole caption (agreement needs one)
        "interleaved_consistency": {"n_pairs": total, "accuracy": agree / total if total else None,
                                    "parsed": parsed / total if total else None, **free_cost},
        "sampler": dataclasses.asdict(sampler_config),
        "examples": {"captions": [c["text"] for c in captions[:5]], "free": [d for d, _ in free_docs[:3]],
                     "caption_failures": [{"truth": truth, "document": c["text"]} for c, truth
                                          in zip(captions, caption_texts) if not c["correct"]][:MAX_FAILURES]},
    }


def _latency(one: generate.Generator, prompts, seed: int) -> dict:
    """Median wall clock and mean network evaluations of requests sampled one at a time (batch 1, warmed up)."""
    one.warm_up(prompts)
    one.nfe.clear()
    seconds = []
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        one([prompt], seed + i)                  # a vote's samples run one after another, as a request would
        seconds.append(time.perf_counter() - t0)
    return {"latency_s": float(np.median(seconds)), "nfe_per_request": float(np.sum(one.nfe) / len(prompts))}


def _caption_row(doc: str, truth, held: bool) -> dict:
    text = first_caption(doc)
    return dict(pred=loose_attributes(text), true=truth, held_out=held, correct=sw.parse_caption(text or "") == truth,
                text=doc)


def _objects(attrs):
    lc, ls, rc, rs = attrs
    return sw.ObjectSpec(lc, ls), sw.ObjectSpec(rc, rs)


def format_table(scores) -> str:
    lines = [f"shapes-world eval @ step {scores['step']}",
             f"{'task':<12} {'split':<9} {'n':>5} {'acc':>6} " + " ".join(f"{a:>12}" for a in ATTRS)]
    tasks = ["caption", "generation"]
    if scores["caption"].get("votes", 1) > 1:      # the vote's caption, then one draw's
        tasks.insert(1, "caption_one_sample")
    for task in tasks:
        for split in ("seen", "held_out", "all"):
            s = scores[task][split]
            if s:
                name = "caption@1" if task == "caption_one_sample" else task
                lines.append(f"{name:<12} {split:<9} {s['n']:>5} {s['accuracy']:>6.3f} "
                             + " ".join(f"{s[a]:>12.3f}" for a in ATTRS))
    ic = scores["interleaved_consistency"]
    acc = "n/a" if ic["accuracy"] is None else f"{ic['accuracy']:.3f}"
    parsed = f" ({ic['parsed']:.0%} of the pairs' texts parse as captions)" if ic.get("parsed") is not None else ""
    lines.append(f"interleaved consistency: {acc} over {ic['n_pairs']} pairs{parsed}")
    votes = scores["caption"].get("votes", 1)
    if votes > 1:
        lines.append(f"caption: the most frequent of {votes} samples (caption@1: the first sample alone)")
    lines.append(format_cost(scores))
    return "\n".join(lines)


def format_cost(scores) -> str:
    """One line per task: network evaluations, batch-1 latency and throughput, compilation excluded."""
    out = []
    for task, unit in (("caption", "captions"), ("generation", "images")):
        c = scores[task]
        lat = (f"{c['nfe_per_request']:.1f} evaluations and {c['latency_s'] * 1e3:.0f} ms per request at batch 1, "
               if "latency_s" in c else "")
        out.append(f"{task}: {lat}{c['per_second']:.1f} {unit}/s at batch {c['batch_size']} "
                   f"({c['nfe_per_batch']:.1f} evaluations per batch; warm-up, compile included, {c['warmup_s']:.0f} s apart)")
    return "\n".join(out)
