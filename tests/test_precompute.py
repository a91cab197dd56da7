"""`python -m oneflow_jax.precompute` (data/precompute.py) as users run it: webdataset shards with 1,000 broken members
among good ones encoded by a tiny SD3-architecture VAE (random weights) into the dataset `train` reads; two processes
killed with -9 halfway and rerun give exactly the records of an uninterrupted run."""
from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

pytest.register_assert_rewrite("cli_utils")
from cli_utils import REPO, assert_one_line_error  # noqa: E402

from oneflow_jax.data import datasets  # noqa: E402
from oneflow_jax.data import shapes_world as sw  # noqa: E402

pytest_plugins = ("cli_utils",)
diffusers = pytest.importorskip("diffusers")


def _jpeg(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).resize((40, 40)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _tar(path, members) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _good_members(start: int, count: int):
    out = []
    for n in range(start, start + count):
        doc = sw.generate_document("train", n)
        out += [(f"{n:06d}.jpg", _jpeg(doc.images[0])), (f"{n:06d}.txt", sw.caption(doc.specs[0]).encode())]
    return out


BROKEN_KINDS = ("random_bytes", "truncated_jpeg", "empty_image", "no_caption", "empty_caption")


def _broken_members(start: int, count: int):
    """`count` broken samples, cycling through BROKEN_KINDS (each a different way img2dataset output goes bad)."""
    good = _jpeg(sw.generate_document("train", 0).images[0])
    rng = np.random.default_rng(start)
    out = []
    for i in range(count):
        key, kind = f"bad{start + i:06d}", BROKEN_KINDS[i % len(BROKEN_KINDS)]
        image = {"random_bytes": rng.integers(0, 256, 300, dtype=np.uint8).tobytes(),
                 "truncated_jpeg": good[:len(good) // 3], "empty_image": b""}.get(kind, good)
        out.append((f"{key}.jpg", image))
        if kind != "no_caption":
            out.append((f"{key}.txt", b"   " if kind == "empty_caption" else b"a red circle"))
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """8 train shards of 6 good samples (the first also holds 1,000 broken ones), 1 eval shard, a tiny VAE."""
    from test_vae import make_diffusers_vae
    root = tmp_path_factory.mktemp("precompute_inputs")
    train = []
    for shard in range(8):
        members = _good_members(6 * shard, 6)
        if shard == 0:
            members = members[:6] + _broken_members(0, 1000) + members[6:]
        train.append(str(root / f"{shard:05d}.tar"))
        _tar(train[-1], members)
    _tar(root / "eval.tar", _good_members(100, 4))
    make_diffusers_vae(str(root / "vae"), use_quant_conv=False, use_post_quant_conv=False)
    config = {"name": "toy_vae", "train_files": train, "eval_files": [str(root / "eval.tar")], "image_size": 32,
              "image_field": "jpg", "caption_field": "txt",
              "codec": {"name": "vae", "path": str(root / "vae"), "patch_size": 2}}
    return root, config


def _args(config, data_dir, per_device_batch=2):
    return ["--name=image_caption_pairs", f"--config={json.dumps(config)}", f"--data_dir={data_dir}",
            f"--per_device_batch={per_device_batch}", "--decode_threads=2"]


def _shards(data_dir):
    """{shard name: [(text, kind, latents as bytes)]}: the records, decoded (tf.Example's map of features is
    serialized in an order that can differ between processes, so the files' bytes need not be equal)."""
    from array_record.python import array_record_module
    d = data_dir / "image_caption_pairs" / "toy_vae" / "1.0.0"
    features = datasets.F.FeaturesDict.from_json(json.loads((d / "features.json").read_text()))
    out = {}
    for path in sorted(d.glob("*.array_record-*")):
        reader = array_record_module.ArrayRecordReader(str(path))
        out[path.name] = [(ex["text"], ex["kind"], np.stack(ex["images"]).tobytes()) for ex in
                          map(features.deserialize_example_np, reader.read_all())]
        reader.close()
    return out


def _start_two_processes(cli, config, data_dir):
    """launch/local_multiprocess.sh 2: two processes of 2 devices each, batches of 2 x 2 images."""
    args = ["bash", str(REPO / "launch" / "local_multiprocess.sh"), "2", *_args(config, data_dir)]
    return cli._start(args, dict(cli.env(2), MODULE="precompute"))


@pytest.fixture(scope="module")
def uninterrupted(cli, inputs, tmp_path_factory):
    """Two processes, run to the end."""
    _, config = inputs
    data_dir = tmp_path_factory.mktemp("precompute_once")
    return data_dir, _start_two_processes(cli, config, data_dir).wait().check()


def test_broken_members_are_counted_and_the_rest_trains(cli, inputs, uninterrupted, tmp_path):
    _, config = inputs
    data_dir, result = uninterrupted
    cfg = datasets.make_builder_config("image_caption_pairs", config)
    builder = datasets.get_builder("image_caption_pairs", str(data_dir), cfg)
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == 48 and builder.info.splits["eval"].num_examples == 4
    totals = builder.info.metadata["precompute"]
    assert sum(totals["skipped"].values()) == 1000, totals          # every broken member counted, by reason
    assert totals["skipped"]["bad_image"] == 600 and totals["skipped"]["malformed"] == 400, totals
    assert totals["latent_dtype"] == "bfloat16" and totals["scaling_factor"] == pytest.approx(1.5305)
    assert result.stderr.count("skipping") >= 1000, "every skipped member is named in the log"
    # 28 and 24 images per process: full batches of 4, nothing padded
    assert result.stdout.count("100.0% of encoder FLOPs on real images") == 2, str(result)

    # Same documents as the tfds builder path (host encoding), latents equal up to bf16 rounding.
    records = datasets.load_records("image_caption_pairs", "train", data_dir=str(data_dir), config=cfg)
    reference = datasets.load_records("image_caption_pairs", "train", data_dir=str(tmp_path / "ref"), config=cfg)
    assert sorted(r["text"] for r in reference) == sorted(r["text"] for r in records)
    for r in records:                       # captions repeat: match each record to a reference with its text
        assert r["images"].dtype == np.float32 and r["images"].shape == (1, 64, 64)
        assert any(q["text"] == r["text"] and np.allclose(q["images"], r["images"], rtol=2 ** -7, atol=2 ** -7)
                   for q in reference), r["text"]


def test_kill9_two_processes_halfway_then_rerun_equals_the_uninterrupted_run(cli, inputs, uninterrupted, tmp_path):
    _, config = inputs
    data_dir = tmp_path / "data"
    markers = data_dir / "image_caption_pairs" / "toy_vae" / "1.0.0" / "precompute"
    run = _start_two_processes(cli, config, data_dir)
    deadline = time.time() + 300
    while time.time() < deadline and run.process.poll() is None:
        done = len(list(markers.glob("*.json"))) if markers.exists() else 0
        if 2 <= done:
            os.killpg(run.process.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    run.wait()
    done = len(list(markers.glob("*.json")))
    assert 2 <= done < 9, f"{done} of 9 input files were done when killed: not halfway"
    assert not (data_dir / "image_caption_pairs" / "toy_vae" / "1.0.0" / "dataset_info.json").exists()

    rerun = _start_two_processes(cli, config, data_dir).wait()
    assert rerun.returncode == 0, str(rerun)
    assert f"{done} already done" in rerun.stdout, str(rerun)
    once, resumed = _shards(uninterrupted[0]), _shards(data_dir)
    assert sorted(once) == sorted(resumed) and len(once) == 9
    assert all(once[name] == resumed[name] for name in once), "records differ from the uninterrupted run"


def test_bad_inputs_are_one_line_errors(cli, inputs, tmp_path):
    _, config = inputs
    cases = {
        "not json": ["--config={", "not JSON"],
        "no codec": [f"--config={json.dumps(dict(config, codec=None))}", "needs a codec"],
        "missing file": [f"--config={json.dumps(dict(config, train_files=[str(tmp_path / 'nope.tar')]))}",
                         "does not exist"],
        "missing vae": [f"--config={json.dumps(dict(config, codec={'name': 'vae', 'path': str(tmp_path)}))}",
                        "config.json"],
    }
    results = cli.run_many([("precompute", ["--name=image_caption_pairs", args[0], f"--data_dir={tmp_path}"])
                            for args in cases.values()])
    for (name, (_, expected)), result in zip(cases.items(), results):
        assert_one_line_error(result, expected)
