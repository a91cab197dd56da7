"""The embedded default: a tiny OneFlow model on shapes-world that trains on a 2-core CPU in minutes.

python -m oneflow_jax.train --config configs/shapes_tiny.py --workdir workdir/shapes_tiny [--config.total_steps=...]
Variants: --config configs/shapes_tiny.py:smoke (a few steps, for tests).
"""
import ml_collections


def get_config(arg: str | None = None):
    c = ml_collections.ConfigDict()
    c.model_type = "oneflow"          # 'oneflow' | 'ar' (the AR+FM baseline)
    c.seed = 0
    c.total_steps = 4000              # 605-690 s of training at 5.8-6.6 steps/s (batch 8, d_model 128, the MLP patch
                                      # head at data.max_patches_per_row slots, launch/local.sh's XLA flags,
                                      # data.cache_decoded): local.sh's set-up, periodic samples and an eval whose
                                      # captions take 3 samples (sampler.votes) stay within 900 s on a slow hour
                                      # (4400 steps: 944 s in all on one). Seen split, 200 eval docs, caption (one
                                      # sample) / generation, EMA weights, seeds 0 / 1 (/ 2): 4000 steps 0.86 /
                                      # 0.82, 0.86 / 0.86, 0.90 / 0.86 (vote of 3: caption -, 0.99, 0.98); 4400
                                      # steps 0.86 / 0.87, 0.93 / 0.88 (vote: 0.99, 0.98); 8000 steps 0.86 / 0.93;
                                      # 4300 steps 0.92 / 0.86, 0.86 / 0.86; 3300 steps 0.81 / 0.78, 0.86 / 0.83;
                                      # with a linear patch head (3300) 0.83 / 0.71, 0.88 / 0.65, and at batch 16 x
                                      # 2900 steps (860 s) 0.88 / 0.68; d_model 192 x 2400 steps 0.84 / 0.65; batch
                                      # 16 x 5000 steps (d_model 192, linear head, 36 min) 0.88 / 0.92
    c.log_every = 50
    c.ckpt_every = 500
    c.keep_checkpoints = 3
    c.sample_every = 1200             # periodic sample grid + texts into workdir/samples (0 = off)
    c.compile_only = False
    c.peak_flops = 0.0                # per-device peak FLOP/s for MFU; 0 = measure a matmul peak (CPU)

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))   # -1: the remaining devices

    # 16x16 patches: 4 per image, each object in at most 2 (one column), so the model need not make many patches
    # agree (8x8: 16 patches, objects drawn as fragments; caption 0.32 -> 0.66, generation colours 0.75 -> 0.81 on
    # the seen split at 1000 steps). 96 PCA components of these 768-d patches reconstruct shapes-world images the judge
    # scores identically, yet the tiny model's linear patch head drew soft corners (model.patch_head_hidden below).
    # One 32x16 patch per half (codec rows of 1; measured with a patch_height option since removed): caption 0.86 /
    # 0.89, generation 0.66 / 0.60 at 3300 steps (200 docs), in 584 s instead of ~420 s of training: not better.
    c.codec = ml_collections.ConfigDict(dict(name="pixel_patch", image_size=32, patch_size=16, channels=3))

    # d_model 128 (1.0M parameters, 1.27M with the MLP patch head) instead of 192 (1.9M): 0.10 vs 0.16 s/step
    # (benchmarks/mfu.py, linear head), so 3300 steps fit the time of 2400 (quality above). With lr 3e-3 it scored
    # 0.88 / 0.68 (seed 0), but seed 1's generation collapsed to 0.11 (crisp shapes, the wrong ones; captions fine) and
    # 4300 steps gave 0.86 / 0.60: lr stays 2e-3 (linear patch head).
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=0,                 # 0: taken from the tokenizer
        d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, rope_theta=10000.0, norm_eps=1e-5,
        tie_embeddings=False, time_embed_dim=128, dtype="float32", param_dtype="float32", remat="none",
        attention_impl="xla",
        cpu_dense_grads=True,         # model.dense_matmul_transposed_grad: 0.26 vs 0.34 s/step on 2 CPU cores (same
                                      # gradients); turn off on TPU/GPU
        scan_layers=False,            # 4 unrolled layers: 0.52 vs 0.56 s/step on 2 CPU cores (the smoke variant scans,
                                      # for compile time)
        patch_head_hidden=384,        # the patch head as an MLP (d_model -> 384, GELU -> 768), not one linear map
                                      # (which writes every patch in a 128-d subspace): generated squares had soft
                                      # corners and were judged circles. Same 3300 steps, 200 eval docs, seen /
                                      # held-out, EMA: generation 0.78 / 0.82 vs 0.71 / 0.71, caption 0.81 / 0.90 vs
                                      # 0.83 / 0.85 (raw weights 0.82 / 0.79, 0.87 / 0.89); seed 1: generation 0.83
                                      # / 0.75 vs 0.65 / 0.68, caption 0.86 / 0.83. Steps 6.2-7.2/s vs 7.2-8.7
        image_prediction="x"))        # patch_out predicts clean patches (model.image_velocity): measured far better
                                      # than "v" on raw pixel patches (clean backgrounds by step 350 instead of noise)

    c.objective = ml_collections.ConfigDict(dict(
        kappa_power=1.0, schedule="interleaved", mixed_gen_prob=0.0,
        clean_images_prob=0.6,        # captioning examples (clean image, noisy text); 0.6 vs 0.3: caption 0.24 vs 0.08;
                                      # 0.7 (clean_text_prob 0.25; 4300 steps, seed 1, 200 docs): 0.82 vs 0.86
        clean_text_prob=0.3,          # text-to-image examples (whole caption, noisy images); 0.3 vs 0: generation
                                      # colours 0.75/0.66 vs 0.53/0.57; the remaining 0.1 is the interleaved schedule
        drop_images_prob=0.05, drop_text_prob=0.05,
        image_loss_weight=4.0,        # L_text + 4 L_image (the x-space image loss is ~1/10 of the text loss): 4 vs 1
                                      # at 2300 steps, 100 eval docs: generation 0.82 vs 0.60, caption 0.76 vs 0.70
                                      # (all splits); 8: no better than 4
        image_loss_space="x",         # flow_matching.image_loss in clean-latent units; 'x' vs 'v' (1400 steps):
                                      # caption 0.15 vs 0.05, generation colours 0.50-0.56 vs 0.39-0.46
        image_time_shift=2.0))        # flow_matching.shift_time: 4 vs 1 turned fragments into coherent shapes
                                      # (8x8 patches, image weight 1); with image weight 4 (2300 steps, 200 eval docs,
                                      # 32 sampler steps) 2 vs 4 gave generation 0.79 vs 0.70 (sharper edges: more
                                      # training at large t), caption 0.75 vs 0.78

    c.data = ml_collections.ConfigDict(dict(
        name="shapes_world", data_dir=ml_collections.FieldReference(None, field_type=str), split="train",
        seq_len=128, max_deletions=256, global_batch_size=8, shuffle_seed=0, num_workers=0, prefetch=2,
        max_patches_per_row=48,       # rows hold ~30 patches (4 per image) among 128 positions: patch-in and the MLP
                                      # patch head (768 values per patch, ~25% of the step's FLOPs at all positions)
                                      # run at 48 slots per row instead of 128
        overlong="drop", tokenizer_path=ml_collections.FieldReference(None, field_type=str), latents=False,
        num_streams=0,                # record streams the global batch is built from (0: one per process)
        cache_decoded=True))          # 20k records decoded once (~100 MB): the pipeline's CPU per batch halves

    c.optimizer = ml_collections.ConfigDict(dict(
        lr=2e-3, min_lr_ratio=0.1, warmup_steps=100, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, grad_clip=1.0,
        ema_decay=0.998,              # sample / eval / export use an EMA of the weights (train_state.ema_decay_at:
                                      # its warm-up min(decay, (1 + step) / (10 + step)) stays below 0.998 until step
                                      # 4490, so 0.999 scored the same at 4000 steps). Against the same run's raw
                                      # weights (4000 steps, seeds 0-2, 200 docs, seen): caption +0.03 to +0.08,
                                      # generation -0.03 to +0.10 (3300 steps and less, 5 runs: -0.05 to +0.03)
        max_consecutive_nonfinite=5))   # lr 2e-3 vs 1e-3 (1000 steps, seen split): caption 0.77 vs 0.66, generation
                                        # 0.38 vs 0.11; 3e-3: 0.51 and 0.17 (image weight 4, 2300 steps: 3e-3 gave
                                        # 0.77 / 0.76 vs 0.78 / 0.70 at 2e-3, within noise)

    c.sampler = ml_collections.ConfigDict(dict(
        steps=32,                     # 32 vs 16 (image weight 4): caption 0.80 vs 0.76; 48 and 64 no better than 32
        max_len=80,                   # fits 3 caption+image pairs (~60 positions); 2.5x cheaper steps than 160
        text_cfg=1.0, image_cfg=1.0, top_p=1.0,
        temperature=0.1,              # Q's temperature, same checkpoints: caption 0.32 at T 0.1, 0.24 at 0.3, 0.045
                                      # at 1 (low T picks each gap's likeliest word; image CFG 3 did not help)
        max_insertions_per_step=1,    # one atom per step, the rest postponed, and more steps while a gap's 1 - pi >
        finish_threshold=0.5,         # 0.5 (sampler docstring). Caption, 200 eval docs, same checkpoints: 1400 steps
                                      # 0.70 -> 0.78 (finish alone 0.735, cap 2 0.72), 5000 steps 0.815 -> 0.875;
                                      # unparseable captions 20 -> 2 of 200. Generation unchanged
        insertion_order="largest_gap",    # the kept insertion is the one with the largest lambda: caption (all, 200
                                          # docs, seeds 0/1/2) 0.860/0.820/0.875 vs 0.825/0.815/0.840 at random;
                                          # the smallest lambda first: 0.795
        votes=3))                     # captions: the most frequent text of 3 samples (generate.Generator). One
                                      # sample's failures are accidents: 4 samples of the 4400-step checkpoint (seed
                                      # 0, 200 docs) held a right caption for every image; seen / held-out 0.86 /
                                      # 0.94 for one sample, 0.96 / 0.99 for the vote of 3, at 3x the captioning cost

    c.eval = ml_collections.ConfigDict(dict(num_examples=100, batch_size=50, split="eval"))

    if arg == "smoke":
        c.total_steps, c.log_every, c.ckpt_every, c.sample_every = 6, 2, 3, 0
        c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, time_embed_dim=32, scan_layers=True,
                       patch_head_hidden=64)
        c.data.update(seq_len=128, max_deletions=256, global_batch_size=8)
        c.sampler.update(steps=8, max_len=128)
        c.eval.update(num_examples=16, batch_size=16)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of shapes_tiny (known: smoke)")
    return c
