"""oneflow_jax: OneFlow — concurrent mixed-modal generation with an insertion Edit Flow over text and Flow Matching
over image latents, in one bidirectional transformer (arXiv 2510.03506)."""

__version__ = "0.1.0"
