"""Scores of a run. Two tasks:

  shapes   (shapes-world runs' default; evals/shapes_eval.py) caption and generation accuracy on seen and held-out
           combinations, and interleaved consistency -> W/eval/step_{K}.json
  caption  (any dataset; evals/captioning.py) a caption per image of the run's eval split, or of the images a
           references file names, scored with BLEU, METEOR, ROUGE-L and CIDEr-D -> W/eval/caption_step_{K}.json
           (scores and cost) and .jsonl (each caption with its references)
  generate (any dataset; evals/image_eval.py) an image per caption of the eval split (or of a references file),
           written as PNGs and scored with FID against the real images and CLIP score against the captions
           -> W/eval/generate_step_{K}.json, .jsonl and W/eval/generate_step_{K}/*.png
  interleaved  (any dataset) documents grown from an empty prompt, each image CLIP-scored against its own text,
           FID against the eval split's images -> W/eval/interleaved_step_{K}.json, .jsonl and PNGs
  likelihood  (any dataset; evals/likelihood.py) bits per text token of the eval split's documents: OneFlow's Edit
           Flow ELBO with its standard error, or the AR+FM baseline's exact NLL -> W/eval/likelihood_step_{K}.json

    python -m oneflow_jax.eval --workdir W [--task shapes|caption] [--step K] [--num_examples N]
        [--references refs.jsonl|captions_val2017.json --image_root DIR] [--sampler '{"key": value}'] [--steps S]
    python -m oneflow_jax.eval --workdir W --task generate|interleaved [--inception_weights inception.safetensors]
        [--clip_weights CLIP_DIR] [--references ... --image_root DIR] [--distributed | --coordinator_address ...]
    python -m oneflow_jax.eval --workdir W --task likelihood [--num_examples N] [--elbo_samples K] [--split S]
        [--images clean|removed]

caption, generate and interleaved split their requests over processes (--distributed or --coordinator_address ...);
shapes and likelihood run on process 0 alone. Every task also writes its numbers as TensorBoard scalars
(W/eval/tb, named <task>/<score>) and a line of W/eval/metrics.jsonl, at the checkpoint's step.
"""
from __future__ import annotations

import json
import os

import jax
from absl import app, flags

from oneflow_jax import cli, config_lib
from oneflow_jax.evals import captioning, likelihood, shapes_eval
from oneflow_jax.sampling import generate

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run directory.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_integer("num_examples", None, "Eval documents (default: config.eval.num_examples).")
flags.DEFINE_integer("num_free", None, "Documents generated from an empty prompt (default: num_examples // 4).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_enum("task", None, ["shapes", "caption", "generate", "interleaved", "likelihood"],
                  "What to score (default: shapes for shapes-world runs, else caption).")
flags.DEFINE_string("references", None, "caption: COCO-style JSONL {\"image\": PATH, \"captions\": [...]} or a COCO "
                    "annotations JSON (default: the run's eval split, each record's own caption).")
flags.DEFINE_string("image_root", None, "caption: folder the references' image paths are relative to (default: the "
                    "references file's folder).")
flags.DEFINE_string("split", None, "caption / generate / likelihood: the split of the run's dataset (default: "
                    "config.eval.split); e.g. --split train next to the eval split shows a generalisation gap.")
flags.DEFINE_string("inception_weights", None, "generate / interleaved: pytorch-fid's Inception as safetensors "
                    "(python -m oneflow_jax.convert_weights) for FID; without it FID is listed as unavailable.")
flags.DEFINE_string("clip_weights", None, "generate / interleaved: a Hugging Face CLIP directory (config.json, "
                    "model.safetensors, tokenizer.json) for CLIP score; without it CLIP score is listed as "
                    "unavailable.")
flags.DEFINE_enum("images", "clean", ["clean", "removed"], "likelihood: score the text given the documents' images "
                  "read clean ('clean'), or the text alone with every image and marker removed ('removed': what "
                  "condition dropout trains for every layout).")
flags.DEFINE_integer("elbo_samples", 16, "likelihood: times t drawn per document for OneFlow's ELBO estimate.")
flags.DEFINE_bool("ema", True, "Use the run's EMA weights when it keeps them (optimizer.ema_decay > 0); "
                  "--noema: the raw trained weights.")
cli.define_sampler_flags()
cli.define_distributed_flags()


def main(argv):
    cli.no_extra_args(argv)
    if not FLAGS.workdir:
        raise cli.UserError("--workdir is required")
    for name in ("num_examples", "num_free"):
        if FLAGS[name].value is not None and FLAGS[name].value < (1 if name == "num_examples" else 0):
            raise cli.UserError(f"--{name} must be {'> 0' if name == 'num_examples' else '>= 0'}, got "
                                f"{FLAGS[name].value}")
    if FLAGS.inception_weights and not os.path.exists(FLAGS.inception_weights):   # before anything is loaded
        from oneflow_jax.evals import inception
        inception.load(FLAGS.inception_weights)                      # a one-line UserError saying where to get it
    if FLAGS.clip_weights and not os.path.isdir(FLAGS.clip_weights):
        from oneflow_jax.evals import clip
        clip.load(FLAGS.clip_weights)
    overrides = cli.sampler_overrides()
    cli.init_distributed()
    run = generate.load_run(FLAGS.workdir, FLAGS.step, FLAGS.ema)
    task = FLAGS.task or ("shapes" if run.config.data.name == "shapes_world" else "caption")
    if task == "shapes" and run.config.data.name != "shapes_world":
        raise cli.UserError(f"--task shapes scores shapes-world runs; this run trained on {run.config.data.name!r} "
                            "(use --task caption)")
    n = FLAGS.num_examples or run.config.eval.num_examples
    scfg = config_lib.sampler_config(run.config, **overrides)
    out = os.path.join(FLAGS.workdir, "eval")
    os.makedirs(out, exist_ok=True)
    if task == "caption":
        return _caption(run, n, scfg, out)
    if task in ("generate", "interleaved"):
        return _images(task, run, n, scfg, out)
    if jax.process_index() != 0:            # the tasks below are not split over processes
        return None
    if task == "likelihood":
        return _likelihood(run, n, out)
    scores = shapes_eval.evaluate(run, n, n // 4 if FLAGS.num_free is None else FLAGS.num_free, scfg,
                                  run.config.eval.batch_size, FLAGS.seed)
    with open(os.path.join(out, f"step_{run.step}.json"), "w") as f:
        json.dump(scores, f, indent=2)
    _log_scores(out, "shapes", run.step, scores)
    print(shapes_eval.format_table(scores))
    print(json.dumps({k: scores[k] for k in ("step", "caption", "generation", "interleaved_consistency")}))


def _likelihood(run, n: int, out: str) -> None:
    if FLAGS.elbo_samples < 2:
        raise cli.UserError(f"--elbo_samples must be >= 2 (the standard error needs two), got {FLAGS.elbo_samples}")
    split = FLAGS.split or run.config.eval.split
    documents = [(run.tokenizer.encode(r["text"]), r["images"])
                 for r in captioning.split_records(run, split)[:n]]
    if FLAGS.images == "removed":
        documents = [likelihood.without_images(tokens, run.tokenizer.image_id) for tokens, _ in documents]
    try:
        scores = likelihood.evaluate(run, documents, FLAGS.elbo_samples, FLAGS.seed)
    except ValueError as e:
        raise cli.UserError(str(e)) from None
    scores.update(split=split, images=FLAGS.images)
    name = "_".join(["likelihood"] + ([split] if split != run.config.eval.split else [])
                    + (["text_only"] if FLAGS.images == "removed" else []))
    with open(os.path.join(out, f"{name}_step_{run.step}.json"), "w") as f:
        json.dump(scores, f, indent=2)
    _log_scores(out, name, run.step, scores)
    error = f" +- {scores['stderr_bits_per_token']:.3f}" if "stderr_bits_per_token" in scores else ""
    print(f"likelihood, step {run.step}: {scores['bits_per_token']:.3f}{error} bits per text token "
          f"({scores['kind']}; {scores['documents']} documents, {scores['tokens']} tokens)")
    print("by layout: " + "; ".join(f"{k} {v['bits_per_token']:.3f} ({v['documents']} documents)"
                                    for k, v in scores["by_layout"].items()))
    print(json.dumps(scores))


def _caption(run, n: int, sampler_config, out: str) -> None:
    if FLAGS.references:
        items = captioning.reference_items(run, FLAGS.references, FLAGS.image_root, n)
    else:
        items = captioning.dataset_items(run, FLAGS.split or run.config.eval.split, n)
    process, processes = jax.process_index(), jax.process_count()
    if processes == 1:
        scores, rows = captioning.evaluate(run, items, sampler_config, run.config.eval.batch_size, FLAGS.seed)
    else:                                   # each process captions its share; process 0 gathers and scores them all
        share = [(i, item) for i, item in enumerate(items) if i % processes == process]
        mine, cost = captioning.caption_rows(run, [item for _, item in share], sampler_config,
                                             run.config.eval.batch_size, FLAGS.seed + process)
        parts = _gather(out, f"caption_step_{run.step}", process, processes,
                        {"rows": [dict(r, index=i) for (i, _), r in zip(share, mine)], "cost": cost})
        if parts is None:
            return
        rows = [{k: v for k, v in r.items() if k != "index"}
                for r in sorted((r for part in parts for r in part["rows"]), key=lambda r: r["index"])]
        cost = dict(parts[0]["cost"], processes=processes,
                    per_second=len(rows) / max(max(p["cost"]["seconds"] for p in parts), 1e-9))
        scores = {**captioning.score_rows(rows), "step": run.step, "cost": cost}
    scores["references"] = FLAGS.references or f"{run.config.data.name}/{FLAGS.split or run.config.eval.split}"
    with open(os.path.join(out, f"caption_step_{run.step}.json"), "w") as f:
        json.dump(scores, f, indent=2)
    with open(os.path.join(out, f"caption_step_{run.step}.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    _log_scores(out, "caption", run.step, scores)
    print(captioning.format_table(scores))
    print(json.dumps({k: v for k, v in scores.items() if k not in ("cost", "unavailable")}))


def _log_scores(out: str, task: str, step: int, scores: dict) -> None:
    """The scores' numbers as TensorBoard scalars (W/eval/tb, through clu) and a line of W/eval/metrics.jsonl, named
    <task>/<key>/..., at the checkpoint's step: evals of several checkpoints draw curves."""
    from oneflow_jax.training import metrics_logging
    logger = metrics_logging.MetricLogger(out, total_steps=step, name="eval")
    logger.write_scalars(step, metrics_logging.scalar_leaves({k: v for k, v in scores.items() if k != "step"}, task))
    logger.close()


def _gather(out: str, name: str, process: int, processes: int, part: dict) -> list[dict] | None:
    """Writes this process's part as JSON under out/name.parts/, waits for every process, and returns all the parts on
    process 0 (None on the others)."""
    from jax.experimental import multihost_utils
    directory = os.path.join(out, f"{name}.parts")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{process}.json.tmp"), "w") as f:
        json.dump(part, f)
    os.replace(os.path.join(directory, f"{process}.json.tmp"), os.path.join(directory, f"{process}.json"))
    multihost_utils.sync_global_devices(f"eval: {name} parts written")
    if process != 0:
        return None
    parts = []
    for p in range(processes):
        with open(os.path.join(directory, f"{p}.json")) as f:
            parts.append(json.load(f))
    return parts


def _images(task: str, run, n: int, sampler_config, out: str) -> None:
    from oneflow_jax.evals import image_eval
    process, processes = jax.process_index(), jax.process_count()
    metrics = image_eval.ImageMetrics(FLAGS.inception_weights, FLAGS.clip_weights, run.config.eval.batch_size)
    if FLAGS.references:
        items = image_eval.reference_items(run, FLAGS.references, FLAGS.image_root, n)
    else:
        items = image_eval.dataset_items(run, FLAGS.split or run.config.eval.split, n)
    name = f"{task}_step_{run.step}"
    images_dir, parts_dir = os.path.join(out, name), os.path.join(out, f"{name}.parts")
    os.makedirs(images_dir, exist_ok=True)
    os.makedirs(parts_dir, exist_ok=True)
    real, cache = image_eval.reference_stats(metrics, items, out, process, processes)
    if task == "generate":
        part = image_eval.generate_part(run, items, sampler_config, run.config.eval.batch_size, metrics, images_dir,
                                        FLAGS.seed, process, processes)
    else:
        documents = n if FLAGS.num_free is None else FLAGS.num_free
        part = image_eval.interleaved_part(run, documents, sampler_config, run.config.eval.batch_size, metrics,
                                           images_dir, FLAGS.seed, process, processes)
    image_eval.save_stats(parts_dir, process, generated=part.pop("generated"),
                          real=real if processes > 1 and not os.path.exists(cache or "") else None)
    parts = _gather(out, name, process, processes, part)
    if parts is None:
        return
    scores, rows = image_eval.merge(parts, parts_dir, metrics, real, cache, run.step)
    scores.update(task=task, images_dir=images_dir,
                  references=FLAGS.references or f"{run.config.data.name}/{FLAGS.split or run.config.eval.split}")
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(scores, f, indent=2)
    with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    _log_scores(out, task, run.step, scores)
    print(image_eval.format_table(task, scores))
    print(json.dumps({k: v for k, v in scores.items() if k not in ("cost", "unavailable")}))


if __name__ == "__main__":
    app.run(cli.run_cli(main), flags_parser=cli.parse_flags)
