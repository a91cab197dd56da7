"""OneFlow vs the AR+FM baseline at equal model size and matched training FLOPs (reference §7-8, paper Table 1).

    python -m oneflow_jax.compare --config configs/compare_shapes.py --workdir W [--config.budget=0.5 ...]

1. Trains OneFlow (W/oneflow) and AR (W/ar) with the same backbone, codec, data and optimizer (config = the shared
   run config; model_type is set per run), total_steps = compare.steps * budget, a checkpoint at each
   1/compare.num_checkpoints of it (all kept).
2. Evaluates every checkpoint (shapes_eval.evaluate on compare.eval_examples eval documents: caption / generation accuracy
   and per-attribute accuracy) and times captioning one prompt at a time after a warm-up (latency, network
   evaluations). Results are cached per checkpoint in W/<model>/compare_eval/step_K.json.
3. x axis = cumulative training FLOPs = step * flops.train_flops_per_step (device-computed; the useful count, no
   padding, is reported too). Parity FLOP ratio per metric: the FLOPs at which OneFlow's curve (linearly
   interpolated) first reaches AR's final score, / AR's final FLOPs (null if never reached or AR's final score is 0;
   if OneFlow's first checkpoint already reaches it, that checkpoint's FLOPs: an upper bound). Paper Table 1: CIDEr 0.32, DPG 0.49.
Writes W/compare.json, W/compare.md (table) and W/compare.png (score vs FLOPs, log x, one line per model).
Resumable: finished trainings and evaluations are skipped, an interrupted training resumes from its checkpoint.
"""
from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw

from oneflow_jax import cli, config_lib
from oneflow_jax.evals import shapes_eval
from oneflow_jax.sampling import generate
from oneflow_jax.training import checkpointing, flops, loop
from oneflow_jax.training.train_state import build_model

MODELS = ("oneflow", "ar")
METRICS = {  # name -> path into shapes_eval.evaluate's scores (accuracy: exact match; attributes: mean of the 4)
    "caption_accuracy": ("caption", "accuracy"), "caption_attributes": ("caption", "attributes"),
    "generation_accuracy": ("generation", "accuracy"), "generation_attributes": ("generation", "attributes"),
}
COLORS = {"oneflow": (31, 119, 180), "ar": (214, 39, 40)}


def run_configs(config) -> dict:
    """{model: run config}: the shared config with model_type, scaled total_steps and the checkpoint schedule."""
    c = config_lib.resolve(config).compare
    total = max(int(round(c.steps * config.budget)), c.num_checkpoints)
    every = int(math.ceil(total / c.num_checkpoints))
    out = {}
    for name in MODELS:
        run = copy.deepcopy(config)
        run.model_type = name
        run.total_steps, run.ckpt_every, run.keep_checkpoints = total, every, c.num_checkpoints + 1
        run.sample_every = 0
        out[name] = run
    return out


def checkpoint_steps(workdir: str) -> list[int]:
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return []
    ckpt = checkpointing.Checkpointer(workdir, keep=1000, async_save=False)
    steps = sorted(ckpt.all_steps())
    ckpt.close()
    return steps


def evaluate_checkpoint(workdir: str, step: int, config, sampler_overrides: dict | None = None) -> dict:
    """Scores of one checkpoint, cached in workdir/compare_eval/step_K.json. The sampler is the run's with
    compare.sampler_steps and then `sampler_overrides` (cli.sampler_overrides)."""
    path = os.path.join(workdir, "compare_eval", f"step_{step}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    c = config_lib.resolve(config).compare
    run = generate.load_run(workdir, step)
    scfg = config_lib.sampler_config(run.config, **{"steps": c.sampler_steps, **(sampler_overrides or {})})
    scores = shapes_eval.evaluate(run, c.eval_examples, c.num_free, scfg, c.eval_batch_size, seed=0,
                                  latency_requests=c.latency_prompts)
    out = {"step": step, "caption_latency_s": scores["caption"]["latency_s"],
           "caption_nfe": scores["caption"]["nfe_per_request"]}
    for name, (task, key) in METRICS.items():
        s = scores[task]["all"]
        out[name] = s["accuracy"] if key == "accuracy" else float(np.mean([s[a] for a in shapes_eval.ATTRS]))
    out["eval"] = {k: scores[k] for k in ("caption", "generation", "interleaved_consistency")}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(path + ".tmp", path)
    return out


def parity_ratio(oneflow_curve, ar_final_score: float, ar_final_flops: float):
    """FLOPs at which OneFlow's score curve [(flops, score)] first reaches `ar_final_score` / AR's final FLOPs."""
    if ar_final_score <= 0:
        return None               # AR scored nothing: no parity point to reach
    prev = None
    for f, s in oneflow_curve:
        if s >= ar_final_score:
            if prev is None or s == prev[1]:
                return f / ar_final_flops
            f0, s0 = prev
            return (f0 + (ar_final_score - s0) / (s - s0) * (f - f0)) / ar_final_flops
        prev = (f, s)
    return None


def compare(config, workdir: str, sampler_overrides: dict | None = None) -> dict | None:
    """Trains what is missing, evaluates every checkpoint, writes the results; None if a training was preempted."""
    runs = run_configs(config)
    for name, run in runs.items():
        wd = os.path.join(workdir, name)
        if (checkpoint_steps(wd) or [0])[-1] < run.total_steps:
            cli.say(f"compare: training {name} to step {run.total_steps} in {wd}")
            loop.train(run, wd)
            reached = (checkpoint_steps(wd) or [0])[-1]
            if reached < run.total_steps:   # preempted (SIGTERM: train saved and returned): stop, rerun resumes
                cli.say(f"compare: {name} stopped at step {reached} of {run.total_steps} (preempted); "
                               "rerun the same command to resume")
                return None
    result = {"budget": config.budget, "models": {}, "parity_flop_ratio": {},
              "paper_parity_flop_ratio": {"cider": 0.32, "dpg": 0.49}}
    for name, run in runs.items():
        wd = os.path.join(workdir, name)
        tok = loop.load_run_tokenizer(run, wd)
        model, _ = build_model(run, tok.vocab_size)
        per_step = flops.train_flops_per_step(model.cfg, config_lib.resolve(run).data, name)
        useful = flops.report(run)["train_flops_per_step_useful"]
        points = []
        for step in checkpoint_steps(wd):
            cli.say(f"compare: evaluating {name} step {step}")
            ev = evaluate_checkpoint(wd, step, config, sampler_overrides)
            points.append(dict(step=step, train_flops=step * per_step, useful_train_flops=step * useful,
                               **{k: ev[k] for k in METRICS}, caption_latency_s=ev["caption_latency_s"],
                               caption_nfe=ev["caption_nfe"]))
        result["models"][name] = dict(params=flops.params(model.cfg, name), train_flops_per_step=per_step,
                                      useful_train_flops_per_step=useful, total_steps=run.total_steps,
                                      points=points)
    of, ar = result["models"]["oneflow"]["points"], result["models"]["ar"]["points"]
    for metric in METRICS:
        result["parity_flop_ratio"][metric] = parity_ratio(
            [(p["train_flops"], p[metric]) for p in of], ar[-1][metric], ar[-1]["train_flops"]) if of and ar else None
    with open(os.path.join(workdir, "compare.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(workdir, "compare.md"), "w") as f:
        f.write(markdown(result))
    plot(result, os.path.join(workdir, "compare.png"))
    cli.say(markdown(result))
    return result


def markdown(result) -> str:
    cols = list(METRICS) + ["caption_latency_s", "caption_nfe"]
    lines = [f"# OneFlow vs AR+FM (budget {result['budget']})", "",
             "| model | step | train FLOPs | useful FLOPs | " + " | ".join(cols) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(cols)]
    for name, m in result["models"].items():
        for p in m["points"]:
            vals = " | ".join(f"{p[c]:.3f}" if c != "caption_latency_s" else f"{p[c] * 1e3:.0f} ms" for c in cols)
            lines.append(f"| {name} | {p['step']} | {p['train_flops']:.3g} | {p['useful_train_flops']:.3g} | {vals} |")
    lines += ["", "Parity FLOP ratio (OneFlow FLOPs to reach AR's final score / AR's final FLOPs; paper: CIDEr 0.32, "
              "DPG 0.49):", ""]
    for k, v in result["parity_flop_ratio"].items():
        lines.append(f"- {k}: {'not reached' if v is None else f'{v:.3f}'}")
    return "\n".join(lines) + "\n"


def plot(result, path: str, panel=(360, 260)) -> None:
    """Score vs cumulative training FLOPs (log x), one panel per metric, one line per model (PIL, no matplotlib)."""
    pw, ph = panel
    img = Image.new("RGB", (2 * pw, 2 * ph + 20), "white")
    d = ImageDraw.Draw(img)
    all_f = [p["train_flops"] for m in result["models"].values() for p in m["points"]] or [1.0]
    lo, hi = math.log10(min(all_f)), math.log10(max(all_f))
    hi = hi if hi > lo else lo + 1
    for i, metric in enumerate(METRICS):
        ox, oy = (i % 2) * pw, (i // 2) * ph + 20
        x0, x1, y0, y1 = ox + 45, ox + pw - 15, oy + ph - 35, oy + 20
        d.rectangle([x0, y1, x1, y0], outline="black")
        d.text((ox + 50, oy + 4), metric, fill="black")
        for v in (0.0, 0.5, 1.0):
            y = y0 + v * (y1 - y0)
            d.text((ox + 18, y - 6), f"{v:.1f}", fill="black")
        ticks = [e for e in range(math.floor(lo), math.ceil(hi) + 1) if lo <= e <= hi] or [lo, hi]
        for e in ticks:
            x = x0 + (e - lo) / (hi - lo) * (x1 - x0)
            d.line([x, y0, x, y0 + 4], fill="black")
            d.text((x - 16, y0 + 8), f"{10 ** e:.1e}", fill="black")
        d.text((x1 - 70, y0 + 20), "training FLOPs", fill="black")
        for name, m in result["models"].items():
            pts = [(x0 + (math.log10(p["train_flops"]) - lo) / (hi - lo) * (x1 - x0), y0 + p[metric] * (y1 - y0))
                   for p in m["points"]]
            if len(pts) > 1:
                d.line(pts, fill=COLORS[name], width=2)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLORS[name])
    d.text((10, 4), "score vs training FLOPs (log x):  blue = OneFlow, red = AR+FM", fill="black")
    img.save(path)
