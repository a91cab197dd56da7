"""Config validation and the small pieces every command shares (clean CLI errors, model config from a run config).

A bad config must fail before anything compiles, with one line that says what is wrong; `run_cli` turns the
`UserError`s raised anywhere in a command into exactly that (no traceback, non-zero exit).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Callable

import ml_collections

from oneflow_jax.model import ModelConfig


def sibling_config(config_file: str, name: str):
    """The python config module `name` in the folder of `config_file` (pass `__file__`): configs build on one another
    (ar_1b on oneflow_1b, compare_shapes on ar_shapes_tiny on shapes_tiny) instead of copying, so they cannot drift."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
    spec = importlib.util.spec_from_file_location(f"oneflow_jax_configs_{os.path.splitext(name)[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class UserError(Exception):
    """A problem with what the user asked for (config, flags, files); printed as one line, exit code 2."""


TOP_LEVEL_KEYS = {
    "model_type", "seed", "total_steps", "log_every", "ckpt_every", "keep_checkpoints", "sample_every",
    "compile_only", "peak_flops", "mesh", "codec", "model", "objective", "data", "optimizer", "sampler", "eval",
    "budget", "ar", "compare",
}
REQUIRED = ("total_steps", "ckpt_every", "log_every", "seed", "mesh", "model", "data", "optimizer", "objective")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises UserError for unknown keys, impossible values, or a mesh that does not fit the devices."""
    unknown = sorted(set(config.keys()) - TOP_LEVEL_KEYS)
    if unknown:
        raise UserError(f"unknown top-level config key(s): {', '.join(unknown)}")
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise UserError(f"config is missing required key(s): {', '.join(missing)}")
    for key in ("total_steps", "log_every", "ckpt_every"):
        if not isinstance(config[key], int) or config[key] <= 0:
            raise UserError(f"config.{key} must be a positive integer, got {config[key]!r}")
    if config.get("model_type", "oneflow") not in ("oneflow", "ar"):
        raise UserError(f"config.model_type must be 'oneflow' or 'ar', got {config.model_type!r}")
    _check_fields(config.model, ModelConfig, "model", extra={"vocab_size"})
    # the model's own checks, before the run directory exists (the vocabulary and codec geometry come later)
    _model_config(config.model, vocab_size=max(config.model.get("vocab_size", 0), 1))
    from oneflow_jax.flow_matching import LOSS_SPACES
    if config.objective.get("image_loss_space", "v") not in LOSS_SPACES:
        raise UserError(f"config.objective.image_loss_space must be one of {LOSS_SPACES}, got "
                        f"{config.objective.image_loss_space!r}")
    if not 0.0 <= config.optimizer.get("ema_decay", 0.0) < 1.0:
        raise UserError(f"config.optimizer.ema_decay must be in [0, 1) (0 = no EMA), got "
                        f"{config.optimizer.ema_decay!r}")
    if num_devices is not None:
        from oneflow_jax import sharding
        try:
            shape = sharding.resolve_mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, num_devices)
        except ValueError as e:
            raise UserError(f"config.mesh: {e}") from None
        dp = shape[0] * shape[1]
        if config.data.global_batch_size % dp:
            raise UserError(f"config.data.global_batch_size={config.data.global_batch_size} is not divisible by the "
                            f"data-parallel size data*fsdp={dp}")
        m = config.model
        for name, size in (("n_heads", m.n_heads), ("n_kv_heads", m.n_kv_heads), ("d_ff", m.d_ff)):
            if size % shape[2]:
                raise UserError(f"config.model.{name}={size} is not divisible by mesh.tensor={shape[2]}")
    if config.data.seq_len <= 0 or config.data.max_deletions <= 0:
        raise UserError("config.data.seq_len and config.data.max_deletions must be positive")
    if not 0 <= config.data.get("max_patches_per_row", 0) <= config.data.seq_len:
        raise UserError(f"config.data.max_patches_per_row must be in [0, seq_len={config.data.seq_len}] (0 = no "
                        f"limit), got {config.data.max_patches_per_row!r}")
    if "sampler" in config:
        from oneflow_jax.sampler import SamplerConfig
        _check_fields(config.sampler, SamplerConfig, "sampler")
        try:
            SamplerConfig.from_config(config.sampler)
        except (TypeError, ValueError) as e:
            raise UserError(f"config.sampler: {e}") from None
    if "codec" in config and config.codec.get("name", "pixel_patch") == "pixel_patch":    # cheap: no weights
        from oneflow_jax.codec import make_codec
        _check_patch_budget(config, make_codec(config.codec).num_patches)


def _check_patch_budget(config, num_patches: int) -> None:
    if 0 < config.data.get("max_patches_per_row", 0) < num_patches:
        raise UserError(f"config.data.max_patches_per_row={config.data.max_patches_per_row} holds less than one "
                        f"image ({num_patches} patches with this codec)")


def _check_fields(section, cls, name: str, extra=()):
    import dataclasses
    known = {f.name for f in dataclasses.fields(cls)} | set(extra)
    unknown = sorted(set(section.keys()) - known)
    if unknown:
        raise UserError(f"unknown config.{name} key(s): {', '.join(unknown)}")


def model_config(config, vocab_size: int, codec) -> ModelConfig:
    """The ModelConfig of a run: config.model plus what the tokenizer and codec determine."""
    if config.model.get("vocab_size", 0) not in (0, vocab_size):
        raise UserError(f"config.model.vocab_size={config.model.vocab_size} but the tokenizer has {vocab_size} "
                        f"pieces (set 0 to take the tokenizer's)")
    _check_patch_budget(config, codec.num_patches)
    return _model_config(config.model, vocab_size=vocab_size, num_patches=codec.num_patches,
                         patch_dim=codec.patch_dim, patch_grid=tuple(codec.grid))


def _model_config(section, **fields) -> ModelConfig:
    """ModelConfig.from_config(section, **fields), its errors as one-line UserErrors."""
    try:
        return ModelConfig.from_config(section, **fields)
    except (TypeError, ValueError) as e:
        raise UserError(f"config.model: {e}") from None


def say(message: str) -> None:
    """A line for the user (process 0 only), also in the absl log."""
    import jax
    from absl import logging
    logging.info(message)
    if jax.process_index() == 0:
        print(message, flush=True)


def config_to_json(config) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(..., flags_parser=parse_flags)`), except that a --config.* override of a key the
    config does not have is one line and exit 2: ml_collections raises AttributeError there, which absl would show
    as a traceback."""
    import re
    from absl import app
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        text = str(e)
        key = (re.findall(r"[A-Za-z_]\w*", text) or ["?"])[0]
        flag = next((a.split("=")[0] for a in argv[1:]
                     if a.startswith("--config.") and a.split("=")[0].rsplit(".", 1)[-1] == key), "--config.*")
        hint = re.search(r'Did you mean "([^"]+)"', text)
        print(f"error: {flag}: the config has no key {key!r}" + (f" (did you mean {hint.group(1)!r}?)" if hint else ""),
              file=sys.stderr)
        sys.exit(2)


def run_cli(main: Callable) -> Callable:
    """Wraps an absl main so that UserError (and FileNotFoundError from user paths) print one line and exit 2."""
    def wrapped(argv):
        from absl import flags, logging
        if not flags.FLAGS["verbosity"].present:   # library INFO chatter (Orbax, tfds) only with --verbosity=0
            logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    return wrapped
