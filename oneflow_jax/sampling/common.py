"""What both samplers share: the sampler settings (`SamplerConfig`) and drawing tokens from a distribution."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1e9
INSERTION_ORDERS = ("random", "largest_gap")
INSERTION_RULES = ("alg1", "confident")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    steps: int = 32             # h = 1 / steps: Euler steps per image (and, for rule 'alg1', text time steps)
    max_len: int = 256
    insertion_rule: str = "alg1"    # 'alg1': the paper's Bernoulli gates on a time grid; 'confident' (oneflow_sampler)
    gap_threshold: float = 0.5      # confident: a gap is open while E[k] = (1 - pi) lambda > this; done when none is
    parallel_confidence: float = 0.8   # confident: an open gap inserts alongside others iff max(1, lambda) / exp(H(Q))
                                       # >= this; the most confident open gap always inserts
    images_wait_for_text: bool = False   # confident rule only: a row's noisy images take no Euler step while an
                                         # evaluation sees an open gap (each image denoises from its written text)
    length_buckets: int = 3         # the network runs on the smallest of this many lengths (max_len / 2^k) that holds
                                    # the live sequence; 1 = always max_len
    text_cfg: float = 1.0       # w of Eq. 12 (1 = no guidance)
    image_cfg: float = 1.0      # v = v_u + w (v_c - v_u)
    temperature: float = 1.0    # for Q
    top_p: float = 1.0          # nucleus sampling for Q
    top_k: int = 0              # nextflow_sampler: draw among the k most likely only (before top_p); 0 = off
    code_temperature: float = 1.0   # nextflow_sampler: temperature of the image code draws (text: `temperature`)
    max_insertions_per_step: int = 0   # per sequence and step; 0 = no limit (Alg. 1). See the module docstring
    finish_threshold: float = 0.0      # after t = 1, keep stepping while some gap has 1 - pi above this; 0 = off
    insertion_order: str = "random"    # which of a step's insertions the cap keeps: "random" | "largest_gap"
    votes: int = 1                     # > 1: a prompt whose images are all given (captioning) is sampled this many
                                       # times and its most frequent text kept (generate.Generator, self-consistency)
    kappa_power: float = 1.0        # the training objective's schedules (config.objective), not sampler knobs
    image_time_shift: float = 1.0

    def __post_init__(self):
        if self.insertion_rule not in INSERTION_RULES:
            raise ValueError(f"insertion_rule must be one of {', '.join(INSERTION_RULES)}, got {self.insertion_rule!r}")
        if self.steps < 1 or self.length_buckets < 1:
            raise ValueError(f"steps and length_buckets must be >= 1, got {self.steps} and {self.length_buckets}")
        if self.insertion_order not in INSERTION_ORDERS:
            raise ValueError(f"insertion_order must be one of {', '.join(INSERTION_ORDERS)}, "
                             f"got {self.insertion_order!r}")
        if self.votes < 1:
            raise ValueError(f"votes must be >= 1 (1: no vote), got {self.votes}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not (self.temperature > 0 and self.code_temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"temperature and code_temperature must be > 0 and top_p in (0, 1], got "
                             f"{self.temperature}, {self.code_temperature} and {self.top_p}")
        if self.text_cfg < 0 or self.image_cfg < 0 or self.max_len < 2:
            raise ValueError(f"text_cfg and image_cfg must be >= 0 and max_len >= 2, got {self.text_cfg}, "
                             f"{self.image_cfg} and {self.max_len}")


# Named sampler settings (`--sampler_preset`); fields not named keep the run's config.sampler.
PRESETS = {
    # The paper's Alg. 1 exactly: Bernoulli(1 - pi) and Bernoulli(min(1, h kappa_dot / (1 - kappa) lambda)) in every
    # gap on the time grid t = 0, h, ..., a ~ Q at temperature 1, no cap, no finishing, no vote, no guidance.
    "alg1": dict(insertion_rule="alg1", max_insertions_per_step=0, finish_threshold=0.0, insertion_order="random",
                 votes=1, temperature=1.0, top_p=1.0, text_cfg=1.0, image_cfg=1.0, images_wait_for_text=False),
    # Concurrent few-step insertion (oneflow_sampler, 'confident'): every confident open gap at once, Q at
    # temperature 0.1, one sample, images denoised once their text is written (docs/results.md, "Sampling frontier").
    "confident": dict(insertion_rule="confident", max_insertions_per_step=0, finish_threshold=0.0, votes=1,
                      temperature=0.1, top_p=1.0, images_wait_for_text=True),
}


def bucket_lengths(max_len: int, count: int) -> tuple[int, ...]:
    """The static lengths the network runs at: max_len / 2^k for k < count, rounded up to 8, ascending, unique."""
    out = {max_len}
    for k in range(1, count):
        out.add(min(max_len, -(-max(max_len >> k, 1) // 8) * 8))
    return tuple(sorted(out))


def run_bucketed(apply_fn, inputs: dict, live_len, buckets: tuple[int, ...]):
    """apply_fn(inputs) on the first `n` positions, n the smallest bucket >= max(live_len); outputs padded back to
    the full length along axis 1. One branch per bucket (lax.switch), each compiled once."""
    full = inputs["tokens"].shape[1]

    def branch(n):
        def f(inp):
            out = apply_fn({k: v[:, :n] for k, v in inp.items()})
            return {k: jnp.pad(v, [(0, 0), (0, full - n)] + [(0, 0)] * (v.ndim - 2)) for k, v in out.items()}
        return f

    if len(buckets) == 1:
        return branch(full)(inputs)
    index = jnp.searchsorted(jnp.asarray(buckets), jnp.max(live_len))
    return jax.lax.switch(jnp.minimum(index, len(buckets) - 1), [branch(n) for n in buckets], inputs)


def next_text_tokens(rng, logits, banned, image_id: int, no_room, cfg: SamplerConfig):
    """The KV-cached samplers' text draw: a token per row from its next-token `logits` [B, V] at the config's
    temperature / top-k / top-p; `banned` ids never, `<image>` not where `no_room` [B] (its block would not fit)."""
    log_q = jax.nn.log_softmax(logits, axis=-1).at[:, banned].set(NEG)
    log_q = log_q.at[:, image_id].set(jnp.where(no_room, NEG, log_q[:, image_id]))
    return sample_tokens(rng, log_q, cfg.temperature, cfg.top_p, cfg.top_k).astype(jnp.int32)


def jit_with_prefill_bucket(run, cfg: SamplerConfig):
    """The KV-cached samplers' entry: run(params, state, rng, prefill_len) jitted with prefill_len static, called
    with the smallest length bucket (bucket_lengths) that holds every prompt, so prompts of similar length share one
    compile."""
    jitted = jax.jit(run, static_argnums=3)

    def sample(params, st, rng):
        buckets = bucket_lengths(st["tokens"].shape[1], cfg.length_buckets)
        longest = int(np.max(st["prompt_len"]))
        return jitted(params, st, rng, next(n for n in buckets if n >= longest))
    return sample


def sample_tokens(rng, log_q, temperature: float, top_p: float, top_k: int = 0):
    """Draws token ids from log-probabilities `log_q` [..., V] at `temperature`, restricted to the `top_k` most likely
    (0 = all; ties at the k-th value are kept) and then to the top-p nucleus."""
    logits = log_q / max(temperature, 1e-6)
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p   # smallest prefix with mass >= top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, NEG, logits)
    return jax.random.categorical(rng, logits, axis=-1)


def prompt_buffers(batch: int, max_len: int, pad_id: int, patch_dim: int, **extra) -> dict[str, np.ndarray]:
    """The host buffers both samplers lay prompts into: tokens (pad), is_patch, patch_index, patches and patch_t
    (1: clean), [batch, max_len(, patch_dim)]; `extra` adds zero-filled buffers by name -> (shape, dtype)."""
    st = dict(tokens=np.full((batch, max_len), pad_id, np.int32), is_patch=np.zeros((batch, max_len), bool),
              patch_index=np.zeros((batch, max_len), np.int32),
              patches=np.zeros((batch, max_len, patch_dim), np.float32), patch_t=np.ones((batch, max_len), np.float32))
    st.update({name: np.zeros(shape, dtype) for name, (shape, dtype) in extra.items()})
    return st


def check_markers(row: int, tokens, images, image_id: int) -> None:
    """A prompt needs one image entry (latents or None) per `<image>` marker."""
    n_markers = sum(t == image_id for t in tokens)
    if n_markers != len(images):
        raise ValueError(f"prompt {row}: {n_markers} <image> markers but {len(images)} images")
