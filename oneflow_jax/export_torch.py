"""Export a training run to PyTorch:

    python -m oneflow_jax.export_torch --workdir W --out D [--step N] [--dtype float32|bfloat16] [--tokenizer PATH]

Reads W/config.json and the latest (or --step) checkpoint, writes D/{model.safetensors, config.json,
modeling_oneflow.py, tokenizer.model, parity_inputs.safetensors, parity_check.py} (see torch_export.py and
docs/conversion.md), then runs D/parity_check.py in a fresh process and exits non-zero if torch does not reproduce
the JAX outputs within tolerance (float32: 1e-4 relative).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from absl import logging
from etils import epath

from oneflow_jax import config_lib, methods
from oneflow_jax.cli import UserError
from oneflow_jax.convert import torch_export
from oneflow_jax.data import tokenizer as tokenizer_lib
from oneflow_jax.training import checkpointing
from oneflow_jax.training.train_state import build_model, restore_params, sampling_weights


def load_params(workdir: str, step: int | None = None, tokenizer_path: str | None = None, ema: bool = True):
    """(config, ModelConfig, params, tokenizer path, restored step) of a run, params (the EMA when the run keeps one
    and `ema`) restored on the local devices."""
    if not (epath.Path(workdir) / "config.json").exists():          # epath: gs:// workdirs too
        raise UserError(f"{workdir} is not a training run directory (no config.json)")
    config = config_lib.resolve(checkpointing.load_config(workdir))
    if not methods.for_config(config).torch_export:
        raise UserError(f"only OneFlow runs can be exported (model_type={config.model_type!r})")
    tok_path = tokenizer_lib.find_in_dir(workdir)
    if tok_path is None:
        if not tokenizer_path:
            raise UserError(f"{workdir} has no {tokenizer_lib.MODEL_FILENAME}; pass --tokenizer")
        tok_path = tokenizer_path
    try:
        tokenizer = tokenizer_lib.load(tok_path)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    model, _ = build_model(config, tokenizer.vocab_size)
    params, restored = restore_params(workdir, config, model, step, ema)
    return config, model.cfg, params, tokenizer, tok_path, restored


def export_run(workdir: str, out_dir: str, step: int | None = None, dtype: str = "float32",
               tokenizer_path: str | None = None, ema: bool = True) -> dict:
    """Exports run `workdir` into `out_dir` and checks parity; returns the parity report. The weights are the run's
    EMA when it keeps one (optimizer.ema_decay > 0) and `ema`, else the trained params."""
    config, cfg, params, tokenizer, tok_path, restored = load_params(workdir, step, tokenizer_path, ema)
    weights = "ema" if sampling_weights(config, ema) == "ema_params" else "params"
    extra = dict(source_step=restored, source_weights=weights, pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id,
                 codec=config_lib.as_dict(config.codec))
    report = torch_export.export(params, dataclasses.asdict(cfg), out_dir, tokenizer_path=tok_path, dtype=dtype,
                                 extra_config=extra, image_token_id=tokenizer.image_id, bos_id=tokenizer.bos_id)
    logging.info("exported step %d of %s to %s; parity %s", restored, workdir, out_dir, json.dumps(report))
    return report


def main(argv=None) -> int:
    """The command; `argv` without the program name (tests call it in-process)."""
    parser = argparse.ArgumentParser(prog="python -m oneflow_jax.export_torch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="training run directory (config.json + checkpoints/)")
    parser.add_argument("--out", required=True, help="output directory of the PyTorch export")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest readable one)")
    parser.add_argument("--dtype", default="float32", choices=sorted(torch_export.NP_DTYPES),
                        help="dtype of the exported weights and of the reference computation")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece .model when the workdir has none")
    parser.add_argument("--noema", dest="ema", action="store_false",
                        help="export the trained params instead of the run's EMA (runs with optimizer.ema_decay > 0)")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.INFO)
    try:
        report = export_run(args.workdir, args.out, args.step, args.dtype, args.tokenizer, args.ema)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch_export.ParityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, r in report["outputs"].items():
        print(f"{name:10s} max_abs {r['max_abs']:.3e}  rel {r['rel']:.3e}")
    print(f"parity ok ({args.dtype}, tolerance {report['tolerance']:g}); export written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
