"""Grain pipeline: determinism, mid-epoch restore, host sharding, packing invariants, bad records, builders."""
import collections
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from oneflow_jax import config_lib
from oneflow_jax.models import codec as codec_lib
from oneflow_jax.data import datasets
from oneflow_jax.objectives import edit_flow
from oneflow_jax.data import input_pipeline as ip
from oneflow_jax.data import packing
from oneflow_jax.data import shapes_world as sw

NUM_TRAIN = 400
BUILDER = {"num_train": NUM_TRAIN, "num_eval": 40}


@pytest.fixture(scope="module")
def codec():
    return codec_lib.PixelPatchCodec(image_size=32, patch_size=4)


def make_config(**data):
    cfg = ml_collections.ConfigDict({"data": config_lib.as_dict(config_lib.DataConfig()), "objective": {}})
    cfg.data.builder_config = dict(BUILDER)
    cfg.data.global_batch_size = 4
    cfg.data.seq_len = 256
    cfg.data.max_deletions = 128
    cfg.data.prefetch = 0
    cfg.data.update(data)
    return cfg


@pytest.fixture(scope="module")
def tok(data_dir):
    return ip.get_tokenizer(make_config())


def make_iter(tok, codec, seed=0, process_index=0, process_count=1, **data):
    return ip.create_train_iterator(make_config(**data), process_index=process_index, process_count=process_count,
                                    codec=codec, tokenizer=tok, seed=seed)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def unpack_texts(batch, tok):
    """Clean documents recovered from packed noised rows (kept atoms + bags), one text per segment."""
    texts = []
    for r in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            idx = np.nonzero(seg == s)[0]
            valid = batch["del_valid"][r] > 0
            in_seg = valid & (seg[batch["del_gap"][r]] == s)
            doc = {"tokens": batch["tokens"][r][idx], "is_patch": batch["is_patch"][r][idx],
                   "del_tokens": batch["del_tokens"][r][in_seg], "del_gap": batch["del_gap"][r][in_seg] - idx[0]}
            special = edit_flow.SpecialTokens(tok.bos_id, tok.pad_id, tok.image_id)
            texts.append(tok.decode(edit_flow.merge_bags(doc, special)))
    return texts


def test_same_seed_same_batches(tok, codec):
    a, b = make_iter(tok, codec), make_iter(tok, codec, prefetch=2)
    first = take(a, 3)
    assert_same(first, take(b, 3))
    assert a.counters == b.counters and a.counters["documents"] > 0
    other_noise = take(make_iter(tok, codec, seed=1), 1)[0]
    other_order = take(make_iter(tok, codec, shuffle_seed=7), 1)[0]
    assert not np.array_equal(first[0]["patches"], other_noise["patches"])
    assert not np.array_equal(first[0]["tokens"], other_order["tokens"])


def test_cache_decoded_reads_each_record_once_and_changes_no_batch(tok, codec, monkeypatch):
    decoded = collections.Counter()
    decode = ip._Decode.__call__

    def counting_decode(self, raw):
        decoded[raw] += 1
        return decode(self, raw)

    monkeypatch.setattr(ip._Decode, "__call__", counting_decode)
    cached = make_iter(tok, codec, cache_decoded=True)
    batches = []
    while cached.counters["documents"] < 2.5 * NUM_TRAIN:      # into the third epoch
        batches.append(next(cached))
    assert len(decoded) == NUM_TRAIN and set(decoded.values()) == {1}        # each record decoded once
    plain = make_iter(tok, codec)
    assert_same(batches, take(plain, len(batches)))
    assert cached.counters == plain.counters
    assert sum(decoded.values()) - NUM_TRAIN >= plain.counters["documents"]   # without the cache: once per use


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restore_mid_epoch(tok, codec, num_workers):
    it = make_iter(tok, codec, num_workers=num_workers, prefetch=2)
    first = take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what Grain's Orbax handler writes
    counters = it.counters
    expected = take(it, 4)
    expected_counters = it.counters
    it.close()
    if num_workers:  # worker processes change where rows are packed, not which rows
        assert_same(first + expected, take(make_iter(tok, codec), 7))

    restored = make_iter(tok, codec, num_workers=num_workers, prefetch=2)
    restored.set_state(state)
    assert restored.counters == counters
    assert_same(take(restored, 4), expected)
    assert restored.counters == expected_counters
    restored.close()


def test_hosts_get_disjoint_shards_covering_the_data(tok, codec, data_dir):
    builder = datasets.ensure_prepared("shapes_world", **BUILDER)
    files = datasets.split_filepaths(builder, "train")
    for epochs, num_streams in ((1, 4), (2, 8)):
        records = ip.global_record_stream(files, shuffle_seed=3, num_epochs=epochs)
        shards = [[records[s::num_streams] for s in ip.host_streams(num_streams, h, 2)] for h in range(2)]
        positions = [{i for stream in host for i, _ in stream} for host in shards]
        assert not positions[0] & positions[1] and len(positions[0] | positions[1]) == NUM_TRAIN * epochs
        for e in range(epochs):
            raw = [r for host in shards for stream in host for i, r in stream if i // NUM_TRAIN == e]
            assert len(raw) == len(set(raw)) == NUM_TRAIN  # each epoch holds every record once

    # End to end: one epoch over 2 hosts packs every document exactly once.
    host_texts, host_docs = [], []
    for h in range(2):
        it = make_iter(tok, codec, process_index=h, process_count=2, num_epochs=1, global_batch_size=8)
        batches = list(it)
        assert all(b["tokens"].shape[0] == 4 for b in batches)  # local rows = global / hosts
        host_texts.append([t for b in batches for t in unpack_texts(b, tok)])
        host_docs.append(it.counters["documents"])
    assert sum(host_docs) == NUM_TRAIN
    all_texts = collections.Counter(host_texts[0] + host_texts[1])
    assert all_texts == collections.Counter(datasets.iter_texts(builder, "train"))


@pytest.mark.parametrize("num_streams", [0, 4])
def test_global_batch_independent_of_process_count(tok, codec, num_streams):
    """The rows of 2 hosts, concatenated, are exactly the 1-host batch (hosts own contiguous stream blocks)."""
    one = take(make_iter(tok, codec, global_batch_size=8, num_streams=num_streams), 3)
    hosts = [take(make_iter(tok, codec, process_index=h, process_count=2, global_batch_size=8,
                            num_streams=num_streams), 3) for h in range(2)]
    joined = [{k: np.concatenate([h0[k], h1[k]]) for k in h0} for h0, h1 in zip(*hosts)]
    assert_same(joined, one)
    with pytest.raises(ValueError, match="num_streams"):
        make_iter(tok, codec, global_batch_size=8, num_streams=3)
    with pytest.raises(ValueError, match="num_workers"):
        make_iter(tok, codec, global_batch_size=8, num_streams=4, num_workers=3)


def test_finite_run_accounts_for_every_document(tok, codec):
    """num_epochs=1 with 2 streams of 4 rows: streams end at different times; shapes stay static."""
    it = make_iter(tok, codec, num_epochs=1, global_batch_size=8, num_streams=2)
    batches = list(it)
    assert all(b["tokens"].shape == (8, 256) for b in batches)
    assert it.counters["documents"] == NUM_TRAIN
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == NUM_TRAIN


def test_packed_rows_keep_documents_apart(tok, codec):
    it = make_iter(tok, codec, seq_len=200, global_batch_size=8)
    n_docs = 0
    for batch in take(it, 5):
        for r in range(8):
            seg, pos, toks = batch["segment_ids"][r], batch["positions"][r], batch["tokens"][r]
            used = int((seg > 0).sum())
            assert (seg[:used] > 0).all() and (seg[used:] == 0).all()  # padding only at the end
            change = np.nonzero(np.diff(seg[:used]))[0] + 1
            starts = np.concatenate([[0], change])
            assert list(seg[starts]) == list(range(1, len(starts) + 1))  # each id is one contiguous run
            for s, start in enumerate(starts, start=1):
                idx = np.nonzero(seg == s)[0]
                assert np.array_equal(pos[idx], np.arange(len(idx)))
                assert toks[start] == tok.bos_id
                assert batch["text_weight"][r][idx].sum() == pytest.approx(1.0, rel=1e-5)
                gaps = batch["del_gap"][r][batch["del_valid"][r] > 0]
                assert batch["insert_count"][r][idx].sum() == int((seg[gaps] == s).sum())
            valid = batch["del_valid"][r] > 0
            assert (seg[batch["del_gap"][r][valid]] > 0).all()
            n_docs += len(starts)
    assert it.counters["documents"] == n_docs


def test_max_patches_per_row_caps_rows_and_lists_their_patch_slots(tok, codec):
    """data.max_patches_per_row: no row holds more latent patches than that, and patch_slots lists exactly the row's
    patch positions in order, then out-of-range fillers (codec: 64 patches per image, so 128 = two images)."""
    capped = take(make_iter(tok, codec, max_patches_per_row=128, global_batch_size=8), 4)
    for batch in capped:
        assert batch["patch_slots"].shape == (8, 128) and batch["patch_slots"].dtype == np.int32
        for r in range(8):
            where = np.flatnonzero(batch["is_patch"][r])
            assert len(where) <= 128
            np.testing.assert_array_equal(batch["patch_slots"][r][:len(where)], where)
            assert (batch["patch_slots"][r][len(where):] == 256).all()
    uncapped = take(make_iter(tok, codec, global_batch_size=8), 4)
    assert "patch_slots" not in uncapped[0]
    assert max(int(b["is_patch"].sum(1).max()) for b in uncapped) > 128      # the cap did bind
    with pytest.raises(ValueError, match="patches"):
        packing.pack_rows([{"tokens": np.ones(3, np.int32), "is_patch": np.ones(3, bool)}], 8, 4, max_patches=2)


def _write_array_record(path, records):
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for rec in records:
        writer.write(rec)
    writer.close()
    return str(path)


def _pipeline(files, features, tok, codec, latents=False, **kw):
    transform = edit_flow.EditFlowTransform(edit_flow.NoisingConfig(),
                                            edit_flow.SpecialTokens(tok.bos_id, tok.pad_id, tok.image_id), codec.num_patches)
    opts = dict(global_batch_size=2, shuffle_seed=0, seed=0, num_epochs=1, prefetch=0, latents=latents)
    opts.update(kw)
    packer = packing.EditFlowPacker(opts.pop("seq_len", 256), opts.pop("max_deletions", 128), tok.pad_id)
    return ip.build_pipeline(files, features, tokenizer=tok, codec=codec, transform=transform, packer=packer, **opts)


def test_bad_records_are_skipped_and_counted(tok, codec, tmp_path):
    docs = [sw.generate_document("train", i) for i in range(12)]
    feats = datasets.record_features()

    def rec(text, images):
        return feats.serialize_example({"text": text, "kind": "generation",
                                        "images": [datasets.png_bytes(im) for im in images]})

    good = [rec(d.text, d.images) for d in docs]
    bad_png = feats.serialize_example({"text": "<image> a", "kind": "understanding", "images": [b"not a png"]})
    corrupt = [b"\x00garbage\xff" * 5, bad_png, good[0][: len(good[0]) // 2]]
    invalid = [rec("<image> a red circle", [np.zeros((16, 16, 3), np.uint8)]),      # wrong image shape
               rec("", []),                                                          # empty text
               rec("   ", []),                                                       # blank text
               rec("a caption <image> <image>", [docs[0].images[0]])]                # marker/image mismatch
    path = _write_array_record(tmp_path / "mixed.array_record", good + corrupt + invalid)
    it = _pipeline([path], feats, tok, codec)
    batches = list(it)
    assert it.counters["skipped_corrupt"] == len(corrupt)
    assert it.counters["skipped_invalid"] == len(invalid)
    assert it.skipped_records == len(corrupt) + len(invalid)
    assert it.counters["documents"] == len(good)
    assert sorted(t for b in batches for t in unpack_texts(b, tok)) == sorted(d.text for d in docs)

    # Latent records: NaN latents are invalid too.
    lat_feats = datasets.record_features(latent_shape=(codec.num_patches, codec.patch_dim))
    lat = [lat_feats.serialize_example({"text": d.text, "kind": d.kind, "images": codec.encode(d.images)})
           for d in docs[:5]]
    nan = codec.encode(docs[5].images)
    nan[..., 3] = np.nan
    lat.append(lat_feats.serialize_example({"text": docs[5].text, "kind": docs[5].kind, "images": nan}))
    path = _write_array_record(tmp_path / "latents.array_record", lat)
    it = _pipeline([path], lat_feats, tok, codec, latents=True)
    list(it)
    assert it.counters["skipped_invalid"] == 1 and it.counters["documents"] == 5
    with pytest.raises(ValueError, match="latents"):
        _pipeline([path], lat_feats, tok, codec, latents=False)


def test_overlong_policy(tok, codec):
    # An interleaved doc of 3 images needs 1 + ~45 + 3 * 64 > 160 positions.
    it = make_iter(tok, codec, seq_len=160, overlong="truncate")
    texts = [t for b in take(it, 6) for t in unpack_texts(b, tok)]
    assert it.counters["truncated"] > 0 and it.counters["skipped_overlong"] == 0
    full = list(datasets.iter_texts(datasets.ensure_prepared("shapes_world", **BUILDER)))
    for text in texts:  # cut at a text boundary: a prefix of a real document, whole words and images only
        assert any(f == text or f.startswith(text + " ") for f in full)
    dropped = make_iter(tok, codec, seq_len=160, overlong="drop")
    take(dropped, 6)
    assert dropped.counters["skipped_overlong"] > 0 and dropped.counters["truncated"] == 0
    with pytest.raises(ValueError, match="overlong"):
        make_iter(tok, codec, overlong="wrap")


def test_truncate_to_fit():
    image_id = 4
    word_start = np.array([False] * 4 + [True] * 6 + [False] * 6)  # ids 4..9 start a word, 10..15 continue one
    tokens = np.array([5, 10, 6, 4, 7, 11, 12, 8])  # words: [5 10] [6] <image> [7 11 12] [8]
    cost = lambda n, m: n + 3 * m            # 3 patches per image
    # 5 tokens fit, but cutting there would split the word [7 11 12]: cut before it.
    assert ip.truncate_to_fit(tokens, image_id, word_start, lambda n, m: cost(n, m) <= 8) == 4
    # Room for 3 tokens only: the image would not fit; cut before it (it is a boundary too).
    assert ip.truncate_to_fit(tokens, image_id, word_start, lambda n, m: cost(n, m) <= 6) == 3
    # Inside the first word with no earlier boundary: fall back to any token boundary.
    assert ip.truncate_to_fit(tokens, image_id, word_start, lambda n, m: cost(n, m) <= 1) == 1
    assert ip.truncate_to_fit(tokens, image_id, word_start, lambda n, m: n <= 0) == 0


def test_make_global_batch(tok, codec):
    assert jax.device_count() == 8
    batch = take(make_iter(tok, codec, global_batch_size=8), 1)[0]
    mesh = jax.make_mesh((8,), ("data",))
    glob = ip.make_global_batch(batch, mesh, "data")
    assert glob.keys() == batch.keys()
    for k, v in glob.items():
        assert v.shape == batch[k].shape
        assert v.sharding.spec == jax.sharding.PartitionSpec("data")
        assert {s.data.shape[0] for s in v.addressable_shards} == {1}
        np.testing.assert_array_equal(np.asarray(v), batch[k])
    mesh2 = jax.make_mesh((4, 2), ("data", "model"))
    glob2 = ip.make_global_batch(batch, mesh2, jax.sharding.PartitionSpec("data"))
    assert {s.data.shape[0] for s in glob2["tokens"].addressable_shards} == {2}


def test_eval_reader(tok, data_dir):
    builder = ip.prepare_dataset(make_config())
    records = datasets.load_records("shapes_world", "eval", None, builder.builder_config)
    assert len(records) == 40
    assert any(r["held_out"] for r in records)
    for r in records:
        assert len(r["attributes"]) == len(r["images"]) == r["text"].count("<image>")


def _write_images(folder, docs):
    paths = []
    for i, d in enumerate(docs):
        for j, im in enumerate(d.images):
            name = f"img_{i}_{j}.png"
            # Larger than the model's size and not square: the builder centre-crops and resizes.
            Image.fromarray(im).resize((64, 48), Image.NEAREST).save(folder / name)
            paths.append(name)
    return paths


def test_user_jsonl_builders(tok, codec, tmp_path, data_dir):
    docs = [sw.generate_document("train", i) for i in range(10)]
    _write_images(tmp_path, docs)
    lines = [json.dumps({"text": d.text, "images": [f"img_{i}_{j}.png" for j in range(len(d.images))]})
             for i, d in enumerate(docs)]
    lines += ["not json", json.dumps({"text": "two markers <image> <image>", "images": ["img_0_0.png"]}),
              json.dumps({"text": "missing <image>", "images": ["nope.png"]})]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = datasets.make_builder_config("interleaved_jsonl", {
        "name": "mine", "train_files": str(tmp_path / "docs.jsonl"), "image_size": 32})
    builder = datasets.ensure_prepared("interleaved_jsonl", config=cfg)
    assert builder.info.splits["train"].num_examples == 10  # bad lines skipped at build time
    files = datasets.split_filepaths(builder, "train")
    assert all(os.path.exists(f) and ".array_record" in f for f in files)
    it = _pipeline(files, builder.info.features, tok, codec, seq_len=512)
    assert sorted(t for b in it for t in unpack_texts(b, tok)) == sorted(d.text for d in docs)

    pairs = [json.dumps({"image": f"img_{i}_0.png", "caption": sw.caption(d.specs[0])}) for i, d in enumerate(docs)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    codec_spec = {"name": "pixel_patch", "image_size": 32, "patch_size": 4}
    cfg = datasets.make_builder_config("image_caption_pairs", {
        "name": "pairs_latents", "train_files": [str(tmp_path / "pairs.jsonl")], "image_size": 32,
        "codec": codec_spec})
    builder = datasets.ensure_prepared("image_caption_pairs", config=cfg)
    records = datasets.load_records("image_caption_pairs", "train", config=cfg)
    assert {r["kind"] for r in records} <= {"generation", "understanding"} and len(records) == 10
    assert all(r["images"].dtype == np.float32 and r["images"].shape == (1, 64, 48) for r in records)
    by_caption = {sw.caption(d.specs[0]): datasets.load_image(str(tmp_path / f"img_{i}_0.png"), 32)
                  for i, d in enumerate(docs)}
    for r in records:  # latents decode back to the (resized) source image
        caption = r["text"].replace("<image>", "").strip()
        np.testing.assert_array_equal(codec.decode(r["images"][0]), by_caption[caption])
    it = _pipeline(datasets.split_filepaths(builder, "train"), builder.info.features, tok, codec, latents=True)
    assert it.counters["documents"] == 0 and sum(1 for _ in it) >= 1 and it.counters["documents"] == 10
