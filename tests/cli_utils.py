"""Shared pieces of the end-to-end tests (test_train.py, test_cli.py): the commands run exactly as a user runs them,
in subprocesses on fake CPU devices.

Loaded with `pytest_plugins = ("cli_utils",)` so that its session fixtures exist once per test session:
  cli          a `Cli` bound to one prepared shapes-world (TFDS_DATA_DIR in a tmp dir) and one JAX compilation cache,
               so each configuration compiles once per session however many runs use it.
  trained_run  the reference run every other test compares with or starts from: the smoke config on 8 devices with
               mesh data=2, fsdp=2, tensor=2, 12 steps, a checkpoint every 2 steps, every step logged. Tests that
               resume or write into it work on a copy (`copy_workdir`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = "configs/shapes_tiny.py:smoke"
TOTAL_STEPS = 12
# The reference run's config overrides. Runs compared with it bit for bit use exactly these (see `train_args`).
REFERENCE_OVERRIDES = {
    "total_steps": TOTAL_STEPS, "ckpt_every": 2, "log_every": 1, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
    # The global batch is assembled from 2 data streams whatever the process count, so a 2-process run sees the
    # same batches as the 1-process reference.
    "data.num_streams": 2,
}
REFERENCE_DEVICES = 8
METRIC_KEYS = ("step", "loss", "text_loss", "image_loss", "lr", "grad_norm", "steps_per_sec", "tokens_per_sec",
               "skipped_records")
# What must be identical, step by step, between an interrupted-and-resumed run and an uninterrupted one.
EXACT_KEYS = ("loss", "text_loss", "image_loss", "grad_norm", "lr", "skipped_records")


@dataclasses.dataclass
class Result:
    """A finished command: exit status and its whole output."""
    args: list
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        tail = lambda s: "\n".join(s.splitlines()[-40:])
        return (f"$ {' '.join(map(str, self.args))}\n-> exit {self.returncode}\n--- stdout (tail)\n{tail(self.stdout)}"
                f"\n--- stderr (tail)\n{tail(self.stderr)}")

    def check(self) -> "Result":
        assert self.returncode == 0, str(self)
        return self


class Started:
    """A command running in the background, its output going to files (polling it never blocks on a pipe)."""

    def __init__(self, args, env, log_dir: Path):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.args = args
        self._out, self._err = log_dir / "stdout.txt", log_dir / "stderr.txt"
        with open(self._out, "w") as out, open(self._err, "w") as err:
            # Its own process group, so that `stop` also ends what it started (the launcher's train processes).
            self.process = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)

    def send(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 300) -> Result:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, self.args))}")
        return Result(self.args, self.process.returncode, self._out.read_text(), self._err.read_text())

    def stop(self) -> None:
        """SIGKILLs this command's process group (the command and anything it started) unless it was reaped already
        (until then its group id cannot belong to anyone else)."""
        if self.process.returncode is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()


class Cli:
    """Runs `python -m oneflow_jax.<module> ...` (and launch/ scripts) from the repository root."""

    def __init__(self, data_dir: Path, cache_dir: Path, scratch: Path):
        self.data_dir, self.cache_dir, self._scratch = data_dir, cache_dir, scratch
        self.started: list[Started] = []

    def env(self, devices: int) -> dict:
        env = dict(os.environ)
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device")]
        env.update(       # the suite's other XLA flags (tests/run.sh) hold in every command too
            JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
            TFDS_DATA_DIR=str(self.data_dir), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
            JAX_COMPILATION_CACHE_DIR=str(self.cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
            # a size limit turns on the cache's file lock: processes that share it never read a half-written entry
            JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30))
        return env

    def _module_args(self, module: str, args) -> list:
        return [sys.executable, "-m", f"oneflow_jax.{module}", *map(str, args)]

    def run(self, module: str, *args, devices: int = 1, timeout: float = 300) -> Result:
        """Runs the command to completion (not checked: see `Result.check`)."""
        return self.run_many([(module, args)], devices=devices, timeout=timeout)[0]

    def run_many(self, commands, devices: int = 1, timeout: float = 300) -> list[Result]:
        """Runs [(module, args)] concurrently (e.g. a batch of commands expected to fail early); results in order."""
        started = [self.start(module, *args, devices=devices) for module, args in commands]
        return [s.wait(timeout) for s in started]

    def run_script(self, script: str, *args, devices: int = 1, timeout: float = 300) -> Result:
        """Runs `python <script> ...` (a path relative to the repository root, e.g. a benchmark) to completion."""
        return self._start([sys.executable, str(REPO / script), *map(str, args)], self.env(devices)).wait(timeout)

    def start(self, module: str, *args, devices: int = 1) -> Started:
        return self._start(self._module_args(module, args), self.env(devices))

    def start_multiprocess(self, num_processes: int, *args, devices_per_process: int, module: str = "train") -> Started:
        """launch/local_multiprocess.sh N <args>: N processes of `module` over gloo on loopback."""
        argv = ["bash", str(REPO / "launch" / "local_multiprocess.sh"), str(num_processes), *map(str, args)]
        return self._start(argv, {**self.env(devices_per_process), "MODULE": module})

    def _start(self, args, env) -> Started:
        self.started.append(Started(args, env, self._scratch / f"command_{len(self.started):03d}"))
        return self.started[-1]

    def stop_all(self) -> None:
        """Ends whatever a failed test left running."""
        for started in self.started:
            started.stop()


# ------------------------------------------------------------------------------------------------ run dirs

def train_args(workdir: Path, changes: dict | None = None) -> list[str]:
    """The train command-line of the reference run in `workdir`, with some config overrides changed."""
    overrides = {**REFERENCE_OVERRIDES, **(changes or {})}
    return [f"--config={SMOKE_CONFIG}", f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]


def read_metrics(workdir: Path) -> list[dict]:
    """metrics.jsonl rows (a line still being written is ignored)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def metrics_by_step(workdir: Path) -> dict[int, dict]:
    """{step: row}; fails on a step logged twice (a resumed run must not duplicate lines)."""
    rows = read_metrics(workdir)
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged more than once in {workdir}/metrics.jsonl: {steps}"
    return {r["step"]: r for r in rows}


def exact_metrics(workdir: Path) -> dict[int, tuple]:
    """{step: (loss, text_loss, ...)} of the values that do not depend on timing."""
    return {step: tuple(row[k] for k in EXACT_KEYS) for step, row in metrics_by_step(workdir).items()}


def checkpoint_steps(workdir: Path) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def copy_workdir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def wait_for_step(started: Started, workdir: Path, step: int, timeout: float = 300) -> int:
    """Polls metrics.jsonl until it shows `step` or later; returns the step seen. Fails if the run exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = read_metrics(workdir)
        if rows and rows[-1]["step"] >= step:
            return rows[-1]["step"]
        if started.process.poll() is not None:
            pytest.fail(f"the run exited before step {step}:\n{started.wait()}")
        time.sleep(0.02)
    started.stop()
    pytest.fail(f"no step {step} in {workdir}/metrics.jsonl after {timeout} s")


def resumed_step(result: Result) -> int | None:
    """The step of the 'resumed from checkpoint step N' line, if any."""
    for line in result.stdout.splitlines():
        if "resumed from checkpoint step" in line:
            return int(line.split("resumed from checkpoint step")[1].split()[0])
    return None


def assert_one_line_error(result: Result, *fragments: str) -> str:
    """A clean CLI failure: non-zero exit, no Python traceback, one `error: ...` line naming what is wrong."""
    assert result.returncode != 0, str(result)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, str(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected exactly one 'error:' line\n{result}"
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}\n{result}"
    return errors[0]


def all_finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def cli(tmp_path_factory, prepared_data_dir, worker_id) -> Cli:
    """A copy of the prepared shapes-world and its tokenizer (conftest.prepared_data_dir) in a session tmp dir, and
    one JAX compilation cache for the whole test run (both xdist workers: a program compiles once per run)."""
    from conftest import shared_dir
    data_dir = tmp_path_factory.mktemp("tfds")
    shutil.copytree(prepared_data_dir, data_dir, dirs_exist_ok=True)
    cli = Cli(data_dir, shared_dir(tmp_path_factory, worker_id, "jax_cache"), tmp_path_factory.mktemp("logs"))
    yield cli
    cli.stop_all()


@dataclasses.dataclass
class TrainedRun:
    workdir: Path
    result: Result


@pytest.fixture(scope="session")
def trained_run(cli, tmp_path_factory) -> TrainedRun:
    workdir = tmp_path_factory.mktemp("reference") / "run"
    result = cli.run("train", *train_args(workdir), devices=REFERENCE_DEVICES).check()
    return TrainedRun(workdir, result)
