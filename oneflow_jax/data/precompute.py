"""Sharded, resumable latent precompute: users' image-text files -> ArrayRecord shards of codec latents, encoded on
every local device of every process (`python -m oneflow_jax.precompute`, docs/real_data.md).

The output is the prepared tfds dataset that `datasets.ensure_prepared(name, data_dir, config)` looks for, so `train`
with the same `data.builder_config` reads it with no other step. The work is cut by input file:

  * every input file (a webdataset `.tar`, a `.parquet`, a `.jsonl`; data/sources.py) of a split is one *unit* and
    becomes the output shard with the same index, `<name>-<split>.array_record-<i>-of-<n>`;
  * process p of P takes units p, p + P, ... . It decodes images on `decode_threads` host threads and encodes them in
    batches of `per_device_batch` x its local devices, the batch sharded across them. Images of consecutive
    documents and units share batches, so only the process's very last batch is padded;
  * a finished shard is written to `<shard>.tmp`, renamed into place, then marked done by
    `precompute/<split>-<i>.json` (its record, image and skip counts). A rerun skips marked units, so a killed job
    loses at most the units in flight;
  * the process that finds every unit marked writes the tfds metadata (`dataset_info.json`, `features.json`, and the
    totals in `metadata.json`): only then is the dataset prepared.

Latents are stored as `codec["dtype"]` (bfloat16 by default here), normalised once with the VAE's shift and scale,
which the dataset's metadata records. Bad records (unreadable members, undecodable images, empty captions, texts
whose `<image>` markers do not match the images) are skipped and counted by reason, per shard and in total.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from oneflow_jax import cli
from oneflow_jax.data import datasets, sources

MARKERS = "precompute"                  # the folder of per-unit completion markers, inside the dataset directory
SKIP_REASONS = ("unreadable", "malformed", "bad_image")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One input file of a split, and the output shard it becomes."""
    split: str
    index: int
    count: int          # input files in the split
    path: str

    def shard(self, dataset: str) -> str:
        return f"{dataset}-{self.split}.{datasets.FILE_FORMAT}-{self.index:05d}-of-{self.count:05d}"

    @property
    def marker(self) -> str:
        return f"{MARKERS}/{self.split}-{self.index:05d}.json"


def units_of(config) -> list[Unit]:
    """Every unit of the config's train and eval files, in order."""
    out = []
    for split, files in (("train", config.train_files), ("eval", config.eval_files)):
        out += [Unit(split, i, len(files), str(path)) for i, path in enumerate(files)]
    return out


# ------------------------------------------------------------------------------------------------ encoding


class DeviceEncoder:
    """uint8 images [B, H, W, 3] -> latents [B, num_patches, patch_dim] in `dtype`, jitted over this process's devices
    with the batch sharded across them (B = per_device_batch x local devices). A codec without device weights (the
    pixel-patch codec) encodes on the host."""

    def __init__(self, codec, per_device_batch: int, dtype):
        self.codec, self.dtype = codec, dtype
        devices = jax.local_devices()
        self.num_devices = len(devices)
        self.batch_size = int(per_device_batch) * self.num_devices
        mesh = Mesh(np.asarray(devices), ("batch",))
        self._batch = NamedSharding(mesh, PartitionSpec("batch"))
        self._fn = None
        if getattr(codec, "params", None) is not None:        # a VAE: run it on the devices
            self._params = jax.device_put(codec.params, NamedSharding(mesh, PartitionSpec()))
            self._fn = jax.jit(lambda params, images: codec.encode_patches(params, images).astype(dtype),
                               out_shardings=self._batch)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """A full batch of `batch_size` images (pad the last one)."""
        if self._fn is None:
            return np.asarray(self.codec.encode(images), np.float32).astype(self.dtype)
        return np.asarray(self._fn(self._params, jax.device_put(images, self._batch)))


# ------------------------------------------------------------------------------------------------ one process


@dataclasses.dataclass
class _Doc:
    unit: Unit
    text: str
    kind: str
    latents: list           # one slot per image, filled as batches come back


class _Output:
    """The open output shard of one unit: records are written in input order as their latents arrive."""

    def __init__(self, unit: Unit, directory: epath.Path, dataset: str):
        from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
        self.unit, self.path = unit, directory / unit.shard(dataset)
        self.tmp = epath.Path(str(self.path) + ".tmp")
        self._writer = array_record_module.ArrayRecordWriter(os.fspath(self.tmp), "group_size:1")
        self.records = self.images = 0
        self.skipped = collections.Counter()
        self.pending = 0            # documents read but not written yet
        self.read_all = False

    def write(self, raw: bytes, num_images: int) -> None:
        self._writer.write(raw)
        self.records += 1
        self.images += num_images
        self.pending -= 1

    def finish(self, directory: epath.Path) -> dict:
        self._writer.close()
        self.tmp.rename(self.path)
        info = {"split": self.unit.split, "index": self.unit.index, "input": self.unit.path,
                "shard": self.path.name, "records": self.records, "images": self.images,
                "num_bytes": self.path.stat().length, "skipped": dict(self.skipped)}
        marker = directory / self.unit.marker
        tmp = epath.Path(str(marker) + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.rename(marker)
        return info


class Precompute:
    """The loop of one process over its units (see the module docstring)."""

    def __init__(self, builder, encoder: DeviceEncoder, decode_threads: int = 8, log_every_s: float = 30.0):
        self.builder, self.encoder, self.cfg = builder, encoder, builder.builder_config
        self.directory = epath.Path(builder.data_dir)
        self.features = builder.info.features
        self.decode_threads, self.log_every_s = max(int(decode_threads), 1), log_every_s
        self.parse = datasets.BUILDERS[builder.name].parse
        self._docs: collections.deque[_Doc] = collections.deque()
        self._queue: list[tuple[_Doc, int, np.ndarray]] = []          # images waiting for a batch
        self._outputs: dict[Unit, _Output] = {}
        self.batches = self.encoded = 0

    # -- reading
    def _prepare(self, unit: Unit, item) -> tuple:
        """(item index, object) -> ("ok", text, kind, images) or ("skip", reason, message)."""
        index, obj = item
        if isinstance(obj, Exception):
            return "skip", "unreadable", f"record {index}: {obj}"
        root = epath.Path(self.cfg.image_root) if self.cfg.image_root else epath.Path(unit.path).parent
        try:
            text, kind, refs = self.parse(obj, f"{unit.split}/{unit.index}/{index}", self.cfg)
            datasets.check_document(text, len(refs))
        except Exception as e:  # pylint: disable=broad-except  (missing fields, empty caption, bad markers)
            return "skip", "malformed", f"record {index}: {e}"
        try:
            images = [sources.image_from(r, root, self.cfg.image_size) for r in refs]
        except Exception as e:  # pylint: disable=broad-except  (truncated / not an image / missing file)
            return "skip", "bad_image", f"record {index}: {str(e).splitlines()[0][:200] if str(e) else e}"
        return "ok", text, kind, images

    def _read(self, unit: Unit, pool) -> None:
        out = self._outputs[unit] = _Output(unit, self.directory, self.builder.name)
        items = sources.read_items(unit.path, self.cfg.image_field, self.cfg.caption_field)
        while True:
            chunk = [item for _, item in zip(range(4 * self.decode_threads), items)]
            if not chunk:
                break
            for result in pool.map(lambda item: self._prepare(unit, item), chunk):
                if result[0] == "skip":
                    out.skipped[result[1]] += 1
                    logging.warning("%s: skipping %s", unit.path, result[2])
                    continue
                _, text, kind, images = result
                doc = _Doc(unit, text, kind, [None] * len(images))
                self._docs.append(doc)
                out.pending += 1
                self._queue += [(doc, i, image) for i, image in enumerate(images)]
                while len(self._queue) >= self.encoder.batch_size:
                    self._encode(self._queue[:self.encoder.batch_size])
                    del self._queue[:self.encoder.batch_size]
                self._write_ready()
        out.read_all = True
        self._write_ready()

    # -- encoding and writing
    def _encode(self, entries, pad: int = 0) -> None:
        images = np.stack([image for _, _, image in entries])
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
        latents = self.encoder(images)
        for (doc, slot, _), z in zip(entries, latents):
            doc.latents[slot] = z
        self.batches += 1
        self.encoded += len(entries)

    def _write_ready(self) -> None:
        """Writes the leading documents whose latents are all back; finishes units that are read and written."""
        while self._docs and all(z is not None for z in self._docs[0].latents):
            doc = self._docs.popleft()
            c = self.encoder.codec
            latents = (np.stack(doc.latents) if doc.latents
                       else np.zeros((0, c.num_patches, c.patch_dim), self.encoder.dtype))
            raw = self.features.serialize_example({"text": doc.text, "kind": doc.kind, "images": latents})
            self._outputs[doc.unit].write(raw, len(doc.latents))
        for unit, out in list(self._outputs.items()):
            if out.read_all and out.pending == 0:
                out.finish(self.directory)
                del self._outputs[unit]

    def run(self, units: list[Unit]) -> None:
        t0, last_log, total = time.time(), time.time(), len(units)
        (self.directory / MARKERS).mkdir(parents=True, exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(self.decode_threads) as pool:
            for n, unit in enumerate(units):
                self._read(unit, pool)
                if time.time() - last_log > self.log_every_s or n + 1 == total:
                    last_log = time.time()
                    self._progress(n + 1, total, time.time() - t0)
            if self._queue:                  # the process's one partial batch
                self._encode(self._queue, pad=self.encoder.batch_size - len(self._queue))
                self._queue = []
            self._write_ready()
        assert not self._docs and not self._outputs, "documents left unwritten"

    @property
    def useful_fraction(self) -> float:
        """Encoded images / encoder slots computed (1 - padding waste)."""
        return self.encoded / max(self.batches * self.encoder.batch_size, 1)

    def _progress(self, units_read: int, total: int, elapsed: float) -> None:
        per_device = self.encoded / max(elapsed, 1e-9) / self.encoder.num_devices
        eta = elapsed / units_read * (total - units_read)
        cli.say(f"precompute [process {jax.process_index()}]: {units_read}/{total} input files, {self.encoded} images "
                f"({per_device:.2f} images/s per device x {self.encoder.num_devices}), "
                f"ETA {eta / 60:.1f} min", every_process=True)


# ------------------------------------------------------------------------------------------------ metadata


def read_markers(directory: epath.Path, units: list[Unit]) -> dict[Unit, dict]:
    out = {}
    for unit in units:
        path = directory / unit.marker
        if path.exists():
            out[unit] = json.loads(path.read_text())
    return out


def write_metadata(builder, units: list[Unit], extra: dict[str, Any]) -> dict:
    """Writes dataset_info.json / features.json / metadata.json from the markers; the dataset is then prepared."""
    directory = epath.Path(builder.data_dir)
    markers = read_markers(directory, units)
    splits = []
    for split in dict.fromkeys(u.split for u in units):
        rows = [markers[u] for u in units if u.split == split]
        template = tfds.core.ShardedFileTemplate(data_dir=directory, dataset_name=builder.name, split=split,
                                                 filetype_suffix=datasets.FILE_FORMAT)
        splits.append(tfds.core.SplitInfo(name=split, shard_lengths=[r["records"] for r in rows],
                                          num_bytes=sum(r["num_bytes"] for r in rows), filename_template=template))
    skipped = collections.Counter()
    for row in markers.values():
        skipped.update(row["skipped"])
    totals = {"records": sum(r["records"] for r in markers.values()),
              "images": sum(r["images"] for r in markers.values()),
              "skipped": {reason: skipped.get(reason, 0) for reason in SKIP_REASONS}, **extra}
    info = builder.info
    info.set_splits(tfds.core.SplitDict(splits))
    info.metadata.update({"precompute": totals})
    info.write_to_directory(directory)
    return totals


def latent_normalisation(codec) -> dict:
    """What was applied to the latents once, before storing: z = (mean - shift) * scale."""
    vae = getattr(codec, "vae_config", None)
    if vae is None:
        return {"codec": type(codec).__name__, "scaling_factor": 1.0, "shift_factor": 0.0}
    return {"codec": type(codec).__name__, "scaling_factor": vae.scaling_factor, "shift_factor": vae.shift_factor}
