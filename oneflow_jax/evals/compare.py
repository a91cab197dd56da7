"""OneFlow vs the AR+FM baseline at matched training FLOPs, tuned alike, over model sizes and seeds (reference §7-8,
paper Table 1). `python -m oneflow_jax.compare --config configs/compare_shapes.py --workdir W` runs it:

1. Tuning, at the smallest width (compare.tune): each model trains at every compare.tune.lr (image-loss weight =
   the config's), and past the grid's edge (x2 or /2, up to compare.tune.extend times) while its best lr lies on
   it; then at every other compare.tune.image_loss_weight with its best lr; best = the highest mean of the metric
   set's headline metrics at the final checkpoint. Each model then uses its own best (lr, weight).
2. The sweep: for each seed (outer, so that every size has one seed before any has two), each width, each model: a
   training of compare.steps * budget steps on the same data stream (data.shuffle_seed), evaluated at
   compare.eval_fractions of it. A sweep run equal to a tuning run (seed 0, smallest width) is that run.
3. The report (evals/compare_report.py): curves of score vs training FLOPs, parity read along them, the cost of
   each model where both reach the same quality; W/compare.json, W/compare.md, W/compare_*.png.

Every run lives in W/runs/<width>/<model>_lr<lr>_w<weight>_s<seed> and every evaluation is cached there
(compare_eval/step_K.json): rerunning the command resumes an interrupted training and skips finished work, and the
report is rewritten after each run, so a partial sweep is readable while the rest trains.

FLOPs (training/flops.py): x = step * the device FLOPs of one step (every position of every packed row, dense
attention for both models: what XLA computes). Reported too: the count with AR's causal attention halved (what a
causal-skipping kernel would compute) and the useful count measured on the documents actually packed
(flops.measured_useful_flops: each document's own length, no padding).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time

import numpy as np

from oneflow_jax import cli, config_lib
from oneflow_jax.evals import compare_report
from oneflow_jax.training import checkpointing, flops, loop

MODELS = ("oneflow", "ar")


# ------------------------------------------------------------------------------------------------ metric sets

class ShapesWorldMetrics:
    """shapes-world's exact scores (evals/shapes_eval.py) and the captioning / generation cost at batch 1."""
    names = ("caption_accuracy", "generation_accuracy", "caption_attributes", "generation_attributes")
    headline = ("caption_accuracy", "generation_accuracy")
    cost = ("caption_nfe", "caption_latency_s", "generation_nfe", "generation_latency_s")

    @staticmethod
    def evaluate(run, c, sampler_config) -> dict:
        from oneflow_jax.evals import shapes_eval
        scores = shapes_eval.evaluate(run, c.eval_examples, 0, sampler_config, c.eval_batch_size, seed=0,
                                      latency_requests=c.latency_prompts)
        out = {}
        for task in ("caption", "generation"):
            s = scores[task]["all"]
            out[f"{task}_accuracy"] = s["accuracy"]
            out[f"{task}_attributes"] = float(np.mean([s[a] for a in shapes_eval.ATTRS]))
            out[f"{task}_seen"] = scores[task]["seen"]["accuracy"] if scores[task]["seen"] else None
            out[f"{task}_held_out"] = scores[task]["held_out"]["accuracy"] if scores[task]["held_out"] else None
            out[f"{task}_nfe"] = scores[task].get("nfe_per_request")
            out[f"{task}_latency_s"] = scores[task].get("latency_s")
        return out


class CaptionMetrics:
    """Any dataset: COCO's caption metrics on the eval split's one-image records (evals/captioning.py) and the
    captioning cost at batch 1. Text-to-image has no metric here until FID / CLIP score exist."""
    names = ("CIDEr", "BLEU-4", "ROUGE-L")
    headline = ("CIDEr",)
    cost = ("caption_nfe", "caption_latency_s")

    @staticmethod
    def evaluate(run, c, sampler_config) -> dict:
        from oneflow_jax.evals import captioning
        from oneflow_jax.sampling import generate
        items = captioning.dataset_items(run, run.config.eval.split, c.eval_examples)
        scores, _ = captioning.evaluate(run, items, sampler_config, c.eval_batch_size)
        out = {name: scores[name] for name in CaptionMetrics.names}
        out.update(caption_nfe=None, caption_latency_s=None)
        if c.latency_prompts:
            one = generate.Generator(run, sampler_config, 1)
            _, cost = one.timed([captioning.prompt(image, run) for _, image, _ in items[:c.latency_prompts]])
            out.update(caption_nfe=cost["nfe_per_batch"], caption_latency_s=cost["seconds"] / cost["batches"])
        return out


# A dataset's metrics plug in here (compare.metric_set): names / headline / cost tuples and evaluate(run, c, scfg).
METRIC_SETS = {"shapes_world": ShapesWorldMetrics, "caption": CaptionMetrics}


def metric_set_name(config) -> str:
    """The metric set a comparison scores with: `compare.metric_set`, or with 'auto' the dataset's own
    (shapes-world's exact scores for shapes-world, caption metrics for any other dataset)."""
    name = config.compare.metric_set
    if name == "auto":
        name = "shapes_world" if config.data.name == "shapes_world" else "caption"
    return name


# ------------------------------------------------------------------------------------------------ the runs

@dataclasses.dataclass(frozen=True, order=True)
class RunSpec:
    width: int
    model: str
    lr: float
    image_loss_weight: float
    seed: int

    @property
    def name(self) -> str:
        return f"d{self.width}/{self.model}_lr{self.lr:g}_w{self.image_loss_weight:g}_s{self.seed}"


def settings(config):
    """The comparison section, checked: one line for what is wrong."""
    if "compare" not in config or "budget" not in config:
        raise cli.UserError("--config must be a comparison config (with 'budget' and 'compare'), e.g. "
                            "configs/compare_shapes.py")
    c = config.compare
    if config.budget <= 0:
        raise cli.UserError(f"config.budget must be > 0, got {config.budget}")
    known = sorted((*METRIC_SETS, "auto"))
    if c.metric_set not in known:
        raise cli.UserError(f"compare.metric_set {c.metric_set!r} is not one of {known}")
    if not c.widths or not c.seeds or not c.tune.lr or not c.tune.image_loss_weight:
        raise cli.UserError("compare.widths, compare.seeds, compare.tune.lr and compare.tune.image_loss_weight "
                            "need at least one value each")
    if any(not 0 < f <= 1 for f in c.eval_fractions):
        raise cli.UserError(f"compare.eval_fractions must lie in (0, 1], got {tuple(c.eval_fractions)}")
    if any(w % config.model.n_heads for w in c.widths):
        raise cli.UserError(f"every compare.widths value must be a multiple of model.n_heads={config.model.n_heads}")
    return c


def total_steps(config) -> int:
    return max(int(round(config.compare.steps * config.budget)), 1)


def eval_steps(config) -> list[int]:
    n = total_steps(config)
    return sorted({max(1, int(round(f * n))) for f in config.compare.eval_fractions} | {n})


def run_config(config, spec: RunSpec):
    """The run config of one training: the shared config, the model's type, the width (d_ff and the patch head's
    hidden layer at compare.ff_mult x width), lr, image-loss weight, seed, and a checkpoint at every eval step."""
    run = copy.deepcopy(config)
    c = run.compare
    run.model_type, run.seed = spec.model, spec.seed
    run.model.update(d_model=spec.width, d_ff=c.ff_mult * spec.width, patch_head_hidden=c.ff_mult * spec.width)
    run.optimizer.lr, run.objective.image_loss_weight = spec.lr, spec.image_loss_weight
    steps = eval_steps(config)
    run.total_steps = total_steps(config)
    run.ckpt_every = math.gcd(*steps)
    run.keep_checkpoints = run.total_steps // run.ckpt_every + 1        # all kept: each is a point of the curve
    run.sample_every = 0
    if "eval_every" in run:             # the comparison scores the checkpoints itself: no validation loss to build
        run.eval_every = 0
    return run


def tuning_specs(config, best: dict | None = None) -> list[RunSpec]:
    """The tuning runs: every lr at the config's image-loss weight, then (given `best` = {model: lr}) every other
    weight at the model's best lr."""
    c, w0 = config.compare, float(config.objective.image_loss_weight)
    width = min(c.widths)
    if best is None:
        return [RunSpec(width, m, float(lr), w0, c.seeds[0]) for m in MODELS for lr in c.tune.lr]
    return [RunSpec(width, m, best[m], float(w), c.seeds[0]) for m in MODELS for w in c.tune.image_loss_weight
            if float(w) != w0]


def edge_extensions(config, lr_runs, best_lr: dict) -> list[RunSpec]:
    """One more lr per model whose best lr lies at an edge of those tried (x2 past the largest, /2 past the
    smallest), so that the optimum is bracketed; [] when every best lr is inside."""
    w0, width, seed = float(config.objective.image_loss_weight), min(config.compare.widths), config.compare.seeds[0]
    out = []
    for m in MODELS:
        lrs = sorted({s.lr for s in lr_runs if s.model == m})
        if best_lr[m] == lrs[-1]:
            out.append(RunSpec(width, m, lrs[-1] * 2, w0, seed))
        elif best_lr[m] == lrs[0] and len(lrs) > 1:
            out.append(RunSpec(width, m, lrs[0] / 2, w0, seed))
    return out


def sweep_specs(config, best: dict) -> list[RunSpec]:
    """{model: (lr, weight)} -> the sweep's runs, seeds outermost. compare.lr_scaling 'inverse_width' scales the
    tuned lr by (smallest width / width), as muP does for Adam's hidden matrices; 'constant' keeps it."""
    c = config.compare
    scaling = c.get("lr_scaling", "constant")
    if scaling not in ("constant", "inverse_width"):
        raise cli.UserError(f"compare.lr_scaling must be 'constant' or 'inverse_width', got {scaling!r}")
    base = min(c.widths)

    def lr(model, width):
        return best[model][0] * (base / width if scaling == "inverse_width" else 1.0)

    return [RunSpec(int(w), m, lr(m, w), best[m][1], int(s)) for s in c.seeds for w in c.widths for m in MODELS]


# ------------------------------------------------------------------------------------------------ train and evaluate

def checkpoint_steps(workdir: str) -> list[int]:
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return []
    ckpt = checkpointing.Checkpointer(workdir, keep=1000, async_save=False)
    steps = sorted(ckpt.all_steps())
    ckpt.close()
    return steps


def ensure_trained(config, spec: RunSpec, workdir: str, progress: str) -> bool:
    """Trains the run to its last step unless its checkpoints are there; False if it was preempted."""
    run = run_config(config, spec)
    wd = os.path.join(workdir, "runs", spec.name)
    if (checkpoint_steps(wd) or [0])[-1] >= run.total_steps:
        return True
    cli.say(f"compare: {progress} training {spec.name} ({run.total_steps} steps)")
    loop.train(run, wd)
    reached = (checkpoint_steps(wd) or [0])[-1]
    if reached < run.total_steps:         # SIGTERM: train saved and returned; a rerun resumes
        cli.say(f"compare: {spec.name} stopped at step {reached} of {run.total_steps} (preempted); rerun the same "
                "command to resume")
        return False
    return True


def evaluate(config, spec: RunSpec, workdir: str, steps, sampler_overrides: dict | None = None) -> list[dict]:
    """The metric set's scores at each of `steps`, cached per checkpoint in the run's compare_eval/step_K.json
    (compare_eval/sampler_<hash>/ for --sampler overrides, so that other sampler settings never read them)."""
    from oneflow_jax.sampling import generate
    c = config.compare
    wd = os.path.join(workdir, "runs", spec.name)
    metric_set = metric_set_name(config)
    cache = os.path.join(wd, "compare_eval", *(() if metric_set == "shapes_world" else (metric_set,)))
    if sampler_overrides:
        digest = hashlib.sha256(json.dumps(sampler_overrides, sort_keys=True).encode()).hexdigest()[:10]
        cache = os.path.join(cache, f"sampler_{digest}")
    out = []
    for step in steps:
        path = os.path.join(cache, f"step_{step}.json")
        if not os.path.exists(path):
            t0 = time.perf_counter()
            run = generate.load_run(wd, step)
            scfg = config_lib.sampler_config(run.config, **(sampler_overrides or {}))
            scores = dict(step=step, **METRIC_SETS[metric_set].evaluate(run, c, scfg))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(scores, f, indent=1)
            os.replace(path + ".tmp", path)
            cli.say(f"compare: {spec.name} step {step}: " + ", ".join(
                f"{k} {scores[k]:.3f}" for k in METRIC_SETS[metric_set].headline) +
                f" ({time.perf_counter() - t0:.0f} s)")
        with open(path) as f:
            out.append(json.load(f))
    return out


def flop_counts(config, spec: RunSpec, workdir: str) -> dict:
    """Per-step FLOP counts of a run (cached in its compare_flops.json: measuring the useful count reads batches)."""
    wd = os.path.join(workdir, "runs", spec.name)
    path = os.path.join(wd, "compare_flops.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    run = config_lib.resolve(run_config(config, spec))
    tok = loop.load_run_tokenizer(run, wd)
    from oneflow_jax.training.train_state import build_model
    model, codec = build_model(run, tok.vocab_size)
    out = dict(params=flops.params(model.cfg, spec.model),
               params_non_embedding=flops.params_non_embedding(model.cfg, spec.model),
               train_flops_per_step=flops.train_flops_per_step(model.cfg, run.data, spec.model),
               train_flops_per_step_causal=flops.train_flops_per_step(model.cfg, run.data, spec.model,
                                                                      causal_skipping=True),
               **flops.measured_useful_flops(run, model.cfg, tok, codec, config.compare.useful_flops_batches))
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return out


def run_record(config, spec: RunSpec, workdir: str, steps, sampler_overrides=None) -> dict:
    counts = flop_counts(config, spec, workdir)
    points = []
    for ev in evaluate(config, spec, workdir, steps, sampler_overrides):
        points.append(dict(ev, train_flops=ev["step"] * counts["train_flops_per_step"],
                           train_flops_causal=ev["step"] * counts["train_flops_per_step_causal"],
                           useful_train_flops=ev["step"] * counts["useful_train_flops_per_step"]))
    return dict(dataclasses.asdict(spec), name=spec.name, **counts, points=points)


# ------------------------------------------------------------------------------------------------ the whole thing

def tuning_score(record: dict, metric_set) -> float:
    """The mean of the metric set's headline metrics at the run's final checkpoint."""
    return float(np.mean([record["points"][-1][m] for m in metric_set.headline]))


def best_settings(records: dict, specs, metric_set) -> dict:
    """{model: (lr, image-loss weight)} of each model's best-scoring run among `specs` (ties: the first)."""
    best = {}
    for m in MODELS:
        runs = [s for s in specs if s.model == m]
        top = max(runs, key=lambda s: tuning_score(records[s.name], metric_set))   # max keeps the first of ties
        best[m] = (top.lr, top.image_loss_weight)
    return best


def compare(config, workdir: str, sampler_overrides: dict | None = None, report_only: bool = False) -> dict | None:
    """Tunes, trains and evaluates what is missing, writes the report after each run; None if preempted. With
    `report_only`, nothing is trained: the report covers the runs that are finished (evaluating what is not cached)."""
    c = settings(config)
    metric_set = METRIC_SETS[metric_set_name(config)]
    final = [total_steps(config)]
    records: dict[str, dict] = {}
    state = dict(best=None, tuning=[], sweep=[])      # what the report shows: run names in order, the chosen settings
    meta = dict(commit=compare_report.git_commit(), budget=config.budget, metric_set=metric_set_name(config),
                config=json.loads(config_lib.config_to_json(config)), sampler_overrides=sampler_overrides or {})

    def report():
        result = compare_report.build(records, state, config, metric_set, meta)
        compare_report.write(result, workdir)
        return result

    def do(specs, steps, label):
        for i, spec in enumerate(specs):
            if report_only:
                wd = os.path.join(workdir, "runs", spec.name)
                if (checkpoint_steps(wd) or [0])[-1] < total_steps(config):
                    continue
            elif not ensure_trained(config, spec, workdir, f"[{label} {i + 1}/{len(specs)}]"):
                return False
            records[spec.name] = run_record(config, spec, workdir, steps, sampler_overrides)
            report()
        return not report_only or all(s.name in records for s in specs)

    t0 = time.perf_counter()
    lr_runs = tuning_specs(config)
    state["tuning"] = [s.name for s in lr_runs]
    if not do(lr_runs, final, "tuning lr"):
        return report() if report_only else None
    best_lr = {m: lw[0] for m, lw in best_settings(records, lr_runs, metric_set).items()}
    for _ in range(c.tune.get("extend", 0)):         # the best lr at an edge of the grid: try past it
        extra = edge_extensions(config, lr_runs, best_lr)
        if not extra:
            break
        lr_runs += extra
        state["tuning"] += [s.name for s in extra]
        if not do(extra, final, "tuning lr, past the edge"):
            return report() if report_only else None
        best_lr = {m: lw[0] for m, lw in best_settings(records, lr_runs, metric_set).items()}
    weight_runs = tuning_specs(config, best_lr)
    state["tuning"] += [s.name for s in weight_runs]
    if not do(weight_runs, final, "tuning image-loss weight"):
        return report() if report_only else None
    state["best"] = best_settings(records, [s for s in lr_runs + weight_runs if s.lr == best_lr[s.model]],
                                  metric_set)
    cli.say("compare: tuned " + ", ".join(f"{m}: lr {lr:g}, image-loss weight {w:g}"
                                          for m, (lr, w) in state["best"].items()))
    sweep = sweep_specs(config, state["best"])
    state["sweep"] = [s.name for s in sweep]
    if not do(sweep, eval_steps(config), "sweep") and not report_only:
        return None
    result = report()
    cli.say(compare_report.markdown(result))
    cli.say(f"compare: {'reported' if report_only else 'done'} in {time.perf_counter() - t0:.0f} s; "
            f"{workdir}/compare.md")
    return result
