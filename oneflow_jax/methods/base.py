"""What a method provides to the shared train loop, samplers, FLOP counter and converters."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Method:
    """One generative method. Every field is a plain function or constant, so a method is defined by a table.

    name              the `config.model_type` that selects it
    model_class       the Flax module, built from a models.transformer.ModelConfig
    loss              (model, params, batch, image_loss_weight, image_loss_space) -> (loss, metrics)
    pipeline_pieces   (config, tokenizer, codec) -> (DocumentTransform, RowPacker) for data.input_pipeline
    batch_structure   (config, model_cfg) -> {key: (per-row shape, dtype)} of a packed row, for aot
    sampler           the sampling module: init_state, extract_documents, make_sampler
    special_tokens    tokenizer -> the special ids its sampler and transform use
    banned_tokens     tokenizer -> ids its sampler never draws
    causal            attention is causal (the FLOP count's causal-skipping column halves it)
    insert_head       the model has OneFlow's insertion head (pi, lambda)
    end_token         the document ends with an EOS token (AR)
    torch_export      export_torch supports it
    image_codes       images are VQ codes (a code head, no flow matching); its sampler takes the run's codec
    """
    name: str
    model_class: type
    loss: Callable[..., Any]
    pipeline_pieces: Callable[..., tuple[Any, Any]]
    batch_structure: Callable[..., dict]
    sampler: Any
    special_tokens: Callable[[Any], Any]
    banned_tokens: Callable[[Any], tuple[int, ...]]
    causal: bool
    insert_head: bool
    end_token: bool
    torch_export: bool
    image_codes: bool = False

    def build_model(self, model_cfg):
        return self.model_class(model_cfg)

    def loss_function(self, image_loss_space: str) -> Callable[..., Any]:
        """(model, params, batch, image_loss_weight) -> (loss, metrics)."""
        return functools.partial(self.loss, image_loss_space=image_loss_space)

    def make_sampler(self, model, sampler_config, tokenizer, codec):
        """jit(params, state, rng) -> (state, nfe) for this method's model."""
        extra = dict(codec=codec) if self.image_codes else {}
        return self.sampler.make_sampler(model, sampler_config, self.special_tokens(tokenizer), codec.num_patches,
                                         self.banned_tokens(tokenizer), **extra)
