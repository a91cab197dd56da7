"""Damaged shards never kill a run (data/records.py): flipped bytes lose only the chunks they hit, with and without
`cache_decoded`; shards that cannot be opened are skipped whole and named; too much loss is one clear error; the
train CLI on a dataset with flipped bytes in every shard trains and reports what it skipped."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from array_record.python import array_record_module

from oneflow_jax.data import datasets, records
from oneflow_jax.data import input_pipeline as ip
from oneflow_jax.data import packing
from oneflow_jax.data import shapes_world as sw
from oneflow_jax.data import tokenizer as tokenizer_lib
from oneflow_jax.models import codec as codec_lib
from oneflow_jax.objectives import edit_flow

pytest.register_assert_rewrite("cli_utils")
from cli_utils import assert_one_line_error  # noqa: E402

pytest_plugins = ("cli_utils",)

N_DOCS = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two clean shards of shapes-world documents (one record per chunk), a tokenizer and a codec."""
    tmp = tmp_path_factory.mktemp("shards")
    docs = [sw.generate_document("train", i) for i in range(N_DOCS)]
    feats = datasets.record_features()
    raw = [feats.serialize_example({"text": d.text, "kind": d.kind,
                                    "images": [datasets.png_bytes(im) for im in d.images]}) for d in docs]
    paths, sizes = [], []
    for k, part in enumerate((raw[:N_DOCS // 2], raw[N_DOCS // 2:])):
        sizes.append(sum(len(r) for r in part))
        path = str(tmp / f"clean-{k}.array_record")
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        for r in part:
            writer.write(r)
        writer.close()
        paths.append(path)
    tok = tokenizer_lib.train_tokenizer((d.text for d in docs), 200, str(tmp / "tok.model"))
    codec = codec_lib.PixelPatchCodec(image_size=32, patch_size=8)
    return dict(tmp=tmp, paths=paths, sizes=sizes, feats=feats, tok=tok, codec=codec)


def flip_bytes(src: str, dst: str, places: int, seed: int, data_bytes: int | None = None) -> None:
    """A copy of `src` with 64 random bytes written at `places` offsets among its first `data_bytes` (default: 80% of
    the file; the records come first, the footer and padding last)."""
    shutil.copy(src, dst)
    rng = np.random.default_rng(seed)
    span = data_bytes or int(os.path.getsize(dst) * 0.8)
    with open(dst, "r+b") as f:
        for off in rng.integers(0, span - 64, places):
            f.seek(int(off))
            f.write(rng.integers(0, 256, 64, dtype=np.uint8).tobytes())


def pipeline(s, paths, feats=None, **kw):
    tok = s["tok"]
    transform = edit_flow.EditFlowTransform(edit_flow.NoisingConfig(),
                                            edit_flow.SpecialTokens(tok.bos_id, tok.pad_id, tok.image_id),
                                            s["codec"].num_patches)
    packer = packing.EditFlowPacker(256, 128, tok.pad_id)
    opts = dict(global_batch_size=2, shuffle_seed=0, seed=0, num_epochs=1, prefetch=0)
    opts.update(kw)
    return ip.build_pipeline(paths, feats or s["feats"], tokenizer=tok, codec=s["codec"], transform=transform, packer=packer,
                             **opts)


def readable(paths) -> int:
    """Records of `paths` that can be read and parsed, counted one by one (the ground truth)."""
    shards = records.open_shards(paths, 1.0)
    feats = datasets.record_features()
    ok = 0
    for i in range(len(shards)):
        raw = shards.read(i)
        try:
            feats.deserialize_example_np(raw)
            ok += 1
        except Exception:  # pylint: disable=broad-except
            pass
    return ok


@pytest.mark.parametrize("cache_decoded", [False, True])
def test_flipped_bytes_lose_only_what_they_hit(setup, tmp_path, cache_decoded):
    clean = pipeline(setup, setup["paths"], cache_decoded=cache_decoded)
    list(clean)
    assert clean.counters["documents"] == N_DOCS and clean.skipped_records == 0
    bad = [str(tmp_path / f"bad-{k}") for k in range(2)]
    for k, (src, dst) in enumerate(zip(setup["paths"], bad)):
        flip_bytes(src, dst, places=3, seed=k, data_bytes=setup["sizes"][k])
    it = pipeline(setup, bad, cache_decoded=cache_decoded, max_unreadable_fraction=0.9)
    list(it)
    c = it.counters
    assert c["skipped_unreadable"] + c["skipped_corrupt"] > 0, c
    assert c["documents"] == readable(bad), c               # every record that can be read is trained on
    assert c["documents"] + it.skipped_records == N_DOCS, c  # and every other one is counted


def test_unopenable_shards_are_skipped_whole_and_named(setup, tmp_path, caplog):
    good = setup["paths"][0]
    truncated, empty, missing = str(tmp_path / "truncated"), str(tmp_path / "empty"), str(tmp_path / "missing")
    with open(good, "rb") as f, open(truncated, "wb") as g:
        g.write(f.read()[: os.path.getsize(good) // 2])
    open(empty, "wb").close()
    shards = records.open_shards([good, truncated, empty, missing], max_unreadable_fraction=1.0)
    assert len(shards) == N_DOCS // 2 and shards.paths == [good]
    assert [u["path"] for u in shards.unreadable] == [truncated, empty, missing]
    assert shards.unreadable[0]["records_lost_estimate"] > 0                  # estimated from the bytes per record
    assert "skipping unreadable shard " + truncated in caplog.text
    it = pipeline(setup, [good, truncated, empty], max_unreadable_fraction=0.9)
    list(it)
    assert it.counters["documents"] == N_DOCS // 2
    assert [u["path"] for u in it.unreadable_shards] == [truncated, empty]      # the train loop logs these
    with pytest.raises(ValueError, match="unreadable.*data.max_unreadable_fraction=0.05"):
        records.open_shards([good, truncated])              # ~1/3 of the split lost: too much
    with pytest.raises(ValueError, match="no readable shard"):
        records.open_shards([empty, missing], 1.0)


def test_eval_reader_skips_unreadable_records(setup, tmp_path, monkeypatch):
    bad = str(tmp_path / "bad")
    flip_bytes(setup["paths"][0], bad, places=1, seed=3, data_bytes=setup["sizes"][0])
    monkeypatch.setattr(datasets, "ensure_prepared", lambda *a, **k: type("B", (), dict(
        info=type("I", (), dict(features=setup["feats"]))(), name="fake"))())
    monkeypatch.setattr(datasets, "split_filepaths", lambda builder, split: [bad, setup["paths"][1]])
    want = readable([bad, setup["paths"][1]])
    assert want < N_DOCS
    assert len(datasets.load_records("fake", limit=None)) == want
    assert len(datasets.load_records("fake", limit=25)) == 25                 # the first 25 readable ones
    flip_bytes(setup["paths"][0], bad, places=8, seed=4, data_bytes=setup["sizes"][0])
    from oneflow_jax.cli import UserError
    with pytest.raises(UserError, match="are unreadable"):                     # > 5% lost: one clear line
        datasets.load_records("fake")


def test_train_cli_on_flipped_shards_trains_and_counts(cli, tmp_path):
    """The issue's check, denser: 64 bytes flipped at ten places in the eval shard and 400 in the train shard (so
    that 20 steps surely read some: ~2% of its records), 20 steps of the default config at a smaller width, with its
    periodic samples (whose eval prompts read the eval split)."""
    data = tmp_path / "tfds"
    shutil.copytree(cli.data_dir, data)
    shards = [os.path.join(r, f) for r, _, fs in os.walk(data) for f in fs if ".array_record" in f]
    assert shards
    for k, path in enumerate(shards):
        flip_bytes(path, path + ".tmp", places=400 if "-train." in path else 10, seed=100 + k)
        os.replace(path + ".tmp", path)
    wd = tmp_path / "run"
    res = cli.run("train", "--config=configs/shapes_tiny.py", f"--workdir={wd}", f"--config.data.data_dir={data}",
                  "--config.total_steps=20", "--config.log_every=5", "--config.sample_every=10",
                  "--config.model.d_model=64", "--config.model.d_ff=128", "--config.model.patch_head_hidden=64",
                  timeout=600).check()
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "skipped_records" in r][-1]
    assert last["step"] == 20 and last["skipped_records"] >= last["unreadable_records"] > 0, last
    assert "unreadable)" in res.stdout, res
    assert (wd / "samples").exists()


def test_train_stops_with_one_line_when_too_much_is_unreadable(cli, tmp_path):
    data = tmp_path / "tfds"
    shutil.copytree(cli.data_dir, data)
    train = [os.path.join(r, f) for r, _, fs in os.walk(data) for f in fs if "-train.array_record" in f]
    for path in train:
        flip_bytes(path, path + ".tmp", places=6000, seed=7)           # ~25% of the records
        os.replace(path + ".tmp", path)
    res = cli.run("train", "--config=configs/shapes_tiny.py:smoke", f"--workdir={tmp_path}/run",
                  f"--config.data.data_dir={data}", "--config.total_steps=60", "--config.log_every=5")
    assert res.returncode == 2, res
    assert_one_line_error(res, "are unreadable", "data.max_unreadable_fraction=0.05", "stopping at step")


def test_bad_command_inputs_are_one_line_errors(cli, tmp_path):
    """Config files that are missing, not python, or an unknown variant; bad flag values; files that are not what
    they claim: every command fails with one line and exit status 2, before any work."""
    garbage = tmp_path / "garbage.py"
    garbage.write_text("def get_config(:\n")
    not_tok = tmp_path / "tok.model"
    not_tok.write_bytes(b"\x00\x01 not a sentencepiece model")
    no_run = tmp_path / "empty"
    no_run.mkdir()
    cases = {
        "missing config": (("train", "--config=configs/nope.py", f"--workdir={tmp_path}/w"), "No such file"),
        "config not python": (("train", f"--config={garbage}", f"--workdir={tmp_path}/w"), "SyntaxError"),
        "unknown variant": (("compare", "--config=configs/compare_shapes.py:nope", f"--workdir={tmp_path}/w"),
                            "unknown variant 'nope'"),
        "flags config missing": (("flops", "--config=/nonexistent/c.py"), "No such file"),
        "bad int flag": (("eval", f"--workdir={no_run}", "--num_examples=abc"), "--num_examples"),
        "zero examples": (("eval", f"--workdir={no_run}", "--num_examples=0"), "must be > 0"),
        "not a tokenizer": (("train", "--config=configs/shapes_tiny.py:smoke", f"--workdir={tmp_path}/w2",
                             f"--config.data.tokenizer_path={not_tok}"), "is not a SentencePiece model"),
        "not a run (sample)": (("sample", f"--workdir={no_run}", "--prompt=a"), "not a training run directory"),
        "not a run (export)": (("export_torch", f"--workdir={no_run}", f"--out={tmp_path}/o"),
                               "not a training run directory"),
        "data unlike the config": (("train", "--config=configs/shapes_tiny.py:smoke", f"--workdir={tmp_path}/w4",
                                    "--config.codec.image_size=8", "--config.codec.patch_size=4"),
                                   "records in a row were skipped (invalid: 2000; e.g. image uint8(32, 32, 3)"),
        "datasets config not JSON": (("datasets", "--config={nope", f"--data_dir={tmp_path}/d"), "not JSON"),
        "no hf dir": (("import_llama", f"--hf_dir={tmp_path}/nohf", "--config=configs/oneflow_1b.py",
                       f"--workdir={tmp_path}/w3"), "no config.json"),
    }
    results = cli.run_many([(args[0], args[1:]) for args, _ in cases.values()])
    for (name, (_, fragment)), res in zip(cases.items(), results):
        assert res.returncode == 2, f"{name}\n{res}"
        assert_one_line_error(res, fragment)


def _fuzz_records(feats, rng):
    """(serialized record, expected skip reason or None) for good documents and >= 1,000 malformed ones."""
    import io
    from PIL import Image

    def rec(text, pngs):
        return feats.serialize_example({"text": text, "kind": "generation", "images": pngs})

    def png(arr, mode):
        buf = io.BytesIO()
        Image.fromarray(arr, mode).save(buf, format="PNG")
        return buf.getvalue()

    from tensorflow_datasets.proto import tf_example_pb2
    docs = [sw.generate_document("train", i) for i in range(150)]
    out = [(rec(d.text, [datasets.png_bytes(im) for im in d.images]), None) for d in docs]
    for i in range(150):
        d = docs[i]
        good_png = datasets.png_bytes(d.images[0])
        non_utf8 = tf_example_pb2.Example()
        non_utf8.features.feature["text"].bytes_list.value.append(b"\xff\xfe" + rng.bytes(8))
        non_utf8.features.feature["kind"].bytes_list.value.append(b"generation")
        out += [
            (rng.bytes(int(rng.integers(0, 400))), "corrupt"),                                   # random bytes
            (rec("<image> a", [good_png[: int(rng.integers(8, len(good_png) // 2))]]), "corrupt"),  # truncated PNG
            (non_utf8.SerializeToString(), "corrupt"),                                           # not UTF-8
            (rec("<image> x", [png(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA")]), "invalid"),
            (rec("<image> x", [datasets.png_bytes(np.zeros((int(rng.integers(1, 31)), 32, 3), np.uint8))]),
             "invalid"),                                                                         # wrong shape
            (rec(d.text + " <image>", [good_png]), "invalid"),                                   # unbalanced
            (rec(" " * int(rng.integers(0, 4)), []), "invalid"),                                 # empty text
            (rec("word " * int(rng.integers(300, 3000)), []), "overlong"),                       # huge text
        ]
    return out


def test_fuzzed_records_are_counted_by_reason_and_no_good_one_is_lost(setup, tmp_path):
    rng = np.random.default_rng(0)
    cases = _fuzz_records(setup["feats"], rng)
    malformed = [reason for _, reason in cases if reason]
    assert len(malformed) >= 1000
    order = rng.permutation(len(cases))

    def run(items, name):
        path = str(tmp_path / name)
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        for r in items:
            writer.write(r)
        writer.close()
        it = pipeline(setup, [path], overlong="drop", global_batch_size=4)
        batches = list(it)
        n_docs = sum(len(np.unique(b["segment_ids"][r][b["segment_ids"][r] > 0]))
                     for b in batches for r in range(len(b["segment_ids"])))
        return it.counters, n_docs

    clean, clean_docs = run([r for r, reason in cases if reason is None], "clean")     # the good records alone
    c, n_docs = run([cases[i][0] for i in order], "fuzz")
    for reason in ("corrupt", "invalid"):
        assert c[f"skipped_{reason}"] == malformed.count(reason), (reason, c)
    assert c["skipped_overlong"] == malformed.count("overlong") + clean["skipped_overlong"], c
    assert c["documents"] == clean["documents"] == n_docs == clean_docs and c["skipped_transform_error"] == 0, c

    # latents: NaN / inf / wrong shape are invalid, the rest trained on
    shape = (setup["codec"].num_patches, setup["codec"].patch_dim)
    lat_feats = datasets.record_features(latent_shape=shape)
    docs = [sw.generate_document("train", i) for i in range(30)]
    lat_cases = []
    for i, d in enumerate(docs):
        lat = setup["codec"].encode(d.images)
        bad = lat.copy()
        bad[..., i % shape[1]] = [np.nan, np.inf, -np.inf][i % 3]
        lat_cases += [(lat_feats.serialize_example({"text": d.text, "kind": d.kind, "images": lat}), None),
                      (lat_feats.serialize_example({"text": d.text, "kind": d.kind, "images": bad}), "invalid")]
    path = str(tmp_path / "lat.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for r, _ in lat_cases:
        writer.write(r)
    writer.close()
    it = pipeline(setup, [path], latents=True, feats=lat_feats)
    list(it)
    assert it.counters["skipped_invalid"] == 30 and it.counters["documents"] == 30


def test_fuzzed_shard_files_are_skipped_and_no_good_record_is_lost(setup, tmp_path):
    rng = np.random.default_rng(1)
    good = []
    for k in range(10):
        path = str(tmp_path / f"good-{k}")
        shutil.copy(setup["paths"][k % 2], path)
        good.append(path)
    bad = []
    for k in range(21):
        path = str(tmp_path / f"bad-{k}")
        src = open(setup["paths"][k % 2], "rb").read()
        kind = k % 3
        data = (b"" if kind == 0 else src[: int(rng.integers(1, len(src) - 1))] if kind == 1
                else rng.bytes(int(rng.integers(64 << 10, 200 << 10))))        # empty, truncated, garbage
        open(path, "wb").write(data)
        bad.append(path)
    files = list(rng.permutation(good + bad))
    shards = records.open_shards(files, max_unreadable_fraction=1.0)
    assert sorted(u["path"] for u in shards.unreadable) == sorted(bad) and sorted(shards.paths) == sorted(good)
    it = pipeline(setup, files, max_unreadable_fraction=1.0)
    list(it)
    assert it.counters["documents"] == 10 * N_DOCS // 2 and it.skipped_records == 0


def test_missing_vae_is_a_config_error_and_not_needed_for_the_latent_shape(tmp_path):
    """The pod quickstart's --config.codec.path on workers without the VAE: the prepared latents' shape comes from
    the codec geometry, and a model that needs the weights fails with one line (exit 2), not a FileNotFoundError."""
    from oneflow_jax import config_lib
    from oneflow_jax.training.train_state import build_model
    spec = dict(name="vae", path=str(tmp_path / "no_vae"), image_size=256, patch_size=2, latent_channels=16,
                downsample_factor=8)
    assert datasets._latent_shape(spec) == (256, 64)
    config = config_lib.load_config_file("configs/oneflow_1b.py:cpu")
    config.codec.path = str(tmp_path / "no_vae")
    with pytest.raises(config_lib.UserError, match="config.codec: .*no_vae: no config.json"):
        build_model(config, 128256)
