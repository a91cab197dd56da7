"""OneFlow vs its baselines (AR+FM, the NextFlow-style model) at matched training FLOPs, tuned alike, over model sizes
and seeds (reference §7-8, paper Table 1). `python -m oneflow_jax.compare --config configs/compare_shapes.py
--workdir W` runs it for compare.models (OneFlow first, then each baseline):

0. A model whose images are VQ codes (NextFlow) needs the tokenizer: trained once into W/vq from compare.tokenizer
   (a train_vq config); its training FLOPs (XLA's count of one step x steps) are reported apart, not on the x axis.

1. Tuning, at the smallest width (compare.tune): each model trains at every compare.tune.lr (image-loss weight =
   the config's), and past the grid's edge (x2 or /2, up to compare.tune.extend times) while its best lr lies on
   it; then at every other compare.tune.image_loss_weight with its best lr; best = the highest mean of the metric
   set's headline metrics at the final checkpoint. Each model then uses its own best (lr, weight).
2. The sweep: for each seed (outer, so that every size has one seed before any has two), each width, each model: a
   training of compare.steps * budget steps on the same data stream (data.shuffle_seed), evaluated at
   compare.eval_fractions of it. A sweep run equal to a tuning run (seed 0, smallest width) is that run.
3. The report (evals/compare_report.py): curves of score vs training FLOPs, parity of OneFlow against each baseline
   read along them, the cost of each model where both reach the same quality; W/compare.json, compare.md, *.png.

Every run lives in W/runs/<width>/<model>_lr<lr>_w<weight>_s<seed> and every evaluation is cached there
(compare_eval/step_K.json): rerunning the command resumes an interrupted training and skips finished work, and the
report is rewritten after each run, so a partial sweep is readable while the rest trains. `--reuse F.jsonl` takes the
runs of an earlier sweep's compare.jsonl (same config and budget) as finished: their evaluations and FLOP counts are
written into W/runs/<name>/ with the commit they came from (imported.json), so a new baseline can be added to a sweep
whose checkpoints are gone without training the others again.

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

MODELS = ("oneflow", "ar", "nextflow")                  # what compare.models may name; OneFlow comes first
COUNTS = ("params", "params_non_embedding", "train_flops_per_step", "train_flops_per_step_causal",
          "useful_train_flops_per_step", "documents_per_row", "positions_per_document", "packing_fill",
          "useful_flops_batches")    # a run's compare_flops.json (flop_counts)
POINT_FLOPS = ("train_flops", "train_flops_causal", "useful_train_flops")   # added to each evaluation by run_record


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
    names = models(config)
    if len(names) < 2 or names[0] != "oneflow" or len(set(names)) != len(names) or not set(names) <= set(MODELS):
        raise cli.UserError(f"compare.models must be 'oneflow' then one or more distinct baselines of {MODELS[1:]}, "
                            f"got {names}")
    if any(w % config.model.n_heads for w in c.widths):
        raise cli.UserError(f"every compare.widths value must be a multiple of model.n_heads={config.model.n_heads}")
    return c


def models(config) -> tuple[str, ...]:
    """The compared methods: OneFlow, then its baselines (compare.models)."""
    return tuple(config.compare.get("models", ("oneflow", "ar")))


def tokenizer_dir(workdir: str) -> str:
    """Where the comparison's VQ tokenizer (for models with codec 'vq') is trained: W/vq."""
    return os.path.abspath(os.path.join(workdir, "vq"))


def base_weight(config, model: str) -> float:
    """The image-loss weight a model tunes its lr at: compare.overrides.<model>'s, else the shared config's."""
    over = config.compare.get("overrides", {}).get(model, {})
    return float(over.get("objective", {}).get("image_loss_weight", config.objective.image_loss_weight))


def total_steps(config) -> int:
    return max(int(round(config.compare.steps * config.budget)), 1)


def eval_steps(config) -> list[int]:
    n = total_steps(config)
    return sorted({max(1, int(round(f * n))) for f in config.compare.eval_fractions} | {n})


def run_config(config, spec: RunSpec, workdir: str | None = None):
    """The run config of one training: the shared config with compare.overrides.<model> on top, the model's type, the
    width (d_ff and the patch head's hidden layer at compare.ff_mult x width), lr, image-loss weight, seed, a
    checkpoint at every eval step, and (codec 'vq', given the comparison's workdir) the tokenizer in W/vq."""
    run = copy.deepcopy(config)
    c = run.compare
    run.model_type, run.seed = spec.model, spec.seed
    run.model.update(d_model=spec.width, d_ff=c.ff_mult * spec.width, patch_head_hidden=c.ff_mult * spec.width)
    with run.unlocked():
        run.update(c.get("overrides", {}).get(spec.model, {}))     # e.g. NextFlow's codec, rows and sampler
        if run.codec.name == "vq" and workdir is not None:
            run.codec.tokenizer = tokenizer_dir(workdir)
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
    c = config.compare
    width = min(c.widths)
    if best is None:
        return [RunSpec(width, m, float(lr), base_weight(config, m), c.seeds[0]) for m in models(config)
                for lr in c.tune.lr]
    return [RunSpec(width, m, best[m], float(w), c.seeds[0]) for m in models(config) for w in c.tune.image_loss_weight
            if float(w) != base_weight(config, m)]


def edge_extensions(config, lr_runs, best_lr: dict) -> list[RunSpec]:
    """One more lr per model whose best lr lies at an edge of those tried (x2 past the largest, /2 past the
    smallest), so that the optimum is bracketed; [] when every best lr is inside."""
    width, seed = min(config.compare.widths), config.compare.seeds[0]
    out = []
    for m in models(config):
        lrs = sorted({s.lr for s in lr_runs if s.model == m})
        if best_lr[m] == lrs[-1]:
            out.append(RunSpec(width, m, lrs[-1] * 2, base_weight(config, m), seed))
        elif best_lr[m] == lrs[0] and len(lrs) > 1:
            out.append(RunSpec(width, m, lrs[0] / 2, base_weight(config, m), seed))
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

    return [RunSpec(int(w), m, lr(m, w), best[m][1], int(s)) for s in c.seeds for w in c.widths for m in models(config)]


# ------------------------------------------------------------------------------------------------ train and evaluate

def checkpoint_steps(workdir: str) -> list[int]:
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return []
    ckpt = checkpointing.Checkpointer(workdir, keep=1000, async_save=False)
    steps = sorted(ckpt.all_steps())
    ckpt.close()
    return steps


def is_finished(config, run_dir: str) -> bool:
    return (os.path.exists(os.path.join(run_dir, "imported.json"))
            or (checkpoint_steps(run_dir) or [0])[-1] >= total_steps(config))


def ensure_trained(config, spec: RunSpec, workdir: str, progress: str) -> bool:
    """Trains the run to its last step unless its checkpoints are there (or it was imported by --reuse); False if it
    was preempted."""
    run = run_config(config, spec, workdir)
    wd = os.path.join(workdir, "runs", spec.name)
    if is_finished(config, wd):
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
            if os.path.exists(os.path.join(wd, "imported.json")):
                raise cli.UserError(f"{spec.name} was imported by --reuse without an evaluation at step {step} (or with "
                                    "other sampler settings): it has no checkpoints to evaluate")
            t0 = time.perf_counter()
            run = generate.load_run(wd, step)
            scfg = config_lib.sampler_config(run.config, **(sampler_overrides or {}))
            scores = dict(step=step, **METRIC_SETS[metric_set].evaluate(run, c, scfg))
            _write_json(path, scores)
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
    run = config_lib.resolve(run_config(config, spec, workdir))
    tok = loop.load_run_tokenizer(run, wd)
    from oneflow_jax.training.train_state import build_model
    model, codec = build_model(run, tok.vocab_size)
    out = dict(params=flops.params(model.cfg, spec.model),
               params_non_embedding=flops.params_non_embedding(model.cfg, spec.model),
               train_flops_per_step=flops.train_flops_per_step(model.cfg, run.data, spec.model),
               train_flops_per_step_causal=flops.train_flops_per_step(model.cfg, run.data, spec.model,
                                                                      causal_skipping=True),
               **flops.measured_useful_flops(run, model.cfg, tok, codec, config.compare.useful_flops_batches))
    _write_json(path, out)
    return out


def run_record(config, spec: RunSpec, workdir: str, steps, sampler_overrides=None) -> dict:
    counts = flop_counts(config, spec, workdir)
    points = []
    for ev in evaluate(config, spec, workdir, steps, sampler_overrides):
        points.append(dict(ev, train_flops=ev["step"] * counts["train_flops_per_step"],
                           train_flops_causal=ev["step"] * counts["train_flops_per_step_causal"],
                           useful_train_flops=ev["step"] * counts["useful_train_flops_per_step"]))
    record = dict(dataclasses.asdict(spec), name=spec.name, **counts, points=points)
    imported = os.path.join(workdir, "runs", spec.name, "imported.json")
    if os.path.exists(imported):
        with open(imported) as f:
            record["imported"] = json.load(f)
    return record


# ------------------------------------------------------------------------------------------------ tokenizer, reuse

def vq_models(config) -> list[str]:
    """The compared models whose images are VQ codes (codec 'vq'): they share one tokenizer."""
    return [m for m in models(config)
            if run_config(config, RunSpec(min(config.compare.widths), m, 1e-3, 1.0, 0)).codec.name == "vq"]


def ensure_tokenizer(config, workdir: str, train: bool = True) -> dict | None:
    """Trains (or resumes) the VQ tokenizer of vq_models into W/vq from compare.tokenizer, once; returns its record
    (steps, XLA FLOPs of a step and in all, eval scores; cached in W/vq/compare_tokenizer.json), None if preempted
    (or, with `train` False, not trained yet)."""
    needs = vq_models(config)
    from oneflow_jax.training import vq_trainer
    vq_dir = tokenizer_dir(workdir)
    path = os.path.join(vq_dir, "compare_tokenizer.json")
    imported = os.path.join(vq_dir, "imported_tokenizer.json")     # --reuse's record: reported, never trained on
    for p in [path] if train else [path, imported]:
        if os.path.exists(p):
            with open(p) as f:
                return json.load(f)
    if not train:
        return None
    if not config.compare.get("tokenizer"):
        raise cli.UserError(f"compare.models {needs} need a VQ tokenizer: set compare.tokenizer to a train_vq config "
                            "(configs/vq_shapes_tiny.py's get_config())")
    vq_config = copy.deepcopy(config.compare.tokenizer)
    if config.data.get("data_dir") and not vq_config.data.get("data_dir"):
        with vq_config.unlocked():
            vq_config.data.data_dir = config.data.data_dir
    cli.say(f"compare: training the VQ tokenizer of {', '.join(needs)} into {vq_dir} ({vq_config.total_steps} steps)")
    t0 = time.perf_counter()
    scores = vq_trainer.train(vq_config, vq_dir)
    if not scores:                        # preempted: a rerun resumes it
        return None
    per_step = vq_trainer.train_flops_per_step(vq_config)
    out = dict(steps=int(vq_config.total_steps), batch_size=int(vq_config.batch_size), train_flops_per_step=per_step,
               train_flops=per_step * int(vq_config.total_steps), wall_s=time.perf_counter() - t0,   # eval included
               **{k: scores[k] for k in ("psnr", "attributes_recognised") if k in scores})
    _write_json(path, out)
    return out


def import_runs(config, workdir: str, path: str) -> list[str]:
    """--reuse: the 'run' and 'tuning' rows of an earlier compare.jsonl (same budget and metric set) become finished
    runs of W: compare_eval/step_K.json per evaluated point, compare_flops.json, imported.json (source, commit, date;
    a row that was itself imported keeps where it was trained). A tuning row has only its final headline scores; its
    FLOP counts are those of the sweep run of the same model and width. Runs already in W are left alone. The
    'tokenizer' row is kept for the report (W/vq/imported_tokenizer.json). Returns the names imported."""
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise cli.UserError(f"--reuse {path}: {e}") from None
    want = dict(budget=float(config.budget), metric_set=metric_set_name(config))
    runs = {r["name"]: r for r in rows if r.get("kind") == "run"}
    out = []
    for r in rows:
        if r.get("kind") == "tokenizer":          # the record ensure_tokenizer made, without the row's bookkeeping
            record = {k: v for k, v in r.items() if k not in ("kind", "date", "commit", "budget", "metric_set")}
            _write_json(os.path.join(tokenizer_dir(workdir), "imported_tokenizer.json"),
                        dict(record, imported=_provenance(r, path)))
        if r.get("kind") not in ("run", "tuning") or (r["kind"] == "tuning" and r["name"] in runs):
            continue
        got = dict(budget=float(r.get("budget", -1)), metric_set=r.get("metric_set"))
        if got != want:
            raise cli.UserError(f"--reuse {path}: row {r['name']} has {got}, this comparison {want}")
        wd = os.path.join(workdir, "runs", r["name"])
        if os.path.exists(os.path.join(wd, "compare_flops.json")) or checkpoint_steps(wd):
            continue
        if r["kind"] == "run":
            counts, points = {k: r[k] for k in COUNTS if k in r}, r["points"]
        else:
            width = int(r["name"].split("/")[0][1:])          # d<width>/<model>_...
            twin = next((x for x in runs.values() if (x["model"], x["width"]) == (r["model"], width)), None)
            if twin is None:
                continue
            counts = {k: twin[k] for k in COUNTS if k in twin}
            headline = METRIC_SETS[want["metric_set"]].headline
            points = [dict(step=total_steps(config), **{k: r[k] for k in headline})]
        for p in points:
            _write_json(os.path.join(wd, "compare_eval", f"step_{p['step']}.json"),
                        {k: v for k, v in p.items() if k not in POINT_FLOPS})
        _write_json(os.path.join(wd, "compare_flops.json"), counts)
        _write_json(os.path.join(wd, "imported.json"), _provenance(r, path))
        out.append(r["name"])
    return out


def _provenance(row: dict, path: str) -> dict:
    """Where a reused row was trained: its own `imported` record if it was imported too, else this file's row."""
    return row.get("imported") or dict(source=os.path.abspath(path), commit=row.get("commit"), date=row.get("date"))


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------------------ the whole thing

def tuning_score(record: dict, metric_set) -> float:
    """The mean of the metric set's headline metrics at the run's final checkpoint."""
    return float(np.mean([record["points"][-1][m] for m in metric_set.headline]))


def best_settings(records: dict, specs, metric_set) -> dict:
    """{model: (lr, image-loss weight)} of each model's best-scoring run among `specs` (ties: the first)."""
    best = {}
    for m in sorted({s.model for s in specs}, key=MODELS.index):
        runs = [s for s in specs if s.model == m]
        top = max(runs, key=lambda s: tuning_score(records[s.name], metric_set))   # max keeps the first of ties
        best[m] = (top.lr, top.image_loss_weight)
    return best


def compare(config, workdir: str, sampler_overrides: dict | None = None, report_only: bool = False,
            reuse: str | None = None) -> dict | None:
    """Tunes, trains and evaluates what is missing, writes the report after each run; None if preempted. With
    `report_only`, nothing is trained: the report covers the runs that are finished (evaluating what is not cached).
    `reuse`: an earlier compare.jsonl whose runs are imported first (import_runs)."""
    c = settings(config)
    if reuse:
        names = import_runs(config, workdir, reuse)
        cli.say(f"compare: {len(names)} runs imported from {reuse}" + (f" ({', '.join(names)})" if names else ""))
    metric_set = METRIC_SETS[metric_set_name(config)]
    final = [total_steps(config)]
    records: dict[str, dict] = {}
    state = dict(best=None, tuning=[], sweep=[], tokenizer=None)   # what the report shows: run names in order, the
    # chosen settings, the VQ tokenizer's record
    meta = dict(commit=compare_report.git_commit(), budget=config.budget, metric_set=metric_set_name(config),
                config=json.loads(config_lib.config_to_json(config)), sampler_overrides=sampler_overrides or {})

    def report():
        result = compare_report.build(records, state, config, metric_set, meta)
        compare_report.write(result, workdir)
        return result

    def do(specs, steps, label):
        for i, spec in enumerate(specs):
            if report_only:
                if not is_finished(config, os.path.join(workdir, "runs", spec.name)):
                    continue
            elif not ensure_trained(config, spec, workdir, f"[{label} {i + 1}/{len(specs)}]"):
                return False
            records[spec.name] = run_record(config, spec, workdir, steps, sampler_overrides)
            report()
        return not report_only or all(s.name in records for s in specs)

    t0 = time.perf_counter()
    if vq_models(config):
        state["tokenizer"] = ensure_tokenizer(config, workdir, train=not report_only)
        if state["tokenizer"] is None and not report_only:
            return None                   # the tokenizer's training was preempted: a rerun resumes it
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
