"""Initialise a run from a Hugging Face Llama-3 checkpoint (convert/import_llama.py, docs/conversion.md):

    python -m oneflow_jax.import_llama --hf_dir DIR --config configs/oneflow_1b.py --workdir W [--seed S]

Writes W/config.json and a step-0 checkpoint; `python -m oneflow_jax.train --config ... --workdir W` continues.
"""
from __future__ import annotations

import argparse
import sys

from absl import logging

from oneflow_jax import config_lib
from oneflow_jax.cli import UserError
from oneflow_jax.convert import import_llama, safetensors_io


def main(argv=None) -> int:
    """The command; `argv` without the program name (tests call it in-process)."""
    parser = argparse.ArgumentParser(prog="python -m oneflow_jax.import_llama", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf_dir", required=True, help="Hugging Face Llama directory (config.json + safetensors)")
    parser.add_argument("--config", required=True, help="configs/*.py[:variant] of the run (OneFlow or AR)")
    parser.add_argument("--workdir", required=True, help="new run directory to write the step-0 checkpoint into")
    parser.add_argument("--seed", type=int, default=None, help="seed of the fresh heads (default: config.seed)")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.INFO)
    try:
        import_llama.import_to_workdir(args.hf_dir, config_lib.load_config_file(args.config), args.workdir, args.seed)
    except (UserError, import_llama.ConfigMismatch, safetensors_io.SafetensorsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"imported {args.hf_dir} into {args.workdir} (step 0); train with --workdir {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
