"""tfds builders writing the OneFlow record format to ArrayRecord shards (see docs/data.md).

Builders (registered with tfds on import of this module):
  * `shapes_world`         the built-in procedural corpus (oneflow_jax.data.shapes_world); splits 'train' and 'eval'.
  * `interleaved_jsonl`    users' interleaved documents, JSONL lines `{"text": "... <image> ...", "images": [...]}`.
  * `image_caption_pairs`  users' pairs, JSONL lines `{"image": "path", "caption": "..."}`.

Every record has `text` (str with literal `<image>` markers), `images` (uint8 HxWx3 PNGs, or float32 latents
[num_patches, patch_dim] when the config names a `codec` to precompute them with) and `kind`
('generation' | 'understanding' | 'interleaved'); shapes-world adds its labels. Everything builds offline.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from typing import Any

import ml_dtypes
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from oneflow_jax.data import records, sources
from oneflow_jax.data import shapes_world as sw
from oneflow_jax.data import tokenizer as tokenizer_lib

F = tfds.features
IMAGE_TOKEN = sw.IMAGE_TOKEN
FILE_FORMAT = "array_record"

# --------------------------------------------------------------------------------------------- record format


def resolve_data_dir(data_dir: str | None = None) -> str:
    """`data_dir`, else $TFDS_DATA_DIR (read at call time), else ~/tensorflow_datasets."""
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


LATENT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def record_features(*, latent_shape: tuple[int, int] | None = None, labels: bool = False,
                    latent_dtype: str = "float32") -> F.FeaturesDict:
    """The record features; `latent_shape` switches `images` to precomputed latents stored as `latent_dtype`."""
    if latent_shape is None:
        images = F.Sequence(F.Image(shape=(None, None, 3), encoding_format="png"))
    else:
        images = F.Sequence(F.Tensor(shape=tuple(latent_shape), dtype=LATENT_DTYPES[latent_dtype], encoding="bytes"))
    feats: dict[str, Any] = {"text": F.Text(), "kind": F.Text(), "images": images}
    if labels:
        feats["held_out"] = F.Scalar(np.bool_)
        feats["image_held_out"] = F.Tensor(shape=(None,), dtype=np.bool_)
        # Per image: (left_color, left_shape, right_color, right_shape) as indices into sw.COLORS / sw.SHAPES.
        feats["labels"] = F.Tensor(shape=(None, 4), dtype=np.int32)
    return F.FeaturesDict(feats)


def make_codec(spec: dict | None, image_size: int | None = None):
    """The codec a builder config's `codec` dict names (models/codec.py), or None (store pixels); `image_size` (the
    config's) unless the dict has its own."""
    if not spec:
        return None
    import ml_collections  # pylint: disable=g-import-not-at-top
    from oneflow_jax.models import codec as codec_lib
    spec = dict(spec)
    if spec.get("name") == "vq":
        raise ValueError("codec 'vq' does not precompute latents (they carry the image codes): keep pixel records; "
                         "the input pipeline encodes them")
    if image_size and not spec.get("image_size"):
        spec["image_size"] = int(image_size)
    return codec_lib.make_codec(ml_collections.ConfigDict(spec))


def latent_dtype(spec: dict | None) -> str:
    """How a codec spec stores latents: its "dtype"; by default bfloat16 for a VAE (half the bytes; the VAE's own
    precision is no better) and float32 for pixel patches (exact)."""
    spec = spec or {}
    dtype = spec.get("dtype") or ("bfloat16" if spec.get("name") == "vae" else "float32")
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"codec dtype must be one of {sorted(LATENT_DTYPES)}, got {dtype!r}")
    return dtype


def _latent_shape(spec: dict | None, image_size: int | None = None):
    spec = dict(spec) if spec else spec
    if spec and spec.get("latent_channels") and spec.get("downsample_factor"):
        spec.pop("path", None)        # the geometry says the shape: no need to read (or have) the VAE's weights
    codec = make_codec(spec, image_size)
    return None if codec is None else (codec.num_patches, codec.patch_dim)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a uint8 [H, W, 3] image (PIL; avoids tfds' TensorFlow-based encoder)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _images_value(images: list[np.ndarray], codec, dtype: str = "float32"):
    """Record value for `images`: PNG bytes of the uint8 images, or their latents when a codec is configured."""
    if codec is None:
        return [png_bytes(im) for im in images]
    if not images:
        return np.zeros((0, codec.num_patches, codec.patch_dim), LATENT_DTYPES[dtype])
    return np.asarray(codec.encode(np.stack(images)), np.float32).astype(LATENT_DTYPES[dtype])


def check_document(text: str, num_images: int) -> None:
    """Raises ValueError unless `text` is non-empty and has one `<image>` marker per image."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty text")
    markers = text.count(IMAGE_TOKEN)
    if markers != num_images:
        raise ValueError(f"text has {markers} {IMAGE_TOKEN} markers but {num_images} images")


class _ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes ArrayRecord shards unless another `file_format` is requested explicitly."""

    DEFAULT_TOKENIZER = ("unigram", 8000)  # (model_type, vocab_size) when training one for this dataset

    def __init__(self, *, file_format=None, data_dir=None, **kwargs):
        # tfds reads $TFDS_DATA_DIR once at import; resolve it per call so a changed environment is honoured.
        super().__init__(file_format=file_format or FILE_FORMAT, data_dir=resolve_data_dir(data_dir), **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # pylint: disable=no-self-argument
        # No download checksums to look up next to the code (everything is generated or local). This also avoids
        # tfds' unconditional use of the `importlib_resources` backport, which is not installed on Python >= 3.9.
        return None


# ------------------------------------------------------------------------------------------------ shapes-world


@dataclasses.dataclass(eq=False)
class ShapesWorldConfig(tfds.core.BuilderConfig):
    """Sizes and generator knobs of shapes-world; `codec` (e.g. {'name': 'pixel_patch', 'image_size': 32,
    'patch_size': 4}) stores latents instead of pixels."""

    num_train: int = 20_000
    num_eval: int = 1_000
    seed: int = 0
    kind_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    eval_held_out_fraction: float = 0.5
    codec: dict | None = None


def shapes_world_config(num_train: int = 20_000, num_eval: int = 1_000, seed: int = 0,
                        kind_weights=(1.0, 1.0, 1.0), eval_held_out_fraction: float = 0.5,
                        codec: dict | None = None) -> ShapesWorldConfig:
    """A config whose name encodes its fields, so different sizes/seeds never share a directory."""
    fields = dict(num_train=int(num_train), num_eval=int(num_eval), seed=int(seed),
                  kind_weights=tuple(float(w) for w in kind_weights),
                  eval_held_out_fraction=float(eval_held_out_fraction), codec=dict(codec) if codec else None)
    default = ShapesWorldConfig(name="default")
    if all(getattr(default, k) == v for k, v in fields.items()):
        return ShapesWorld.builder_configs["default"]
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    name = f"n{num_train}_e{num_eval}_s{seed}_{digest}"
    return ShapesWorldConfig(name=name, description=json.dumps(fields, sort_keys=True), **fields)


class ShapesWorld(_ArrayRecordBuilder):
    """shapes-world v1 (docs/data.md, /work/shared/specs/shapes-world.md).

    `tfds.builder("shapes_world")` gives the default (20k train / 1k eval documents); pass `num_train=`,
    `num_eval=`, `seed=` (or `config=shapes_world_config(...)`) for other sizes.
    """

    VERSION = tfds.core.Version("1.0.1")
    RELEASE_NOTES = {"1.0.0": "shapes-world v1.", "1.0.1": "Right object keeps its 1 px margin to the image border."}
    BUILDER_CONFIGS = [ShapesWorldConfig(name="default", description="20k train / 1k eval documents")]
    DEFAULT_TOKENIZER = ("word", 64)

    def __init__(self, *, num_train=None, num_eval=None, seed=None, config=None, **kwargs):
        if num_train is not None or num_eval is not None or seed is not None:
            base = config if isinstance(config, ShapesWorldConfig) else ShapesWorldConfig(name="default")
            config = shapes_world_config(
                num_train=base.num_train if num_train is None else num_train,
                num_eval=base.num_eval if num_eval is None else num_eval,
                seed=base.seed if seed is None else seed, kind_weights=base.kind_weights,
                eval_held_out_fraction=base.eval_held_out_fraction, codec=base.codec)
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=record_features(latent_shape=_latent_shape(self.builder_config.codec), labels=True,
                                     latent_dtype=latent_dtype(self.builder_config.codec)),
            description="Procedural interleaved text-image corpus: two coloured shapes per 32x32 image.")

    def _split_generators(self, dl_manager):
        del dl_manager  # generated offline
        cfg = self.builder_config
        return {"train": self._generate_examples("train", cfg.num_train),
                "eval": self._generate_examples("eval", cfg.num_eval)}

    def _generate_examples(self, split: str, num: int):
        cfg = self.builder_config
        gen = sw.GeneratorConfig(seed=cfg.seed, kind_weights=tuple(cfg.kind_weights),
                                 eval_held_out_fraction=cfg.eval_held_out_fraction)
        codec = make_codec(cfg.codec)
        for index in range(num):
            doc = sw.generate_document(split, index, gen)
            yield index, {
                "text": doc.text, "kind": doc.kind, "images": _images_value(list(doc.images), codec, latent_dtype(cfg.codec)),
                "held_out": any(doc.held_out), "image_held_out": np.asarray(doc.held_out, np.bool_),
                "labels": np.asarray([sw.label_indices(s) for s in doc.specs], np.int32).reshape(-1, 4)}


# ------------------------------------------------------------------------------------------- users' own data


def load_image(path: str, image_size: int | None) -> np.ndarray:
    """RGB uint8 [H, W, 3]; with `image_size`, centre-cropped to a square and resized to image_size^2."""
    return sources.image_from(str(path), None, image_size)


@dataclasses.dataclass(eq=False)
class JsonlConfig(tfds.core.BuilderConfig):
    """Where users' data files live: `.jsonl`, webdataset `.tar` shards or `.parquet` files (data/sources.py), mixed
    freely. Image paths are relative to `image_root` (default: the file's folder).

    `image_size` centre-crops and resizes every image (required with `codec`, which precomputes latents). The field
    names say where a record keeps its image (bytes, a path, or {"bytes", "path"}) and caption (pairs), or its
    text and images (interleaved documents).
    """

    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    image_root: str | None = None
    image_size: int | None = None
    codec: dict | None = None
    pair_format: str = "both"  # image_caption_pairs: 'generation' | 'understanding' | 'both' (seeded per line)
    seed: int = 0
    image_field: str = "image"       # pairs: the image (jsonl: a path; tar: the .jpg/.png member; parquet: a column)
    caption_field: str = "caption"   # pairs: the caption (tar: the .txt member, or this key of the .json member)
    text_field: str = "text"         # interleaved: the text with <image> markers
    images_field: str = "images"     # interleaved: the list of images


class _JsonlBuilder(_ArrayRecordBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIG_CLASS = JsonlConfig

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        if cfg is not None and cfg.codec and not cfg.image_size:
            raise ValueError("precomputing latents (codec=...) needs a fixed image_size")
        return self.dataset_info_from_configs(
            features=record_features(latent_shape=_latent_shape(cfg.codec, cfg.image_size) if cfg else None,
                                     latent_dtype=latent_dtype(cfg.codec if cfg else None)),
            metadata=tfds.core.MetadataDict())          # precompute's totals go here (data/precompute.py)

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        if cfg is None or not cfg.train_files:
            raise ValueError(f"{self.name} needs config=JsonlConfig(name=..., train_files=[...]) naming the data")
        splits = {"train": self._generate_examples(tuple(cfg.train_files), "train")}
        if cfg.eval_files:
            splits["eval"] = self._generate_examples(tuple(cfg.eval_files), "eval")
        return splits

    def _generate_examples(self, files: tuple[str, ...], split: str):
        cfg = self.builder_config
        codec = make_codec(cfg.codec, cfg.image_size)
        total_bad = 0
        for file_idx, name in enumerate(files):
            path = epath.Path(name)
            root = epath.Path(cfg.image_root) if cfg.image_root else path.parent
            good = bad = 0
            for item_idx, obj in sources.read_items(str(path), cfg.image_field, cfg.caption_field):
                key = f"{split}/{file_idx}/{item_idx}"
                try:
                    if isinstance(obj, Exception):
                        raise obj
                    text, kind, refs = self.parse(obj, key, cfg)
                    images = [sources.image_from(r, root, cfg.image_size) for r in refs]
                    check_document(text, len(images))
                except Exception as e:  # pylint: disable=broad-except  (corrupt image, empty caption, bad JSON)
                    bad += 1
                    logging.warning("%s: skipping %s record %d: %s", self.name, path, item_idx,
                                    str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
                    continue
                good += 1
                yield key, {"text": text, "kind": kind, "images": _images_value(images, codec, latent_dtype(cfg.codec))}
            logging.info("%s: %s: %d records, %d skipped", self.name, path, good, bad)
            if bad:
                logging.warning("%s: %s: skipped %d of %d records", self.name, path, bad, good + bad)
            total_bad += bad
        if total_bad:
            logging.warning("%s: skipped %d bad records in split %r", self.name, total_bad, split)

    parse = None    # (record object, key, config) -> (text, kind, image refs); raises ValueError on a bad record


def parse_interleaved(obj, key: str, cfg: JsonlConfig) -> tuple[str, str, list]:
    """An interleaved document `{"text": "... <image> ...", "images": [...]}` -> (text, kind, image refs)."""
    del key
    if not isinstance(obj, dict) or cfg.text_field not in obj:
        raise ValueError(f'expected an object with "{cfg.text_field}" and "{cfg.images_field}"')
    refs = obj.get(cfg.images_field) or []
    if not isinstance(refs, list):
        raise ValueError(f'"{cfg.images_field}" must be a list of images (paths or bytes)')
    return str(obj[cfg.text_field]), "interleaved", refs


def parse_pair(obj, key: str, cfg: JsonlConfig) -> tuple[str, str, list]:
    """An image-caption pair -> `caption <image>` (generation) or `<image> caption` (understanding), per
    `cfg.pair_format`; 'both' picks one per record, seeded by (seed, key)."""
    if not isinstance(obj, dict) or obj.get(cfg.image_field) is None or obj.get(cfg.caption_field) is None:
        raise ValueError(f'expected "{cfg.image_field}" and "{cfg.caption_field}"')
    caption = " ".join(str(obj[cfg.caption_field]).replace(IMAGE_TOKEN, " ").split())
    if not caption:
        raise ValueError("empty caption")
    fmt = cfg.pair_format
    if fmt == "both":
        digest = hashlib.sha1(f"{cfg.seed}/{key}".encode()).digest()
        fmt = "generation" if digest[0] % 2 == 0 else "understanding"
    if fmt == "generation":
        return f"{caption} {IMAGE_TOKEN}", "generation", [obj[cfg.image_field]]
    if fmt == "understanding":
        return f"{IMAGE_TOKEN} {caption}", "understanding", [obj[cfg.image_field]]
    raise ValueError(f"pair_format must be 'generation', 'understanding' or 'both', got {fmt!r}")


class InterleavedJsonl(_JsonlBuilder):
    """Interleaved documents (OBELICS / MMC4 style): `{"text": "... <image> ...", "images": ["a.png", ...]}`."""
    parse = staticmethod(parse_interleaved)


class ImageCaptionPairs(_JsonlBuilder):
    """Image-caption pairs `{"image": "a.jpg", "caption": "..."}` stored as `caption <image>` (generation) or
    `<image> caption` (understanding), per `pair_format`; 'both' picks one per line, seeded by (seed, line)."""
    parse = staticmethod(parse_pair)


BUILDERS = {"shapes_world": ShapesWorld, "interleaved_jsonl": InterleavedJsonl,
            "image_caption_pairs": ImageCaptionPairs}


# ------------------------------------------------------------------------------------------------- helpers


def make_builder_config(name: str, fields: dict) -> tfds.core.BuilderConfig:
    """A builder config from plain fields (e.g. `config.data.builder_config`)."""
    fields = dict(fields)
    if name == "shapes_world":
        fields.pop("name", None)
        return shapes_world_config(**fields)
    if name in ("interleaved_jsonl", "image_caption_pairs"):
        if "name" not in fields:
            raise ValueError(f"{name} needs a config name (the directory the prepared data goes to)")
        for key in ("train_files", "eval_files"):
            if isinstance(fields.get(key), str):
                fields[key] = (fields[key],)
            elif key in fields:
                fields[key] = tuple(fields[key])
        return JsonlConfig(**fields)
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(BUILDERS)}")


def get_builder(name: str, data_dir: str | None = None, config=None, **kwargs) -> tfds.core.DatasetBuilder:
    """The builder for `name` in `data_dir` (see `resolve_data_dir`); kwargs go to the builder (e.g. num_train)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[name](data_dir=resolve_data_dir(data_dir), config=config, **kwargs)


def ensure_prepared(name: str, data_dir: str | None = None, config=None, **kwargs) -> tfds.core.DatasetBuilder:
    """Returns the builder, generating the dataset (offline) on first use."""
    builder = get_builder(name, data_dir, config, **kwargs)
    if not builder.is_prepared():
        for key in ("train_files", "eval_files"):          # users' data: every named file exists, before any work
            for path in getattr(builder.builder_config, key, ()):
                if not epath.Path(path).exists():
                    raise ValueError(f"data file {path} (builder_config.{key}) does not exist")
        mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
        try:
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
        except AssertionError as e:                         # tfds' way of saying every record was skipped
            if "No examples were yielded" not in str(e):
                raise
            raise ValueError(f"{builder.data_dir}: no usable record in a split's files (every one was skipped; "
                             "see the warnings above)") from None
    _check_stored_images(builder)
    return builder


def _check_stored_images(builder) -> None:
    """tfds reads records with the features the *config* describes; raise if the shards hold other images (e.g.
    latents precomputed in bfloat16, read with a config whose codec says float32)."""
    path = epath.Path(builder.data_dir) / "features.json"
    if not path.exists():
        return
    def describe(feature):
        feature = feature["images"].feature
        if isinstance(feature, F.Tensor):
            return f"latents {tuple(feature.shape)} {np.dtype(feature.np_dtype).name}"
        return "pixels"
    stored = describe(F.FeaturesDict.from_json(json.loads(path.read_text())))
    wanted = describe(builder.info.features)
    if stored != wanted:
        raise ValueError(f"{builder.data_dir} holds {stored} but the builder config makes {wanted}: use the config "
                         "it was built with (codec, image_size, codec.dtype)")


def split_filepaths(builder: tfds.core.DatasetBuilder, split: str) -> list[str]:
    """The ArrayRecord shard files of `split`, in shard order."""
    if split not in builder.info.splits:
        raise ValueError(f"{builder.name} has no split {split!r}; available: {list(builder.info.splits)}")
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(f"{builder.data_dir} is stored as {builder.info.file_format}, not array_record; "
                         "regenerate it with file_format='array_record'")
    return [os.fspath(p) for p in builder.info.splits[split].filepaths]


def iter_texts(builder: tfds.core.DatasetBuilder, split: str = "train", limit: int | None = None):
    """Yields the `text` of each readable record without decoding images (for tokenizer training); unreadable
    shards and records are skipped (data/records.py) and counted in the log."""
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
    shards = records.open_shards(split_filepaths(builder, split))
    n = len(shards) if limit is None else min(limit, len(shards))
    bad = 0
    for i in range(n):
        raw = shards.read(i)
        try:
            feature = tf_example_pb2.Example.FromString(raw).features.feature["text"]
            text = feature.bytes_list.value[0].decode("utf-8")
        except Exception:  # pylint: disable=broad-except  (None, unparsable, no text, not UTF-8)
            bad += 1
            continue
        yield text
    if bad:
        logging.warning("%s/%s: skipped %d unreadable or malformed record(s) of %d", builder.name, split, bad, n)


def dataset_tokenizer(name: str, data_dir: str | None = None, config=None, *, vocab_size: int | None = None,
                      model_type: str | None = None, **kwargs) -> tokenizer_lib.Tokenizer:
    """The tokenizer for a dataset: trained once from its train split and cached next to the prepared data."""
    builder = ensure_prepared(name, data_dir, config, **kwargs)
    default_type, default_vocab = builder.DEFAULT_TOKENIZER
    model_type, vocab_size = model_type or default_type, vocab_size or default_vocab
    path = epath.Path(builder.data_dir) / f"tokenizer_{model_type}_{vocab_size}.model"
    if path.exists():
        return tokenizer_lib.load(os.fspath(path))
    logging.info("training a %s tokenizer (vocab <= %d) for %s at %s", model_type, vocab_size, name, path)
    return tokenizer_lib.train_tokenizer(iter_texts(builder), vocab_size, os.fspath(path), model_type=model_type)


def decode_record(features: F.FeaturesDict, raw: bytes) -> dict[str, Any]:
    """Parses one serialized record into numpy: text/kind as str, images as a list of arrays, labels as names."""
    ex = dict(features.deserialize_example_np(raw))
    for key in ("text", "kind"):
        if isinstance(ex.get(key), bytes):
            ex[key] = ex[key].decode("utf-8")
    if "labels" in ex:
        ex["attributes"] = [sw.labels_to_attributes(row) for row in np.asarray(ex.pop("labels")).reshape(-1, 4)]
    return ex


def load_records(name: str = "shapes_world", split: str = "eval", data_dir: str | None = None, config=None,
                 limit: int | None = None, **kwargs) -> list[dict[str, Any]]:
    """Raw decoded records of a split in file order (the eval tool's reader).

    shapes-world records: {'text', 'kind', 'images': uint8 [n, 32, 32, 3], 'held_out': bool,
    'image_held_out': [n] bool, 'attributes': [(left_color, left_shape, right_color, right_shape)] * n}.
    """
    builder = ensure_prepared(name, data_dir, config, **kwargs)
    shards = records.open_shards(split_filepaths(builder, split))
    want = len(shards) if limit is None else min(limit, len(shards))
    image_feature = builder.info.features["images"].feature
    if isinstance(image_feature, F.Tensor):  # latents (stored as float32, bfloat16 or float16), read as float32
        empty = np.zeros((0,) + tuple(image_feature.shape), np.float32)
    else:
        empty = np.zeros((0, 0, 0, 3), np.uint8)
    out, bad = [], 0
    for i in range(len(shards)):             # the first `limit` readable records
        if len(out) == want:
            break
        raw = shards.read(i)
        try:
            ex = decode_record(builder.info.features, raw)
        except Exception:  # pylint: disable=broad-except  (None: unreadable; or unparsable bytes)
            bad += 1
            continue
        images = ex["images"]
        ex["images"] = np.stack(images) if len(images) else empty
        if isinstance(image_feature, F.Tensor):
            ex["images"] = ex["images"].astype(np.float32)
        if "image_held_out" in ex:
            ex["image_held_out"] = np.asarray(ex["image_held_out"], bool)
        out.append(ex)
    n_read = len(out) + bad
    read_all = n_read == len(shards)
    if bad:
        logging.warning("%s/%s: skipped %d unreadable or malformed record(s) of %d", name, split, bad, n_read)
    if bad and (read_all or n_read >= records.MIN_RECORDS_TO_JUDGE):    # a small prefix says little of the split
        try:
            records.check_loss(bad, n_read, records.DEFAULT_MAX_UNREADABLE, f"{name}/{split}")
        except ValueError as e:
            from oneflow_jax.cli import UserError  # pylint: disable=g-import-not-at-top
            raise UserError(str(e)) from None
    return out
