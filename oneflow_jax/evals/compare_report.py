"""The FLOP comparison's report (evals/compare.py runs the trainings): seed-averaged curves of score vs training
FLOPs, OneFlow's parity against each baseline read along them, the cost where both reach the same quality;
compare.json, compare.md and the figures compare_curves.png (score vs FLOPs per size) and compare_parity.png (parity
ratio vs model size, one panel per baseline), and compare.jsonl (the raw rows, as benchmarks/results/ keeps them).

Parity (paper Table 1 reads it at AR's final score): for a target score s, F_m(s) is the training FLOPs at which
model m's curve first reaches s (linear interpolation between evaluated checkpoints), and the ratio is
F_oneflow(s) / F_baseline(s): below 1, OneFlow needs fewer FLOPs. Targets are fractions (compare.parity_levels) of
the baseline's final score and, for the reverse reading, of OneFlow's final score. A curve that reaches s at its
first checkpoint gives an upper bound on its F (marked <= / >= in the ratio); one that never reaches s gives a bound
from its last checkpoint (> / <). The paper's own definition, F_oneflow(the baseline's final score) / the baseline's
total FLOPs, is `paper`. A VQ tokenizer's training FLOPs (NextFlow's) are reported apart, not on the x axis.
"""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np

LABELS = {"oneflow": "OneFlow", "ar": "AR+FM", "nextflow": "NextFlow"}
COLORS = {"oneflow": "tab:blue", "ar": "tab:red", "nextflow": "tab:green"}
PAPER = {"CIDEr": 0.32, "DPG": 0.49, "FID": 0.97}


def git_commit() -> str | None:
    """The checkout's commit (with '+dirty' for uncommitted changes), None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------------ curves

def mean_curve(records: list[dict], metrics, cost) -> list[dict]:
    """Seed-averaged points at the steps every record has: each metric's mean and [min, max] over seeds."""
    steps = sorted(set.intersection(*[{p["step"] for p in r["points"]} for r in records]))
    out = []
    for step in steps:
        pts = [next(p for p in r["points"] if p["step"] == step) for r in records]
        point = {k: float(np.mean([p[k] for p in pts])) for k in ("train_flops", "train_flops_causal",
                                                                  "useful_train_flops")}
        point.update(step=step, seeds=len(pts))
        for m in metrics:
            vals = [p[m] for p in pts]
            point[m], point[m + "_range"] = float(np.mean(vals)), [float(min(vals)), float(max(vals))]
        for k in cost:
            vals = [p[k] for p in pts if p.get(k) is not None]
            point[k] = float(np.mean(vals)) if vals else None
        out.append(point)
    return out


def first_reach(curve: list[tuple[float, float]], target: float):
    """(FLOPs at which the curve [(flops, score)] first reaches `target`, how): 'exact' (interpolated), 'upper'
    (its first point already does: at most that), or (None, 'never')."""
    prev = None
    for f, s in curve:
        if s >= target:
            if prev is None:
                return f, "upper"
            f0, s0 = prev
            return f0 + (target - s0) / (s - s0) * (f - f0), "exact"
        prev = (f, s)
    return None, "never"


def parity_at(of: list, base: list, target: float) -> dict:
    """F_oneflow(target) / F_baseline(target) with what kind of number it is: '=', '<=', '>=', '~' (both upper
    bounds), '>' (OneFlow never reaches it: bound from its last FLOPs), '<' (the baseline never does), or None if
    neither does."""
    f_of, how_of = first_reach(of, target)
    f_b, how_b = first_reach(base, target)
    if how_of == "never" and how_b == "never":
        return dict(target=target, ratio=None, kind=None)
    if how_of == "never":
        return dict(target=target, ratio=of[-1][0] / f_b, kind=">")
    if how_b == "never":
        return dict(target=target, ratio=f_of / base[-1][0], kind="<")
    kind = {("exact", "exact"): "=", ("upper", "exact"): "<=", ("exact", "upper"): ">=", ("upper", "upper"): "~"}
    return dict(target=target, ratio=f_of / f_b, kind=kind[how_of, how_b], oneflow_flops=f_of, baseline_flops=f_b)


def parity(of_points, base_points, metric: str, levels) -> dict:
    """Parity of one metric along OneFlow's and a baseline's curves (see the module docstring)."""
    of = [(p["train_flops"], p[metric]) for p in of_points]
    base = [(p["train_flops"], p[metric]) for p in base_points]
    out = {"baseline_final": base[-1][1], "oneflow_final": of[-1][1]}
    if base[-1][1] > 0:
        out["of_baseline_final"] = {f"{lv:g}": parity_at(of, base, lv * base[-1][1]) for lv in levels}
        f_of, how = first_reach(of, base[-1][1])
        out["paper"] = dict(ratio=(f_of / base[-1][0]) if f_of is not None else of[-1][0] / base[-1][0],
                            kind={"exact": "=", "upper": "<=", "never": ">"}[how])
    if of[-1][1] > 0:
        out["of_oneflow_final"] = {f"{lv:g}": parity_at(of, base, lv * of[-1][1]) for lv in levels}
    return out


def equal_quality_cost(of_points, base_points, metric: str, cost) -> dict | None:
    """OneFlow's and the baseline's first evaluated checkpoint reaching the quality both reach (the lower final
    score): its step, FLOPs, score and sampling cost."""
    q = min(of_points[-1][metric], base_points[-1][metric])
    if q <= 0:
        return None
    out = {"quality": q}
    for name, pts in (("oneflow", of_points), ("baseline", base_points)):
        p = next(p for p in pts if p[metric] >= q)
        out[name] = {k: p[k] for k in ("step", "train_flops", metric, *cost)}
    return out


# ------------------------------------------------------------------------------------------------ the result

def build(records: dict, state: dict, config, metric_set, meta: dict) -> dict:
    """compare.json's content from the run records so far (compare.compare's `records`, `state`)."""
    c = config.compare
    models = list(c.get("models", ("oneflow", "ar")))
    levels = [float(x) for x in c.parity_levels]
    result = dict(meta, models=models, baselines=models[1:], widths=[int(w) for w in c.widths],
                  seeds=[int(s) for s in c.seeds], metrics=list(metric_set.names), headline=list(metric_set.headline),
                  cost=list(metric_set.cost), parity_levels=levels, paper_parity_flop_ratio=PAPER,
                  best=state.get("best"), tokenizer=state.get("tokenizer"), tuning=[], runs={}, curves={}, parity={},
                  parity_per_seed={}, equal_quality={})
    for name in state.get("tuning", []):
        if name in records:
            r = records[name]
            result["tuning"].append(dict(name=name, model=r["model"], lr=r["lr"], image_loss_weight=r["image_loss_weight"],
                                         **{m: r["points"][-1][m] for m in metric_set.headline},
                                         score=float(np.mean([r["points"][-1][m] for m in metric_set.headline]))))
    for name in state.get("sweep", []):
        if name in records:
            result["runs"][name] = records[name]
    for w in result["widths"]:
        by_model = {m: [r for r in result["runs"].values() if r["width"] == w and r["model"] == m] for m in models}
        by_model = {m: runs for m, runs in by_model.items() if runs}
        if "oneflow" not in by_model or len(by_model) < 2:
            continue
        key = f"d{w}"
        curves = {m: dict(params=runs[0]["params"], seeds=[r["seed"] for r in runs],
                          points=mean_curve(runs, metric_set.names, metric_set.cost)) for m, runs in by_model.items()}
        result["curves"][key] = curves
        of = curves["oneflow"]["points"]
        result["parity"][key], result["equal_quality"][key], result["parity_per_seed"][key] = {}, {}, {}
        for b in models[1:]:
            if b not in curves:
                continue
            base = curves[b]["points"]
            result["parity"][key][b] = {m: parity(of, base, m, levels) for m in metric_set.headline}
            result["equal_quality"][key][b] = {m: equal_quality_cost(of, base, m, metric_set.cost)
                                               for m in metric_set.headline}
            seeds = sorted({r["seed"] for r in by_model["oneflow"]} & {r["seed"] for r in by_model[b]})
            per_seed = {}
            for s in seeds:
                pair = [next(r for r in by_model[m] if r["seed"] == s)["points"] for m in ("oneflow", b)]
                per_seed[str(s)] = {m: parity(*pair, m, levels) for m in metric_set.headline}
            result["parity_per_seed"][key][b] = per_seed
    return result


def json_lines(result: dict) -> str:
    """compare.jsonl: one row per run (its points), per tuning run and per parity reading, each with the date, commit
    and budget (the raw rows docs/results.md cites; the config is in compare.json)."""
    import datetime
    base = dict(date=datetime.date.today().isoformat(), commit=result.get("commit"), budget=result["budget"],
                metric_set=result["metric_set"])
    rows = [dict(base, kind="tuning", **t) for t in result["tuning"]]
    rows += [dict(base, kind="run", **r) for r in result["runs"].values()]
    if result.get("tokenizer"):
        rows.append(dict(base, kind="tokenizer", **result["tokenizer"]))
    for key, per_baseline in result["parity"].items():
        for b, per_metric in per_baseline.items():
            for m, p in per_metric.items():
                rows.append(dict(base, kind="parity", size=key, baseline=b,
                                 params=result["curves"][key]["oneflow"]["params"], metric=m,
                                 seeds=result["curves"][key]["oneflow"]["seeds"], **p,
                                 per_seed={s: v[m] for s, v in result["parity_per_seed"][key][b].items()},
                                 equal_quality=result["equal_quality"][key][b][m]))
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def write(result: dict, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    for name, text in (("compare.json", json.dumps(result, indent=1)), ("compare.md", markdown(result)),
                       ("compare.jsonl", json_lines(result))):
        with open(os.path.join(workdir, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(workdir, name + ".tmp"), os.path.join(workdir, name))
    if result["curves"]:
        plot_curves(result, os.path.join(workdir, "compare_curves.png"))
        plot_parity(result, os.path.join(workdir, "compare_parity.png"))


# ------------------------------------------------------------------------------------------------ markdown

def fmt_ratio(entry: dict | None) -> str:
    if not entry or entry.get("ratio") is None:
        return "neither reaches"
    kind = entry["kind"]
    return f"{'' if kind == '=' else kind + ' '}{entry['ratio']:.2f}"


def markdown(result: dict) -> str:
    head, models = result["headline"], result.get("models", ["oneflow", "ar"])
    names = " and ".join(LABELS[b] for b in models[1:])
    lines = [f"# OneFlow vs {names} at matched training FLOPs (commit {result.get('commit')}, budget "
             f"{result['budget']}, metric set {result['metric_set']})", ""]
    tok = result.get("tokenizer")
    if tok:
        lines += ["## VQ tokenizer (NextFlow's images; its FLOPs are not on the curves' x axis)", "",
                  f"{tok['steps']} steps of {tok['batch_size']} images: {tok['train_flops_per_step']:.3g} FLOPs per "
                  f"step (XLA), {tok['train_flops']:.3g} in all; PSNR {tok.get('psnr', float('nan')):.2f} dB"
                  + (f", attributes recognised {tok['attributes_recognised']:.1%}" if "attributes_recognised" in tok
                     else "") + (f" (imported, {tok['imported'].get('commit')})" if tok.get("imported") else "")
                  + ".", ""]
    if result["tuning"]:
        lines += ["## Tuning (smallest width, final checkpoint)", "",
                  "| model | lr | image-loss weight | " + " | ".join(head) + " | score |",
                  "|---|---:|---:|" + "---:|" * (len(head) + 1)]
        for t in result["tuning"]:
            lines.append(f"| {LABELS[t['model']]} | {t['lr']:g} | {t['image_loss_weight']:g} | "
                         + " | ".join(f"{t[m]:.3f}" for m in head) + f" | {t['score']:.3f} |")
        if result.get("best"):
            lines += ["", "Chosen: " + ", ".join(f"{LABELS[m]} lr {lr:g}, weight {w:g}"
                                                 for m, (lr, w) in result["best"].items()), ""]
    if result["parity"]:
        levels = [f"{lv:g}" for lv in result["parity_levels"]]
        lines += ["## Parity FLOP ratio (OneFlow FLOPs / the baseline's FLOPs to first reach a score; < 1: OneFlow "
                  "cheaper)", "",
                  "Targets: fractions of the baseline's final score; `paper`: FLOPs OneFlow needs to reach the "
                  "baseline's final score / the baseline's total FLOPs (paper Table 1, against AR: CIDEr 0.32, DPG "
                  "0.49, FID 0.97). Seed-averaged curves; the per-seed range in brackets.", "",
                  "| size | params | baseline | metric | baseline final | OneFlow final | "
                  + " | ".join(f"{lv} x baseline" for lv in levels) + " | paper |",
                  "|---|---:|---|---|---:|---:|" + "---:|" * (len(levels) + 1)]
        for key, per_baseline in result["parity"].items():
            params = result["curves"][key]["oneflow"]["params"]
            for b, per_metric in per_baseline.items():
                for m, p in per_metric.items():
                    cells = []
                    for lv in levels:
                        cell = fmt_ratio(p.get("of_baseline_final", {}).get(lv))
                        seeds = [s[m].get("of_baseline_final", {}).get(lv)
                                 for s in result["parity_per_seed"][key][b].values()]
                        if len(seeds) > 1:
                            cell += " [" + ", ".join(fmt_ratio(s) for s in seeds) + "]"
                        cells.append(cell)
                    lines.append(f"| {key} | {params / 1e6:.2f}M | {LABELS[b]} | {m} | {p['baseline_final']:.3f} | "
                                 f"{p['oneflow_final']:.3f} | " + " | ".join(cells)
                                 + f" | {fmt_ratio(p.get('paper'))} |")
        lines += ["", "Reverse reading (targets: fractions of OneFlow's final score):", "",
                  "| size | baseline | metric | " + " | ".join(f"{lv} x OneFlow" for lv in levels) + " |",
                  "|---|---|---|" + "---:|" * len(levels)]
        for key, per_baseline in result["parity"].items():
            for b, per_metric in per_baseline.items():
                for m, p in per_metric.items():
                    lines.append(f"| {key} | {LABELS[b]} | {m} | " + " | ".join(
                        fmt_ratio(p.get("of_oneflow_final", {}).get(lv)) for lv in levels) + " |")
    if result["equal_quality"]:
        cost = result["cost"]
        lines += ["", "## Cost at equal quality (each model's first checkpoint reaching the lower final score)", "",
                  "| size | metric | quality | model | step | train FLOPs | " + " | ".join(cost) + " |",
                  "|---|---|---:|---|---:|---:|" + "---:|" * len(cost)]
        for key, per_baseline in result["equal_quality"].items():
            for b, per_metric in per_baseline.items():
                for m, e in per_metric.items():
                    if not e:
                        continue
                    for model, row in (("oneflow", e["oneflow"]), (b, e["baseline"])):
                        lines.append(f"| {key} | {m} | {e['quality']:.3f} | {LABELS[model]} | {row['step']} | "
                                     f"{row['train_flops']:.3g} | " + " | ".join(_num(row.get(k)) for k in cost)
                                     + " |")
    if result["runs"]:
        lines += ["", "## Runs (FLOPs per training step: device = dense attention, as run; causal = causal "
                  "attention halved; useful = the packed documents only; imported: trained at that commit, "
                  "compare --reuse)", "",
                  "| run | params | device | causal | useful | documents / row | positions / document | fill | "
                  + " | ".join(f"final {m}" for m in head) + " |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(head)]
        for name, r in sorted(result["runs"].items()):
            where = f" (imported, {r['imported'].get('commit')})" if r.get("imported") else ""
            lines.append(f"| {name}{where} | {r['params'] / 1e6:.2f}M | {r['train_flops_per_step']:.3g} | "
                         f"{r['train_flops_per_step_causal']:.3g} | {r['useful_train_flops_per_step']:.3g} | "
                         f"{r['documents_per_row']:.2f} | {r['positions_per_document']:.1f} | {r['packing_fill']:.2f} | "
                         + " | ".join(f"{r['points'][-1][m]:.3f}" for m in head) + " |")
    if result["curves"]:
        lines += ["", "## Curves (seed mean [min, max])", "",
                  "| size | model | step | train FLOPs | " + " | ".join(head) + " |",
                  "|---|---|---:|---:|" + "---:|" * len(head)]
        for key, curves in result["curves"].items():
            for model, curve in curves.items():
                for p in curve["points"]:
                    cells = [f"{p[m]:.3f}" + (f" [{p[m + '_range'][0]:.2f}, {p[m + '_range'][1]:.2f}]"
                                              if p["seeds"] > 1 else "") for m in head]
                    lines.append(f"| {key} | {LABELS[model]} | {p['step']} | {p['train_flops']:.3g} | "
                                 + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    if v is None:
        return "-"
    return f"{v * 1e3:.0f} ms" if isinstance(v, float) and v < 1 and v != 0 else f"{v:.3g}"


# ------------------------------------------------------------------------------------------------ figures

def plot_curves(result: dict, path: str) -> None:
    """Score vs training FLOPs (log x): one row per headline metric, one column per size, seed band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker.NullFormatter below)
    head, keys = result["headline"], list(result["curves"])
    fig, axes = plt.subplots(len(head), len(keys), figsize=(3.6 * len(keys), 2.8 * len(head)), squeeze=False)
    for j, key in enumerate(keys):
        for i, m in enumerate(head):
            ax = axes[i][j]
            for model, curve in result["curves"][key].items():
                pts = curve["points"]
                x = [p["train_flops"] for p in pts]
                ax.plot(x, [p[m] for p in pts], "o-", color=COLORS[model], label=LABELS[model], ms=3)
                if any(p["seeds"] > 1 for p in pts):
                    ax.fill_between(x, [p[m + "_range"][0] for p in pts], [p[m + "_range"][1] for p in pts],
                                    color=COLORS[model], alpha=0.2, lw=0)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # decade labels only
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            params = result["curves"][key]["oneflow"]["params"]
            ax.set_title(f"{key} ({params / 1e6:.1f}M params)", fontsize=9)
            if j == 0:
                ax.set_ylabel(m.replace("_", " "), fontsize=9)
            if i == len(head) - 1:
                ax.set_xlabel("training FLOPs (device count)", fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_parity(result: dict, path: str) -> None:
    """Parity FLOP ratio at 1, 0.9 and 0.5 x the baseline's final score vs model size, one panel per baseline, one
    line per metric and level (log-log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401
    baselines = [b for b in result.get("baselines", ["ar"]) if any(b in v for v in result["parity"].values())]
    fig, axes = plt.subplots(1, len(baselines), figsize=(5.5 * len(baselines), 3.8), squeeze=False)
    marks = {"=": "o", ">": "^", ">=": "^", "<": "v", "<=": "v", "~": "x"}   # a bound points the way it bounds
    for ax, b in zip(axes[0], baselines):
        keys = [k for k in result["parity"] if b in result["parity"][k]]
        sizes = [result["curves"][k]["oneflow"]["params"] for k in keys]
        for i, m in enumerate(result["headline"]):
            for lv, ls in (("1", "-"), ("0.9", "--"), ("0.5", ":")):
                entries = [result["parity"][k][b][m].get("of_baseline_final", {}).get(lv, {}) for k in keys]
                pts = [(s, e["ratio"], e["kind"]) for s, e in zip(sizes, entries) if e.get("ratio") is not None]
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, color=f"C{i}",
                        label=f"{m} at {lv} x {LABELS[b]} final")
                for x, y, kind in pts:
                    ax.plot([x], [y], marks[kind], color=f"C{i}", mfc="none" if kind != "=" else f"C{i}", ms=7)
        ax.axhline(1.0, color="gray", lw=1)
        if b == "ar":                     # the paper's Table 1 reads OneFlow against AR
            for name, v in PAPER.items():
                ax.axhline(v, color="black", lw=0.6, ls=":")
                ax.text(min(sizes) if sizes else 1, v, f" paper {name} {v}", fontsize=7, va="bottom")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"OneFlow FLOPs / {LABELS[b]} FLOPs")
        ax.set_title(f"FLOPs to reach {LABELS[b]}'s score (< 1: OneFlow cheaper;\nhollow triangles: bounds, never "
                     "reached)", fontsize=9)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
