"""FID: the Flax FID Inception against a torch reference of pytorch-fid's network at random weights (converted by the
real `convert_weights` command), the resize against torch's F.interpolate, the Frechet distance against scipy's sqrtm
formula, streaming statistics, the data-parallel feature path on 8 fake devices, and the missing-weights error."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from oneflow_jax.cli import UserError
from oneflow_jax.evals import fid, inception

REPO = Path(__file__).resolve().parents[1]
FEATURE_RTOL = 1e-4


def torch_fid_inception():
    """pytorch-fid's `fid_inception_v3()` inside its `InceptionV3` wrapper (block 3, resize_input and
    normalize_input), written out without torchvision: torchvision's Inception3(num_classes=1008, aux_logits=False)
    module names, so its state dict has the keys of pt_inception-2015-12-05-6726825d.pth, with pytorch-fid's FID
    patches (average pools without padding in Mixed_5*, 6b..6e, 7b; a max pool in Mixed_7c). NCHW in [0, 1]."""
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class BasicConv2d(nn.Module):
        def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg_pool(x):                    # the FID patch: TF's average pool ignores the zero padding
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class FIDInceptionA(nn.Module):
        def __init__(self, cin, pool_features):
            super().__init__()
            self.branch1x1 = BasicConv2d(cin, 64, 1)
            self.branch5x5_1, self.branch5x5_2 = BasicConv2d(cin, 48, 1), BasicConv2d(48, 64, 5, padding=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
            self.branch_pool = BasicConv2d(cin, pool_features, 1)

        def forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool(x))], 1)

    class InceptionB(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class FIDInceptionC(nn.Module):
        def __init__(self, cin, c7):
            super().__init__()
            self.branch1x1 = BasicConv2d(cin, 192, 1)
            self.branch7x7_1 = BasicConv2d(cin, c7, 1)
            self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
            self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
            self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
            self.branch_pool = BasicConv2d(cin, 192, 1)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for i in range(1, 6):
                bd = getattr(self, f"branch7x7dbl_{i}")(bd)
            return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg_pool(x))], 1)

    class InceptionD(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1, self.branch3x3_2 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 320, 3, stride=2)
            self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
            self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
            self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
            self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

        def forward(self, x):
            b7 = x
            for i in range(1, 5):
                b7 = getattr(self, f"branch7x7x3_{i}")(b7)
            return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)],
                             1)

    class FIDInceptionE(nn.Module):         # max_pool=False: FIDInceptionE_1, True: FIDInceptionE_2
        def __init__(self, cin, max_pool):
            super().__init__()
            self.max_pool = max_pool
            self.branch1x1 = BasicConv2d(cin, 320, 1)
            self.branch3x3_1 = BasicConv2d(cin, 384, 1)
            self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
            self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
            self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
            self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
            self.branch_pool = BasicConv2d(cin, 192, 1)

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else avg_pool(x)
            return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)

    class FIDInception3(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
            self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
            self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (FIDInceptionA(192, 32), FIDInceptionA(256, 64),
                                                           FIDInceptionA(288, 64))
            self.Mixed_6a = InceptionB(288)
            self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (FIDInceptionC(768, c) for c in
                                                                          (128, 160, 160, 192))
            self.Mixed_7a = InceptionD(768)
            self.Mixed_7b, self.Mixed_7c = FIDInceptionE(1280, max_pool=False), FIDInceptionE(2048, max_pool=True)
            self.fc = nn.Linear(2048, 1008)           # in the .pth, unused by the pool3 features

        def forward(self, x):
            x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, kernel_size=3, stride=2)))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(self, f"Mixed_{name}")(x)
            return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)

    return FIDInception3().eval()


def randomize(model, seed=0):
    """He-scaled conv weights and random BatchNorm affine and running statistics, so that activations keep their
    scale through the ~50 layers and every BatchNorm tensor matters."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=g))
                module.bias.copy_(0.2 * torch.randn(n, generator=g))
                module.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                module.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(torch reference, variables): a random reference saved as a .pth, converted to safetensors and loaded."""
    torch = pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("inception")
    model = randomize(torch_fid_inception())
    pth, out = str(d / "random_inception.pth"), str(d / "random_inception.safetensors")
    torch.save(model.state_dict(), pth)
    assert inception.convert_weights(pth, out) == 94 * 5               # fc.* and num_batches_tracked dropped
    return model, inception.load(out)


@pytest.fixture(scope="module")
def images_uint8():
    return np.random.default_rng(0).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def one_device_features(converted, images_uint8):
    """Features of `images_uint8 / 255` (float input) on one device."""
    features = fid.InceptionFeatures(converted[1], devices=jax.local_devices()[:1])
    return features(images_uint8.astype(np.float32) / 255)


@pytest.mark.parametrize("shape", [(32, 32), (40, 56), (512, 384), (300, 1000)])
def test_resize_matches_torch_interpolate(shape):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).random((2, *shape, 3), dtype=np.float32)
    ours = np.asarray(inception.resize_bilinear(x))
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                                          mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=0)


def test_features_match_torch_reference(converted, images_uint8, one_device_features):
    torch = pytest.importorskip("torch")
    model, _ = converted
    with torch.no_grad():
        ref = model(torch.from_numpy(images_uint8.astype(np.float32) / 255).permute(0, 3, 1, 2)).numpy()
    assert one_device_features.shape == ref.shape == (3, 2048)
    assert 0.05 < np.abs(ref).mean() < 20 and (ref > 0).mean() > 0.5          # a meaningful, non-degenerate scale
    error = np.abs(one_device_features - ref).max() / np.abs(ref).max()
    print(f"FID Inception parity: max |jax - torch| / max |torch| = {error:.2e}")
    assert error <= FEATURE_RTOL


def test_sharded_features_match_one_device(converted, images_uint8, one_device_features):
    """8 devices, uint8 input: 11 images in chunks of 8, the last one (3 images) padded to 8."""
    assert jax.local_device_count() == 8
    features = fid.InceptionFeatures(converted[1], batch_size=8)
    scale = np.abs(one_device_features).max()
    others = np.random.default_rng(2).integers(0, 256, (5, 40, 56, 3), dtype=np.uint8)
    eleven = features(np.concatenate([images_uint8, others, images_uint8]))
    assert eleven.shape == (11, 2048)
    np.testing.assert_allclose(eleven[:3], one_device_features, atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(eleven[8:], one_device_features, atol=1e-5 * scale, rtol=0)
    assert features(images_uint8[:0]).shape == (0, 2048)


def test_converter_checks_names_and_shapes(converted):
    model, variables = converted
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}     # with fc.* and bn.num_batches_tracked
    assert len(tensors) == 94 * 6 + 2                                   # 94 BasicConv2d: conv weight + 5 BatchNorm
    round_trip = inception.convert_pytorch_fid_state(tensors)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, round_trip, variables))
    # torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and fc (2,049,000):
    assert sum(np.size(x) for x in jax.tree_util.tree_leaves(variables["params"])) == 21_785_568
    bad = dict(tensors, **{"Mixed_6b.branch7x7_2.conv.weight": np.zeros((128, 128, 7, 1), np.float32),
                           "AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)})
    del bad["Mixed_7c.branch_pool.bn.running_var"]
    with pytest.raises(ValueError) as e:
        inception.convert_pytorch_fid_state(bad, source="bad.pth")
    for name in ("Mixed_6b.branch7x7_2.conv.weight", "AuxLogits.fc.weight", "Mixed_7c.branch_pool.bn.running_var"):
        assert name in str(e.value)


def test_missing_weights_is_one_line(tmp_path):
    path = str(tmp_path / "inception.safetensors")
    for call, name in ((lambda: inception.load(path), path),
                       (lambda: fid.InceptionFeatures.from_file(path), path),
                       (lambda: inception.convert_weights(str(tmp_path / "x.pth"), path), str(tmp_path / "x.pth"))):
        with pytest.raises(UserError) as e:
            call()
        message = str(e.value)
        assert "\n" not in message and name in message and inception.WEIGHTS_URL in message
        if name == path:                                          # the converted file: how to make it
            assert "python -m oneflow_jax.convert_weights --inception_pth" in message and f"--out {path}" in message


def test_command_without_the_pth_is_one_line(tmp_path):
    pth = str(tmp_path / "pt_inception.pth")
    result = subprocess.run([sys.executable, "-m", "oneflow_jax.convert_weights", "--inception_pth", pth, "--out",
                             str(tmp_path / "out.safetensors")], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {pth}: no such file; download pytorch-fid's Inception weights from " \
                                    f"{inception.WEIGHTS_URL}"
    assert not os.path.exists(tmp_path / "out.safetensors")


def test_frechet_distance_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    for d, rank in ((8, 8), (64, 64), (64, 40), (64, 3)):             # rank < d: singular, as with < d images
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        a, b = rng.normal(size=(d, rank)), rng.normal(size=(d, d))
        cov1, cov2 = a @ a.T / rank, b @ b.T / d
        base = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2)
        sqrtm = base - 2 * np.trace(scipy_linalg.sqrtm(cov1 @ cov2).real)            # pytorch-fid's formula
        # tr((cov1 cov2)^(1/2)) = sum of sqrt(eigenvalues of a^T cov2 a / rank): exact even when cov1 is singular
        exact = base - 2 * np.sqrt(np.linalg.eigvalsh(a.T @ cov2 @ a / rank).clip(0)).sum()
        for ours in (fid.frechet_distance(mu1, cov1, mu2, cov2), fid.frechet_distance(mu2, cov2, mu1, cov1)):
            assert ours == pytest.approx(sqrtm, rel=1e-7)                # sqrtm itself is off by ~1e-8 when singular
            assert ours == pytest.approx(exact, rel=1e-12)
    features = rng.normal(size=(300, 512)) ** 2                       # FID of a set against itself (singular cov)
    mu, cov = features.mean(0), np.cov(features, rowvar=False)
    assert abs(fid.frechet_distance(mu, cov, mu, cov)) < 1e-3
    with pytest.raises(ValueError, match="mismatched"):
        fid.frechet_distance(mu[:3], cov, mu, cov)


def test_feature_stats_streaming_merge_and_cache(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(103, 16)) * 3 + 5
    stats = fid.FeatureStats(16)
    for lo, hi in ((0, 1), (1, 30), (30, 31), (31, 103)):             # uneven batches
        stats.update(x[lo:hi].astype(np.float32) if lo == 1 else x[lo:hi])
    expected_x = np.concatenate([x[:1], x[1:30].astype(np.float32), x[30:]])
    mean, cov = stats.mean_cov()
    np.testing.assert_allclose(mean, expected_x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(expected_x, rowvar=False), rtol=1e-10, atol=1e-12)
    merged = fid.FeatureStats(16).update(x[:50]).merge(fid.FeatureStats(16).update(x[50:]))
    assert merged.count == 103
    np.testing.assert_allclose(merged.mean_cov()[1], np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    path = str(tmp_path / "ref_stats.npz")
    merged.save(path)
    loaded = fid.FeatureStats.load(path)
    assert loaded.count == 103 and loaded.dim == 16
    np.testing.assert_array_equal(loaded.sum_outer, merged.sum_outer)
    np.testing.assert_array_equal(loaded.sum, merged.sum)
    assert fid.fid_from_stats(loaded, merged) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        fid.FeatureStats(16).update(x[:1]).mean_cov()
    np.savez(str(tmp_path / "other.npz"), mu=mean, sigma=cov)                       # not our format: one clear error
    with pytest.raises(ValueError, match="not a FeatureStats file"):
        fid.FeatureStats.load(str(tmp_path / "other.npz"))


def test_fid_from_images_and_cache(converted, images_uint8, tmp_path):
    """The streaming helpers end to end on one device (the images of the other tests: no new compilation)."""
    features = fid.InceptionFeatures(converted[1], devices=jax.local_devices()[:1])
    batches = [images_uint8.astype(np.float32) / 255] * 2
    path = str(tmp_path / "ref.npz")
    reference = fid.cached_feature_stats(path, iter(batches), features)
    assert reference.count == 6 and os.path.exists(path)

    def never():
        raise AssertionError("the cached statistics should have been read")
        yield
    assert fid.cached_feature_stats(path, never(), features).count == 6
    assert fid.fid_from_images(batches, path, features) == pytest.approx(0, abs=1e-3)
