"""Exit 0 if the run in WORKDIR has reached its total_steps, 3 if not (used by the pod launchers).

    python launch/check_done.py gs://BUCKET/runs/1b

`python -m oneflow_jax.train` exits 0 both when it finishes and when a SIGTERM (preemption, maintenance) made it save
and stop early, so a launcher cannot tell the two apart from the exit status: this reads the committed checkpoint
steps (`WORKDIR/checkpoints/<step>/`) and `WORKDIR/config.json` (through etils.epath, so gs:// works).
"""
import json
import sys

from etils import epath


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    workdir = epath.Path(argv[1])
    total = json.loads((workdir / "config.json").read_text())["total_steps"]
    ckpt = workdir / "checkpoints"
    steps = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.exists() else []
    last = max(steps, default=0)
    print(f"{workdir}: last checkpoint step {last} of {total}")
    return 0 if last >= total else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv))
