"""The train CLI end to end, run as users run it, on fake CPU devices: sharded training, multi-process runs, exact
resume after kill -9 / SIGTERM, resharding on resume, corrupt-checkpoint fallback, and clean config errors.

Everything is compared with `trained_run` (cli_utils.py): the 12-step smoke run on mesh data=2, fsdp=2, tensor=2.
"""
from __future__ import annotations

import os
import signal
import shutil
import statistics

import numpy as np
import pytest

pytest.register_assert_rewrite("cli_utils")
from cli_utils import (METRIC_KEYS, REFERENCE_DEVICES, REPO, SMOKE_CONFIG, TOTAL_STEPS,  # noqa: E402
                       all_finite, assert_one_line_error, checkpoint_steps, copy_workdir, exact_metrics,
                       metrics_by_step, resumed_step, train_args, wait_for_step)

pytest_plugins = ("cli_utils",)


def test_sharded_run_logs_metrics_tensorboard_and_checkpoints(trained_run):
    workdir = trained_run.workdir
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in trained_run.result.stdout
    rows = metrics_by_step(workdir)
    assert sorted(rows) == list(range(1, TOTAL_STEPS + 1))
    for step, row in rows.items():
        assert set(METRIC_KEYS) <= set(row), f"step {step}: missing {set(METRIC_KEYS) - set(row)}"
        assert all_finite(row[k] for k in METRIC_KEYS), row
        assert row["steps_per_sec"] > 0 and row["tokens_per_sec"] > 0 and row["grad_norm"] > 0
    losses = [rows[s]["loss"] for s in sorted(rows)]
    assert statistics.mean(losses[-3:]) < 0.8 * statistics.mean(losses[:3]), losses
    assert list((workdir / "tb").rglob("events.out.tfevents.*")), "no TensorBoard events file in W/tb"
    assert checkpoint_steps(workdir) == [8, 10, 12]          # every 2 steps, the latest 3 kept
    assert (workdir / "config.json").exists() and (workdir / "tokenizer.model").exists()


FOUR_DEVICE_MESH = {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 1}


@pytest.fixture(scope="module")
def new_topology_runs(cli, trained_run, tmp_path_factory):
    """The two runs whose programs the reference did not compile: 2 processes x 4 devices from scratch, and 1 process
    x 4 devices resuming the reference's step-10 checkpoint (saved on 8). XLA compiles on one core, so they run side
    by side. Returns {name: (workdir, Result)}."""
    base = tmp_path_factory.mktemp("new_topologies")
    two_processes = base / "two_processes"
    four_devices = copy_workdir(trained_run.workdir, base / "four_devices")
    shutil.rmtree(four_devices / "checkpoints" / "12")       # resume mid-run, from step 10
    started = {
        "two_processes": (two_processes, cli.start_multiprocess(2, *train_args(two_processes, {"ckpt_every": 6}),
                                                                 devices_per_process=4)),
        "four_devices": (four_devices, cli.start("train", *train_args(four_devices, FOUR_DEVICE_MESH), devices=4)),
    }
    return {name: (workdir, run.wait(timeout=600)) for name, (workdir, run) in started.items()}


def test_two_processes_match_one_process(new_topology_runs, trained_run):
    """jax.distributed over gloo: 2 processes x 4 devices = the reference's 8 devices and mesh -> the same losses."""
    workdir, result = new_topology_runs["two_processes"]
    result.check()
    assert f"[0] train step {TOTAL_STEPS}/{TOTAL_STEPS}" in result.stdout, str(result)
    assert "2 process(es), 8 device(s)" in result.stdout, str(result)
    got, want = metrics_by_step(workdir), metrics_by_step(trained_run.workdir)
    assert sorted(got) == sorted(want)
    for step in sorted(want):
        for key in ("loss", "text_loss", "image_loss"):
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-5, err_msg=f"step {step} {key}")
        assert got[step]["skipped_records"] == want[step]["skipped_records"], f"step {step}: counted over all processes"
    assert checkpoint_steps(workdir) == [6, 12]
    iter_states = sorted(p.name for p in (workdir / "checkpoints" / "12" / "data_iter").glob("process_*.json"))
    assert iter_states == ["process_0-of-2.json", "process_1-of-2.json"]


def test_resume_on_4_devices_from_a_checkpoint_saved_on_8(new_topology_runs, trained_run):
    workdir, result = new_topology_runs["four_devices"]
    result.check()
    assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}; 1 process(es), 4 device(s)" in result.stdout, str(result)
    assert resumed_step(result) == 10, str(result)
    got, want = metrics_by_step(workdir), metrics_by_step(trained_run.workdir)
    assert sorted(got) == list(range(1, TOTAL_STEPS + 1))
    for step in (11, 12):
        assert all_finite(got[step][k] for k in METRIC_KEYS), got[step]
        # Same params, optimizer state and data; only the reduction order differs from the 8-device run.
        np.testing.assert_allclose(got[step]["loss"], want[step]["loss"], rtol=1e-4, err_msg=f"step {step}")
    assert checkpoint_steps(workdir)[-1] == TOTAL_STEPS


def test_multiprocess_launcher_fails_when_a_process_fails(cli, tmp_path):
    result = cli.start_multiprocess(2, f"--config={SMOKE_CONFIG}", f"--workdir={tmp_path / 'run'}", "--no_such_flag=1",
                                    devices_per_process=1).wait(timeout=120)
    assert result.returncode != 0, str(result)
    # Each process's lines carry its id (the first failure stops the other, which may not get to print).
    prefixed = [line for line in result.stderr.splitlines() if line.startswith(("[0] ", "[1] "))]
    assert any("no_such_flag" in line for line in prefixed), str(result)
    assert "local_multiprocess: process" in result.stderr, str(result)


def test_kill9_then_rerun_matches_the_uninterrupted_run(cli, trained_run, tmp_path):
    workdir = tmp_path / "run"
    run = cli.start("train", *train_args(workdir), devices=REFERENCE_DEVICES)
    wait_for_step(run, workdir, 5)
    run.send(signal.SIGKILL)
    assert run.wait().returncode == -signal.SIGKILL
    killed_at = max(metrics_by_step(workdir))
    assert killed_at < TOTAL_STEPS, "the run finished before it was killed"

    resumed = cli.run("train", *train_args(workdir), devices=REFERENCE_DEVICES).check()
    start = resumed_step(resumed)
    assert start is not None and 2 <= start <= killed_at, str(resumed)
    # Every step (those before the kill, those redone after the restored step) is bit-identical to the reference.
    assert exact_metrics(workdir) == exact_metrics(trained_run.workdir)


def test_sigterm_checkpoints_exits_0_and_resumes(cli, trained_run, tmp_path):
    workdir = tmp_path / "run"
    run = cli.start("train", *train_args(workdir), devices=REFERENCE_DEVICES)
    wait_for_step(run, workdir, 3)
    run.send(signal.SIGTERM)
    stopped = run.wait()
    assert stopped.returncode == 0, str(stopped)
    stop_step = max(metrics_by_step(workdir))
    assert stop_step < TOTAL_STEPS, "the run finished before SIGTERM arrived"
    assert f"stopped by signal at step {stop_step}" in stopped.stderr, str(stopped)
    assert checkpoint_steps(workdir)[-1] == stop_step

    resumed = cli.run("train", *train_args(workdir), devices=REFERENCE_DEVICES).check()
    assert resumed_step(resumed) == stop_step, str(resumed)
    assert exact_metrics(workdir) == exact_metrics(trained_run.workdir)


def _corrupt_files(directory):
    """Overwrites every file below `directory` with garbage of the same size (bit rot, a torn write)."""
    rng = np.random.default_rng(0)
    corrupted = 0
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            size = max(os.path.getsize(path), 16)
            with open(path, "wb") as f:
                f.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
            corrupted += 1
    assert corrupted, f"nothing to corrupt in {directory}"


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(cli, trained_run, tmp_path):
    workdir = copy_workdir(trained_run.workdir, tmp_path / "run")
    _corrupt_files(workdir / "checkpoints" / "12" / "state")
    result = cli.run("train", *train_args(workdir), devices=REFERENCE_DEVICES).check()
    warnings = [line for line in result.stderr.splitlines() if "checkpoint step 12" in line and "falling back" in line]
    assert warnings, str(result)
    assert resumed_step(result) == 10, str(result)
    assert list((workdir / "checkpoints.corrupt").glob("12-*")), "the unreadable step was not moved aside"
    assert checkpoint_steps(workdir)[-1] == TOTAL_STEPS      # step 12 trained and saved again
    assert exact_metrics(workdir) == exact_metrics(trained_run.workdir)


def test_resuming_with_a_different_ema_setting_is_a_one_line_error(cli, trained_run, tmp_path):
    workdir = copy_workdir(trained_run.workdir, tmp_path / "run")
    result = cli.run("train", *train_args(workdir, {"optimizer.ema_decay": 0.0, "total_steps": TOTAL_STEPS + 2}),
                     devices=REFERENCE_DEVICES)
    assert_one_line_error(result, "hold an EMA of the params", "ema_decay=0.0")
    assert checkpoint_steps(workdir) == checkpoint_steps(trained_run.workdir)     # nothing moved aside


# Bad configs, each with what the one error line must mention. Two run as commands (the flag parser, the device
# count); the rest run the train entry point in-process: the same code from the config on, without a start-up each.
BAD_COMMANDS = {
    "mesh_product_is_not_the_device_count": (["--config.mesh.fsdp=3"], "config.mesh"),
    "unknown_top_level_key": (["--config.nonexistent=1"], "nonexistent"),
}
BAD_CONFIGS = {
    "batch_not_divisible_by_data_parallel": ({"data.global_batch_size": 12}, "global_batch_size"),
    "heads_not_divisible_by_tensor": ({"mesh.tensor": 8}, "n_heads"),
    "heads_not_dividing_d_model": ({"model.n_heads": 3}, "n_heads 3"),
    "negative_patch_head_hidden": ({"model.patch_head_hidden": -1}, "patch_head_hidden"),
    "unknown_image_loss_space": ({"objective.image_loss_space": "eps"}, "image_loss_space"),
    "ema_decay_of_1": ({"optimizer.ema_decay": 1.0}, "ema_decay"),
    "negative_max_patches_per_row": ({"data.max_patches_per_row": -1}, "max_patches_per_row"),
    "max_patches_per_row_below_one_image": ({"data.max_patches_per_row": 2}, "less than one image"),
    "zero_sampler_votes": ({"sampler.votes": 0}, "votes must be >= 1"),
    "negative_lr": ({"optimizer.lr": -1e-3}, "lr must be > 0"),
    "zero_batch": ({"data.global_batch_size": 0}, "global_batch_size must be a positive integer, got 0"),
}


@pytest.fixture(scope="module")
def bad_command_results(cli, tmp_path_factory):
    """The bad-config commands, run concurrently (each fails before anything compiles)."""
    base = tmp_path_factory.mktemp("bad_configs")
    commands = [("train", [f"--config={SMOKE_CONFIG}", f"--workdir={base / name}", *flags])
                for name, (flags, _) in BAD_COMMANDS.items()]
    results = cli.run_many(commands, devices=REFERENCE_DEVICES, timeout=180)
    return {name: (result, base / name) for name, result in zip(BAD_COMMANDS, results)}


@pytest.mark.parametrize("name", list(BAD_COMMANDS))
def test_bad_config_command_is_a_one_line_error(bad_command_results, name):
    result, workdir = bad_command_results[name]
    assert_one_line_error(result, BAD_COMMANDS[name][1])
    assert not workdir.exists(), "a bad config must fail before the run directory is created"


def train_error_lines(cli, config, workdir, capsys, monkeypatch) -> tuple[int, list[str]]:
    """train's entry point (cli.run_cli around loop.train) on 8 devices, as the command runs it: (exit status, the
    `error:` lines it printed)."""
    import jax
    from oneflow_jax import cli as cli_lib
    from oneflow_jax.training import loop
    monkeypatch.setenv("TFDS_DATA_DIR", str(cli.data_dir))
    assert jax.device_count() == REFERENCE_DEVICES
    with pytest.raises(SystemExit) as stopped:
        cli_lib.run_cli(lambda argv: loop.train(config, str(workdir)))([])
    return stopped.value.code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_is_a_one_line_error(cli, name, tmp_path, capsys, monkeypatch):
    from oneflow_jax import config_lib
    config = config_lib.load_config_file(f"{REPO}/{SMOKE_CONFIG}")
    changes, fragment = BAD_CONFIGS[name]
    for key, value in changes.items():
        *parents, field = key.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        section[field] = value
    code, errors = train_error_lines(cli, config, tmp_path / "run", capsys, monkeypatch)
    assert code == 2 and len(errors) == 1 and fragment in errors[0], errors
    assert not (tmp_path / "run").exists(), "a bad config must fail before the run directory is created"


def test_a_workdir_that_cannot_be_created_is_a_one_line_error(cli, tmp_path, capsys, monkeypatch):
    from oneflow_jax import config_lib
    (tmp_path / "a_file").write_text("")
    config = config_lib.load_config_file(f"{REPO}/{SMOKE_CONFIG}")
    code, errors = train_error_lines(cli, config, tmp_path / "a_file" / "run", capsys, monkeypatch)
    assert code == 2 and len(errors) == 1 and "cannot create --workdir" in errors[0], errors


def test_nonfinite_updates_are_skipped_counted_and_stop_the_run(cli, tmp_path):
    """A learning rate that blows the params up: every later loss is NaN, each update is skipped (params unchanged),
    counted in metrics.jsonl, and after optimizer.max_consecutive_nonfinite (5) in a row the run stops cleanly."""
    import jax
    from oneflow_jax.sampling import generate
    workdir = tmp_path / "diverging"
    result = cli.run("train", f"--config={SMOKE_CONFIG}", f"--workdir={workdir}", "--config.optimizer.lr=1e30",
                     "--config.total_steps=30", "--config.log_every=1", "--config.ckpt_every=3", devices=1)
    error = assert_one_line_error(result, "5 non-finite losses in a row", "lower optimizer.lr")
    rows = metrics_by_step(workdir)
    nan_steps = [s for s in sorted(rows) if not all_finite([rows[s]["loss"]])]
    assert len(nan_steps) == 5 and nan_steps == list(range(nan_steps[0], nan_steps[0] + 5)), nan_steps
    assert f"at step {nan_steps[-1]}" in error
    assert [rows[s]["nonfinite_steps"] for s in sorted(rows)] == [float(sum(n <= s for n in nan_steps))
                                                                   for s in sorted(rows)]
    kept = [s for s in checkpoint_steps(workdir) if s >= nan_steps[0] - 1]   # saved after the last good update
    assert len(kept) >= 2, checkpoint_steps(workdir)
    params = [jax.tree_util.tree_leaves(generate.load_run(str(workdir), s).params) for s in kept]
    assert all(np.isfinite(np.asarray(p)).all() for p in params[-1])
    for earlier in params[:-1]:
        assert all(np.array_equal(a, b) for a, b in zip(earlier, params[-1])), "a skipped update changed the params"


def test_full_disk_during_a_save_stops_with_one_line_and_keeps_every_checkpoint(cli, trained_run, tmp_path):
    """A save that cannot be written (here: a per-file size limit, `ulimit -f`, which fails writes the way a full
    disk does) stops the run with exit 1 and one line naming the last complete step; no older checkpoint is deleted
    for it, and a rerun resumes from that step."""
    workdir = copy_workdir(trained_run.workdir, tmp_path / "run")
    args = train_args(workdir, {"total_steps": TOTAL_STEPS + 4})
    limited = ["bash", "-c", 'ulimit -f 256 && exec "$@"', "bash", *cli._module_args("train", args)]
    failed = cli._start(limited, cli.env(REFERENCE_DEVICES)).wait()
    assert failed.returncode == 1, str(failed)
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write checkpoint step {TOTAL_STEPS + 2}"), str(failed)
    assert f"the last complete checkpoint is step {TOTAL_STEPS}" in last, last
    assert checkpoint_steps(workdir) == [8, 10, 12], "a checkpoint was deleted for a save that failed"

    resumed = cli.run("train", *args, devices=REFERENCE_DEVICES).check()
    assert resumed_step(resumed) == TOTAL_STEPS, str(resumed)
    assert "unfinished checkpoint" in resumed.stderr, str(resumed)       # the torn step is named, then removed
    assert checkpoint_steps(workdir) == [12, 14, 16]


def test_encoding_images_in_the_step_trains_like_the_host_encoded_run(cli, trained_run, tmp_path):
    """data.encode_in_step: the same run with its images encoded inside the jitted step (sharded over the 8-device
    mesh) follows the reference run's losses up to float rounding."""
    workdir = tmp_path / "in_step"
    cli.run("train", *train_args(workdir, {"data.encode_in_step": True}), devices=REFERENCE_DEVICES).check()
    ours, reference = exact_metrics(workdir), exact_metrics(trained_run.workdir)
    assert sorted(ours) == sorted(reference)
    np.testing.assert_allclose(np.array([ours[s] for s in sorted(ours)]),
                               np.array([reference[s] for s in sorted(reference)]), rtol=2e-3, atol=1e-4)
