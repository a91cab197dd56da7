"""Checkpointer on real Orbax + Grain: round trip, keep-N, resharding restore, corrupt-latest fallback, SIGTERM."""
import importlib.util
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from oneflow_jax.training import checkpointing
from oneflow_jax.training import sharding
from oneflow_jax.training.checkpointing import Checkpointer, PreemptionGuard

REPO = pathlib.Path(__file__).resolve().parents[1]
CPUS = jax.devices("cpu")    # 8 of them (conftest's XLA_FLAGS), also on a machine with an accelerator
SUBPROCESS_ENV = dict(os.environ, JAX_PLATFORMS="cpu",
                      PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
# logical axes of the toy params (names as in model.py, mapped to mesh axes by sharding.LOGICAL_AXIS_RULES)
PARAM_AXES = {"embed_table": ("vocab", "embed"), "mlp_in": ("embed", "mlp"), "scale": ("norm",)}
PARAM_SHAPES = {"embed_table": (32, 16), "mlp_in": (16, 24), "scale": (16,)}


def make_mesh(data, fsdp, tensor, n_devices=8):
    return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)),
                              CPUS[:n_devices])


def target_abstract(state, mesh):
    """The state's abstract tree with shardings from the logical axis rules (opt-state moments follow params)."""
    specs = {k: sharding.logical_to_sharding(P(*axes), mesh) for k, axes in PARAM_AXES.items()}

    def leaf(path, x):
        name = getattr(path[-1], "key", None)
        s = specs[name] if name in specs and x.ndim else sharding.replicated(mesh)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return jax.tree_util.tree_map_with_path(leaf, state)


def make_state(mesh, seed=0, bf16_scale=True):
    """A train-state pytree like train.py's: params, AdamW(+schedule) state after one update, step, rng key."""
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16 if k == "scale" and bf16_scale
                             else jnp.float32) for k, shape in PARAM_SHAPES.items()}
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100), weight_decay=0.05)
    opt_state = tx.init(params)
    _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    state = dict(params=params, opt_state=opt_state, step=jnp.int32(seed + 1), rng=jax.random.key(seed))
    return jax.device_put(state, jax.tree.map(lambda a: a.sharding, target_abstract(state, mesh)))


def host(tree):
    """Leaves as numpy (PRNG keys as their raw data), for bitwise comparison."""
    def leaf(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)
    return jax.tree.map(leaf, tree)


def assert_bitwise_equal(a, b):
    ha, hb = host(a), host(b)
    assert jax.tree.structure(ha) == jax.tree.structure(hb)
    for x, y in zip(jax.tree.leaves(ha), jax.tree.leaves(hb)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh(1, 8, 1)


def test_round_trip_with_metadata(tmp_path, mesh8):
    state = make_state(mesh8)
    with Checkpointer(tmp_path, keep=3) as ckpt:
        assert ckpt.latest_step() is None
        meta = {"config_hash": "abc", "skipped_records": np.int64(3), "flops": np.float64(1.5e12)}
        assert ckpt.save(7, state, metadata=meta)
        ckpt.wait()
    ckpt = Checkpointer(tmp_path, keep=3)
    assert ckpt.latest_step() == 7
    restored, restored_meta, step = ckpt.restore(target_abstract(state, mesh8))
    assert step == 7 and restored_meta == {"config_hash": "abc", "skipped_records": 3, "flops": 1.5e12}
    assert_bitwise_equal(restored, state)
    assert type(restored["opt_state"][0]) is type(state["opt_state"][0])   # optax namedtuples come back
    assert restored["params"]["mlp_in"].sharding == state["params"]["mlp_in"].sharding
    ckpt.close()


def test_relative_workdir(tmp_path, mesh8, monkeypatch):
    """`--workdir workdir/x` (README's default run) works: Orbax itself refuses relative checkpoint paths."""
    monkeypatch.chdir(tmp_path)
    state = make_state(mesh8)
    with Checkpointer("runs/rel", keep=1) as ckpt:
        assert ckpt.save(3, state)
        ckpt.wait()
    monkeypatch.chdir("runs")
    with Checkpointer("rel", keep=1) as ckpt:
        restored, _, step = ckpt.restore(target_abstract(state, mesh8))
    assert step == 3
    assert_bitwise_equal(restored, state)


def test_keep_n_save_every_and_force(tmp_path, mesh8):
    state = make_state(mesh8)
    with Checkpointer(tmp_path, keep=2, save_every=3) as ckpt:
        saved = [s for s in range(1, 11) if ckpt.save(s, state)]
        assert saved == [3, 6, 9]
        assert ckpt.save(10, state, force=True)
        assert not ckpt.save(10, state, force=True)        # an existing step is never overwritten
        ckpt.wait()
        assert ckpt.all_steps() == [9, 10]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "9"]


@pytest.mark.parametrize("layout", [(1, 4, 1, 4), (2, 1, 2, 4), (1, 2, 4, 8)],
                         ids=["fsdp4_on_4dev", "data2_tensor2_on_4dev", "fsdp2_tensor4_on_8dev"])
def test_resharding_restore(tmp_path, mesh8, layout):
    *axes, n_devices = layout
    state = make_state(mesh8)
    with Checkpointer(tmp_path, keep=1) as ckpt:
        ckpt.save(1, state)
    mesh = make_mesh(*axes, n_devices=n_devices)
    abstract = target_abstract(state, mesh)
    with Checkpointer(tmp_path, keep=1) as ckpt:
        restored, _, _ = ckpt.restore(abstract)
    assert_bitwise_equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert got.sharding == want.sharding
        assert set(got.sharding.device_set) <= set(CPUS[:n_devices])


def test_partial_restore_reads_params_only(tmp_path, mesh8):
    state = make_state(mesh8)
    with Checkpointer(tmp_path, keep=1) as ckpt:
        ckpt.save(3, state)
    mesh = make_mesh(1, 2, 2, n_devices=4)
    abstract = {"params": target_abstract(state, mesh)["params"]}
    with Checkpointer(tmp_path, keep=1) as ckpt:
        restored, _, step = ckpt.restore(abstract, partial=True)
        assert step == 3 and set(restored) == {"params"}
        assert_bitwise_equal(restored["params"], state["params"])
        with pytest.raises(RuntimeError):          # without partial=True the structure must match exactly
            ckpt.restore(abstract, step=3)


def _array_files(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    return files


def _truncate_arrays(step_dir):
    for p in _array_files(step_dir):
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size // 2)


CORRUPTIONS = {
    "truncated_arrays": _truncate_arrays,
    "deleted_array_files": lambda d: [p.unlink() for p in _array_files(d)],
    "deleted_metadata": lambda d: (d / "meta" / "metadata.json").unlink(),
    "killed_mid_write": lambda d: d.rename(d.parent / "2.orbax-checkpoint-tmp-1700000000"),
}


# Orbax's failed reads can leave a tensorstore callback that fires after its event loop closed: harmless noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_latest_falls_back_with_warning(tmp_path, mesh8, caplog, corruption):
    s1, s2 = make_state(mesh8, seed=0), make_state(mesh8, seed=1)
    with Checkpointer(tmp_path, keep=3) as ckpt:
        ckpt.save(1, s1, metadata={"n": 1})
        ckpt.save(2, s2, metadata={"n": 2})
    CORRUPTIONS[corruption](tmp_path / "checkpoints" / "2")

    with caplog.at_level(logging.WARNING):
        ckpt = Checkpointer(tmp_path, keep=3)
        restored, meta, step = ckpt.restore(target_abstract(s1, mesh8))
    assert step == 1 and meta == {"n": 1}
    assert_bitwise_equal(restored, s1)
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert ("unfinished checkpoint" if corruption == "killed_mid_write" else "step 2") in warnings
    # the bad step is out of the way: training can save step 2 again
    assert ckpt.latest_step() == 1
    assert ckpt.save(2, s2, force=True)
    ckpt.close()
    if corruption != "killed_mid_write":
        assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints.corrupt").iterdir()] == ["2"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_all_corrupt_raises_and_moves_nothing(tmp_path, mesh8):
    state = make_state(mesh8)
    with Checkpointer(tmp_path, keep=3) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)
    for s in ("1", "2"):
        _truncate_arrays(tmp_path / "checkpoints" / s)
    ckpt = Checkpointer(tmp_path, keep=3)
    with pytest.raises(RuntimeError, match="could be restored"):
        ckpt.restore(target_abstract(state, mesh8))
    assert ckpt.all_steps() == [1, 2] and not (tmp_path / "checkpoints.corrupt").exists()
    with pytest.raises(RuntimeError, match="step 2"):
        ckpt.restore(target_abstract(state, mesh8), step=2)
    ckpt.close()
    with pytest.raises(FileNotFoundError):
        Checkpointer(tmp_path / "empty", keep=1).restore(target_abstract(state, mesh8))


def test_abstract_state_needs_shardings(tmp_path, mesh8):
    state = make_state(mesh8)
    with Checkpointer(tmp_path, keep=1) as ckpt:
        ckpt.save(1, state)
        with pytest.raises(ValueError, match="no sharding"):
            ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))


def _grain_dataset_iter():
    return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset())


def _grain_dataloader_iter():       # get_state() -> bytes
    sampler = grain.samplers.IndexSampler(100, shard_options=grain.sharding.NoSharding(), shuffle=True,
                                          num_epochs=1, seed=0)
    return iter(grain.DataLoader(data_source=grain.sources.RangeDataSource(0, 100, 1), sampler=sampler,
                                 operations=[grain.transforms.Batch(4)], worker_count=0))


@pytest.mark.parametrize("make_iter", [_grain_dataset_iter, _grain_dataloader_iter], ids=["dataset", "dataloader"])
def test_grain_iterator_round_trip(tmp_path, mesh8, make_iter):
    state = make_state(mesh8)
    it = make_iter()
    for _ in range(3):
        next(it)
    with Checkpointer(tmp_path, keep=1) as ckpt:
        ckpt.save(3, state, data_iter=it)
        expected = [np.asarray(next(it)) for _ in range(4)]  # consumed while the async save may still run
    fresh = make_iter()
    with Checkpointer(tmp_path, keep=1) as ckpt:
        _, _, step = ckpt.restore(target_abstract(state, mesh8), data_iter=fresh)
    assert step == 3
    for want in expected:
        np.testing.assert_array_equal(np.asarray(next(fresh)), want)
    files = [p.name for p in (tmp_path / "checkpoints" / "3" / "data_iter").iterdir()]
    assert "process_0-of-1.json" in files


def test_config_round_trip(tmp_path):
    spec = importlib.util.spec_from_file_location("shapes_tiny", REPO / "configs" / "shapes_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    checkpointing.save_config(tmp_path / "run", config)
    loaded = checkpointing.load_config(tmp_path / "run")
    assert loaded.to_dict() == config.to_dict()
    assert checkpointing.config_hash(loaded) == checkpointing.config_hash(config)
    config.model.d_model += 1
    assert checkpointing.config_hash(loaded) != checkpointing.config_hash(config)
    assert not list((tmp_path / "run").glob("*.tmp"))


TRAIN_LOOP = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from oneflow_jax.training.checkpointing import Checkpointer, PreemptionGuard

    ckpt = Checkpointer(sys.argv[1], keep=2, save_every=4)
    state = {"w": jnp.zeros((8,), jnp.float32), "step": jnp.int32(0)}
    with PreemptionGuard() as guard:
        step = 0
        while True:
            step += 1
            state = {"w": state["w"] + 1.0, "step": jnp.int32(step)}
            ckpt.save(step, state)
            print(f"step {step}", flush=True)
            if guard.should_stop(step):
                ckpt.save(step, state, force=True)
                ckpt.close()
                print(f"stopped at {step}", flush=True)
                sys.exit(0)
            time.sleep(0.05)
""")


def test_sigterm_saves_and_exits_zero(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(TRAIN_LOOP)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=SUBPROCESS_ENV, cwd=REPO)
    try:
        deadline = time.time() + 60
        for line in proc.stdout:
            if line.strip() == "step 6" or time.time() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    stopped = int(out.strip().splitlines()[-1].removeprefix("stopped at "))
    assert stopped >= 6
    with Checkpointer(tmp_path / "run", keep=2) as ckpt:
        assert ckpt.latest_step() == stopped
        abstract = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding.replicated(make_mesh(1, 8, 1))),
                    "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(make_mesh(1, 8, 1)))}
        restored, _, step = ckpt.restore(abstract)
    assert step == stopped and int(restored["step"]) == stopped
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.full((8,), float(stopped), np.float32))


BIG_SAVES = textwrap.dedent("""
    import sys
    import jax
    from oneflow_jax.training.checkpointing import Checkpointer

    ckpt = Checkpointer(sys.argv[1], keep=2)
    for step in range(1, 1000):        # 64 MB per step: each async write is in flight long enough to be killed in
        ckpt.save(step, {"w": jax.random.normal(jax.random.key(step), (1 << 24,)), "step": jax.numpy.int32(step)})
""")


def test_kill9_during_an_async_save_resumes_from_the_last_complete_step(tmp_path, caplog):
    script = tmp_path / "saves.py"
    script.write_text(BIG_SAVES)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=SUBPROCESS_ENV, cwd=REPO)
    try:               # kill -9 while a step is being written, once at least two steps are complete
        deadline, killed_in = time.time() + 120, None
        while killed_in is None and time.time() < deadline and proc.poll() is None:
            names = [p.name for p in (run / "checkpoints").iterdir()] if (run / "checkpoints").exists() else []
            torn = [n for n in names if ".orbax-checkpoint-tmp" in n]
            if torn and sum(n.isdigit() for n in names) >= 2:
                proc.kill()
                killed_in = torn[0]
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    assert killed_in is not None, "never saw a save in flight"
    complete = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    torn_step = int(killed_in.split(".")[0])
    assert complete and max(complete) < torn_step, (complete, killed_in)

    mesh = make_mesh(1, 8, 1)
    abstract = {"w": jax.ShapeDtypeStruct((1 << 24,), jnp.float32, sharding=sharding.replicated(mesh)),
                "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))}
    with caplog.at_level(logging.WARNING):
        with Checkpointer(run, keep=2) as ckpt:
            restored, _, step = ckpt.restore(abstract)
    assert step == max(complete) and int(restored["step"]) == step
    np.testing.assert_array_equal(np.asarray(restored["w"]),
                                  np.asarray(jax.random.normal(jax.random.key(step), (1 << 24,))))
    assert any("unfinished checkpoint" in r.getMessage() and killed_in.split("-tmp")[0] in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert not [p for p in (run / "checkpoints").iterdir() if ".orbax-checkpoint-tmp" in p.name]


class _FileSizeLimit:
    """RLIMIT_FSIZE for this process: writes past `limit` bytes fail with EFBIG, as they fail on a full disk."""

    def __init__(self, limit: int):
        import resource
        self._resource, self._limit = resource, limit

    def __enter__(self):
        self._old = self._resource.getrlimit(self._resource.RLIMIT_FSIZE)
        self._resource.setrlimit(self._resource.RLIMIT_FSIZE, (self._limit, self._old[1]))

    def __exit__(self, *exc):
        self._resource.setrlimit(self._resource.RLIMIT_FSIZE, self._old)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_failed_save_keeps_every_older_step_and_names_the_last_complete_one(tmp_path):
    def state(seed):
        return {"w": jax.random.normal(jax.random.key(seed), (1 << 18,)), "step": jnp.int32(seed)}
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for step in (1, 2):
            ckpt.save(step, state(step))
    ckpt = Checkpointer(tmp_path, keep=2)
    with _FileSizeLimit(64 << 10):
        ckpt.save(3, state(3))                        # asynchronous: the failure shows at the next wait
        with pytest.raises(checkpointing.CheckpointWriteError,
                           match="could not write checkpoint step 3 .*the last complete checkpoint is step 2"):
            ckpt.wait()
    ckpt.close()
    assert ckpt.committed_steps() == [1, 2]           # keep=2 deletes nothing for a step that never committed
    with Checkpointer(tmp_path, keep=2) as ckpt:      # and the next good save prunes as usual, once committed
        ckpt.save(3, state(3))
        ckpt.wait()
        assert ckpt.committed_steps() == [2, 3]


def test_preemption_guard_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert guard.should_stop(1) and guard.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


TWO_PROCESSES = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    import grain, ml_collections, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from oneflow_jax.training import sharding
    from oneflow_jax.training.checkpointing import Checkpointer, PreemptionGuard

    def mesh(data, fsdp, tensor):
        return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))
    m8 = mesh(1, 8, 1)
    values = np.arange(64, dtype=np.float32)
    w = jax.make_array_from_callback((64,), NamedSharding(m8, P("fsdp")), lambda i: values[i])
    state = {"w": w, "step": jax.device_put(np.int32(3), NamedSharding(m8, P()))}
    it = iter(grain.MapDataset.range(100).shuffle(seed=pid).batch(4).to_iter_dataset())
    next(it)
    ckpt = Checkpointer(workdir, keep=2)
    ckpt.save(1, state, data_iter=it, metadata={"saved_by": pid})
    next(it)
    ckpt.save(2, state, data_iter=it)
    ckpt.wait()
    if pid == 1:   # only process 1 loses its part of step 2: both processes must fall back to step 1 together
        os.remove(os.path.join(workdir, "checkpoints", "2", "data_iter", "process_1-of-2.json"))
    multihost_utils.sync_global_devices("corrupted")
    m = mesh(2, 1, 4)
    abstract = {"w": jax.ShapeDtypeStruct((64,), np.float32, sharding=NamedSharding(m, P("tensor"))),
                "step": jax.ShapeDtypeStruct((), np.int32, sharding=NamedSharding(m, P()))}
    fresh = iter(grain.MapDataset.range(100).shuffle(seed=pid).batch(4).to_iter_dataset())
    restored, meta, step = ckpt.restore(abstract, data_iter=fresh)
    assert step == 1 and meta == {"saved_by": 0}, (step, meta)
    assert fresh.get_state() == {"next_index": 1}, fresh.get_state()
    assert (multihost_utils.process_allgather(restored["w"], tiled=True) == values).all()
    with PreemptionGuard() as guard:
        assert not guard.should_stop(5)
    assert ckpt.all_steps() == [1]
    ckpt.close()
    print("OK", pid, flush=True)
""")


def test_two_processes_agree_on_fallback(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESSES)
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(pid), str(tmp_path / "run")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=SUBPROCESS_ENV, cwd=REPO)
             for pid in (0, 1)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for pid, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {pid}" in out, out[-3000:]
    assert [p.name.split("-")[0] for p in (tmp_path / "run" / "checkpoints.corrupt").iterdir()] == ["2"]
