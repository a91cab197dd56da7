"""Text likelihood of held-out documents, in bits per text token (`python -m oneflow_jax.eval --task likelihood`):
OneFlow's Edit Flow ELBO (an upper bound on the NLL, estimated by Monte Carlo) and the causal baselines' exact NLL
(AR+FM, NextFlow).

Both read the document's images clean and in place: OneFlow keeps every image (t_img = 1) while only its text is
noised; the AR baseline reads images clean (`ar.cond_t_min` = 1) and its NLL sums the text tokens only, not the
`<image>` markers or EOS, which OneFlow never inserts here. The normaliser is the document's text tokens.

OneFlow's bound. From [BOS] + images, the insertion chain grows x1 by a CTMC whose conditional rates insert each
missing token of gap j at rate w(t) = kappa'(t) / (1 - kappa(t)) (Edit Flows); the model inserts `a` in gap j at rate
w(t) (1 - pi_j) lambda_j Q_j(a), as Alg. 1 samples. The KL between the conditional and the model path measures bounds
the NLL (the conditional chain ends at x1 surely):

    -log p(x1) <= int_0^1 w(t) E_{x_t} [ sum_j (1 - pi_j) lambda_j - sum_j k_j log((1 - pi_j) lambda_j)
                                         - sum_j sum_{a in A_j} log Q_j(a) + sum_j sum_a n_ja log n_ja - sum_j k_j ] dt

with k_j the tokens missing from gap j, A_j their bag and n_ja how many of them are `a` (the last two terms are the
conditional chain's own, free of parameters). Per document the estimate draws K stratified times
t_i = (i + u_i) / K with one x_t each and averages w(t_i) B(x_t_i); its standard error is the K terms' spread over
sqrt(K).

A caveat (docs/results.md, "Likelihood"): the integral is finite only if the model's total insertion rate at the
complete document vanishes. OneFlow's text heads are not told t, so at x_t = x1 the rate sum_j (1 - pi_j) lambda_j is
small but positive, and the tail w(t) ~ 1 / (1 - t) makes the exact bound diverge logarithmically; the K-sample
estimate, whose latest time is about 1 - 1 / (2K), grows slowly with K. Compare estimates at the same K only.

The report splits the bound over t (`bits_per_token_by_time`) and by document layout (`by_layout`, `layout`): the
images are read clean while the text is noised, which training shows for image-first documents only, so the other
layouts' bounds are measured off the training distribution (docs/results.md, "Likelihood"). `without_images` gives
the text alone (images and markers removed), which condition dropout trains for every layout: the likelihood of the
text with no image to read (`eval --images removed`).
"""
from __future__ import annotations

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from oneflow_jax import methods
from oneflow_jax.data import packing
from oneflow_jax.models import ar_transformer, nextflow_transformer
from oneflow_jax.objectives import edit_flow, oneflow_objective
from oneflow_jax.sampling import generate


TIME_EDGES = (0.5, 0.75, 0.875, 1.0)       # where `bits_per_token_by_time` splits the bound (the tail t -> 1 last)


def layout(tokens, image_id: int) -> str:
    """A document's layout: "image first" (its one image before all text: a captioning document), "text first"
    (one image after text), "interleaved" (several images) or "text only"."""
    where = np.flatnonzero(np.asarray(tokens) == image_id)
    if len(where) == 0:
        return "text only"
    if len(where) > 1:
        return "interleaved"
    return "image first" if where[0] == 0 else "text first"


def without_images(tokens, image_id: int):
    """(tokens, no images) of a document with every image and `<image>` marker removed: the text alone, as training's
    condition dropout (`drop_images_prob`) shows it for every layout (`eval --task likelihood --images removed`)."""
    return [t for t in tokens if t != image_id], np.zeros((0, 1, 1, 3), np.uint8)


def _latents(run: generate.Run, images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return np.asarray(run.codec.encode(images), np.float32) if len(images) else np.zeros(
            (0, run.codec.num_patches, run.codec.patch_dim), np.float32)
    return images.astype(np.float32)


def _bag_entropy_terms(doc) -> float:
    """sum_j sum_a n_ja log n_ja - sum_j k_j of a noised document (the conditional chain's own terms)."""
    counts = collections.Counter(zip(doc["del_gap"].tolist(), doc["del_tokens"].tolist()))
    return float(sum(n * math.log(n) for n in counts.values()) - len(doc["del_tokens"]))


def oneflow_bound(run: generate.Run, documents, num_samples: int = 16, seed: int = 0) -> list[dict]:
    """Per document: {"nats", "stderr_nats", "tokens"} of the ELBO estimate (module docstring)."""
    cfg = run.config
    method = methods.for_config(cfg)
    special = method.special_tokens(run.tokenizer)
    noising = dataclasses.replace(cfg.objective.noising, drop_images_prob=0.0, drop_text_prob=0.0)
    _, packer = method.pipeline_pieces(cfg, run.tokenizer, run.codec)
    forward = jax.jit(lambda p, b: run.model.apply({"params": p}, oneflow_objective.model_inputs(b)))
    rng = np.random.default_rng(seed)
    out = []
    for tokens, images in documents:
        tokens, latents = np.asarray(tokens, np.int32), _latents(run, images)
        times = (np.arange(num_samples) + rng.uniform(size=num_samples)) / num_samples
        docs = [edit_flow.noise_document(tokens, latents, rng, noising, special, times=(t, np.ones(len(latents))))
                for t in times]
        if not all(packing.fits((0,) * len(packer.limits), packer.usage(d), packer.limits) for d in docs):
            continue                                                        # longer than a row: skipped
        rows = [packer.pack([d]) for d in docs]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        o = jax.device_get(forward(run.params, batch))
        rate = jax.nn.sigmoid(-np.asarray(o["pi_logit"], np.float32)) * np.asarray(o["lam"], np.float32)
        gaps = batch["text_weight"] > 0
        k = batch["insert_count"].astype(np.float32)
        log_q = np.asarray(jax.nn.log_softmax(jnp.asarray(o["q_logits"], jnp.float32), axis=-1))
        rows_idx = np.arange(len(rows))[:, None]
        bag = np.where(batch["del_valid"] > 0, log_q[rows_idx, batch["del_gap"], batch["del_tokens"]], 0.0)
        b = (np.sum(np.where(gaps, rate, 0.0), 1) - np.sum(np.where(k > 0, k * np.log(np.maximum(rate, 1e-30)), 0.0), 1)
             - np.sum(bag, 1) + np.asarray([_bag_entropy_terms(d) for d in docs]))
        terms = np.asarray(edit_flow.insertion_rate_scale(times, noising.kappa_power)) * b
        out.append({"nats": float(terms.mean()), "stderr_nats": float(terms.std(ddof=1) / math.sqrt(num_samples)),
                    "tokens": int(np.sum(tokens != special.image)), "strata_nats": terms / num_samples,
                    "layout": layout(tokens, special.image)})
    return out


def ar_nll(run: generate.Run, documents) -> list[dict]:
    """Per document: {"nats", "tokens"}: a causal method's exact NLL of the text tokens (AR+FM, NextFlow), images
    read clean (AR+FM: t_img = 1; NextFlow: no condition dropout)."""
    cfg = run.config
    method = methods.for_config(cfg)
    clean = dataclasses.replace(cfg, ar=dataclasses.replace(cfg.ar, cond_t_min=1.0),
                                nextflow=dataclasses.replace(cfg.nextflow, cond_drop=0.0))
    transform, packer = method.pipeline_pieces(clean, run.tokenizer, run.codec)
    special = method.special_tokens(run.tokenizer)
    inputs = nextflow_transformer.model_inputs if method.image_codes else ar_transformer.model_inputs
    forward = jax.jit(lambda p, b: run.model.apply({"params": p}, inputs(b)))
    out = []
    rng = np.random.default_rng(0)
    for tokens, images in documents:
        tokens = np.asarray(tokens, np.int32)
        doc = transform(tokens, _latents(run, images), rng)
        if not packing.fits((0,) * len(packer.limits), packer.usage(doc), packer.limits):
            continue
        row = {k: v[None] for k, v in packer.pack([doc]).items()}
        logits = np.asarray(jax.device_get(forward(run.params, row))["q_logits"], np.float32)[0]
        ce = np.asarray(jax.nn.logsumexp(logits, -1)) - np.take_along_axis(logits, row["targets"][0][:, None], 1)[:, 0]
        text = (row["target_weight"][0] > 0) & (row["targets"][0] != special.image) & (row["targets"][0] != special.eos)
        out.append({"nats": float(np.sum(np.where(text, ce, 0.0))), "tokens": int(np.sum(tokens != special.image)),
                    "layout": layout(tokens, special.image)})
    return out


def evaluate(run: generate.Run, documents, num_samples: int = 16, seed: int = 0) -> dict:
    """Corpus bits per text token (total nats / total tokens / ln 2), with the OneFlow estimate's standard error."""
    method = methods.for_config(run.config)
    if method.causal:                                   # AR+FM and NextFlow: their likelihood is exact
        rows, kind = ar_nll(run, documents), f"exact NLL ({'AR+FM' if method.name == 'ar' else method.name})"
    else:
        rows, kind = oneflow_bound(run, documents, num_samples, seed), f"ELBO bound, {num_samples} times per document"
    if not rows:
        raise ValueError("no document fits a row of the run's seq_len")
    tokens = sum(r["tokens"] for r in rows)
    out = {"step": run.step, "kind": kind, "documents": len(rows), "tokens": tokens,
           "bits_per_token": sum(r["nats"] for r in rows) / tokens / math.log(2), "by_layout": {}}
    for layout in sorted({r["layout"] for r in rows}):
        mine = [r for r in rows if r["layout"] == layout]
        n = sum(r["tokens"] for r in mine)
        out["by_layout"][layout] = {"documents": len(mine), "tokens": n,
                                    "bits_per_token": sum(r["nats"] for r in mine) / n / math.log(2)}
    if "stderr_nats" in rows[0]:
        out["stderr_bits_per_token"] = math.sqrt(sum(r["stderr_nats"] ** 2 for r in rows)) / tokens / math.log(2)
        out["samples_per_document"] = num_samples
        out["bits_per_token_by_time"] = _by_time(rows, num_samples, tokens)
    return out


def _by_time(rows, num_samples: int, tokens: int) -> dict:
    """The bound split over t: {"[a, b)": bits per token} (they sum to the total). Stratum i covers [i/K, (i+1)/K),
    so each lies in one range; ranges with no stratum edge inside are merged into the next."""
    strata = np.sum([r["strata_nats"] for r in rows], axis=0) / tokens / math.log(2)
    edges = sorted({min(num_samples, max(1, round(e * num_samples))) for e in TIME_EDGES} | {0})
    return {f"[{lo / num_samples:g}, {hi / num_samples:g})": float(strata[lo:hi].sum())
            for lo, hi in zip(edges[:-1], edges[1:])}
