"""Accuracy against cost for a list of sampler settings on one checkpoint: one JSON line per setting.

python benchmarks/sampler_frontier.py --workdir W --out benchmarks/results/F.jsonl [--settings NAME,...]
    [--num_examples 100] [--latency_requests 8] [--seed 0]

Each setting is a named set of sampler overrides (SETTINGS below; `preset:` names expand sampling.common.PRESETS)
evaluated with shapes_eval.evaluate: caption accuracy (one sample), generation accuracy, interleaved consistency,
network evaluations per request, batch-1 latency and throughput at the eval batch size, compilation excluded.
Lines already in --out for the same workdir, step and setting are skipped, so an interrupted sweep resumes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess

from oneflow_jax import config_lib
from oneflow_jax.evals import shapes_eval
from oneflow_jax.sampling import generate
from oneflow_jax.sampling.common import PRESETS

ALG1 = PRESETS["alg1"]
CONFIDENT = PRESETS["confident"]
SETTINGS = {
    "alg1_6": dict(ALG1, steps=6),
    "alg1_16": dict(ALG1, steps=16),
    "alg1_32": dict(ALG1, steps=32),
    "alg1_6_t0.1": dict(ALG1, steps=6, temperature=0.1),
    "confident": dict(CONFIDENT),
    "confident_t1": dict(CONFIDENT, temperature=1.0),
    "confident_t0.3": dict(CONFIDENT, temperature=0.3),
    "confident_c0.5": dict(CONFIDENT, parallel_confidence=0.5),
    "confident_g0.25": dict(CONFIDENT, gap_threshold=0.25),
    "confident_g0.1": dict(CONFIDENT, gap_threshold=0.1),
    "confident_c0.65": dict(CONFIDENT, parallel_confidence=0.65),
    "confident_c1.0": dict(CONFIDENT, parallel_confidence=1.0),
    "confident_serial": dict(CONFIDENT, parallel_confidence=1e9),      # only the most confident gap: one per step
    "confident_img16": dict(CONFIDENT, steps=16),
    "confident_img8": dict(CONFIDENT, steps=8),
    "confident_nowait": dict(CONFIDENT, images_wait_for_text=False),     # the preset before 2026-12-04
    "confident_wait": dict(CONFIDENT, images_wait_for_text=True),
    "confident_t1_wait": dict(CONFIDENT, temperature=1.0, images_wait_for_text=True),
    "confident_serial_t1_wait": dict(CONFIDENT, parallel_confidence=1e9, temperature=1.0, images_wait_for_text=True),
    "cap1_vote3": dict(insertion_rule="alg1", max_insertions_per_step=1, finish_threshold=0.5,
                       insertion_order="largest_gap", votes=3),      # the 2026-12-03 default (114 evaluations)
    "cap1": dict(insertion_rule="alg1", max_insertions_per_step=1, finish_threshold=0.5,
                 insertion_order="largest_gap", votes=1),
    "run_config": {},                          # the run's own config.sampler (the AR+FM baseline: its steps)
    "image_steps16": dict(steps=16),
    "image_steps8": dict(steps=8),
}
for w in (1.5, 2.0, 3.0, 5.0):
    SETTINGS[f"confident_textcfg{w}"] = dict(CONFIDENT, text_cfg=w)
    SETTINGS[f"confident_imagecfg{w}"] = dict(CONFIDENT, image_cfg=w)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--settings", default="alg1_6,alg1_16,confident,confident_c0.5,confident_serial,cap1")
    p.add_argument("--num_examples", type=int, default=100)
    p.add_argument("--num_free", type=int, default=25)
    p.add_argument("--latency_requests", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None)
    args = p.parse_args()
    names = args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    run = generate.load_run(args.workdir, args.step)
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            for line in f:
                row = json.loads(line)
                done.add((row["workdir"], row["step"], row["setting"], row["seed"]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    for name in names:
        if (args.workdir, run.step, name, args.seed) in done:
            continue
        scfg = config_lib.sampler_config(run.config, **SETTINGS[name])
        s = shapes_eval.evaluate(run, args.num_examples, args.num_free, scfg, run.config.eval.batch_size, args.seed,
                                 latency_requests=args.latency_requests)
        cap, gen, free = s["caption"], s["generation"], s["interleaved_consistency"]
        row = dict(date=datetime.date.today().isoformat(), commit=commit, workdir=args.workdir, step=run.step,
                   setting=name, overrides=SETTINGS[name], seed=args.seed, n=args.num_examples,
                   caption_at1=s["caption_one_sample"]["all"]["accuracy"],
                   caption_at1_seen=s["caption_one_sample"]["seen"]["accuracy"],
                   caption=cap["all"]["accuracy"], generation=gen["all"]["accuracy"],
                   generation_seen=gen["seen"]["accuracy"], interleaved=free["accuracy"], pairs=free["n_pairs"],
                   parsed=free["parsed"],
                   caption_nfe=cap["nfe_per_request"], caption_latency_ms=1e3 * cap["latency_s"],
                   caption_nfe_per_batch=cap["nfe_per_batch"], batch_size=cap["batch_size"],
                   captions_per_s=cap["per_second"], image_nfe=gen["nfe_per_request"],
                   image_latency_ms=1e3 * gen["latency_s"], images_per_s=gen["per_second"],
                   examples=s["examples"]["captions"][:2] + s["examples"]["free"][:2])
        print(json.dumps({k: v for k, v in row.items() if k not in ("examples", "overrides")}), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
