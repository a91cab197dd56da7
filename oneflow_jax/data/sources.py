"""Where users' image-text data comes from, read record by record for the dataset builders (data/datasets.py):

  * `.jsonl`: one JSON object per line, images as paths (relative to the file's folder or `image_root`);
  * `.tar`: webdataset shards as img2dataset writes them (LAION, CC12M, DataComp): members grouped by key
    (`0001.jpg` + `0001.txt` and/or `0001.json`), the caption from the `.txt` or the JSON's caption field;
  * `.parquet`: one row per record, the image column holding bytes, a path, or Hugging Face datasets' struct
    `{"bytes": ..., "path": ...}` (pyarrow; read a row group at a time).

`read_items(path, fields)` yields (item index, a dict with the configured field names), whatever the format; a member
or row that cannot be read yields an exception in the dict's place, so the builder skips and counts it per shard.
`image_from(ref, root, image_size)` turns a field's value (bytes, a path, or the struct) into a uint8 RGB image.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator

import numpy as np
from etils import epath

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FORMATS = (".jsonl", ".tar", ".parquet")


def format_of(path: str) -> str:
    for ext in FORMATS:
        if str(path).endswith(ext):
            return ext
    raise ValueError(f"{path}: unknown data file type (known: {', '.join(FORMATS)})")


def read_items(path: str, image_field: str = "image", caption_field: str = "caption") -> Iterator[tuple[int, object]]:
    """(index, dict or Exception) for every record of one file; see the module docstring."""
    fmt = format_of(path)
    if fmt == ".jsonl":
        yield from _jsonl_items(path)
    elif fmt == ".tar":
        yield from _tar_items(path, image_field, caption_field)
    else:
        yield from _parquet_items(path)


def _jsonl_items(path):
    with epath.Path(path).open("r") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, e


def _tar_items(path, image_field, caption_field):
    """webdataset: consecutive members sharing a key form one sample (the shard's own order, as webdataset reads).
    A sample's fields are its members' extensions (`jpg`, `txt`, `json`, ...) and its JSON member's keys; the image
    is `image_field` or else its first image member, the caption `caption_field`, else the `txt` member, else the
    JSON's `caption`."""
    def sample_of(key, members):
        out = {"__key__": key}
        for ext, data in members.items():
            out[ext] = data
            if ext == "json":
                meta = json.loads(data)
                out["json"] = meta
                if isinstance(meta, dict):
                    for k, v in meta.items():
                        out.setdefault(k, v)
        if isinstance(out.get("txt"), bytes):
            out["txt"] = out["txt"].decode("utf-8")
        if image_field not in out:
            first = next((e for e in members if "." + e in IMAGE_EXTENSIONS), None)
            if first:
                out[image_field] = members[first]
        if caption_field not in out:
            caption = out.get("txt", out.get("caption"))
            if caption is not None:
                out[caption_field] = caption
        return out

    index, key, members = 0, None, {}
    try:
        with tarfile.open(fileobj=io.BytesIO(epath.Path(path).read_bytes())) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                stem, _, ext = base.partition(".")
                member_key = os.path.join(os.path.dirname(member.name), stem)
                if key is not None and member_key != key:
                    yield index, _safe(sample_of, key, members)
                    index, members = index + 1, {}
                key = member_key
                members[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:     # a truncated shard: what came before it still counts
        if members:
            yield index, _safe(sample_of, key, members)
            index += 1
        yield index, ValueError(f"unreadable tar ({e})")
        return
    if key is not None:
        yield index, _safe(sample_of, key, members)


def _parquet_items(path):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    try:
        pf = pq.ParquetFile(io.BytesIO(epath.Path(path).read_bytes()))
    except Exception as e:  # pylint: disable=broad-except  (pyarrow raises ArrowInvalid and friends)
        yield 0, ValueError(f"unreadable parquet ({e})")
        return
    index = 0
    for g in range(pf.num_row_groups):
        try:
            rows = pf.read_row_group(g).to_pylist()
        except Exception as e:  # pylint: disable=broad-except
            yield index, ValueError(f"unreadable row group {g} ({e})")
            index += pf.metadata.row_group(g).num_rows
            continue
        for row in rows:
            yield index, row
            index += 1


def _safe(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # pylint: disable=broad-except
        return e


def image_from(ref, root, image_size: int | None) -> np.ndarray:
    """RGB uint8 [H, W, 3] from bytes, a path (relative to `root`) or {"bytes": ..., "path": ...}; with
    `image_size`, centre-cropped to a square and resized."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    if isinstance(ref, dict):
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, str):
        ref = (epath.Path(root) / ref if root is not None else epath.Path(ref)).read_bytes()
    if not isinstance(ref, (bytes, bytearray)):
        raise ValueError(f"no image (got {type(ref).__name__})")
    with Image.open(io.BytesIO(ref)) as im:
        im = im.convert("RGB")
        if image_size:
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            if s != image_size:
                im = im.resize((image_size, image_size), Image.BICUBIC)
        return np.asarray(im, np.uint8)
