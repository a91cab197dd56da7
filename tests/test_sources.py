"""Users' data in the formats the field writes (data/sources.py): webdataset tar shards as img2dataset writes them,
parquet with image bytes / paths / Hugging Face structs, and JSONL, mixed in one dataset; corrupt images, empty
captions and truncated shards are skipped and counted, never fatal."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from oneflow_jax.data import datasets, sources
from oneflow_jax.data import shapes_world as sw


def _jpeg(im) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(im).resize((48, 40)).save(buf, format="JPEG", quality=95)   # not square: centre-cropped
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def docs():
    return [sw.generate_document("train", i) for i in range(12)]


def test_webdataset_parquet_and_jsonl_pairs_in_one_dataset(docs, tmp_path, data_dir, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq
    caption = lambda d: sw.caption(d.specs[0])
    members = []
    for i, d in enumerate(docs[:4]):                      # img2dataset: NNNN.jpg + NNNN.txt + NNNN.json
        members += [(f"{i:04d}.jpg", _jpeg(d.images[0])), (f"{i:04d}.txt", caption(d).encode()),
                    (f"{i:04d}.json", json.dumps({"url": "x", "key": f"{i:04d}"}).encode())]
    members += [("0004.jpg", b"not a jpeg"), ("0004.txt", b"a caption"),          # corrupt image
                ("0005.jpg", _jpeg(docs[4].images[0])), ("0005.txt", b"   ")]       # empty caption
    _tar(tmp_path / "00000.tar", members)
    good = _jpeg(docs[5].images[0])
    _tar(tmp_path / "00001.tar", [("a.jpg", good), ("a.json", json.dumps({"caption": caption(docs[5])}).encode())])
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(data[:700])                                # truncated inside a member
    pq.write_table(pa.table({"jpg": [_jpeg(docs[7].images[0]), None], "txt": [caption(docs[7]), "no image"]}),
                   tmp_path / "bytes.parquet")
    (tmp_path / "img6.jpg").write_bytes(_jpeg(docs[6].images[0]))
    hf_style = [{"bytes": _jpeg(docs[8].images[0]), "path": None}, {"bytes": None, "path": "img6.jpg"}]
    pq.write_table(pa.table({"jpg": hf_style, "txt": [caption(docs[8]), caption(docs[6])]}), tmp_path / "hf.parquet",
                   row_group_size=1)
    cfg = datasets.make_builder_config("image_caption_pairs", {
        "name": "mixed", "image_size": 32, "image_field": "jpg", "caption_field": "txt",
        "train_files": [str(tmp_path / f) for f in ("00000.tar", "00001.tar", "00002.tar", "bytes.parquet",
                                                    "hf.parquet")]})
    builder = datasets.ensure_prepared("image_caption_pairs", config=cfg)
    records = datasets.load_records("image_caption_pairs", "train", config=cfg)
    want = {caption(docs[i]) for i in (0, 1, 2, 3, 5, 7, 8, 6)}
    assert builder.info.splits["train"].num_examples == len(records) == len(want)
    assert {r["text"].replace("<image>", "").strip() for r in records} == want
    assert all(r["images"].shape == (1, 32, 32, 3) for r in records)
    assert "00000.tar: skipped 2 of 6 records" in caplog.text
    assert "00002.tar: skipped 1 of 1 records" in caplog.text and "bytes.parquet: skipped 1 of 2" in caplog.text


def test_interleaved_parquet_with_image_bytes(docs, tmp_path, data_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"text": d.text, "images": [_jpeg(im) for im in d.images]} for d in docs[:5]]
    rows.append({"text": "one marker <image> but two images", "images": [_jpeg(docs[0].images[0])] * 2})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "docs.parquet")
    cfg = datasets.make_builder_config("interleaved_jsonl", {
        "name": "docs_pq", "image_size": 32, "train_files": [str(tmp_path / "docs.parquet")]})
    records = datasets.load_records("interleaved_jsonl", "train", config=cfg)
    assert sorted((r["text"], len(r["images"])) for r in records) == sorted((d.text, len(d.images)) for d in docs[:5])


def test_image_refs_and_formats(tmp_path):
    im = np.zeros((20, 30, 3), np.uint8)
    im[:, 10:20] = 255
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="PNG")
    (tmp_path / "x.png").write_bytes(buf.getvalue())
    for ref in (buf.getvalue(), "x.png", {"bytes": buf.getvalue(), "path": None}, {"bytes": None, "path": "x.png"}):
        out = sources.image_from(ref, tmp_path, 20)
        np.testing.assert_array_equal(out, im[:, 5:25])                                    # centre crop
    with pytest.raises(ValueError, match="no image"):
        sources.image_from(None, tmp_path, 20)
    with pytest.raises(ValueError, match="unknown data file type"):
        sources.format_of("data.csv")


def test_missing_files_and_all_bad_records_are_one_clear_error(tmp_path, data_dir):
    missing = datasets.make_builder_config("image_caption_pairs", {
        "name": "missing", "image_size": 32, "train_files": [str(tmp_path / "nope.tar")]})
    with pytest.raises(ValueError, match=r"nope.tar \(builder_config.train_files\) does not exist"):
        datasets.ensure_prepared("image_caption_pairs", config=missing)
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all")
    all_bad = datasets.make_builder_config("image_caption_pairs", {
        "name": "all_bad", "image_size": 32, "train_files": [str(tmp_path / "bad.tar")]})
    with pytest.raises(ValueError, match="no usable record"):
        datasets.ensure_prepared("image_caption_pairs", config=all_bad)
