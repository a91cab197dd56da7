"""Test-wide setup: 8 fake CPU devices (multi-device code is tested for real), quiet TensorFlow, and how tests/run.sh
spreads the suite over 2 pytest-xdist workers without building an expensive fixture twice."""
import os
import shutil
from pathlib import Path

import pytest

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Files whose tests share a session fixture that is expensive to build (cli_utils.trained_run: the reference run) form
# one group; every other file is a group of its own, so its module fixtures are built once.
SHARED_GROUPS = {"test_train.py": "reference_run", "test_cli.py": "reference_run",
                 "test_caption_metrics.py": "reference_run", "test_likelihood.py": "reference_run",
                 "test_image_eval.py": "reference_run"}


# Seconds each group took in a quiet 2-worker run (`tests/run.sh --durations=0`, 2026-12-03; test_compare and
# test_nextflow: their slowest test in the 2026-12-04 runs; the rest: ~2 s a test).
# Groups start longest first, so that no long group is left to run alone at the end while the other worker idles
# (ordered by test count, the same suite took 811 s in one run and 947 s in another).
GROUP_SECONDS = {"reference_run": 540, "test_corrupt_data.py": 110, "test_compare.py": 110, "test_sampler.py": 98,
                 "test_import_llama.py": 60, "test_ar.py": 75, "test_real_data.py": 69, "test_model.py": 61,
                 "test_export_torch.py": 45, "test_validation.py": 41, "test_vq.py": 35, "test_hf_tokenizer.py": 31,
                 "test_precompute.py": 26, "test_fid.py": 25, "test_vae.py": 24, "test_flops.py": 28,
                 "test_nextflow.py": 130, "test_nextflow_sampler.py": 22}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under `pytest -n N`, whole groups (above) go to one worker, the longest groups first (GROUP_SECONDS). (Our own
    scheduler: xdist's `--dist loadgroup` marks do not group tests under pytest 9.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FileGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
            return SHARED_GROUPS.get(file, file)

        def _assign_work_unit(self, node) -> None:
            order = sorted(self.workqueue, key=lambda g: -GROUP_SECONDS.get(g, 2 * len(self.workqueue[g])))
            for group in order:
                self.workqueue.move_to_end(group)
            super()._assign_work_unit(node)

    return FileGroupScheduling(config, log)


def shared_dir(tmp_path_factory, worker_id: str, name: str) -> Path:
    """A directory every pytest-xdist worker of this test run sees (the run's basetemp root), or this process's own
    under plain pytest."""
    root = tmp_path_factory.getbasetemp()
    return (root if worker_id == "master" else root.parent) / name


@pytest.fixture(scope="session")
def prepared_data_dir(tmp_path_factory, worker_id) -> Path:
    """shapes-world and its tokenizer, prepared once per test run (the train CLI's own code path; the first worker
    builds it under a file lock, the other waits) instead of once per test module. Read-only: copy it (`data_dir`)."""
    import filelock
    path = shared_dir(tmp_path_factory, worker_id, "prepared_tfds")
    with filelock.FileLock(f"{path}.lock"):
        if not (path / "PREPARED").exists():
            from oneflow_jax import config_lib
            from oneflow_jax.data import input_pipeline
            config = config_lib.load_config_file(f"{Path(__file__).parents[1]}/configs/shapes_tiny.py:smoke")
            config.data.data_dir = str(path)
            input_pipeline.get_tokenizer(config.data)
            (path / "PREPARED").write_text("")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, prepared_data_dir):
    """A module's own TFDS_DATA_DIR in a tmp dir, holding a copy of the prepared shapes-world: datasets built by its
    tests never touch ~/tensorflow_datasets or another module's."""
    path = tmp_path_factory.mktemp("tfds")
    shutil.copytree(prepared_data_dir, path, dirs_exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TFDS_DATA_DIR", str(path))
        yield str(path)
