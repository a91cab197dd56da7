"""Image-metric throughput: FID features (pytorch-fid's Inception-v3, evals/inception.py) and CLIP scores
(evals/clip.py) per second, on every local device, at the real architectures with random weights (the FLOPs do not
depend on the weights).

python benchmarks/image_metrics.py [--batch 32] [--batches 4] [--image_size 256]
    [--clip vit-b-32|vit-l-14] [--out benchmarks/results/image_metrics_<date>.jsonl]

Prints one JSON line: images/s of Inception features and (image, caption) pairs/s of CLIP score in steady state (after
a first, compiling batch), both per device and in all, with the compile time apart and XLA's FLOPs per image.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np

from oneflow_jax.evals import clip, fid, inception

# Hugging Face CLIPConfig fields of the two OpenAI checkpoints CLIP score is usually computed with.
CLIP_SIZES = {
    "vit-b-32": dict(vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                 image_size=224, patch_size=32),
                     text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
                     projection_dim=512),
    "vit-l-14": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                 image_size=224, patch_size=14),
                     text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                     projection_dim=768),
}


def _timed(fn, batches):
    t0 = time.perf_counter()
    fn(batches[0])                                          # compiles
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in batches[1:]:
        fn(b)
    return compile_s, (time.perf_counter() - t0)


def _clip_scorer(size: str, directory: str) -> clip.ClipScorer:
    """A random-weight CLIP of `size` with a byte-level tokenizer: the architecture's cost, no download."""
    import tokenizers
    spec = CLIP_SIZES[size]
    vocab = {f"<{i}>": i for i in range(49406)}
    vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 49406), ("<|endoftext|>", 49407)])
    tok.save(os.path.join(directory, "tokenizer.json"))
    hf = {"text_config": dict(spec["text"], vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5, eos_token_id=2, bos_token_id=49406, pad_token_id=1),
          "vision_config": dict(spec["vision"], hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3),
          "projection_dim": spec["projection_dim"], "logit_scale_init_value": 2.6592}
    cfg = clip.ClipConfig.from_hf(hf)
    return clip.ClipScorer(cfg, clip.init_params(cfg), clip.load_tokenizer(directory, 77), batch_size=10**9)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="images per call (a multiple of the device count)")
    p.add_argument("--batches", type=int, default=4, help="timed calls after the compiling one")
    p.add_argument("--image_size", type=int, default=256, help="generated images' size (resized by each network)")
    p.add_argument("--clip", choices=sorted(CLIP_SIZES), default="vit-b-32")
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (args.batch, args.image_size, args.image_size, 3), dtype=np.uint8)
               for _ in range(args.batches + 1)]
    captions = ["a photograph of a red circle on the left and a blue square on the right"] * args.batch
    n, devices = args.batch * args.batches, jax.local_device_count()

    variables = inception.random_variables(0)
    features = fid.InceptionFeatures(variables, batch_size=args.batch)
    fid_compile, fid_s = _timed(features, batches)
    fid_flops = _flops(lambda x: inception.FIDInceptionV3().apply(variables, x), batches[0][:1].astype(np.float32))

    with tempfile.TemporaryDirectory() as d:
        scorer = _clip_scorer(args.clip, d)
        clip_compile, clip_s = _timed(lambda b: scorer.score(b, captions), batches)

    row = {"date": datetime.date.today().isoformat(), "benchmark": "image_metrics", "backend": jax.default_backend(),
           "device": jax.devices()[0].device_kind, "devices": devices, "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "batch": args.batch, "image_size": args.image_size,
           "fid_images_per_s": n / fid_s, "fid_images_per_s_per_device": n / fid_s / devices,
           "fid_compile_s": fid_compile, "inception_gflop_per_image": fid_flops / 1e9,
           "clip": args.clip, "clip_pairs_per_s": n / clip_s, "clip_pairs_per_s_per_device": n / clip_s / devices,
           "clip_compile_s": clip_compile}
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


def _flops(fn, x) -> float:
    cost = jax.jit(fn).lower(x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


if __name__ == "__main__":
    main()
