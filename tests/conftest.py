"""Test-wide setup: 8 fake CPU devices (multi-device code is tested for real), quiet TensorFlow."""
import os

import pytest

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A module's own TFDS_DATA_DIR in a tmp dir: datasets built by its tests never touch ~/tensorflow_datasets."""
    path = str(tmp_path_factory.mktemp("tfds"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TFDS_DATA_DIR", path)
        yield path
