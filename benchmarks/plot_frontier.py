"""The sampling frontier as one PNG: caption accuracy (one sample) against network evaluations and against batch-1
latency, generation accuracy against evaluations per image, and interleaved consistency, one marker per (model,
sampler setting), seeds as separate points.

python benchmarks/plot_frontier.py benchmarks/results/F.jsonl [more.jsonl ...] --out docs/images/frontier.png
    [--label WORKDIR_SUBSTRING=NAME ...] [--markdown]

Reads the JSON lines of benchmarks/sampler_frontier.py; --markdown also prints the table of docs/results.md (per
model and setting: the mean over seeds, and the range when there are several).
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

PANELS = (("caption_nfe", "caption_at1", "network evaluations per caption (batch 1)", "caption accuracy, one sample"),
          ("caption_latency_ms", "caption_at1", "caption latency at batch 1 (ms)", "caption accuracy, one sample"),
          ("image_nfe", "generation", "network evaluations per image (batch 1)", "generation accuracy"),
          ("caption_nfe", "interleaved", "network evaluations per caption (batch 1)", "interleaved consistency"))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--label", action="append", default=[], help="WORKDIR_SUBSTRING=NAME: the model name in the legend")
    p.add_argument("--markdown", action="store_true", help="print the table of docs/results.md")
    p.add_argument("--settings", default=None, help="comma-separated settings to draw (default: all)")
    args = p.parse_args()
    labels = dict(x.split("=", 1) for x in args.label)
    rows = [json.loads(line) for f in args.files for line in open(f) if line.strip()]
    if args.settings:
        keep = args.settings.split(",")
        rows = [r for r in rows if r["setting"] in keep]
    model = lambda r: next((name for key, name in labels.items() if key in r["workdir"]), r["workdir"])
    fig, grid = plt.subplots(2, 2, figsize=(11, 9))
    axes = grid.ravel()
    groups = sorted({(model(r), r["setting"]) for r in rows})
    markers = "osD^vP*Xh<>p"
    settings = sorted({g[1] for g in groups})
    models = sorted({g[0] for g in groups})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (x, y, xlabel, ylabel) in zip(axes, PANELS):
        for m, s in groups:
            pts = [(r[x], r[y]) for r in rows if model(r) == m and r["setting"] == s and r.get(y) is not None]
            if pts:
                ax.scatter(*zip(*pts), marker=markers[settings.index(s) % len(markers)],
                           color=colors[models.index(m) % len(colors)], label=f"{m}: {s}", alpha=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(3, len(names)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.03 + 0.018 * (len(names) // 3 + 1), 1, 1))
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({len(rows)} rows)")
    if args.markdown:
        print(markdown(rows, model))


COLUMNS = (("caption_at1", "caption@1", "{:.2f}"), ("generation", "generation", "{:.2f}"),
           ("interleaved", "interleaved", "{:.2f}"), ("caption_nfe", "evals/caption", "{:.1f}"),
           ("caption_latency_ms", "caption ms", "{:.0f}"), ("captions_per_s", "captions/s", "{:.1f}"),
           ("image_nfe", "evals/image", "{:.0f}"), ("image_latency_ms", "image ms", "{:.0f}"),
           ("images_per_s", "images/s", "{:.1f}"))


def markdown(rows, model) -> str:
    """One row per (model, setting): the mean over seeds (checkpoints), the range in brackets when there are more."""
    lines = ["| model | sampler | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for m, s in dict.fromkeys((model(r), r["setting"]) for r in rows):
        group = [r for r in rows if model(r) == m and r["setting"] == s]
        cells = []
        for key, _, fmt in COLUMNS:
            vals = [r[key] for r in group if r.get(key) is not None]
            if not vals:
                cells.append("")
                continue
            mean = fmt.format(sum(vals) / len(vals))
            cells.append(mean if len(vals) == 1 else f"{mean} ({fmt.format(min(vals))}-{fmt.format(max(vals))})")
        lines.append(f"| {m} | {s} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
