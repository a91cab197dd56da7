"""Flax AutoencoderKL vs diffusers' AutoencoderKL (random weights, tiny SD3-like config: 16 latent channels, scaling
and shift factors): encode (latent mean) and decode parity, the VAE codec, and loading errors."""
import copy
import os

import jax
import ml_collections
import numpy as np
import pytest

from oneflow_jax.models import codec as codec_lib
from oneflow_jax.convert import safetensors_io
from oneflow_jax.models import vae

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
            latent_channels=16, norm_num_groups=8, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609)


def make_diffusers_vae(directory, seed=0, **overrides):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**dict(TINY, **overrides)).eval()
    with torch.no_grad():                   # perturb every tensor so norms / biases are not at their 1 / 0 init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def sd3_like(tmp_path_factory):
    """SD3 / FLUX layout: no quant convs."""
    d = str(tmp_path_factory.mktemp("vae_sd3"))
    return make_diffusers_vae(d, use_quant_conv=False, use_post_quant_conv=False), d


def test_encode_decode_match_diffusers(sd3_like):
    model, d = sd3_like
    cfg, params = vae.load_diffusers_vae(d)
    assert cfg.latent_channels == 16 and not cfg.use_quant_conv and cfg.shift_factor == pytest.approx(0.0609)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want_mean = model.encode(torch.from_numpy(x)).latent_dist.mean.numpy()
    flax_vae = vae.AutoencoderKL(cfg)
    got_mean = flax_vae.apply({"params": params}, x.transpose(0, 2, 3, 1), method=vae.AutoencoderKL.encode)
    np.testing.assert_allclose(np.asarray(got_mean).transpose(0, 3, 1, 2), want_mean, rtol=1e-4, atol=1e-4)
    z = np.random.default_rng(1).standard_normal((2, 16, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want_image = model.decode(torch.from_numpy(z)).sample.numpy()
    got_image = flax_vae.apply({"params": params}, z.transpose(0, 2, 3, 1), method=vae.AutoencoderKL.decode)
    np.testing.assert_allclose(np.asarray(got_image).transpose(0, 3, 1, 2), want_image, rtol=1e-4, atol=1e-4)


def test_quant_convs_and_legacy_attention_names(tmp_path):
    """SD1/SDXL layout (quant_conv / post_quant_conv) and pre-0.14 attention names stored as 1x1 convs."""
    d = str(tmp_path / "vae_sd1")
    model = make_diffusers_vae(d, seed=1)
    path = os.path.join(d, vae.WEIGHTS_NAME)
    tensors, meta = safetensors_io.load_file(path)
    legacy = {}
    for name, value in tensors.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in name:
                name = name.replace(f".{new}.", f".{old}.")
                value = np.asarray(value)[..., None, None] if value.ndim == 2 else value
        legacy[name] = np.asarray(value)
    safetensors_io.save_file(legacy, path, meta)
    cfg, params = vae.load_diffusers_vae(d)
    assert cfg.use_quant_conv and cfg.use_post_quant_conv
    x = np.random.default_rng(2).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x), sample_posterior=False).sample.numpy()
    got = vae.AutoencoderKL(cfg).apply({"params": params}, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-4, atol=1e-4)


def test_vae_codec_matches_the_sd3_latent_normalisation(sd3_like):
    model, d = sd3_like
    codec = codec_lib.make_codec(ml_collections.ConfigDict(dict(name="vae", path=d, image_size=32, patch_size=2,
                                                                batch_size=2)))
    assert isinstance(codec, vae.VAECodec)
    assert codec.grid == (8, 8) and codec.num_patches == 64 and codec.patch_dim == 2 * 2 * 16
    images = np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)   # 3: a padded last chunk
    latents = codec.encode(images)
    assert latents.shape == (3, 64, 64) and latents.dtype == np.float32
    with torch.no_grad():
        x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
        mean = model.encode(x).latent_dist.mean
        z = ((mean - TINY["shift_factor"]) * TINY["scaling_factor"]).permute(0, 2, 3, 1).numpy()   # [3, 16, 16, 16]
    patch = latents[1, 8 * 2 + 5].reshape(2, 2, 16)          # patch (row 2, col 5): latent rows 4-5, cols 10-11
    np.testing.assert_allclose(patch, z[1, 4:6, 10:12], rtol=1e-4, atol=1e-4)
    decoded = codec.decode(latents)
    assert decoded.shape == images.shape and decoded.dtype == np.uint8
    with torch.no_grad():
        zt = torch.from_numpy(z).permute(0, 3, 1, 2) / TINY["scaling_factor"] + TINY["shift_factor"]
        want = model.decode(zt).sample.permute(0, 2, 3, 1).numpy()
    want = np.clip(np.round((want + 1) * 127.5), 0, 255)
    assert np.abs(decoded.astype(int) - want).max() <= 1
    again = copy.deepcopy(codec)          # __getstate__ drops the jitted functions (copying to data-loader workers)
    np.testing.assert_allclose(again.encode(images[:1]), latents[:1], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="image_size 34"):
        vae.VAECodec(codec.vae_config, codec.params, image_size=34)


def test_loading_errors_name_the_tensor(tmp_path, sd3_like):
    _, d = sd3_like
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / vae.CONFIG_NAME).write_bytes(open(os.path.join(d, vae.CONFIG_NAME), "rb").read())
    tensors, meta = safetensors_io.load_file(os.path.join(d, vae.WEIGHTS_NAME))
    tensors = dict(tensors)
    tensors["decoder.up_blocks.0.resnets.1.conv2.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    del tensors["encoder.mid_block.attentions.0.to_k.bias"]
    safetensors_io.save_file(tensors, str(broken / vae.WEIGHTS_NAME), meta)
    with pytest.raises(safetensors_io.SafetensorsError,
                       match=r"(?s)missing tensor 'encoder.mid_block.attentions.0.to_k.bias'.*"
                             r"'decoder.up_blocks.0.resnets.1.conv2.weight' has shape \(64, 64, 1, 1\)"):
        vae.load_diffusers_vae(str(broken))
    data = open(os.path.join(d, vae.WEIGHTS_NAME), "rb").read()
    (broken / vae.WEIGHTS_NAME).write_bytes(data[:-100])
    with pytest.raises(safetensors_io.SafetensorsError, match="truncated: tensor '"):
        vae.load_diffusers_vae(str(broken))
    os.remove(broken / vae.WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        vae.load_diffusers_vae(str(broken))
    with pytest.raises(ValueError, match="unsupported down_block_types"):
        vae.VAEConfig.from_diffusers(dict(TINY, down_block_types=["AttnDownEncoderBlock2D"] * 2))


def test_shape_only_codec_and_config_checks(sd3_like):
    """configs/oneflow_1b.py style: latent_channels / downsample_factor without weights; checked against weights."""
    _, d = sd3_like
    shape_only = codec_lib.make_codec(ml_collections.ConfigDict(dict(
        name="vae", path=None, image_size=256, patch_size=2, latent_channels=16, downsample_factor=8)))
    assert (shape_only.num_patches, shape_only.patch_dim, shape_only.grid) == (256, 64, (16, 16))
    with pytest.raises(ValueError, match="no weights"):
        shape_only.encode(np.zeros((1, 256, 256, 3), np.uint8))
    with pytest.raises(ValueError, match="latent_channels=4 but the VAE"):
        codec_lib.make_codec(ml_collections.ConfigDict(dict(name="vae", path=d, image_size=32, latent_channels=4)))
    with pytest.raises(ValueError, match="needs codec.path"):
        codec_lib.make_codec(ml_collections.ConfigDict(dict(name="vae", path=None, image_size=32)))


def test_short_batches_are_padded_to_a_power_of_two_only():
    """A one-image document costs one encode, not batch_size: the last chunk is padded to 1, 2, 4 or 8 rows."""
    codec = vae.VAECodec(vae.VAEConfig(latent_channels=4, block_out_channels=(0, 0)), None, 16, 2, 8)
    shapes = []

    def fn(params, x):
        shapes.append(len(x))
        return x * 2.0

    for n, want in ((1, [1]), (3, [4]), (8, [8]), (11, [8, 4]), (16, [8, 8])):
        shapes.clear()
        x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
        np.testing.assert_array_equal(codec._chunked(fn, x), x * 2.0)
        assert shapes == want, (n, shapes)


def test_saved_random_vae_loads_in_diffusers_and_back(tmp_path):
    cfg = vae.VAEConfig(block_out_channels=(16, 32, 32), latent_channels=16, norm_num_groups=8,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    params = vae.init_params(cfg, seed=1)
    vae.save_diffusers_vae(str(tmp_path), cfg, params)
    loaded_cfg, loaded = vae.load_diffusers_vae(str(tmp_path))
    assert loaded_cfg == cfg
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), b)
    model = diffusers.AutoencoderKL.from_pretrained(str(tmp_path)).eval()
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist.mean.numpy().transpose(0, 2, 3, 1)
    ours = vae.AutoencoderKL(cfg).apply({"params": params}, x, method=vae.AutoencoderKL.encode)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-4, rtol=2e-4)
