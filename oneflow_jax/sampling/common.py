"""What both samplers share: the sampler settings (`SamplerConfig`) and drawing tokens from a distribution."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1e9
INSERTION_ORDERS = ("random", "largest_gap")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    steps: int = 32
    max_len: int = 256
    text_cfg: float = 1.0       # w of Eq. 12 (1 = no guidance)
    image_cfg: float = 1.0      # v = v_u + w (v_c - v_u)
    temperature: float = 1.0    # for Q
    top_p: float = 1.0          # nucleus sampling for Q
    max_insertions_per_step: int = 0   # per sequence and step; 0 = no limit (Alg. 1). See the module docstring
    finish_threshold: float = 0.0      # after t = 1, keep stepping while some gap has 1 - pi above this; 0 = off
    insertion_order: str = "random"    # which of a step's insertions the cap keeps: "random" | "largest_gap"
    votes: int = 1                     # > 1: a prompt whose images are all given (captioning) is sampled this many
                                       # times and its most frequent text kept (generate.Generator, self-consistency)
    kappa_power: float = 1.0        # the training objective's schedules (config.objective), not sampler knobs
    image_time_shift: float = 1.0

    def __post_init__(self):
        if self.insertion_order not in INSERTION_ORDERS:
            raise ValueError(f"insertion_order must be one of {', '.join(INSERTION_ORDERS)}, "
                             f"got {self.insertion_order!r}")
        if self.votes < 1:
            raise ValueError(f"votes must be >= 1 (1: no vote), got {self.votes}")


def sample_tokens(rng, log_q, temperature: float, top_p: float):
    """Draws token ids from log-probabilities `log_q` [..., V] at `temperature`, restricted to the top-p nucleus."""
    logits = log_q / max(temperature, 1e-6)
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
