"""What every command shares: one-line errors for bad input (`UserError`, `run_cli`, `parse_flags`), lines for the
user (`say`) and the sampler flags that `sample`, `eval` and `compare` accept the same way.

A bad config, flag or file fails before anything compiles, with one line that says what is wrong and exit status 2.
"""
from __future__ import annotations

import json
import re
import sys
from typing import Callable


class UserError(Exception):
    """A problem with what the user asked for (config, flags, files); printed as one line, exit code 2."""


class RunError(Exception):
    """A run stopped by its environment (a full disk, lost storage): one line, exit code 1; rerunning resumes."""


def say(message: str, every_process: bool = False) -> None:
    """A line for the user (process 0 only, unless `every_process`), also in the absl log."""
    import jax
    from absl import logging
    logging.info(message)
    if every_process or jax.process_index() == 0:
        print(message, flush=True)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(..., flags_parser=parse_flags)`), except that a --config.* override of a key the
    config does not have is one line and exit 2: ml_collections raises AttributeError there, which absl would show
    as a traceback."""
    from absl import flags
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:          # a bad flag value, or a --config file that fails to load: one line, not usage
        lines = [line.strip() for line in str(e).splitlines() if line.strip() and "Traceback" not in line]
        where = re.match(r"(?:flag )?(--[\w.]+)", lines[0]) if lines else None
        flag = where.group(1) if where else ""
        if flag == "--config":
            flag = f"--config {_config_arg()}"
        print(f"error: {flag + ': ' if flag else ''}{lines[-1] if lines else e}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as e:
        text = str(e)
        key = (re.findall(r"[A-Za-z_]\w*", text) or ["?"])[0]
        flag = next((a.split("=")[0] for a in argv[1:]
                     if a.startswith("--config.") and a.split("=")[0].rsplit(".", 1)[-1] == key), "--config.*")
        hint = re.search(r'Did you mean "([^"]+)"', text)
        print(f"error: {flag}: the config has no key {key!r}" + (f" (did you mean {hint.group(1)!r}?)" if hint else ""),
              file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # pylint: disable=broad-except  (a --config file whose python fails while it loads)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        print(f"error: --config {_config_arg()}: {type(e).__name__}: {lines[-1] if lines else ''}", file=sys.stderr)
        sys.exit(2)


def _config_arg() -> str | None:
    """The --config value on the command line (as given, variant included)."""
    given = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), None)
    if given is None and "--config" in sys.argv[:-1]:
        given = sys.argv[sys.argv.index("--config") + 1]
    return given


def run_cli(main: Callable) -> Callable:
    """Wraps an absl main so that a UserError prints one line and exits 2, a RunError one line and exits 1."""
    def wrapped(argv):
        from absl import flags, logging
        if not flags.FLAGS["verbosity"].present:   # library INFO chatter (Orbax, tfds) only with --verbosity=0
            logging.set_verbosity(logging.WARNING)
        load_config_flag(argv)
        sys.unraisablehook = _drop_closed_event_loop_callbacks
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except RunError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
    return wrapped


def _drop_closed_event_loop_callbacks(unraisable) -> None:
    """sys.unraisablehook without the noise of a failed Orbax write: tensorstore's late callbacks into the asyncio
    loop that Orbax already closed (one traceback per array, hundreds per checkpoint). Everything else is shown."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def load_config_flag(argv) -> None:
    """Loads a --config file now (ml_collections loads it lazily, on first use), so that a missing file, a python
    error in it or an unknown variant is one line and exit 2 instead of a traceback from deep inside a command."""
    from absl import flags
    if "config" not in flags.FLAGS or not flags.FLAGS["config"].present:
        return
    value = flags.FLAGS["config"].value
    if value is None or isinstance(value, str):       # not a config file flag (e.g. `datasets --config JSON`)
        return
    try:
        _ = value.keys()              # any attribute access makes ml_collections load the file
    except Exception as e:  # pylint: disable=broad-except  (OSError, SyntaxError, NameError, ValueError, ...)
        cause = e.__cause__ or e
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        print(f"error: --config {_config_arg()}: {type(cause).__name__}: {lines[-1] if lines else ''}",
              file=sys.stderr)
        sys.exit(2)


def no_extra_args(argv) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")


# ------------------------------------------------------------------------------------------------ sampler flags

SAMPLER_SHORTHANDS = {"steps": int, "temperature": float, "text_cfg": float, "image_cfg": float}


def define_distributed_flags() -> None:
    """--coordinator_address / --num_processes / --process_id, or --distributed, for multi-process commands."""
    from absl import flags
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs (jax.distributed).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM).")


def init_distributed() -> None:
    """jax.distributed for multi-process runs (the flags of `define_distributed_flags`); CPU processes use gloo."""
    import os
    import jax
    from absl import flags
    f = flags.FLAGS
    if f.coordinator_address or f.num_processes:
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
    elif f.distributed:
        jax.distributed.initialize()


def define_sampler_flags() -> None:
    """--sampler (a JSON object of sampling.common.SamplerConfig fields) and shorthands for the common ones; each
    overrides the run's config.sampler. Defined by `sample`, `eval` and `compare`."""
    from absl import flags
    flags.DEFINE_string("sampler_preset", None, "Named sampler settings applied before --sampler: "
                        "'alg1' (the paper's Alg. 1 exactly) or 'confident' (sampling.common.PRESETS).")
    flags.DEFINE_string("sampler", None, "JSON object of sampler overrides of the run's config.sampler, e.g. "
                        "'{\"steps\": 16, \"temperature\": 0.3}' (fields: sampling.common.SamplerConfig).")
    flags.DEFINE_integer("steps", None, "Sampler steps (shorthand for --sampler '{\"steps\": N}').")
    flags.DEFINE_float("temperature", None, "Temperature of Q (shorthand).")
    flags.DEFINE_float("text_cfg", None, "Text guidance weight w of Eq. 12 (shorthand).")
    flags.DEFINE_float("image_cfg", None, "Image velocity guidance weight (shorthand).")


def sampler_overrides() -> dict:
    """The sampler overrides the flags of define_sampler_flags ask for: --sampler's JSON, then the shorthands."""
    import dataclasses

    from absl import flags
    from oneflow_jax.sampling.common import PRESETS, SamplerConfig
    f = flags.FLAGS
    overrides = {}
    if f.sampler_preset is not None:
        if f.sampler_preset not in PRESETS:
            raise UserError(f"--sampler_preset must be one of {', '.join(PRESETS)}, got {f.sampler_preset!r}")
        overrides = dict(PRESETS[f.sampler_preset])
    if f.sampler:
        try:
            given = json.loads(f.sampler)
        except json.JSONDecodeError as e:
            raise UserError(f"--sampler is not JSON: {e}") from None
        if not isinstance(given, dict):
            raise UserError(f"--sampler must be a JSON object, got {f.sampler!r}")
        overrides.update(given)
    overrides.update({k: f[k].value for k in SAMPLER_SHORTHANDS if f[k].value is not None})
    known = {field.name for field in dataclasses.fields(SamplerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"--sampler: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return overrides
