"""Analytic parameter and training-FLOP counts for OneFlow (reference §8), and the MFU arithmetic built on them
(`python -m oneflow_jax.flops` prints them for a config).

Two counts (reference §8, MaxText's convention: matmuls x3 for forward + backward, attention counted separately):
  * device FLOPs: what one train step really computes. Every packed row has `data.seq_len` positions, padding
    included, and models/transformer.py runs everything at every position: the Q head over the whole vocabulary, the insert and
    velocity heads, patch-in and the t_img MLP (also at text positions, unless data.max_patches_per_row > 0 limits
    them to that many slots per row), and dense attention over the whole row (4 L^2 H d_head forward, for both
    methods: XLA's masked attention computes every score, causal or not). `train_flops_per_step` is this number;
    `causal_skipping=True` halves a causal method's attention (what a block-skipping kernel would compute).
  * useful FLOPs: the same network on the documents' X_t only, no padding, attention inside the document only
    (halved for causal), each head only where its loss reads it: `measured_useful_flops` on the batches a run really
    packs (the FLOP comparison), `report` analytically for an average document (DocStats). Under the interleaved schedule (reference §4) the text keep rate is
    E[kappa(min(tau, 1))], tau ~ U[0, 2]: with kappa(t) = t that is 3/4, not 1/2 (t_text = 1 half the time); the
    independent schedule (t ~ U[0, 1]) gives the 1/2 of the paper's FLOP argument.
Model FLOPs only: rematerialisation re-runs the forward pass but is not counted (MFU, not HFU). Backward = 2x the
forward matmul, except for matmuls whose input is data (patch-in, the first t_img MLP layer): only the weight
gradient, 1x. Attention backward = 2x forward (XLA's dense attention; FlashAttention's recompute makes it 2.5x).

The train loop logs throughput with `train_flops_per_step(model.cfg, config.data, config.model_type)` once and
`throughput_metrics(...)` per log window. Every count takes the method's name (methods.METHODS); what differs is what
the Method says: causal attention (halved where counted as skipped), no insert head, an EOS (the AR+FM baseline,
reference §7: next-token LM over the clean sequence BOS, text, `<image>` = BOI + patches, EOS; objectives/ar_objective.py).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time

import numpy as np

from oneflow_jax import methods
from oneflow_jax.models.transformer import ModelConfig

BWD_MATMUL = 2.0          # backward of y = x W: dL/dx and dL/dW, each as costly as the forward
BWD_ATTENTION = 2.0       # dQ, dK, dV, dP: twice the two forward matmuls (no recompute in XLA's attention)
# Dense bf16 peak FLOP/s per device (vendor spec sheets), keyed by a substring of jax's `device_kind`.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


# ------------------------------------------------------------------------------------------------------ parameters

def param_breakdown(cfg: ModelConfig, model_type: str = "oneflow") -> dict[str, int]:
    """Parameter count per part, exactly as models.transformer.OneFlowModel creates them (checked in tests/test_flops.py)."""
    method = methods.get(model_type)
    d, hd, v = cfg.d_model, cfg.dim_per_head, cfg.vocab_size
    layer = (2 * d                                               # attn_norm, mlp_norm
             + d * cfg.n_heads * hd * 2                          # q, o
             + d * cfg.n_kv_heads * hd * 2                       # k, v
             + 3 * d * cfg.d_ff)                                 # gate, up, down
    common = dict(embed=v * d, token_head=0 if cfg.tie_embeddings else d * v, layers=cfg.n_layers * layer,
                  final_norm=d)
    if method.image_codes:        # models/nextflow_transformer.py: code_in (features, not the code column), the
        c = cfg.patch_dim - 1     # block-position table, the code head
        return dict(common, patch_in=c * d + d, patch_pos=cfg.num_patches * d, code_head=d * cfg.image_vocab_size)
    return dict(
        **common,
        patch_in=cfg.patch_dim * d + d,
        time_mlp=cfg.time_embed_dim * d + d + d * d + d,
        patch_pos=(cfg.patch_grid[0] + cfg.patch_grid[1]) * d,
        insert_head=2 * d + 2 if method.insert_head else 0,
        patch_hidden=d * cfg.patch_head_hidden + cfg.patch_head_hidden,
        patch_out=(cfg.patch_head_hidden or d) * cfg.patch_dim + cfg.patch_dim,
    )


def params(cfg: ModelConfig, model_type: str = "oneflow") -> int:
    return sum(param_breakdown(cfg, model_type).values())


def params_non_embedding(cfg: ModelConfig, model_type: str = "oneflow") -> int:
    """Without the vocabulary matrices (embedding and an untied Q head) and the patch row/col position tables."""
    b = param_breakdown(cfg, model_type)
    return params(cfg, model_type) - b["embed"] - b["token_head"] - b["patch_pos"]


# ------------------------------------------------------------------------------------------------------ FLOPs

def forward_flops_per_position(cfg: ModelConfig, model_type: str = "oneflow") -> dict[str, float]:
    """Forward matmul FLOPs (2 m n k) of one position, by part; attention scores/values are separate."""
    method = methods.get(model_type)
    d, hd = cfg.d_model, cfg.dim_per_head
    layer = 2 * d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 2 * 3 * d * cfg.d_ff
    if method.image_codes:        # NextFlow: code_in at block positions (input is data), the code head
        return dict(backbone=cfg.n_layers * layer, token_head=2 * d * cfg.vocab_size, insert_head=0,
                    patch_in=2 * (cfg.patch_dim - 1) * d, code_head=2 * d * cfg.image_vocab_size)
    return dict(backbone=cfg.n_layers * layer,
                token_head=2 * d * cfg.vocab_size,                 # Q logits (tied: embed.attend, same cost)
                insert_head=2 * d * 2 if method.insert_head else 0,
                patch_hidden=2 * d * cfg.patch_head_hidden,
                patch_out=2 * (cfg.patch_head_hidden or d) * cfg.patch_dim,
                patch_in=2 * cfg.patch_dim * d,                    # input is data: backward = weight grad only
                time_mlp_in=2 * cfg.time_embed_dim * d,            # input is data (sinusoidal t_img)
                time_mlp_out=2 * d * d)


_DATA_INPUT = ("patch_in", "time_mlp_in")


def train_flops_per_position(cfg: ModelConfig, model_type: str = "oneflow") -> dict[str, float]:
    """forward_flops_per_position with the backward added (x3, or x2 where the matmul's input is data)."""
    return {k: v * (2.0 if k in _DATA_INPUT else 1.0 + BWD_MATMUL)
            for k, v in forward_flops_per_position(cfg, model_type).items()}


def attention_train_flops(cfg: ModelConfig, length_sq: float, model_type: str = "oneflow",
                          causal_skipping: bool = False) -> float:
    """QK^T and AV over `length_sq` = L^2 query-key pairs, all layers, forward + backward (reference §8). Every pair
    is computed (XLA's dense masked attention, for both methods); `causal_skipping` halves a causal method's pairs,
    what a kernel that skips masked blocks would compute."""
    half = 0.5 if causal_skipping and methods.get(model_type).causal else 1.0
    return half * 4.0 * length_sq * cfg.n_heads * cfg.dim_per_head * cfg.n_layers * (1.0 + BWD_ATTENTION)


_IMAGE_PARTS = ("patch_in", "time_mlp_in", "time_mlp_out", "patch_hidden", "patch_out", "code_head")


def train_flops_per_row(cfg: ModelConfig, seq_len: int, model_type: str = "oneflow",
                        patch_slots: int = 0, causal_skipping: bool = False) -> dict[str, float]:
    """Device FLOPs of one packed row: every part at every one of the seq_len positions, dense attention; with
    `patch_slots` > 0 (data.max_patches_per_row) the image parts at that many positions only."""
    per_pos = train_flops_per_position(cfg, model_type)
    out = {k: v * (patch_slots if patch_slots and k in _IMAGE_PARTS else seq_len) for k, v in per_pos.items()}
    out["attention"] = attention_train_flops(cfg, float(seq_len) ** 2, model_type, causal_skipping)
    return out


def train_flops_per_step(model_cfg: ModelConfig, data_cfg, model_type: str = "oneflow",
                         causal_skipping: bool = False) -> float:
    """Device-computed training FLOPs of one global step: global_batch_size rows of data.seq_len positions (with
    `causal_skipping`, a causal method's attention halved: the second count of the FLOP comparison)."""
    row = train_flops_per_row(model_cfg, data_cfg.seq_len, model_type, data_cfg.max_patches_per_row, causal_skipping)
    return float(sum(row.values())) * data_cfg.global_batch_size


# --------------------------------------------------------------------------------------- useful work (X_t length)

@dataclasses.dataclass(frozen=True)
class DocStats:
    """An average clean document: text tokens (without `<image>` tokens) and images (objective.task_mix may train it
    as a captioning example if it is a pair, one image and some text, or as a text-to-image one; edit_flow.TaskMix).
    A document with several images is taken to open with text."""
    text_tokens: float
    images: float


def default_doc(seq_len: int, num_patches: int, model_type: str = "oneflow") -> DocStats:
    """One image plus the text that fills the rest of a clean row (what AR at the same seq_len would process):
    BOS + text + `<image>` + its patches (+ EOS for AR, whose `<image>` is its BOI; ar_objective) = seq_len. Without
    room for an image: text only."""
    fixed = 1 + int(methods.get(model_type).end_token)    # BOS (+ EOS)
    img = num_patches + 1
    if seq_len - fixed - img < 1:
        return DocStats(seq_len - fixed, 0)
    return DocStats(seq_len - fixed - img, 1)


def _schedule_grid(noising, n: int = 2000):
    """(t values, probability weights) of t_text under the noising schedule (edit_flow.sample_times)."""
    mid = (np.arange(n) + 0.5) / n
    if noising.schedule == "independent":
        return mid, np.full(n, 1.0 / n)
    p = noising.mixed_gen_prob            # tau ~ U[1, 2] w.p. p, else U[0, 2]; t = min(tau, 1)
    cont = (1.0 - p) * 0.5                # mass of t uniform on [0, 1)
    return np.append(mid, 1.0), np.append(np.full(n, cont / n), 1.0 - cont)


def expected_xt(doc: DocStats, num_patches: int, noising) -> dict[str, float]:
    """Moments of X_t of `doc` under `noising` (an edit_flow.NoisingConfig), matching edit_flow.noise_document.

    Given t_text: text tokens ~ Bin(n_text, kappa(t)); each image present w.p. kappa(t) (interleaved: P(tau_img >= 0))
    or always (independent), bringing its `<image>` token and num_patches patches; plus BOS. Condition dropout
    removes all images (drop_images_prob) or else all text (drop_text_prob, documents with images only).
    Returns E[length], E[length^2], E[text positions] (BOS + kept text + `<image>`), E[patch positions], and the
    expected kept text tokens and images.
    """
    t, w = _schedule_grid(noising)
    img_keep = np.ones_like(t) if noising.schedule == "independent" else t ** noising.kappa_power
    mix = noising.task_mix
    und = mix.understanding if doc.images == 1 and doc.text_tokens >= 1 else 0.0
    gen = mix.generation if doc.images >= 1 and doc.text_tokens >= 1 else 0.0
    w = (1.0 - und - gen) * w
    if und:                           # captioning examples: the image clean, t_text ~ U[0, 1]
        n = len(t) - (noising.schedule != "independent")
        t = np.concatenate([t, (np.arange(n) + 0.5) / n])
        w = np.concatenate([w, np.full(n, und / n)])
        img_keep = np.concatenate([img_keep, np.ones(n)])
    if gen:                           # text-to-image: text whole, each image kept w.p. 1 - TaskMix.DELETE_PROB
        kept = 1.0 - mix.DELETE_PROB
        t, w, img_keep = np.append(t, 1.0), np.append(w, gen), np.append(img_keep, kept)
    keep = t ** noising.kappa_power
    d_img = noising.drop_images_prob
    d_txt = (1.0 - d_img) * noising.drop_text_prob if doc.images else 0.0
    cases = ((d_img, doc.text_tokens, 0.0), (d_txt, 0.0, doc.images), (1.0 - d_img - d_txt, doc.text_tokens, doc.images))
    out = dict(length=0.0, length_sq=0.0, text_positions=0.0, patch_positions=0.0, text_kept=0.0, images_kept=0.0)
    block = 1 + num_patches
    for prob, n_t, n_i in cases:
        text, imgs = n_t * keep, n_i * img_keep
        mean = 1.0 + text + block * imgs
        var = n_t * keep * (1 - keep) + block ** 2 * n_i * img_keep * (1 - img_keep)
        out["length"] += prob * float(np.sum(w * mean))
        out["length_sq"] += prob * float(np.sum(w * (mean ** 2 + var)))
        out["text_positions"] += prob * float(np.sum(w * (1.0 + text + imgs)))
        out["patch_positions"] += prob * float(np.sum(w * num_patches * imgs))
        out["text_kept"] += prob * float(np.sum(w * text))
        out["images_kept"] += prob * float(np.sum(w * imgs))
    return out


def ar_sequence(doc: DocStats, num_patches: int) -> dict[str, float]:
    """The AR+FM baseline's clean sequence (ar_objective): BOS + text + (BOI=`<image>` + patches) per image + EOS;
    no explicit EOI (fixed-size blocks), no noising."""
    length = 2.0 + doc.text_tokens + doc.images * (num_patches + 1)
    return dict(length=length, length_sq=length ** 2, text_positions=length - doc.images * num_patches,
                patch_positions=doc.images * num_patches)


def useful_train_flops_per_document(cfg: ModelConfig, seq: dict[str, float], model_type: str = "oneflow") -> float:
    """Training FLOPs of one document of the given sequence moments: the backbone at every position, the text heads
    (Q, insert) at text positions, the image parts (patch-in, t_img MLP, velocity) at patch positions, attention over
    the document only (causal attention halved: useful work skips the masked half)."""
    per_pos = train_flops_per_position(cfg, model_type)
    text_part = per_pos["token_head"] + per_pos["insert_head"]
    image_part = sum(per_pos.get(k, 0.0) for k in _IMAGE_PARTS)
    return (per_pos["backbone"] * seq["length"] + text_part * seq["text_positions"]
            + image_part * seq["patch_positions"]
            + attention_train_flops(cfg, seq["length_sq"], model_type, causal_skipping=True))


def packed_documents(batch: dict) -> list[dict[str, float]]:
    """The sequence moments of every document of a packed batch (segment_ids, is_patch): its length, length^2,
    text positions and patch positions, as useful_train_flops_per_document takes them."""
    seg, is_patch = np.asarray(batch["segment_ids"]), np.asarray(batch["is_patch"], bool)
    docs = []
    for row, patches in zip(seg, is_patch):
        for s in np.unique(row[row > 0]):
            where = row == s
            n, p = float(np.count_nonzero(where)), float(np.count_nonzero(where & patches))
            docs.append(dict(length=n, length_sq=n * n, text_positions=n - p, patch_positions=p))
    return docs


def measured_useful_flops(config, model_cfg: ModelConfig, tokenizer, codec, num_batches: int = 50) -> dict:
    """The useful count measured on the documents the run really packs: its first `num_batches` training batches
    (the run's pipeline and seed), each document at its own X_t (OneFlow) or clean sequence (AR) length. Returns the
    useful FLOPs per step, the documents and positions per row, and the fraction of row positions filled."""
    from oneflow_jax.data import input_pipeline
    it = input_pipeline.create_train_iterator(config, process_index=0, process_count=1, codec=codec,
                                              tokenizer=tokenizer, seed=config.seed)
    useful = n_docs = filled = 0.0
    rows = 0
    for _ in range(num_batches):
        docs = packed_documents(next(it))
        rows += config.data.global_batch_size
        n_docs += len(docs)
        filled += sum(d["length"] for d in docs)
        useful += sum(useful_train_flops_per_document(model_cfg, d, config.model_type) for d in docs)
    steps = float(num_batches)
    return dict(useful_train_flops_per_step=useful / steps, documents_per_row=n_docs / rows,
                positions_per_document=filled / max(n_docs, 1.0), packing_fill=filled / (rows * config.data.seq_len),
                useful_flops_batches=num_batches)


# ------------------------------------------------------------------------------------------------ from a run config

def model_config_from(config) -> ModelConfig:
    """The run's ModelConfig: vocab from config.model.vocab_size when > 0, else the dataset's tokenizer
    (input_pipeline.get_tokenizer, which may prepare the dataset once); latent geometry from the codec, which for
    'vae' without codec.path is shape-only (codec.latent_channels / downsample_factor, no weights)."""
    from oneflow_jax import config_lib
    from oneflow_jax.models.codec import make_codec
    cfg = config_lib.resolve(config)
    return config_lib.model_config(cfg, config_lib.vocab_size(cfg), make_codec(cfg.codec))


def report(config, doc: DocStats | None = None, packing_fill: float = 1.0) -> dict:
    """Everything `python -m oneflow_jax.flops --json` prints, for a run config."""
    from oneflow_jax import config_lib
    run = config_lib.resolve(config)
    model_type = run.model_type
    cfg = model_config_from(run)
    data = run.data
    doc = doc or default_doc(data.seq_len, cfg.num_patches, model_type)
    row = train_flops_per_row(cfg, data.seq_len, model_type, data.max_patches_per_row)
    per_row = float(sum(row.values()))
    rows = data.global_batch_size
    if methods.get(model_type).end_token:
        seq = ar_sequence(doc, cfg.num_patches)
    else:
        seq = expected_xt(doc, cfg.num_patches, run.objective.noising)
    useful_doc = useful_train_flops_per_document(cfg, seq, model_type)
    docs_per_step = rows * data.seq_len * packing_fill / seq["length"]
    clean_len = 1.0 + doc.text_tokens + doc.images * (cfg.num_patches + 1) + float(methods.get(model_type).end_token)
    n_ne = params_non_embedding(cfg, model_type)
    return dict(
        model_type=model_type, params=params(cfg, model_type), params_non_embedding=n_ne,
        params_breakdown=param_breakdown(cfg, model_type), vocab_size=cfg.vocab_size,
        num_patches=cfg.num_patches, patch_dim=cfg.patch_dim, seq_len=data.seq_len, global_batch_size=rows,
        train_flops_per_example=per_row, train_flops_per_step=per_row * rows,
        train_flops_per_step_breakdown={k: v * rows for k, v in row.items()},
        attention_flops_fraction=row["attention"] / per_row,
        tokens_per_step=rows * data.seq_len,
        average_document=dataclasses.asdict(doc), clean_document_length=clean_len,
        expected_sequence_length=seq["length"],
        expected_text_keep_fraction=seq.get("text_kept", doc.text_tokens) / max(doc.text_tokens, 1e-9),
        packing_fill=packing_fill, documents_per_step=docs_per_step,
        train_flops_per_document=per_row * rows / docs_per_step,
        useful_tokens_per_step=docs_per_step * seq["length"],
        train_flops_per_document_useful=useful_doc, train_flops_per_step_useful=useful_doc * docs_per_step,
        useful_flops_fraction=useful_doc * docs_per_step / (per_row * rows),
        six_n_d_flops_per_step=6.0 * n_ne * rows * data.seq_len,
    )


# ------------------------------------------------------------------------------------------------ MFU

def peak_flops_per_device(device=None) -> float | None:
    """Dense bf16 peak FLOP/s of a known accelerator (PEAK_FLOPS), None for CPUs and unknown kinds."""
    import jax
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in kind.lower():
            return PEAK_FLOPS[key]
    return None


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of the best of `repeats` n x n x n jitted matmuls on the default device (a CPU's practical peak)."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def resolve_peak_flops(config_peak: float = 0.0, n: int = 2048, repeats: int = 5) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from): config.peak_flops when > 0, else the device's spec-sheet peak,
    else the measured matmul peak (CPU)."""
    if config_peak:
        return float(config_peak), "config.peak_flops"
    peak = peak_flops_per_device()
    if peak:
        return peak, "spec sheet (flops.PEAK_FLOPS)"
    return measure_matmul_peak(n, repeats), f"measured: best of {repeats} f32 {n}^3 matmuls"


def throughput_metrics(flops_per_step: float, steps_per_sec: float, num_devices: int,
                       peak_flops: float) -> dict[str, float]:
    """{'tflops_per_sec': per-device TFLOP/s (MaxText's convention), 'mfu': that / the per-device peak}."""
    per_device = flops_per_step * steps_per_sec / num_devices
    return dict(tflops_per_sec=per_device / 1e12, mfu=per_device / peak_flops if peak_flops else float("nan"))
