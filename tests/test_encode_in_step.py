"""data.encode_in_step (data/encode_in_step.py): pixel records noised on the host with zero latents and completed in
the step give the batch the host-encoding pipeline gives, for both methods; the VAE encoder matches the codec."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from oneflow_jax import config_lib
from oneflow_jax.data import encode_in_step, input_pipeline
from oneflow_jax.models import vae
from oneflow_jax.training import train_state


def _first_batch(model_type: str, in_step: bool):
    config = config_lib.load_config_file("configs/shapes_tiny.py:smoke")
    config.model_type = model_type
    config.data.encode_in_step = in_step
    cfg = config_lib.validate(config, jax.device_count())
    tokenizer = input_pipeline.get_tokenizer(cfg.data)
    _, codec = train_state.build_model(cfg, tokenizer.vocab_size)
    it = input_pipeline.create_train_iterator(cfg, process_index=0, process_count=1, codec=codec, tokenizer=tokenizer,
                                              seed=3)
    batch = next(it)
    it.close()
    return batch, codec


@pytest.mark.parametrize("model_type", ["oneflow", "ar"])
def test_in_step_batch_equals_the_host_encoded_batch(model_type, data_dir):
    host, codec = _first_batch(model_type, in_step=False)
    carried, _ = _first_batch(model_type, in_step=True)
    assert carried["pixels"].dtype == np.uint8 and carried["pixels"].shape[2:] == codec.image_shape
    assert np.count_nonzero(carried["pixels"].reshape(len(carried["pixels"]), -1).any(-1)) > 0
    done = jax.jit(lambda b: encode_in_step.add_clean_latents(b, encode_in_step.encoder(codec)))(carried)
    assert set(done) == set(host)                                # pixels and image_index are consumed
    for key in host:
        if key in ("patches", "velocity_target"):
            np.testing.assert_allclose(np.asarray(done[key]), host[key], atol=1e-5, rtol=1e-5, err_msg=key)
        else:
            np.testing.assert_array_equal(np.asarray(done[key]), host[key], err_msg=key)
    assert np.abs(host["velocity_target"]).max() > 0.5          # the clean part is there, not only the noise


def test_vae_encoder_matches_the_codec():
    cfg = vae.VAEConfig(block_out_channels=(16, 32), latent_channels=16, norm_num_groups=8,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    codec = vae.VAECodec(cfg, vae.init_params(cfg), image_size=16, patch_size=2)
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    ours = jax.jit(encode_in_step.encoder(codec))(images)
    np.testing.assert_allclose(np.asarray(ours), codec.encode(images), atol=1e-5, rtol=1e-5)
