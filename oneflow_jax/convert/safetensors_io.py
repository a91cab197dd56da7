"""A strict, pickle-free safetensors reader/writer over numpy (bfloat16 via ml_dtypes).

Format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the raw little-endian
tensor bytes; offsets are relative to the end of the header. The `safetensors` package reads what this writes (tested);
this module exists so that every failure names the tensor at fault: a truncated file, an offset outside the data, a
byte count that disagrees with dtype x shape, a missing or unexpected name, or a shape other than the expected one.
Reading memory-maps the file, so multi-GB checkpoints (Llama, VAE) are not copied until a tensor is used.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A malformed, truncated or mismatched safetensors file; the message names the file and the tensor."""


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` (sorted by name, 8-byte aligned header) to `path` atomically (tmp file + rename)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype not in _CODES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {a.dtype}")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)


def read_header(path: str) -> tuple[dict, dict, int]:
    """Returns ({name: entry}, metadata, data_start) after checking the header is well formed and complete."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header size)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: header of {n} bytes does not fit in the {size}-byte file "
                                   "(truncated or not a safetensors file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    for name, entry in header.items():
        if entry.get("dtype") not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unknown dtype {entry.get('dtype')!r}")
        begin, end = entry["data_offsets"]
        nbytes = math.prod(entry["shape"]) * DTYPES[entry["dtype"]].itemsize
        if end - begin != nbytes or begin < 0:
            raise SafetensorsError(f"{path}: tensor {name!r} ({entry['dtype']} {entry['shape']}) should take {nbytes} "
                                   f"bytes but its offsets {begin}..{end} span {end - begin}")
        if end > data_size:
            raise SafetensorsError(f"{path}: file truncated: tensor {name!r} needs data bytes {begin}..{end} but the "
                                   f"data section holds only {data_size}")
    return header, metadata, 8 + n


def load_file(path: str, expected: Mapping[str, tuple[int, ...]] | None = None,
              allow_missing: bool = False, allow_unexpected: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """Reads every tensor of `path` as read-only memory-mapped numpy arrays; returns (tensors, metadata).

    With `expected` ({name: shape}) the names and shapes are checked first and every problem is reported by name.
    """
    header, metadata, start = read_header(path)
    if expected is not None:
        check_names_and_shapes({k: tuple(v["shape"]) for k, v in header.items()}, expected, path,
                               allow_missing=allow_missing, allow_unexpected=allow_unexpected)
    mm = np.memmap(path, dtype=np.uint8, mode="r") if header else None
    out = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]].newbyteorder("<")
        out[name] = mm[start + begin:start + end].view(dtype).reshape(entry["shape"])
    return out, metadata


def check_names_and_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], source: str,
                           allow_missing: bool = False, allow_unexpected: bool = False) -> None:
    """Raises SafetensorsError listing missing, unexpected and wrongly shaped tensors (by name)."""
    problems = []
    if not allow_missing:
        problems += [f"missing tensor {k!r} (expected shape {tuple(expected[k])})" for k in expected if k not in found]
    if not allow_unexpected:
        problems += [f"unexpected tensor {k!r} (shape {tuple(found[k])})" for k in found if k not in expected]
    problems += [f"tensor {k!r} has shape {tuple(found[k])}, expected {tuple(expected[k])}"
                 for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise SafetensorsError(f"{source}: {len(problems)} tensor mismatch(es):\n  {shown}")


def load_sharded(directory: str, single: str, index: str) -> dict[str, np.ndarray]:
    """Loads a Hugging Face checkpoint directory: `single` (e.g. model.safetensors) or the shards listed by `index`
    (e.g. model.safetensors.index.json, {"weight_map": {tensor: shard file}}). Never falls back to pickle files."""
    single_path, index_path = os.path.join(directory, single), os.path.join(directory, index)
    if os.path.exists(single_path):
        return load_file(single_path)[0]
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            tensors, _ = load_file(os.path.join(directory, shard))
            out.update(tensors)
        missing = sorted(k for k, shard in weight_map.items() if k not in out)
        if missing:
            raise SafetensorsError(f"{index_path}: tensors listed in the index but absent from their shard: {missing[:10]}")
        return out
    raise FileNotFoundError(f"{directory}: neither {single} nor {index} found (only safetensors checkpoints are "
                            "supported; convert .bin / .pt files with a trusted tool first)")
