"""Flax modules: the Llama-style bidirectional backbone with OneFlow's heads (`transformer`), the AR+FM baseline's
causal variant (`ar_transformer`), and the image codecs that turn pixels into latent patches (`codec`, `vae`)."""
