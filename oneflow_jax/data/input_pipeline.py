"""Grain input pipeline: ArrayRecord records -> noised documents -> packed [batch, seq_len] rows.

Stages (docs/data.md has the full picture):

    records.open_shards(files).records()             raw serialized records of one split (data/records.py: unreadable
                                                     shards skipped whole, unreadable records as skip markers)
      .map(_Decode)                                  tfds decode + validation (records are read lazily, by index)
      [_MemoizedMapDataset]                          data.cache_decoded: each record decoded once per process
      .shuffle(shuffle_seed).repeat(num_epochs)      seeded global shuffle, reshuffled every epoch
      .map_with_index(...)                           tag each record with its global stream position
      [s::num_streams], for this host's streams s    per-host shard: disjoint streams covering every epoch
      .map(_Tokenize)                                text -> ids, images -> latents, over-long policy
      .map(_Transform)                               per-document transform (OneFlow noising), seeded by
                                                     (seed, global position) = per example and epoch
      .to_iter_dataset()
    StreamPackerIterDataset                          greedy row filling per stream -> blocks of rows
      .mp_prefetch(num_workers)                      worker processes, whole streams each (or a prefetch thread)
    TrainIterator                                    blocks -> batch, cumulative counters, checkpointable state

The global batch is `num_streams` blocks of rows, block s packed from stream s alone, so it is identical whatever
the process count or number of workers; a host builds the contiguous blocks of its streams.

Bad records never raise: they travel as `{"skip": reason}` markers to the packer, which counts them per block; the
`TrainIterator` accumulates the counts (`iterator.counters`, `iterator.skipped_records`) and checkpoints them with
its state. The per-document transform and the row packer are pluggable (`DocumentTransform`, `RowPacker`): the AR
baseline swaps them and keeps everything else.
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import json
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from oneflow_jax.cli import UserError
from oneflow_jax.data import datasets, encode_in_step, packing, records
from oneflow_jax.data import tokenizer as tokenizer_lib

MAX_SKIPS_IN_A_ROW = 2000   # records skipped in a row before a stream gives up: the data cannot be what the config says


class DataStarvedError(ValueError):
    """Every record of a long run was skipped: the data does not match the config (image size, latents, ...)."""


SKIP_REASONS = ("unreadable", "corrupt", "invalid", "overlong", "transform_error")
COUNTER_NAMES = tuple(f"skipped_{r}" for r in SKIP_REASONS) + ("truncated", "documents", "rows")
_COUNTS_KEY = "_counts"


# ------------------------------------------------------------------------------------------ pluggable pieces


class DocumentTransform(Protocol):
    """Turns one clean document into the variable-length sequence the packer places."""

    def cost(self, num_tokens: int, num_images: int) -> tuple[int, ...]:
        """Worst-case row usage (same arity as `RowPacker.limits`) of a clean document of this size."""

    def __call__(self, tokens: np.ndarray, latents: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        ...


class RowPacker(Protocol):
    """Places transformed documents into rows; `usage(doc)` is summed per row and must stay <= `limits`."""

    limits: tuple[int, ...]

    def usage(self, doc: dict[str, np.ndarray]) -> tuple[int, ...]:
        ...

    def pack(self, docs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        ...


def truncate_to_fit(tokens: np.ndarray, image_id: int, word_start: np.ndarray,
                    fits: Callable[[int, int], bool]) -> int:
    """Largest cut c (1 <= c < len) such that tokens[:c] fits, preferring a text boundary; 0 if nothing fits.

    `fits(num_tokens, num_images)` must be monotone in the prefix length. A boundary is a cut before a token that
    starts a word or is `<image>` (so images and words stay whole); without one, any token boundary is used.
    """
    is_image = tokens == image_id
    cum_images = np.concatenate([[0], np.cumsum(is_image)])
    lo, hi = 0, len(tokens) - 1  # invariant: prefix lo fits (0 trivially), find the largest fitting c <= hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid, int(cum_images[mid])):
            lo = mid
        else:
            hi = mid - 1
    for c in range(lo, 0, -1):
        if word_start[tokens[c]]:
            return c
    return lo


# ----------------------------------------------------------------------------------------- per-record stages


def _skip(reason: str, why: str = "") -> dict[str, Any]:
    return {"skip": reason, "why": why} if why else {"skip": reason}


class _Decode:
    """Raw record -> {'text', 'images'} or a skip marker ('corrupt': unparsable, 'invalid': bad values)."""

    def __init__(self, features_json: str, latents: bool, image_shape: tuple[int, ...],
                 latent_shape: tuple[int, int]):
        self._features_json = features_json
        self._latents = latents
        self._image_shape = tuple(image_shape)
        self._latent_shape = tuple(latent_shape)
        self._features = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_features"] = None  # rebuilt lazily in each worker process
        return state

    def _check_images(self, images) -> None:
        for im in images:
            im = np.asarray(im)
            if self._latents:
                if im.dtype.name not in ("float32", "bfloat16", "float16") or im.shape != self._latent_shape:
                    raise ValueError(f"latent {im.dtype}{im.shape}, expected float32/bf16/f16{self._latent_shape}")
                if not np.isfinite(im).all():
                    raise ValueError("non-finite latents")
            elif im.dtype != np.uint8 or im.shape != self._image_shape:
                raise ValueError(f"image {im.dtype}{im.shape}, expected uint8{self._image_shape}")

    def __call__(self, raw):
        if isinstance(raw, dict):           # a skip marker (records.UNREADABLE: its chunk failed its checksum)
            return raw
        if self._features is None:
            self._features = tfds.features.FeatureConnector.from_json(json.loads(self._features_json))
        try:
            ex = self._features.deserialize_example_np(raw)
            text = ex["text"].decode("utf-8") if isinstance(ex["text"], bytes) else str(ex["text"])
            images = list(ex["images"])
        except Exception:  # pylint: disable=broad-except
            return _skip("corrupt")
        try:
            datasets.check_document(text, len(images))
            self._check_images(images)
        except ValueError as e:
            return _skip("invalid", str(e))
        return {"text": text, "images": images}


@dataclasses.dataclass
class _Tokenize:
    """(global position, decoded record) -> token ids, latents [n_img, N, D], position; the over-long policy."""

    tokenizer: tokenizer_lib.Tokenizer
    codec: Any
    latents: bool
    cost: Callable[[int, int], tuple[int, ...]]
    limits: tuple[int, ...]
    overlong: str

    def _fits_empty_row(self, num_tokens: int, num_images: int) -> bool:
        return packing.fits((0,) * len(self.limits), self.cost(num_tokens, num_images), self.limits)

    def __call__(self, item):
        index, element = item
        if "skip" in element:
            return element
        tokens = np.asarray(self.tokenizer.encode(element["text"]), np.int32)
        images = element["images"]
        n_img = len(images)
        if not len(tokens) or int((tokens == self.tokenizer.image_id).sum()) != n_img:
            return _skip("invalid")
        if n_img == 0:
            latents = np.zeros((0, self.codec.num_patches, self.codec.patch_dim), np.float32)
        elif self.latents:
            latents = np.stack(images).astype(np.float32)
        else:
            latents = self.codec.encode(np.stack(images)).astype(np.float32)

        truncated = False
        if not self._fits_empty_row(len(tokens), n_img):
            if self.overlong == "drop":
                return _skip("overlong")
            cut = truncate_to_fit(tokens, self.tokenizer.image_id, self.tokenizer.word_start, self._fits_empty_row)
            if cut == 0:
                return _skip("overlong")
            tokens = tokens[:cut]
            latents = latents[:int((tokens == self.tokenizer.image_id).sum())]
            truncated = True
        return {"index": index, "tokens": tokens, "latents": latents, "truncated": truncated}


@dataclasses.dataclass
class _Transform:
    """Runs the per-document transform with a Generator seeded by (seed, global stream position)."""

    transform: DocumentTransform
    seed: int

    def __call__(self, element):
        if "skip" in element:
            return element
        rng = np.random.default_rng([self.seed, element["index"]])
        try:
            doc = self.transform(element["tokens"], element["latents"], rng)
        except Exception:  # pylint: disable=broad-except
            logging.warning("document transform failed on record %d; skipping it", element["index"], exc_info=True)
            return _skip("transform_error")
        return {"doc": doc, "truncated": element["truncated"]}


# -------------------------------------------------------------------------------------------------- packing


class StreamPackerIterDataset(grain.IterDataset):
    """Packs each record stream into rows and emits one block of `rows_per_stream` rows per stream, cycling.

    Parents: one per-document IterDataset per stream. Rows are filled greedily in stream order; the first document
    that does not fit closes the row and is carried over to the stream's next row. Elements are
    `{key: [rows_per_stream, ...], "_counts": [len(COUNTER_NAMES)]}` in stream order. Under `mp_prefetch`, worker w
    keeps streams w, w + W, ... (`set_slice`); Grain's round-robin over workers then restores stream order.
    """

    def __init__(self, streams: Sequence[grain.IterDataset], packer: RowPacker, rows_per_stream: int):
        super().__init__(list(streams))
        self._packer = packer
        self._rows = rows_per_stream
        self._active = list(range(len(streams)))

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        del sequential_slice  # whole streams are dealt to workers either way
        self._active = self._active[sl]

    def __iter__(self):
        return _StreamPackerIterator([self.parents[i].__iter__() for i in self._active], self._packer, self._rows)

    def __str__(self):
        return f"StreamPackerIterDataset(streams={len(self._active)}, rows_per_stream={self._rows})"


class _StreamPackerIterator(grain.DatasetIterator):
    """State: per stream, its parent's position *before* the carried-over document (restoring re-reads it)."""

    def __init__(self, streams, packer: RowPacker, rows_per_stream: int):
        super().__init__(streams)
        self._packer = packer
        self._rows = rows_per_stream
        n = len(streams)
        self._pending = [None] * n          # document read but not placed (did not fit the previous row)
        self._pending_state = [None] * n    # parent state just before it was read
        self._exhausted = [False] * n
        self._next = 0                      # stream whose block comes next

    def _read(self, s: int):
        if self._pending[s] is not None:
            element, self._pending[s] = self._pending[s], None
            return element
        self._pending_state[s] = self._parents[s].get_state()
        return next(self._parents[s])

    def _fill_row(self, s: int, counts: dict[str, int]) -> list[dict]:
        """Documents of stream s's next row ([] once the stream is exhausted)."""
        limits = tuple(self._packer.limits)
        docs, used = [], (0,) * len(limits)
        in_a_row, why = collections.Counter(), ""
        while True:
            try:
                element = self._read(s)
            except StopIteration:
                self._exhausted[s] = True
                return docs
            if "skip" in element:
                counts["skipped_" + element["skip"]] += 1
                in_a_row[element["skip"]] += 1
                why = element.get("why", why)
                if sum(in_a_row.values()) >= MAX_SKIPS_IN_A_ROW:
                    raise DataStarvedError(
                        f"{MAX_SKIPS_IN_A_ROW} records in a row were skipped ("
                        + ", ".join(f"{k}: {v}" for k, v in in_a_row.most_common()) + (f"; e.g. {why}" if why else "")
                        + "): the data does not match the config (codec image size, data.latents) or is damaged")
                continue
            in_a_row.clear()
            usage = tuple(self._packer.usage(element["doc"]))
            if packing.fits(used, usage, limits):
                docs.append(element["doc"])
                used = tuple(u + e for u, e in zip(used, usage))
                counts["truncated"] += int(element["truncated"])
            elif not docs:  # cannot happen after the over-long policy, but never loop forever
                counts["skipped_overlong"] += 1
            else:
                self._pending[s] = element
                return docs

    def __next__(self):
        while not all(self._exhausted):
            s = self._next
            self._next = (s + 1) % len(self._parents)
            if self._exhausted[s]:
                continue
            counts = dict.fromkeys(COUNTER_NAMES, 0)
            rows = []
            while len(rows) < self._rows and not self._exhausted[s]:
                docs = self._fill_row(s, counts)
                if docs:
                    rows.append(self._packer.pack(docs))
                    counts["documents"] += len(docs)
            counts["rows"] = len(rows)
            if rows and len(rows) < self._rows:  # the stream ended mid-block: pad with empty rows
                rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (self._rows - len(rows))
            block = {k: np.stack([r[k] for r in rows]) for k in rows[0]} if rows else {}
            if rows or any(counts.values()):  # a finite stream may end with skips only: still report them
                block[_COUNTS_KEY] = np.asarray([counts[k] for k in COUNTER_NAMES], np.int64)
                return block
        raise StopIteration

    def get_state(self):
        streams = [self._pending_state[s] if self._pending[s] is not None else p.get_state()
                   for s, p in enumerate(self._parents)]
        return {"streams": streams, "next": self._next}

    def set_state(self, state):
        if len(state["streams"]) != len(self._parents):
            raise ValueError(f"iterator state has {len(state['streams'])} streams, this worker "
                             f"{len(self._parents)}: restore with the same data.num_streams, processes and workers")
        for parent, st in zip(self._parents, state["streams"]):
            parent.set_state(st)
        n = len(self._parents)
        self._pending, self._pending_state, self._exhausted = [None] * n, [None] * n, [False] * n
        self._next = int(state["next"])

    def __str__(self):
        return "StreamPackerDatasetIterator"


class TrainIterator(grain.DatasetIterator):
    """Host-local batches `{key: np.ndarray [rows, ...]}` with cumulative, checkpointed counters.

    Concatenates the next block of each of this host's streams (in stream order) into one batch. `counters`: the
    COUNTER_NAMES summed over every batch returned so far on this host; `skipped_records` is the sum of the
    skipped_*; `unreadable_shards` lists the shards skipped whole (records.open_shards). `get_state()` /
    `set_state()` are JSON-serializable (Grain's Orbax handler accepts this iterator). A finite stream (num_epochs
    set) ends with a batch padded by empty rows (segment_ids 0).
    """

    def __init__(self, parent: grain.DatasetIterator, rows_per_batch: int, unreadable_shards: Sequence[dict] = ()):
        super().__init__(parent)
        self._rows = rows_per_batch
        self.unreadable_shards = list(unreadable_shards)
        self._totals = np.zeros(len(COUNTER_NAMES), np.int64)
        # Stop prefetch threads / worker processes before interpreter teardown if the user never calls close().
        atexit.register(_close_at_exit, weakref.ref(self))

    def __next__(self):
        blocks, rows = [], 0
        while rows < self._rows:
            try:
                block = dict(next(self._parent))
            except StopIteration:
                break
            self._totals += block.pop(_COUNTS_KEY)
            if block:
                blocks.append(block)
                rows += len(block["segment_ids"])
        if not blocks:
            raise StopIteration
        if rows < self._rows:  # end of a finite stream
            pad = {k: np.zeros((self._rows - rows,) + v.shape[1:], v.dtype) for k, v in blocks[0].items()}
            blocks.append(pad)
        return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}

    @property
    def counters(self) -> dict[str, int]:
        return {k: int(v) for k, v in zip(COUNTER_NAMES, self._totals)}

    @property
    def skipped_records(self) -> int:
        return int(sum(self._totals[i] for i, k in enumerate(COUNTER_NAMES) if k.startswith("skipped_")))

    def get_state(self):
        return {"pipeline": self._parent.get_state(), "counters": self.counters}

    def set_state(self, state):
        self._parent.set_state(state["pipeline"])
        counters = state.get("counters", {})
        self._totals = np.asarray([int(counters.get(k, 0)) for k in COUNTER_NAMES], np.int64)

    def __str__(self):
        return "TrainIterator"


def _close_at_exit(ref: weakref.ref) -> None:
    iterator = ref()
    if iterator is not None:
        iterator.close()
        # Drop the closed pipeline now: Grain's __del__ hooks fail noisily once interpreter teardown has begun.
        iterator._parents = ()  # pylint: disable=protected-access


# ------------------------------------------------------------------------------------------------- assembly


class _MemoizedMapDataset(grain.MapDataset):
    """parent[i], computed once per index and then kept (a pure parent: the elements are the same either way)."""

    def __init__(self, parent: grain.MapDataset):
        super().__init__(parent)
        self._memo = {}

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        index %= len(self._parent)        # Grain passes positions past the end on later epochs
        if index not in self._memo:
            self._memo[index] = self._parent[index]
        return self._memo[index]

    def __str__(self) -> str:
        return "MemoizedMapDataset"


def global_record_stream(filepaths: Sequence[str] | records.ShardSet, *, shuffle_seed: int,
                         num_epochs: int | None = None, decode: Callable | None = None, cache: bool = False,
                         max_unreadable_fraction: float = records.DEFAULT_MAX_UNREADABLE) -> grain.MapDataset:
    """(global position, record) over all hosts: a seeded global shuffle, a different permutation per epoch. The
    record is the raw bytes (a skip marker where unreadable: data/records.py), or `decode(raw)`; with `cache` each
    record is decoded once (then kept in memory). Shards that cannot be opened are skipped (records.open_shards)."""
    shards = (filepaths if isinstance(filepaths, records.ShardSet)
              else records.open_shards(filepaths, max_unreadable_fraction))
    if len(shards) == 0:
        raise ValueError(f"no records in {list(filepaths)}")
    ds = shards.records()
    if decode is not None:
        ds = ds.map(decode)
    if cache:
        ds = _MemoizedMapDataset(ds)
    ds = ds.shuffle(seed=shuffle_seed).repeat(num_epochs)
    return ds.map_with_index(lambda i, record: (i, record))


def host_streams(num_streams: int, process_index: int, process_count: int) -> range:
    """The streams this host packs: a contiguous block, so its rows are its contiguous part of the global batch.

    Stream s reads global positions s, s + num_streams, ...: hosts get disjoint records that together cover each
    epoch, and the global batch does not depend on the process count.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if num_streams % process_count:
        raise ValueError(f"data.num_streams={num_streams} must be a multiple of the {process_count} process(es)")
    per_host = num_streams // process_count
    return range(process_index * per_host, (process_index + 1) * per_host)


def build_pipeline(filepaths: Sequence[str], features: tfds.features.FeaturesDict, *, tokenizer, codec,
                   transform: DocumentTransform, packer: RowPacker, global_batch_size: int, shuffle_seed: int,
                   seed: int, process_index: int = 0, process_count: int = 1, num_streams: int = 0,
                   num_epochs: int | None = None, latents: bool = False, overlong: str = "truncate",
                   num_workers: int = 0, prefetch: int = 2, read_threads: int = 0,
                   cache_decoded: bool = False,
                   max_unreadable_fraction: float = records.DEFAULT_MAX_UNREADABLE) -> TrainIterator:
    """The full pipeline over explicit ArrayRecord files (`create_train_iterator` resolves them from a config).

    The global batch is `num_streams` (0: one per row) blocks of `global_batch_size / num_streams` rows; this host
    builds the blocks of `host_streams(...)`. Batches depend on the seeds and `num_streams`, not on the process
    count or `num_workers` (which must divide the host's stream count).
    """
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"data.overlong must be 'truncate' or 'drop', got {overlong!r}")
    num_streams = num_streams or global_batch_size
    if global_batch_size < 1 or global_batch_size % num_streams:
        raise ValueError(f"data.num_streams={num_streams} must divide global_batch_size={global_batch_size}")
    streams = host_streams(num_streams, process_index, process_count)
    if num_workers and len(streams) % num_workers:
        raise ValueError(f"data.num_workers={num_workers} must divide this host's {len(streams)} streams "
                         f"(num_streams={num_streams} over {process_count} process(es))")
    _check_features(features, latents, codec)
    rows_per_stream = global_batch_size // num_streams
    decode = _Decode(json.dumps(features.to_json()), latents, codec.image_shape, (codec.num_patches, codec.patch_dim))
    shards = records.open_shards(filepaths, max_unreadable_fraction)
    stream = global_record_stream(shards, shuffle_seed=shuffle_seed, num_epochs=num_epochs, decode=decode,
                                  cache=cache_decoded, max_unreadable_fraction=max_unreadable_fraction)
    tokenize = _Tokenize(tokenizer, codec, latents, transform.cost, tuple(packer.limits), overlong)
    noise = _Transform(transform, seed)
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * rows_per_stream if read_threads else 0)
    per_stream = [stream[s::num_streams].map(tokenize).map(noise).to_iter_dataset(read)
                  for s in streams]
    ds = StreamPackerIterDataset(per_stream, packer, rows_per_stream)
    blocks = prefetch * len(streams)  # buffered blocks: `prefetch` batches
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags (defaults are fine)
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=max(1, blocks // num_workers)))
    elif prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=blocks)
    return TrainIterator(iter(ds), rows_per_stream * len(streams), shards.unreadable)


def _check_features(features, latents: bool, codec) -> None:
    images = features["images"].feature
    if latents:
        if not isinstance(images, tfds.features.Tensor):
            raise ValueError("data.latents=True but the records hold pixels; build the dataset with a codec")
        if tuple(images.shape) != (codec.num_patches, codec.patch_dim):
            raise ValueError(f"records hold latents {images.shape}, codec makes ({codec.num_patches}, "
                             f"{codec.patch_dim})")
    elif not isinstance(images, tfds.features.Image):
        raise ValueError("the records hold precomputed latents; set data.latents=True")


def _data_section(config):
    """The data section of a run config, a RunConfig, or the section itself (config_lib.DataConfig)."""
    from oneflow_jax import config_lib
    if isinstance(config, config_lib.DataConfig):
        return config
    if isinstance(config, config_lib.RunConfig) or "data" in config:
        return config_lib.resolve(config).data
    return config_lib.make_section(config_lib.DataConfig, config, "data")


def prepare_dataset(config):
    """The prepared tfds builder named by the data section (built offline on first use)."""
    data = _data_section(config)
    try:
        builder_config = None
        if data.builder_config is not None:
            builder_config = datasets.make_builder_config(data.name, dict(data.builder_config))
        return datasets.ensure_prepared(data.name, data.data_dir, builder_config)
    except (ValueError, TypeError, FileNotFoundError) as e:   # the data section names no usable data: one line
        raise UserError(f"config.data ({data.name}): {e}".splitlines()[0]) from None


def get_tokenizer(config) -> tokenizer_lib.Tokenizer:
    """`data.tokenizer_path` if set, else the dataset's own tokenizer (trained once, cached in its data dir)."""
    data = _data_section(config)
    if data.tokenizer_path:
        return tokenizer_lib.load(data.tokenizer_path, data.image_token)
    builder = prepare_dataset(data)
    return datasets.dataset_tokenizer(data.name, data.data_dir, builder.builder_config,
                                      vocab_size=data.tokenizer_vocab_size)


def create_train_iterator(config, *, process_index: int, process_count: int, codec, tokenizer, seed: int,
                          transform: DocumentTransform | None = None,
                          packer: RowPacker | None = None) -> TrainIterator:
    """Checkpointable iterator of host-local packed batches for a run config (see module docstring).

    `transform` / `packer` default to the run's method's (methods.pipeline_pieces; data.encode_in_step wraps them).
    Each host gets `global_batch_size // process_count` rows per batch: the blocks of its `num_streams //
    process_count` streams. The global batch is the same for any process count and `num_workers`; restoring a
    state needs the same config, seeds, process count and num_workers.
    """
    from oneflow_jax import config_lib, methods
    cfg = config_lib.resolve(config)
    data = cfg.data
    if data.global_batch_size % process_count:
        raise ValueError(f"global_batch_size {data.global_batch_size} not divisible by {process_count} processes")
    builder = prepare_dataset(data)
    codec = encode_in_step.PixelCarrier(codec) if data.encode_in_step else codec   # pixels until the train step
    default_transform, default_packer = methods.pipeline_pieces(cfg, tokenizer, codec)
    transform, packer = transform or default_transform, packer or default_packer
    return build_pipeline(
        datasets.split_filepaths(builder, data.split), builder.info.features, tokenizer=tokenizer, codec=codec,
        transform=transform, packer=packer, global_batch_size=data.global_batch_size,
        shuffle_seed=data.shuffle_seed, seed=seed, process_index=process_index, process_count=process_count,
        num_streams=data.num_streams, num_epochs=data.num_epochs, latents=data.latents, overlong=data.overlong,
        num_workers=data.num_workers, prefetch=data.prefetch, read_threads=data.read_threads,
        cache_decoded=data.cache_decoded, max_unreadable_fraction=data.max_unreadable_fraction)


# ------------------------------------------------------------------------------------------- global arrays


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                      data_sharding_spec) -> dict[str, jax.Array]:
    """Assembles global jax.Arrays from each host's rows (leading axis sharded by `data_sharding_spec`).

    `data_sharding_spec`: a PartitionSpec for the batch axis (trailing axes are replicated), or the mesh axis name(s)
    to shard the batch over, e.g. 'data' or ('data', 'fsdp').
    """
    spec = data_sharding_spec
    if not isinstance(spec, jax.sharding.PartitionSpec):
        spec = jax.sharding.PartitionSpec(spec)
    sharding = jax.sharding.NamedSharding(mesh, spec)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
