"""Where metrics go: TensorBoard through clu (`W/tb`), one JSON object per logged step (`W/metrics.jsonl`), and a
human progress line with throughput and ETA (the eval command's scores: `W/eval/tb`, `W/eval/metrics.jsonl`). Only
process 0 writes files."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging
from etils import epath


class JsonlLog:
    """`metrics.jsonl`: one JSON object per logged step, on local disk or any etils.epath filesystem (gs://).

    Object stores cannot append, so a remote file is rewritten whole on each write (it stays small: one line per
    logged step); a local file is appended to. `resume_step` drops lines logged after a restored checkpoint: the
    resumed run logs those steps again, so every step appears once.
    """

    def __init__(self, path, resume_step: int | None = None):
        self.path = epath.Path(path)
        self.remote = "://" in str(path)
        self.rows = read_jsonl(self.path) if self.path.exists() else []
        if resume_step is not None and any(r.get("step", 0) > resume_step for r in self.rows):
            self.rows = [r for r in self.rows if r.get("step", 0) <= resume_step]
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.parent / f".{self.path.name}.tmp"
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))
        tmp.replace(self.path)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.remote:
            self._rewrite()
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")


class MetricLogger:
    def __init__(self, workdir: str, total_steps: int, name: str = "train", resume_step: int | None = None):
        self.is_main = jax.process_index() == 0
        self.total_steps = total_steps
        self.name = name
        # clu's summary writer imports TensorFlow (~4 s): imported here, so a bad command fails before paying for it
        from clu import metric_writers  # pylint: disable=g-import-not-at-top
        self.writer = metric_writers.create_default_writer(os.path.join(workdir, "tb"), just_logging=not self.is_main,
                                                           asynchronous=False)
        self._jsonl = JsonlLog(epath.Path(workdir) / "metrics.jsonl", resume_step) if self.is_main else None

    def write_scalars(self, step: int, scalars: dict) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        self.writer.write_scalars(step, scalars)
        if self._jsonl:
            self._jsonl.append({"step": int(step), **scalars})

    def write_images(self, step: int, images: dict) -> None:
        self.writer.write_images(step, {k: np.asarray(v)[None] if np.ndim(v) == 3 else v for k, v in images.items()})

    def write_texts(self, step: int, texts: dict) -> None:
        self.writer.write_texts(step, texts)

    def progress(self, step: int, scalars: dict) -> None:
        """One line: step, loss, speed and ETA (printed by every process; cheap)."""
        sps = scalars.get("steps_per_sec", 0.0)
        eta = (self.total_steps - step) / sps if sps > 0 else float("nan")
        parts = [f"{self.name} step {step}/{self.total_steps}"]
        for key in ("loss", "text_loss", "image_loss", "val_loss"):
            if key in scalars:
                parts.append(f"{key} {scalars[key]:.4f}")
        parts.append(f"{sps:.2f} steps/s")
        if "tokens_per_sec" in scalars:
            parts.append(f"{scalars['tokens_per_sec'] / 1e3:.1f}k tok/s")
        if "mfu" in scalars:
            parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
        if scalars.get("skipped_records"):
            parts.append(f"skipped {int(scalars['skipped_records'])} records"
                         + (f" ({int(scalars['unreadable_records'])} unreadable)"
                            if scalars.get("unreadable_records") else ""))
        parts.append(f"ETA {format_seconds(eta)}")
        line = " | ".join(parts)
        logging.info(line)
        if self.is_main:
            print(line, flush=True)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def scalar_leaves(tree, prefix: str = "") -> dict[str, float]:
    """{'a/b/c': value} of the finite numbers in a nested dict of scores (strings, lists and flags left out)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(scalar_leaves(value, name))
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and np.isfinite(value):
            out[name] = float(value)
    return out


def format_seconds(s: float) -> str:
    if not np.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]
