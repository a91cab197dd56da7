"""OneFlow 1B: Llama 3.2 1B backbone, paper pretraining shape (reference §6): sequence 512, global batch 4096,
256-px images through the SD3/FLUX VAE (16 latent channels, /8) in 2x2 patches -> 256 patches of 64 values.

    python -m oneflow_jax.train --config configs/oneflow_1b.py --workdir gs://BUCKET/runs/1b \
        --config.codec.path=/path/to/vae --config.data.tokenizer_path=/path/tokenizer.model \
        --config.data.builder_config.train_files="('gs://BUCKET/pairs-00000.jsonl',)"
    python -m oneflow_jax.flops --config configs/oneflow_1b.py --json
    python -m oneflow_jax.aot --config configs/oneflow_1b.py [--config.mesh.compile_topology=v5p-256]

Wall clock and scores: not measured at this scale. Per chip, one H200 ran the 16-row step (the per-chip share of
batch 4096 on 256 chips) in ~0.14 s with cuDNN attention (docs/results.md, "Throughput and MFU").

Variants (comma-separated after ':'): `cpu` shrinks layers and batch so the aot fit check runs on 8 fake CPU devices;
`tp2`/`tp4`/`tp8` add tensor parallelism; `slices2`, `slices4`, ... put the data axis across that many slices.
configs/oneflow_3b.py and oneflow_8b.py reuse `pod_config` with their backbones. docs/pod_scale.md explains the
mesh choice. Vocabulary: 128256 = Llama 3's, `<image>` takes one of its reserved special-token slots (no +1), so
the Llama embedding imports unchanged (import_llama checks the size).
"""
import ml_collections

# Llama backbones (reference §6); rope_scaling: 'llama3' (factor, low_freq, high_freq, original context)
LLAMA_3_2_1B = dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192, tie_embeddings=True,
                    rope_scaling=(32.0, 1.0, 4.0, 8192))
LLAMA_VOCAB = 128256


def _vae_codec():
    # SD3 / FLUX VAE geometry; without `path` a shape-only codec (enough for aot and flops), with it checked
    return dict(name="vae", path=None, image_size=256, patch_size=2, batch_size=8, latent_channels=16,
                downsample_factor=8)


def pod_config(backbone: dict, arg: str | None = None) -> ml_collections.ConfigDict:
    """The pretraining config around a Llama `backbone`; `arg` = comma-separated variants (module docstring)."""
    c = ml_collections.ConfigDict()
    c.model_type = "oneflow"
    c.seed = 0
    c.total_steps = 500_000          # the paper's scaling study: 500k iterations at batch 4096 (reference §6)
    c.log_every = 100
    c.ckpt_every = 1000              # ~minutes of pod time; preemption loses at most this many steps
    c.keep_checkpoints = 3
    c.sample_every = 0               # sampling at pod scale decodes with the VAE on every host: enable deliberately
    c.eval_every = 0                 # validation loss every N steps (a multiple of log_every): needs eval_files
    c.peak_flops = 0.0               # per-device peak for MFU; 0 = the device's spec sheet (flops.PEAK_FLOPS)

    # FSDP over every chip of a slice, data = num_slices across slices (why: docs/pod_scale.md, "Choosing a mesh")
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, compile_topology="", num_slices=1))

    c.codec = ml_collections.ConfigDict(_vae_codec())
    c.codec.path = ml_collections.FieldReference(None, field_type=str)

    c.model = ml_collections.ConfigDict(dict(
        vocab_size=LLAMA_VOCAB, rope_theta=500000.0, norm_eps=1e-5, time_embed_dim=256,
        dtype="bfloat16", param_dtype="float32",
        remat="full",                # 'none' | 'full' (keep each layer's input only) | 'dots' | 'dots_no_batch'
        attention_impl="xla",        # 'cudnn' on NVIDIA GPUs
        scan_layers=True, **backbone))

    c.objective = ml_collections.ConfigDict(dict(
        kappa_power=1.0, schedule="interleaved",
        mixed_gen_prob=0.0,          # 0.2 for "OneFlow Mixed" (reference §4, Table 2)
        drop_images_prob=0.1, drop_text_prob=0.1,   # condition dropout for CFG (rate not stated in the paper)
        image_loss_weight=1.0))      # the paper gives no weight (reference §3)

    c.data = ml_collections.ConfigDict(dict(
        name="image_caption_pairs",  # or 'interleaved_jsonl' (same builder_config fields)
        builder_config=dict(name="pairs256", train_files=(), eval_files=(), image_size=256, codec=_vae_codec(),
                            pair_format="both"),
        data_dir=ml_collections.FieldReference(None, field_type=str), split="train",
        seq_len=512, max_deletions=512, global_batch_size=4096, shuffle_seed=0, num_workers=8, prefetch=2,
        overlong="truncate",
        tokenizer_path=ml_collections.FieldReference(None, field_type=str),   # required: Llama 3's tokenizer.json
        image_token="<|reserved_special_token_0|>",   # the tokenizer.json token <image> maps to (vocab stays 128256)
        max_unreadable_fraction=0.05,  # stop once more of the split than this is unreadable (damaged shards)
        latents=True))               # records hold precomputed VAE latents (built once with the codec above)
    c.data.builder_config.codec.path = c.codec.get_ref("path")   # one --config.codec.path sets both

    c.optimizer = ml_collections.ConfigDict(dict(    # Edit Flows' recipe (reference §6)
        lr=3e-4, min_lr_ratio=0.1, warmup_steps=2000, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0,
        ema_decay=0.0, max_consecutive_nonfinite=5))    # ema_decay > 0: keep an EMA of the params for sampling

    c.sampler = ml_collections.ConfigDict(dict(steps=50, max_len=512, text_cfg=1.0, image_cfg=5.0, temperature=1.0,
                                               top_p=1.0))
    c.eval = ml_collections.ConfigDict(dict(num_examples=200, batch_size=50, split="eval",
                                            val_batches=8))   # batches the validation loss averages

    for variant in filter(None, (arg or "").split(",")):
        if variant == "cpu":         # the same layout, shrunk to compile on 8 fake CPU devices
            c.model.n_layers = 2
            c.data.update(global_batch_size=16, num_workers=0)
            c.total_steps, c.ckpt_every, c.log_every = 10, 5, 1
        elif variant.startswith("tp") and variant[2:].isdigit():
            c.mesh.tensor = int(variant[2:])
        elif variant.startswith("slices") and variant[6:].isdigit():
            c.mesh.update(data=int(variant[6:]), num_slices=int(variant[6:]))
        else:
            raise ValueError(f"unknown variant {variant!r} (known: cpu, tpN, slicesN)")
    return c


def get_config(arg: str | None = None):
    return pod_config(LLAMA_3_2_1B, arg)
