"""Checkpoints of a training run: train state, data-iterator state and JSON metadata, with Orbax.

Layout of a run's workdir W:
  W/config.json                              the train config (`save_config` / `load_config`), JSON only
  W/checkpoints/<step>/state/                the train-state pytree (Orbax PyTreeSave: OCDBT + zarr)
  W/checkpoints/<step>/meta/metadata.json    JSON {"user": <metadata dict>, "has_data_iter": bool, "step", "time"}
  W/checkpoints/<step>/data_iter/process_<i>-of-<n>.json   each process's data-iterator state (JSON)
  W/checkpoints.corrupt/<step>-<unix time>/  unreadable steps moved aside by `Checkpointer.restore`

Typical train loop:
    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints, save_every=config.ckpt_every)
    if ckpt.latest_step() is not None:
        state, meta, step = ckpt.restore(abstract_state, data_iter)
    with PreemptionGuard() as guard:
        for step in ...:
            state = train_step(state, next(data_iter))
            ckpt.save(step, state, data_iter, metadata)            # saves only every `save_every` steps
            if guard.should_stop(step):
                ckpt.save(step, state, data_iter, metadata, force=True)
                break
    ckpt.close()                                                  # waits for the async write to be committed

All processes of a multi-process run call every method here (Orbax coordinates them); JSON side files that are
global (config.json, meta) are written by process 0 only, the data-iterator state by every process.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging as std_logging
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from oneflow_jax.cli import RunError

_TMP_SUFFIX = ".orbax-checkpoint-tmp"   # Orbax's marker of a step directory that was never committed
_META_FILE = "metadata.json"


# ------------------------------------------------------------------------------------------------ data iterator

class _IterStateHandler(ocp.CheckpointHandler):
    """Orbax handler for one JSON text per process (the encoded data-iterator state), like Grain's own handler.

    The text is produced when `Checkpointer.save` is called, so async saves capture the iterator's position at the
    save call even though the training loop keeps consuming it afterwards.
    """

    def save(self, directory: epath.Path, args: "_IterStateSave"):
        (directory / _process_file()).write_text(args.text)

    def restore(self, directory: epath.Path, args: "_IterStateRestore | None" = None) -> str:
        path = directory / _process_file()
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
            raise FileNotFoundError(f"no data-iterator state {path} (found {found}); a checkpoint's iterator state "
                                    "can only be restored by the same number of processes that saved it")
        return path.read_text()


@ocp.args.register_with_handler(_IterStateHandler, for_save=True)
@dataclasses.dataclass
class _IterStateSave(ocp.args.CheckpointArgs):
    text: str


@ocp.args.register_with_handler(_IterStateHandler, for_restore=True)
@dataclasses.dataclass
class _IterStateRestore(ocp.args.CheckpointArgs):
    pass


def _process_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _encode_iter_state(state) -> str:
    """`get_state()` result -> JSON text: dicts (Grain DatasetIterator) as JSON, bytes (DataLoader) as base64."""
    if isinstance(state, (bytes, bytearray)):
        return json.dumps({"kind": "bytes", "state": base64.b64encode(bytes(state)).decode("ascii")})
    return json.dumps({"kind": "json", "state": state}, default=_json_default)


def _decode_iter_state(text: str):
    record = json.loads(text)
    if record["kind"] == "bytes":
        return base64.b64decode(record["state"])
    return record["state"]


# ------------------------------------------------------------------------------------------------ helpers

def _json_default(x):
    """json.dumps fallback for numpy / jax scalars and arrays."""
    if isinstance(x, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    raise TypeError(f"checkpoint metadata must be JSON-serializable, got {type(x).__name__}: {x!r}")


def _as_abstract(tree):
    """Checks that every array leaf of a restore target carries a sharding; concrete arrays become abstract."""
    def leaf(path, x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
            raise ValueError(f"abstract_state{jax.tree_util.keystr(path)} has no sharding: pass "
                             "jax.ShapeDtypeStruct(shape, dtype, sharding=...) leaves (the target layout)")
        return x
    return jax.tree_util.tree_map_with_path(leaf, tree)


def _all_processes(ok: bool) -> bool:
    """True iff `ok` holds on every process (a no-op in single-process runs)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------------ checkpointer

class CheckpointWriteError(RunError, RuntimeError):
    """A checkpoint could not be written (full disk, lost storage); the message names the last complete step."""


def absolute(path) -> epath.Path:
    """`path` as an epath.Path; a local path made absolute (URLs such as gs://... are left as they are)."""
    path = epath.Path(path)
    return path if "://" in str(path) else epath.Path(os.path.abspath(str(path)))


class Checkpointer:
    """Orbax CheckpointManager over `workdir/checkpoints` that keeps the latest `keep` steps.

    `async_save`: `save` returns once the arrays are copied off the devices; the files are written in a background
    thread and committed (atomically renamed) when done. The next `save`, `wait` and `close` wait for it.
    `save_every`: a non-forced `save(step, ...)` only writes when `step % save_every == 0` (or when JAX's
    multi-host preemption sync point is reached); call `save` every step and let it decide, or force it.
    Steps that were never committed (a process killed mid-write leaves `<step>.orbax-checkpoint-tmp-*`) are
    ignored with a warning and deleted.
    `keep`: old steps are deleted (with a log line) only once a newer save has been committed, so a save that fails
    (a full disk) never costs a checkpoint that was already written. A failed write raises `CheckpointWriteError`
    from the next `save`, `wait` or `close`, naming the last complete step.
    """

    def __init__(self, workdir, keep: int, async_save: bool = True, save_every: int = 1):
        if int(keep) < 1 or int(save_every) < 1:
            raise ValueError(f"keep and save_every must be >= 1, got keep={keep}, save_every={save_every}")
        self.directory = absolute(workdir) / "checkpoints"     # Orbax refuses relative paths
        self._keep, self._async = int(keep), async_save
        self._pending = None            # the step an async save is writing, until it is known committed
        self._warn_uncommitted()
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy([policies.FixedIntervalPolicy(int(save_every)),
                                                         policies.PreemptionCheckpointingPolicy()]),
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
        handlers = dict(state=ocp.PyTreeCheckpointHandler(), meta=ocp.JsonCheckpointHandler(_META_FILE),
                        data_iter=_IterStateHandler())
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._closed = False

    def _warn_uncommitted(self) -> None:
        if jax.process_index() != 0 or not self.directory.exists():
            return
        for path in sorted(self.directory.iterdir()):
            if _TMP_SUFFIX in path.name:
                logging.warning("ignoring the unfinished checkpoint %s (the run stopped while writing it); "
                                "it will be deleted", path)

    def all_steps(self) -> list[int]:
        """Committed steps, ascending (including an async save still being written)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None. `restore` may still fall back to an older one if it is unreadable."""
        return self._manager.latest_step()

    def save(self, step: int, state, data_iter=None, metadata: dict | None = None, force: bool = False) -> bool:
        """Saves `state` (a pytree of jax arrays: params, opt_state, step, rng ...) as checkpoint `step`.

        `data_iter`: an object with `get_state() -> dict | bytes` (e.g. a Grain iterator); its state is read now.
        `metadata`: a JSON-serializable dict (numpy/jax scalars are converted), returned by `restore`.
        Returns True if a save was started: False when `step` is not a multiple of `save_every` (unless `force`)
        or when checkpoint `step` already exists (never overwritten). Asynchronous; see `wait`.
        """
        step = int(step)
        if not force and not self._manager.should_save(step):
            return False
        self._wait_committed()
        if step in self._manager.all_steps():
            logging.info("checkpoint step %d already exists in %s; not saving it again", step, self.directory)
            return False
        meta = {"user": json.loads(json.dumps(metadata or {}, default=_json_default)),
                "has_data_iter": data_iter is not None, "step": step, "time": time.time()}
        items = dict(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
        if data_iter is not None:
            items["data_iter"] = _IterStateSave(_encode_iter_state(data_iter.get_state()))
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:   # a synchronous write (async_save=False) that failed
            raise CheckpointWriteError(self._write_failure(step, e)) from e
        if saved:
            self._pending = step
            logging.info("saving checkpoint step %d to %s", step, self.directory)
            if not self._async:
                self._wait_committed()
        return saved

    def committed_steps(self) -> list[int]:
        """The steps whose write finished, read from the directory (not Orbax's in-memory list), ascending."""
        if not self.directory.exists():
            return []
        return sorted(int(s) for s in ocp.path.step.checkpoint_steps(self.directory))

    def _wait_committed(self) -> None:
        """Waits for the pending async save; raises CheckpointWriteError if it failed, else prunes to `keep`."""
        pending, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointWriteError(self._write_failure(pending, e)) from e
        if pending is None:
            return
        committed = self.committed_steps()
        if pending not in committed:                  # Orbax logged the error but raised nothing
            raise CheckpointWriteError(self._write_failure(pending, "its files were not committed"))
        older = [s for s in committed if s < pending]
        for s in older[:max(len(older) - (self._keep - 1), 0)]:
            logging.info("deleting checkpoint step %d from %s (keeping the latest %d)", s, self.directory, self._keep)
            self._manager.delete(s)

    def _write_failure(self, step, error) -> str:
        first = " ".join(str(error).split()) or type(error).__name__
        if len(first) > 240:     # the tail says why ("No space left on device"); the head is the tensorstore path
            first = "..." + first[-200:]
        # asyncio reports this error again for every array's write task when the tasks are collected (at exit):
        # hundreds of tracebacks after the one line that matters. They are the same failure; silence them.
        std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
        done = [s for s in self.committed_steps() if s != step]
        last = f"the last complete checkpoint is step {done[-1]}" if done else "no complete checkpoint exists yet"
        return (f"could not write checkpoint step {step} to {self.directory}: {first[:400]}; {last} "
                f"(free space or fix the storage, then rerun to resume from it)")

    def restore(self, abstract_state, data_iter=None, step: int | None = None,
                partial: bool = False) -> tuple[Any, dict, int]:
        """Restores `(state, metadata, step)`; with `data_iter`, also calls `data_iter.set_state(saved state)`.

        `partial=True` reads only the top-level entries `abstract_state` names (e.g. `{"params": ...}` for sampling,
        leaving the optimizer moments on disk); otherwise its structure must match the saved state exactly.

        `abstract_state`: the state's pytree structure with `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`
        (or jax.Array) leaves; arrays are read straight into those shardings, so the mesh / device count may
        differ from the one that saved. `step=None` restores the newest readable step: a step that fails to
        restore (truncated or missing files, bad JSON, ...) is skipped with a warning and, once an older step
        restored, moved to `checkpoints.corrupt/` so training can save those step numbers again. An explicit
        `step` is restored or raises. Raises FileNotFoundError if there is no checkpoint at all, RuntimeError if
        no step is readable (then nothing is moved). The iterator is only touched after a successful restore.
        """
        abstract_state = _as_abstract(abstract_state)
        if step is not None:
            try:
                state, meta, iter_text = self._restore_step(int(step), abstract_state, data_iter, partial)
            except Exception as e:
                raise RuntimeError(f"cannot restore checkpoint step {step} from {self.directory}: {e}") from e
            return self._finish_restore(state, meta, int(step), data_iter, iter_text)

        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        failed = []
        for s in steps:
            try:
                state, meta, iter_text = self._restore_step(s, abstract_state, data_iter, partial)
            except Exception as e:  # any unreadable checkpoint is skipped, whatever the reason
                logging.warning("checkpoint step %d in %s is unreadable or incomplete, falling back to an older "
                                "one: %s: %s", s, self.directory, type(e).__name__, str(e)[:500])
                failed.append((s, e))
                continue
            self._quarantine([f for f, _ in failed])
            return self._finish_restore(state, meta, s, data_iter, iter_text)
        s, error = failed[-1]
        raise RuntimeError(f"none of the checkpoints {steps} in {self.directory} could be restored; step {s} "
                           f"failed with {type(error).__name__}: {error}") from error

    def _restore_step(self, step: int, abstract_state, data_iter, partial: bool = False):
        """Reads one step; raises on every process alike if any process cannot read its part."""
        try:    # JSON side items: read directly (no Orbax barriers), then agree across processes
            step_dir = self.directory / str(step)
            meta = json.loads((step_dir / "meta" / _META_FILE).read_text())
            if not isinstance(meta, dict) or not isinstance(meta.get("user"), dict):
                raise ValueError(f"malformed checkpoint metadata: {meta!r}")
            with_iter = data_iter is not None and meta.get("has_data_iter", False)
            iter_text = _IterStateHandler().restore(step_dir / "data_iter") if with_iter else None
            error = None
        except Exception as e:
            error = e
        if not _all_processes(error is None):
            raise error or RuntimeError("another process could not read its part of this checkpoint")
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype),
                                    abstract_state)
        args = ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args, partial_restore=partial)
        return self._manager.restore(step, args=ocp.args.Composite(state=args)).state, meta, iter_text

    def _finish_restore(self, state, meta, step, data_iter, iter_text):
        if iter_text is not None:
            data_iter.set_state(_decode_iter_state(iter_text))
        elif data_iter is not None:
            logging.warning("checkpoint step %d has no data-iterator state; the iterator is left where it is", step)
        logging.info("restored checkpoint step %d from %s", step, self.directory)
        return state, meta["user"], step

    def _quarantine(self, steps: list[int]) -> None:
        """Moves unreadable step directories to `checkpoints.corrupt/` (process 0; all processes reload)."""
        if not steps:
            return
        if jax.process_index() == 0:
            target = self.directory.parent / (self.directory.name + ".corrupt")
            target.mkdir(parents=True, exist_ok=True)
            for s in steps:
                destination = target / f"{s}-{int(time.time())}"
                logging.warning("moving unreadable checkpoint step %d to %s", s, destination)
                (self.directory / str(s)).rename(destination)
        _sync("checkpointing_quarantine")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until the pending async save is committed (raises CheckpointWriteError if it failed)."""
        self._wait_committed()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's threads. Call before the process exits; raises
        CheckpointWriteError if the last save failed (the threads are released either way)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._wait_committed()
        finally:
            try:
                self._manager.close()
            except Exception:  # pylint: disable=broad-except  (the write error was raised above already)
                pass

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ preemption

def _preemption_service_active() -> bool:
    """Whether jax.distributed's preemption service (which owns SIGTERM) is running in this process."""
    try:
        from jax._src import distributed
        state = distributed.global_state
        return state.client is not None and state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


def _reached_preemption_sync_point(step: int) -> bool:
    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:                  # preemption service disabled
        return False


class PreemptionGuard:
    """Context manager that turns SIGTERM / SIGINT into a stop request instead of killing the process.

        with PreemptionGuard() as guard:
            ...
            if guard.should_stop(step): save(force=True); wait(); break     # then exit with status 0

    A second SIGINT raises KeyboardInterrupt (Ctrl-C twice stops at once). Previous handlers come back on exit.
    Multi-process: `should_stop(step)` must be called by every process at the same steps; it returns True on all
    of them at once if any process got a signal or JAX's preemption sync point is reached. When jax.distributed
    runs its preemption service, that service keeps SIGTERM and no Python SIGTERM handler is installed.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self.received: int | None = None      # the first signal number received

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered in the main thread (signal handlers live there)")
        for sig in self._signals:
            if sig == signal.SIGTERM and _preemption_service_active():
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        logging.warning("received %s: will checkpoint and stop at the next step", signal.Signals(signum).name)

    def should_stop(self, step: int | None = None) -> bool:
        """True once a stop was requested (a signal, or JAX's multi-host preemption notice at `step`)."""
        stop = self.received is not None
        if jax.process_count() == 1:
            return stop
        if step is None:
            raise ValueError("should_stop needs the step in multi-process runs (all processes must agree)")
        return _any_process(stop) or _reached_preemption_sync_point(int(step))


# ------------------------------------------------------------------------------------------------ config

def save_config(workdir, config: ml_collections.ConfigDict) -> None:
    """Writes `config` as JSON to `workdir/config.json` (process 0 only; atomic replace)."""
    if jax.process_index() != 0:
        return
    directory = epath.Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "config.json.tmp"
    tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    tmp.replace(directory / "config.json")


def load_config(workdir) -> ml_collections.ConfigDict:
    """Reads `workdir/config.json` back into a ConfigDict."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no saved config {path}")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def config_hash(config: ml_collections.ConfigDict) -> str:
    """A short stable hash of the config's JSON (for checkpoint metadata: did the config change on resume?)."""
    canonical = json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
