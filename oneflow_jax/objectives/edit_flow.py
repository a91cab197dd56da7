"""Insertion-only Edit Flow over text (reference §2, paper Eq. 7) and the interleaved time schedule (App. D.1).

Two halves:
  * `noise_document` runs on the host (numpy, deterministic from a Generator) as a data transform. It turns a clean
    document X1 into the noised state X_t the device computes on: the kept atoms, their gap bags, and noisy image
    latents. The device therefore only ever sees the short X_t — the source of OneFlow's FLOP saving (§4).
  * `text_loss` is a pure function of the model outputs and the packed batch, on device.

Conventions. An *atom* is one text token or one image (its `<image>` token + its block of latent patches). X_t always
starts with BOS, so every gap has a left neighbour: gap j is the space right after kept atom j (after the whole
block, for an image). Its bag A_j holds the deleted atoms between kept atom j and kept atom j+1, in document order;
a deleted image enters its bag as the `<image>` token. Heads for gap j are read at atom j's *text* position (the
`<image>` token for an image atom).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from oneflow_jax.objectives import flow_matching


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    bos: int
    pad: int
    image: int


@dataclasses.dataclass(frozen=True)
class TaskMix:
    """Which documents train the two prompted tasks (`objective.task_mix`), each in that task's layout, as Transfusion
    orders caption and image per example.

    understanding: P(an image-text pair -- one image and some text -- is a captioning example: laid out
      `<image> text`, the image clean (t_img = 1, pure conditioning), the text noised at t_text ~ U[0, 1]) -- how
      `eval` and `sample` prompt captioning.
    generation: P(a document with images and text is a text-to-image example: a pair laid out `text <image>`, a
      longer document as written if it opens with text; the text kept whole (the prompt), and each image deleted
      into its gap's bag with probability 1/4 -- the interleaved schedule's own deletion rate P(tau_img < 0), so a
      whole caption learns to grow its `<image>` -- else noised at t_img ~ U[0, 1]).
    A document drawn for neither follows `schedule` as written (App. D.1, image deletion included). Both 0: the
    paper's training.
    """

    understanding: float = 0.0
    generation: float = 0.0
    DELETE_PROB = 0.25        # P(tau_img < 0) of the interleaved schedule for kappa(t) = t

    def __post_init__(self):
        for name in ("understanding", "generation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"objective.task_mix.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.understanding + self.generation > 1.0:
            raise ValueError("objective.task_mix.understanding + generation must be <= 1, got "
                             f"{self.understanding} + {self.generation}")

    def draw(self, tokens: np.ndarray, is_image: np.ndarray, rng: np.random.Generator) -> str | None:
        """'understanding', 'generation' or None (the schedule) for one document."""
        n_img = int(is_image.sum())
        if not (self.understanding or self.generation) or n_img == 0 or n_img == len(tokens):
            return None
        r = rng.uniform()
        if r < self.understanding:
            return "understanding" if n_img == 1 else None
        if r < self.understanding + self.generation:
            return "generation" if n_img == 1 or not is_image[0] else None
        return None


def pair_layout(tokens: np.ndarray, is_image: np.ndarray, task: str) -> np.ndarray:
    """An image-text pair in its task's order: `<image> text` for understanding, `text <image>` for generation; a
    longer document stays as written."""
    if is_image.sum() != 1:
        return tokens
    image, text = tokens[is_image], tokens[~is_image]
    return np.concatenate([image, text] if task == "understanding" else [text, image])


@dataclasses.dataclass(frozen=True)
class NoisingConfig:
    """Host-side noising knobs (`config.objective`)."""

    kappa_power: float = 1.0        # kappa(t) = t^k; OneFlow uses k = 1, Edit Flows k = 3.
    schedule: str = "interleaved"   # 'interleaved' (App. D.1) or 'independent' (fixed image count only).
    mixed_gen_prob: float = 0.0     # P(tau_text ~ U[1, 2]): clean text, images still noisy.
    task_mix: TaskMix = TaskMix()   # image-text pairs as captioning / text-to-image examples (TaskMix); rest: schedule
    drop_images_prob: float = 0.0   # condition dropout: remove every image (text learns lambda(X), Q(X) w/o images).
    drop_text_prob: float = 0.0     # condition dropout: remove every text token (images learn v(Y) w/o caption).
    image_time_shift: float = 1.0   # an image at schedule time u is noised to t = flow_matching.shift_time(u, s).

    def __post_init__(self):
        if not isinstance(self.task_mix, TaskMix):     # a ConfigDict / dict section from a config file
            mix = dict(self.task_mix.items() if hasattr(self.task_mix, "items") else self.task_mix)
            unknown = sorted(set(mix) - {"understanding", "generation"})
            if unknown:
                raise ValueError(f"unknown objective.task_mix key(s): {', '.join(unknown)} "
                                 "(known: understanding, generation)")
            object.__setattr__(self, "task_mix", TaskMix(**mix))
        if self.schedule not in ("interleaved", "independent"):
            raise ValueError(f"objective.schedule must be 'interleaved' or 'independent', got {self.schedule!r}")
        if self.kappa_power <= 0:
            raise ValueError(f"objective.kappa_power must be > 0, got {self.kappa_power}")
        if self.image_time_shift <= 0:
            raise ValueError(f"objective.image_time_shift must be > 0, got {self.image_time_shift}")


def kappa(t, k: float = 1.0):
    """Keep probability kappa(t) = t^k."""
    return t ** k


def kappa_inverse(u, k: float = 1.0):
    return u ** (1.0 / k)


def insertion_rate_scale(t, k: float = 1.0):
    """kappa_dot(t) / (1 - kappa(t)): the rate multiplier of Edit Flows' u(ins) (reference §2, §5)."""
    return k * t ** (k - 1.0) / jnp.maximum(1.0 - t ** k, 1e-12)


def sample_times(n_images: int, rng: np.random.Generator, cfg: NoisingConfig, task: str | None = None):
    """Returns (t_text, t_img[n_images]) with t_img < 0 meaning 'image deleted' (interleaved schedule only).

    `task` ('understanding', 'generation'; TaskMix.draw) overrides the schedule for an image-text pair."""
    if task == "understanding":
        return rng.uniform(0.0, 1.0), np.ones(n_images)               # captioning: clean image, noisy text
    if task == "generation":                                          # text-to-image
        t_img = rng.uniform(0.0, 1.0, size=n_images)
        return 1.0, np.where(rng.uniform(size=n_images) < TaskMix.DELETE_PROB, -1.0, t_img)
    if cfg.schedule == "independent":
        t_text = rng.uniform(0.0, 1.0)
        return t_text, rng.uniform(0.0, 1.0, size=n_images)
    if rng.uniform() < cfg.mixed_gen_prob:
        tau_text = rng.uniform(1.0, 2.0)
    else:
        tau_text = rng.uniform(0.0, 2.0)
    return min(tau_text, 1.0), _interleaved_image_times(tau_text, n_images, rng, cfg)


def _interleaved_image_times(tau_text: float, n_images: int, rng: np.random.Generator, cfg: NoisingConfig):
    """App. D.1: tau_img = tau_text - kappa^{-1}(u), deleted (-1) below 0; P(tau_img >= 0) = kappa(min(tau_text, 1))."""
    tau_img = tau_text - kappa_inverse(rng.uniform(0.0, 1.0, size=n_images), cfg.kappa_power)
    return np.where(tau_img < 0, -1.0, np.minimum(tau_img, 1.0))


def noise_document(tokens: np.ndarray, latents: np.ndarray, rng: np.random.Generator, cfg: NoisingConfig,
                   special: SpecialTokens, times=None) -> dict[str, np.ndarray]:
    """Samples X_t from a clean document X1 (tokens without BOS, one latent block per `<image>` token).

    `times` = (t_text, t_img[n_images]) fixes the schedule's draw (t_img < 0: image deleted); None samples it.

    Returns one variable-length sequence of m positions (text and patch positions interleaved):
      tokens[m], is_patch[m], patch_index[m], image_index[m] (which of the document's images a patch is of),
      patches[m, D] (Y_t), patch_t[m], velocity_target[m, D] (Y1 - Y0),
      patch_weight[m] (1 on patches of images with t_img < 1), text_weight[m] (1/n on the n text positions),
      no_insert[m] (1[k_j = 0]), insert_count[m] (k_j), and the bags as del_tokens[d], del_gap[d] (index into m).
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    latents = np.asarray(latents, dtype=np.float32)
    is_image = tokens == special.image
    n_img = int(is_image.sum())
    if latents.ndim != 3 or latents.shape[0] != n_img:
        raise ValueError(f"document has {n_img} <image> tokens but latents of shape {latents.shape}")
    num_patches, dim = latents.shape[1:]

    # A document may be a captioning or text-to-image example, a pair laid out in that task's order (TaskMix).
    task = cfg.task_mix.draw(tokens, is_image, rng) if times is None else None
    if task:
        tokens = pair_layout(tokens, is_image, task)
        is_image = tokens == special.image
    # Condition dropout (classifier-free guidance, Eq. 12): drop one modality of the clean document.
    image_ids = np.cumsum(is_image) - 1  # which latent block an <image> token owns
    keep_clean = np.ones(len(tokens), bool)
    if cfg.drop_images_prob and rng.uniform() < cfg.drop_images_prob:
        keep_clean &= ~is_image
    elif cfg.drop_text_prob and rng.uniform() < cfg.drop_text_prob and n_img:
        keep_clean &= is_image
    tokens, is_image, image_ids = tokens[keep_clean], is_image[keep_clean], image_ids[keep_clean]

    t_text, t_img_all = sample_times(n_img, rng, cfg, task) if times is None else times
    t_img_all = np.asarray(t_img_all, np.float64).reshape(n_img)
    keep = rng.uniform(size=len(tokens)) < kappa(t_text, cfg.kappa_power)
    img_t = np.where(is_image, t_img_all[np.maximum(image_ids, 0)] if n_img else 0.0, 0.0)
    keep = np.where(is_image, img_t >= 0.0, keep)

    # Walk the atoms once: kept atoms open a new gap; deleted atoms join the bag of the current gap.
    out_tokens, is_patch, patch_index, patch_rows = [special.bos], [False], [0], []
    text_pos = [0]              # sequence index of each kept atom's text position (gap owners)
    del_tokens, del_gap = [], []
    for i, tok in enumerate(tokens):
        if not keep[i]:
            del_tokens.append(tok)
            del_gap.append(text_pos[-1])
            continue
        text_pos.append(len(out_tokens))
        out_tokens.append(tok)
        is_patch.append(False)
        patch_index.append(0)
        if is_image[i]:
            patch_rows.append((len(out_tokens), image_ids[i], img_t[i]))
            out_tokens.extend([special.pad] * num_patches)
            is_patch.extend([True] * num_patches)
            patch_index.extend(range(num_patches))

    m = len(out_tokens)
    patches = np.zeros((m, dim), np.float32)
    target = np.zeros((m, dim), np.float32)
    patch_t_arr = np.zeros(m, np.float32)
    patch_weight = np.zeros(m, np.float32)
    image_index = np.zeros(m, np.int32)
    for start, img, u in patch_rows:
        t = flow_matching.shift_time(u, cfg.image_time_shift)      # the schedule's time -> the noise level
        noise = rng.standard_normal((num_patches, dim), dtype=np.float32)
        y_t, v = flow_matching.interpolate(latents[img], noise, np.float32(t))
        sl = slice(start, start + num_patches)
        patches[sl], target[sl], patch_t_arr[sl], image_index[sl] = y_t, v, t, img
        patch_weight[sl] = float(t < 1.0)  # a clean (t=1) image is pure conditioning: its velocity is unlearnable

    is_patch = np.asarray(is_patch)
    text_positions = np.asarray(text_pos)
    insert_count = np.zeros(m, np.int32)
    np.add.at(insert_count, np.asarray(del_gap, np.int64), 1)
    text_weight = np.zeros(m, np.float32)
    text_weight[text_positions] = 1.0 / len(text_positions)
    no_insert = np.zeros(m, np.float32)
    no_insert[text_positions] = (insert_count[text_positions] == 0).astype(np.float32)
    return dict(
        tokens=np.asarray(out_tokens, np.int32), is_patch=is_patch, patch_index=np.asarray(patch_index, np.int32),
        image_index=image_index, patches=patches, patch_t=patch_t_arr, velocity_target=target, patch_weight=patch_weight,
        text_weight=text_weight, no_insert=no_insert, insert_count=insert_count,
        del_tokens=np.asarray(del_tokens, np.int32).reshape(-1), del_gap=np.asarray(del_gap, np.int32).reshape(-1))


@dataclasses.dataclass(frozen=True)
class EditFlowTransform:
    """The input pipeline's DocumentTransform for OneFlow (`noise_document`): X_t is BOS + kept atoms, each kept
    image brings its patches."""

    cfg: NoisingConfig
    special: SpecialTokens
    num_patches: int

    def cost(self, num_tokens: int, num_images: int) -> tuple[int, int, int]:
        # Nothing deleted: 1 + n positions + N per image; everything deleted: n bag entries; N patches per image.
        return (1 + num_tokens + num_images * self.num_patches, num_tokens, num_images * self.num_patches)

    def __call__(self, tokens, latents, rng):
        return noise_document(tokens, latents, rng, self.cfg, self.special)


def merge_bags(noised: dict[str, np.ndarray], special: SpecialTokens) -> np.ndarray:
    """Inverse of the text part of `noise_document`: X_t's atoms with every bag spliced back, BOS dropped.

    Used by tests (X_t + bags == X1) and documentation; patch positions are skipped (an image is its token).
    """
    bags: dict[int, list[int]] = {}
    for tok, gap in zip(noised["del_tokens"], noised["del_gap"]):
        bags.setdefault(int(gap), []).append(int(tok))
    out = []
    for j, (tok, patch) in enumerate(zip(noised["tokens"], noised["is_patch"])):
        if patch:
            continue
        if j:
            out.append(int(tok))
        out.extend(bags.get(j, []))
    return np.asarray(out, np.int32)


# ----------------------------------------------------------------------------------------------------------------
# Device side: Eq. 7.

def text_loss(pi_logit, lam, q_logits, batch):
    """L_text of Eq. 7, averaged per document then over documents.

    pi_logit [B, L]: logit of P(k_j = 0); lam [B, L] > 0: Poisson rate; q_logits [B, L, V].
    batch: text_weight (1/n_doc on text positions), no_insert, insert_count, del_tokens/del_gap/del_valid [B, Dmax].
    Because each document's text weights sum to 1, sum(text_weight) is the number of documents: the result is a
    global mean however the batch is sharded.
    """
    w = batch["text_weight"].astype(jnp.float32)
    pi_logit = pi_logit.astype(jnp.float32)
    lam = lam.astype(jnp.float32)
    k = batch["insert_count"].astype(jnp.float32)
    # BCE(pi_j, 1[k_j = 0]) with pi = sigmoid(pi_logit).
    bce = jnp.logaddexp(0.0, pi_logit) - batch["no_insert"] * pi_logit
    # Poisson NLL on non-zero counts only (not zero-truncated, reference §2): lambda - k log lambda.
    poisson = jnp.where(k > 0, lam - k * jnp.log(jnp.maximum(lam, 1e-30)), 0.0)
    # -sum_{a in A_j} log Q_j(a): gather each deleted token's logit at its gap, minus that position's logsumexp.
    lse = jax.nn.logsumexp(q_logits.astype(jnp.float32), axis=-1)                     # [B, L]
    b, length, vocab = q_logits.shape
    flat = q_logits.reshape(b, length * vocab)
    gap = batch["del_gap"]
    tok_logit = jnp.take_along_axis(flat, gap * vocab + batch["del_tokens"], axis=1).astype(jnp.float32)
    gap_lse = jnp.take_along_axis(lse, gap, axis=1)
    gap_w = jnp.take_along_axis(w, gap, axis=1) * batch["del_valid"]
    bag_ce = (gap_lse - tok_logit) * gap_w

    num_docs = jnp.maximum(jnp.sum(w), 1e-6)
    parts = dict(bce=jnp.sum(w * bce) / num_docs, poisson=jnp.sum(w * poisson) / num_docs,
                 bag_ce=jnp.sum(bag_ce) / num_docs)
    return parts["bce"] + parts["poisson"] + parts["bag_ce"], parts
