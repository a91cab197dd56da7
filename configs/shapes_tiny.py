"""The embedded default: a tiny OneFlow model on shapes-world that trains on a 2-core CPU in minutes.

Command: ./launch/local.sh (set-up, shapes-world, training, eval), which runs
    python -m oneflow_jax.train --config configs/shapes_tiny.py --workdir workdir/shapes_tiny
    python -m oneflow_jax.eval --workdir workdir/shapes_tiny
Wall clock: 401 s in all for ./launch/local.sh on a quiet 2-core CPU with its venv installed (training at 13-14
steps/s; 5-8 steps/s on a busy machine). Expected scores (eval of 100 documents, EMA weights, seen / held-out, three
trainings): caption (one sample, ~7 network evaluations) 0.87-0.96 / 0.81-0.93; generation 0.87-0.94 / 0.89-0.94;
interleaved consistency 0.12-0.22 (0.04-0.09 before images waited for their text).
Measured history and ablations: docs/results.md.
Variants: --config configs/shapes_tiny.py:smoke (a few steps, for tests).
"""
import ml_collections


def get_config(arg: str | None = None):
    c = ml_collections.ConfigDict()
    c.model_type = "oneflow"          # 'oneflow' | 'ar' (the AR+FM baseline)
    c.seed = 0
    c.total_steps = 4000              # optimizer steps; sized so that ./launch/local.sh fits 15 min on a 2-core CPU
    c.log_every = 50
    c.ckpt_every = 500
    c.keep_checkpoints = 3
    c.sample_every = 1200             # periodic sample grid + texts into workdir/samples (0 = off)
    c.eval_every = 500                # validation loss on eval.split, fixed documents and noise (0 = off)
    c.peak_flops = 0.0                # per-device peak FLOP/s for MFU; 0 = measure a matmul peak (CPU)

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))   # -1: the remaining devices

    # pixel_patch: 32x32 RGB images cut into 16x16 patches (4 per image, 768 values each); 'vae' for latent codecs
    c.codec = ml_collections.ConfigDict(dict(name="pixel_patch", image_size=32, patch_size=16, channels=3))

    # a tiny Llama-style backbone; every field: oneflow_jax/models/transformer.py, ModelConfig
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=0,                 # 0: taken from the tokenizer
        d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, rope_theta=10000.0, norm_eps=1e-5,
        tie_embeddings=False, time_embed_dim=128, dtype="float32", param_dtype="float32", remat="none",
        attention_impl="xla",
        cpu_dense_grads=True,         # weight gradients through a materialised x^T: faster on CPU; False on TPU/GPU
        scan_layers=False,            # nn.scan over the layers (faster compile) or unrolled (faster CPU steps)
        patch_head_hidden=384,        # patch head: 0 = one linear map; H > 0 = MLP d_model -> H, GELU -> patch values
        image_prediction="x"))        # what the patch head predicts: 'v' the velocity | 'x' the clean patches

    c.objective = ml_collections.ConfigDict(dict(
        kappa_power=1.0, schedule="interleaved", mixed_gen_prob=0.0,
        # P(image-text pair -> captioning example), P(pair -> text-to-image example); the rest: `schedule`
        task_mix=ml_collections.ConfigDict(dict(understanding=0.7, generation=0.3)),
        drop_images_prob=0.05, drop_text_prob=0.05,
        image_loss_weight=4.0,        # w in L = L_text + w * L_image; > 0
        image_loss_space="x",         # image loss in 'v' (velocity) | 'x' (clean-latent) units
        image_time_shift=2.0))        # SD3 time shift s > 0 of image noise levels (flow_matching.shift_time); 1: none

    c.data = ml_collections.ConfigDict(dict(
        name="shapes_world", data_dir=ml_collections.FieldReference(None, field_type=str), split="train",
        seq_len=128, max_deletions=256, global_batch_size=8, shuffle_seed=0, num_workers=0, prefetch=2,
        max_patches_per_row=48,       # image parts of the model run at this many patch slots per row; 0 = everywhere
        overlong="drop", tokenizer_path=ml_collections.FieldReference(None, field_type=str), latents=False,
        num_streams=0,                # record streams the global batch is built from (0: one per row)
        image_token=ml_collections.FieldReference(None, field_type=str),  # tokenizer.json: the token <image> maps to
        max_unreadable_fraction=0.05,  # stop once more of the split than this is unreadable (damaged shards)
        cache_decoded=True,           # keep every decoded record in host memory (for datasets that fit)
        encode_in_step=False))        # encode pixel records' images inside the jitted train step (no precompute)

    c.optimizer = ml_collections.ConfigDict(dict(
        lr=2e-3, min_lr_ratio=0.1, warmup_steps=100, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, grad_clip=1.0,
        ema_decay=0.998,              # in [0, 1); > 0: keep an EMA of the weights, which sample / eval / export use
        max_consecutive_nonfinite=5))   # stop after this many skipped (non-finite) steps in a row

    c.sampler = ml_collections.ConfigDict(dict(
        insertion_rule="confident",   # 'confident': every confident open gap per evaluation | 'alg1': the paper's gates
        steps=32,                     # Euler steps per image, h = 1 / steps (and Alg. 1's text time steps)
        max_len=80,                   # positions of the sampler's buffer, prompt included
        gap_threshold=0.5,            # confident: a gap is open while its expected missing atoms (1 - pi) lambda > this
        parallel_confidence=0.8,      # confident: open gaps insert together where max(1, lambda) / exp(H(Q)) >= this
        images_wait_for_text=True,    # confident: a row's noisy images take no Euler step while a gap of it is open
        text_cfg=1.0, top_p=1.0,
        image_cfg=1.5,                # v = v_u + w (v_c - v_u), v_u without the text; 1 = no guidance
        temperature=0.1,              # temperature of Q, the token distribution; > 0 (1 = Alg. 1)
        max_insertions_per_step=0,    # insertions per sequence and step, the rest postponed; 0 = no cap (Alg. 1)
        finish_threshold=0.0,         # alg1: after t = 1 keep stepping while a gap has 1 - pi above this; 0 = off
        insertion_order="random",     # which capped insertions go first: 'random' | 'largest_gap' (largest lambda)
        votes=1))                     # captioning prompts sampled this many times, the most frequent text kept; 1 = off

    c.eval = ml_collections.ConfigDict(dict(num_examples=100, batch_size=50, split="eval",
                                            val_batches=4))   # batches the validation loss averages

    if arg == "smoke":
        c.total_steps, c.log_every, c.ckpt_every, c.sample_every, c.eval_every = 6, 2, 3, 0, 0
        c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, time_embed_dim=32, scan_layers=True,
                       patch_head_hidden=64)
        c.data.update(seq_len=128, max_deletions=256, global_batch_size=8)
        c.sampler.update(steps=8, max_len=128)
        c.eval.update(num_examples=16, batch_size=16)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of shapes_tiny (known: smoke)")
    return c
