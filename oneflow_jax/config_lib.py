"""Run configs: every field and its default, written once, and `resolve`, which turns a configs/*.py ConfigDict into
typed, validated sections.

A config file (configs/*.py, `get_config(arg)`) sets the fields a run cares about; everything it leaves out takes
the default below (for the model, the objective's noising and the sampler: the defaults of `ModelConfig`,
`NoisingConfig` and `SamplerConfig`, next to the code that uses them). `resolve` runs once per command:

    config (ConfigDict) --resolve--> RunConfig(model, codec, objective, data, optimizer, sampler, eval, mesh, ...)

and libraries take the section they need. An unknown key or an impossible value is a one-line `UserError` before
anything compiles or a run directory is created.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

import ml_collections

from oneflow_jax.cli import UserError
from oneflow_jax.models.transformer import ModelConfig
from oneflow_jax.objectives.edit_flow import NoisingConfig
from oneflow_jax.sampling.common import SamplerConfig


def sibling_config(config_file: str, name: str):
    """The python config module `name` in the folder of `config_file` (pass `__file__`): configs build on one another
    (ar_1b on oneflow_1b, compare_shapes on ar_shapes_tiny on shapes_tiny) instead of copying, so they cannot drift."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
    spec = importlib.util.spec_from_file_location(f"oneflow_jax_configs_{os.path.splitext(name)[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """A configs/*.py[:variant] file's get_config(variant), for commands that take --config as a plain path."""
    path, _, variant = path.partition(":")
    if not os.path.exists(path):
        raise UserError(f"config file not found: {path}")
    module = sibling_config(os.path.abspath(path), os.path.basename(path))
    return module.get_config(variant or None)


# ------------------------------------------------------------------------------------------------ the sections

@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1                  # data-parallel axis (-1: the devices left over)
    fsdp: int = 1                   # parameter-sharded data-parallel axis (ZeRO-3)
    tensor: int = 1                 # tensor-parallel axis (heads, mlp, vocab)
    compile_topology: str = ""      # aot only: compile for this TPU topology (e.g. 'v5p-256') instead of this host
    num_slices: int = 1             # TPU slices; 'data' runs across them


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    name: str = "pixel_patch"       # 'pixel_patch' (pixels cut into patches) | 'vae' (a diffusers VAE) | 'vq' (VQ)
    image_size: int = 32            # square images of this many pixels
    patch_size: int = 16            # pixel_patch: pixels per patch side; vae: latents per patch side
    channels: int = 3               # pixel_patch: image channels
    path: str | None = None         # vae: the diffusers VAE directory (None: shape-only, for FLOPs and aot)
    batch_size: int = 8             # vae: images encoded per jitted call
    latent_channels: int | None = None      # vae: checked against the weights, or the shape-only geometry
    downsample_factor: int | None = None    # vae: likewise
    tokenizer: str | None = None    # vq: a train_vq run directory (None: shape-only, for FLOPs and aot)
    scales: tuple | None = None     # vq: token-map sides; checked against the tokenizer, or the shape-only geometry
    code_dim: int | None = None     # vq: likewise
    codebook_size: int | None = None        # vq: likewise


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig(NoisingConfig):
    """The noising fields of NoisingConfig (host side) plus the loss weighting (device side)."""
    image_loss_weight: float = 1.0  # L = L_text + w L_image
    image_loss_space: str = "v"     # the image loss in velocity ('v') or clean-latent ('x') units (flow_matching)

    def __post_init__(self):
        super().__post_init__()
        from oneflow_jax.objectives.flow_matching import LOSS_SPACES
        if self.image_loss_space not in LOSS_SPACES:
            raise ValueError(f"image_loss_space must be one of {LOSS_SPACES}, got {self.image_loss_space!r}")

    @property
    def noising(self) -> NoisingConfig:
        names = {f.name for f in dataclasses.fields(NoisingConfig)}
        return NoisingConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@dataclasses.dataclass(frozen=True)
class ARConfig:
    cond_t_min: float = 0.5         # AR+FM: an image followed by text draws t_img ~ U(cond_t_min, 1)


@dataclasses.dataclass(frozen=True)
class NextFlowConfig:
    cond_drop: float = 0.1          # NextFlow: P(a document loses the text before its first image), for CFG

    def __post_init__(self):
        if not 0.0 <= self.cond_drop <= 1.0:
            raise ValueError(f"cond_drop must be in [0, 1], got {self.cond_drop!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = "shapes_world"      # tfds builder in data.datasets
    builder_config: Any = None      # dict: shapes_world_config(**) kwargs, or a JsonlConfig for user data
    data_dir: str | None = None     # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    split: str = "train"
    seq_len: int = 256              # positions per packed row
    max_deletions: int = 256        # bag slots per row (deleted tokens the Edit Flow loss predicts)
    max_patches_per_row: int = 0    # > 0: the image parts of the model run at this many patch slots per row only
    global_batch_size: int = 32     # rows, over all hosts
    shuffle_seed: int = 0
    num_streams: int = 0            # record streams the global batch is packed from (0: one per row)
    num_epochs: int | None = None   # None: repeat forever
    num_workers: int = 0            # Grain worker processes (0: a prefetch thread)
    prefetch: int = 2               # batches buffered
    read_threads: int = 0           # extra threads decoding records per stream
    cache_decoded: bool = False     # keep every decoded record in host memory (datasets that fit)
    encode_in_step: bool = False    # pixel records: encode the images inside the jitted train step (no precompute)
    overlong: str = "truncate"      # a document longer than a row: 'truncate' (at a text boundary) | 'drop'
    tokenizer_path: str | None = None       # None: trained once for the dataset and cached in its data dir
    tokenizer_vocab_size: int | None = None  # None: the dataset's default
    image_token: str | None = None  # tokenizer.json only: the token <image> maps to (None: an added <image>)
    latents: bool = False           # records hold precomputed latents instead of pixels
    max_unreadable_fraction: float = 0.05   # stop with an error once more of the split than this is unreadable


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 3e-4                # peak learning rate (linear warmup, cosine decay)
    min_lr_ratio: float = 0.1       # final lr = lr * min_lr_ratio
    warmup_steps: int = 1000
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1       # AdamW, matrices only
    grad_clip: float = 1.0          # global-norm clipping
    ema_decay: float = 0.0          # > 0: keep an EMA of the params (what sample, eval and export read)
    max_consecutive_nonfinite: int = 5      # stop after this many skipped (non-finite) steps in a row


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    num_examples: int = 100         # eval documents
    batch_size: int = 50            # prompts sampled at once
    split: str = "eval"
    val_batches: int = 4            # batches of `split` the validation loss averages (built once, fixed noise)


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """The FLOP comparison (evals/compare.py); configs/compare_shapes.py says what each field is."""
    models: tuple = ("oneflow", "ar")
    overrides: dict = dataclasses.field(default_factory=dict)
    tokenizer: dict = dataclasses.field(default_factory=dict)
    steps: int = 3000
    widths: tuple = (64, 128, 256)
    ff_mult: int = 3
    seeds: tuple = (0, 1)
    tune: dict = dataclasses.field(default_factory=lambda: dict(lr=(1e-3, 2e-3, 4e-3), extend=2,
                                                                 image_loss_weight=(1.0, 4.0)))
    lr_scaling: str = "constant"
    eval_fractions: tuple = (0.125, 0.25, 0.5, 0.75, 1.0)
    parity_levels: tuple = (0.5, 0.75, 0.9, 1.0)
    metric_set: str = "auto"
    eval_examples: int = 100
    eval_batch_size: int = 50
    latency_prompts: int = 4
    useful_flops_batches: int = 50


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A resolved run config: typed sections, every default filled in."""
    model_type: str = "oneflow"     # the method (methods.METHODS): 'oneflow' | 'ar' | 'nextflow'
    seed: int = 0
    total_steps: int = 1000
    log_every: int = 50             # steps between metric lines
    ckpt_every: int = 1000          # steps between checkpoints
    keep_checkpoints: int = 3
    sample_every: int = 0           # steps between periodic sample grids (0: off)
    eval_every: int = 0             # steps between validation losses on eval.split (0: off; a multiple of log_every)
    peak_flops: float = 0.0         # per-device peak FLOP/s for MFU (0: the device's spec, or a measured CPU peak)
    budget: float = 1.0             # compare only: scales compare.steps
    mesh: MeshConfig = MeshConfig()
    codec: CodecConfig = CodecConfig()
    model: dict = dataclasses.field(default_factory=dict)   # ModelConfig fields; vocabulary and patches come later
    objective: ObjectiveConfig = ObjectiveConfig()
    ar: ARConfig = ARConfig()
    nextflow: NextFlowConfig = NextFlowConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    sampler: SamplerConfig = SamplerConfig()
    eval: EvalConfig = EvalConfig()
    compare: CompareConfig = CompareConfig()

    def get(self, key: str, default=None):        # read like the ConfigDict it came from
        return getattr(self, key, default)


TOP_LEVEL_KEYS = {f.name for f in dataclasses.fields(RunConfig)}
_SECTION_TYPES = {"mesh": MeshConfig, "codec": CodecConfig, "objective": ObjectiveConfig, "ar": ARConfig,
                  "nextflow": NextFlowConfig, "data": DataConfig, "optimizer": OptimizerConfig,
                  "sampler": SamplerConfig, "eval": EvalConfig, "compare": CompareConfig}
_MODEL_EXTRA = {"vocab_size"}       # may be given in config.model; 0 = the tokenizer's


def as_dict(section) -> dict:
    """A section (dataclass, ConfigDict, FrozenConfigDict or dict) as a plain dict."""
    if dataclasses.is_dataclass(section):
        return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    if hasattr(section, "to_dict"):
        return section.to_dict()
    return dict(section)


# Fields that were removed, and what replaced them (runs written before the change fail with this hint).
REPLACED = {
    "objective.clean_images_prob": "objective.task_mix.understanding replaced clean_images_prob on 2026-12-03 "
                                   "(image-text pairs only, laid out image first; docs/objective.md)",
    "objective.clean_text_prob": "objective.task_mix.generation replaced clean_text_prob on 2026-12-03",
}


def make_section(cls, values, name: str):
    """`cls` from a mapping (or an instance), unknown keys and bad values as one-line UserErrors."""
    if isinstance(values, cls):
        return values
    values = as_dict(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        hints = [REPLACED[f"{name}.{k}"] for k in unknown if f"{name}.{k}" in REPLACED]
        raise UserError(f"unknown config.{name} key(s): {', '.join(unknown)}" + "".join(f"; {h}" for h in hints))
    if cls is ModelConfig and "patch_grid" in values:
        values["patch_grid"] = tuple(values["patch_grid"])
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise UserError(f"config.{name}: {e}") from None


def resolve(config) -> RunConfig:
    """The typed, validated RunConfig of a configs/*.py ConfigDict (a RunConfig is returned as it is)."""
    if isinstance(config, RunConfig):
        return config
    values = as_dict(config)
    unknown = sorted(set(values) - TOP_LEVEL_KEYS)
    if unknown:
        raise UserError(f"unknown top-level config key(s): {', '.join(unknown)}")
    kwargs = {}
    for key, value in values.items():
        if key in _SECTION_TYPES:
            kwargs[key] = make_section(_SECTION_TYPES[key], value, key)
        elif key == "model":
            model = as_dict(value)
            unknown = sorted(set(model) - {f.name for f in dataclasses.fields(ModelConfig)} - _MODEL_EXTRA)
            if unknown:
                raise UserError(f"unknown config.model key(s): {', '.join(unknown)}")
            kwargs[key] = model
        else:
            kwargs[key] = value
    cfg = RunConfig(**kwargs)
    _check(cfg)
    return cfg


def _check(cfg: RunConfig) -> None:
    from oneflow_jax import methods
    if cfg.model_type not in methods.METHODS:
        raise UserError(f"config.model_type must be one of {', '.join(map(repr, methods.METHODS))}, got "
                        f"{cfg.model_type!r}")
    for key in ("total_steps", "log_every", "ckpt_every"):
        if not isinstance(getattr(cfg, key), int) or getattr(cfg, key) <= 0:
            raise UserError(f"config.{key} must be a positive integer, got {getattr(cfg, key)!r}")
    if not isinstance(cfg.eval_every, int) or cfg.eval_every < 0 or cfg.eval_every % cfg.log_every:
        raise UserError(f"config.eval_every must be 0 (off) or a multiple of log_every={cfg.log_every}, got "
                        f"{cfg.eval_every!r}")
    if cfg.data.encode_in_step and cfg.data.latents:
        raise UserError("config.data.encode_in_step encodes pixel records in the step: it needs data.latents=False")
    if (cfg.model_type == "nextflow") != (cfg.codec.name == "vq"):
        raise UserError(f"config.model_type={cfg.model_type!r} with config.codec.name={cfg.codec.name!r}: the "
                        "'nextflow' method and the 'vq' codec go together")
    if cfg.codec.name == "vq" and (cfg.data.encode_in_step or cfg.data.latents):
        raise UserError("config.codec.name='vq' encodes images in the input pipeline: set data.encode_in_step=False "
                        "and data.latents=False")
    if cfg.eval.val_batches < 1:
        raise UserError(f"config.eval.val_batches must be >= 1, got {cfg.eval.val_batches!r}")
    # the model's own checks (the vocabulary and codec geometry come later)
    make_section(ModelConfig, dict(cfg.model, vocab_size=max(cfg.model.get("vocab_size", 0), 1)), "model")
    if not cfg.optimizer.lr > 0 or cfg.optimizer.warmup_steps < 0 or not 0 <= cfg.optimizer.min_lr_ratio <= 1:
        raise UserError(f"config.optimizer: lr must be > 0, warmup_steps >= 0 and min_lr_ratio in [0, 1], got lr="
                        f"{cfg.optimizer.lr!r}, warmup_steps={cfg.optimizer.warmup_steps!r}, min_lr_ratio="
                        f"{cfg.optimizer.min_lr_ratio!r}")
    if cfg.data.global_batch_size <= 0:
        raise UserError(f"config.data.global_batch_size must be a positive integer, got "
                        f"{cfg.data.global_batch_size!r}")
    if not 0.0 <= cfg.optimizer.ema_decay < 1.0:
        raise UserError(f"config.optimizer.ema_decay must be in [0, 1) (0 = no EMA), got {cfg.optimizer.ema_decay!r}")
    if cfg.data.seq_len <= 0 or cfg.data.max_deletions <= 0:
        raise UserError("config.data.seq_len and config.data.max_deletions must be positive")
    if not 0 <= cfg.data.max_patches_per_row <= cfg.data.seq_len:
        raise UserError(f"config.data.max_patches_per_row must be in [0, seq_len={cfg.data.seq_len}] (0 = no "
                        f"limit), got {cfg.data.max_patches_per_row!r}")
    if cfg.codec.name == "pixel_patch":                 # cheap: no weights
        from oneflow_jax.models.codec import make_codec
        check_patch_budget(cfg, make_codec(cfg.codec).num_patches)


def validate(config, num_devices: int | None = None) -> RunConfig:
    """resolve(config), and with `num_devices` also the mesh: it must fit the devices and divide batch and heads."""
    cfg = resolve(config)
    if num_devices is not None:
        from oneflow_jax.training import sharding
        try:
            shape = sharding.resolve_mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, num_devices)
        except ValueError as e:
            raise UserError(f"config.mesh: {e}") from None
        dp = shape[0] * shape[1]
        if cfg.data.global_batch_size % dp:
            raise UserError(f"config.data.global_batch_size={cfg.data.global_batch_size} is not divisible by the "
                            f"data-parallel size data*fsdp={dp}")
        model = make_section(ModelConfig, dict(cfg.model, vocab_size=1), "model")
        for name, size in (("n_heads", model.n_heads), ("n_kv_heads", model.n_kv_heads), ("d_ff", model.d_ff)):
            if size % shape[2]:
                raise UserError(f"config.model.{name}={size} is not divisible by mesh.tensor={shape[2]}")
    return cfg


def check_patch_budget(cfg: RunConfig, num_patches: int) -> None:
    if 0 < cfg.data.max_patches_per_row < num_patches:
        raise UserError(f"config.data.max_patches_per_row={cfg.data.max_patches_per_row} holds less than one "
                        f"image ({num_patches} patches with this codec)")


def model_config(config, vocab_size: int, codec) -> ModelConfig:
    """The ModelConfig of a run: config.model plus what the tokenizer and codec determine."""
    cfg = resolve(config)
    if cfg.model.get("vocab_size", 0) not in (0, vocab_size):
        raise UserError(f"config.model.vocab_size={cfg.model['vocab_size']} but the tokenizer has {vocab_size} "
                        f"pieces (set 0 to take the tokenizer's)")
    check_patch_budget(cfg, codec.num_patches)
    extra = dict(image_vocab_size=codec.codebook_size) if hasattr(codec, "codebook_size") else {}
    return make_section(ModelConfig, dict(cfg.model, vocab_size=vocab_size, num_patches=codec.num_patches,
                                          patch_dim=codec.patch_dim, patch_grid=tuple(codec.grid), **extra), "model")


def vocab_size(config) -> int:
    """config.model.vocab_size when > 0, without reading anything; else the dataset tokenizer's."""
    cfg = resolve(config)
    if cfg.model.get("vocab_size", 0):
        return cfg.model["vocab_size"]
    from oneflow_jax.data import input_pipeline
    return input_pipeline.get_tokenizer(cfg.data).vocab_size


def sampler_config(config, **overrides) -> SamplerConfig:
    """The run's sampler section plus overrides, with the schedules its objective trained with."""
    cfg = resolve(config)
    fields = dict(as_dict(cfg.sampler), kappa_power=cfg.objective.kappa_power,
                  image_time_shift=cfg.objective.image_time_shift)
    fields.update(overrides)
    return make_section(SamplerConfig, fields, "sampler")


def config_to_json(config) -> str:
    return json.dumps(as_dict(config), indent=2, sort_keys=True, default=str)
