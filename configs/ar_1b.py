"""AR+FM baseline 1B (reference §7, Transfusion-style) matching configs/oneflow_1b.py: the same run with
model_type 'ar' (oneflow_jax/methods/ar_fm.py: models/ar_transformer.py, objectives/ar_objective.py,
sampling/ar_sampler.py).

    python -m oneflow_jax.flops --config configs/ar_1b.py --json
    python -m oneflow_jax.aot --config configs/ar_1b.py:cpu

Wall clock and scores: not measured at this scale; one H200 runs the 16-row step at the speed of OneFlow's
(docs/results.md, "Throughput and MFU").

The config *is* oneflow_1b's (loaded from that file, so the two cannot drift): Llama 3.2 1B backbone, vocabulary
128256, sequence 512, global batch 4096, 256-px SD3/FLUX VAE latents, optimizer, steps, data, mesh presets and the
variants `cpu`, `tpN`, `slicesN`. That makes OneFlow vs AR an equal-size, equal-data comparison. What differs:
  * model_type 'ar': causal attention over text, bidirectional inside each image block; next-token Q head and the
    velocity head, no insertion head (2 * d_model + 2 parameters fewer); next-token CE + flow matching on the clean
    document (BOS, text, `<image>` = BOI + its 256 patches, EOS) instead of Edit Flow noising. The tokenizer needs
    an EOS piece (Llama's <|end_of_text|>).
  * `ar.cond_t_min` = 0.5: an image followed by text draws t_img ~ U(0.5, 1) (Transfusion's noise cap on
    conditioning images), as configs/ar_shapes_tiny.py.
  * objective.image_loss_weight stays 1.0 as in OneFlow for an equal-weight comparison (Transfusion used 5).
Unused by AR and left as they are: OneFlow's noising and condition-dropout knobs (config.objective),
data.max_deletions (AR rows have no deletion bags) and sampler.text_cfg / image_cfg (the AR sampler has no CFG).
configs/ar_3b.py and ar_8b.py call `ar_config` with their oneflow_* file.
"""
import ml_collections

from oneflow_jax.config_lib import sibling_config


def ar_config(oneflow_file: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The AR+FM baseline of configs/<oneflow_file> with its variants `arg` (see the module docstring)."""
    c = sibling_config(__file__, oneflow_file).get_config(arg)
    c.model_type = "ar"
    c.ar = ml_collections.ConfigDict(dict(cond_t_min=0.5))
    return c


def get_config(arg: str | None = None):
    return ar_config("oneflow_1b.py", arg)
