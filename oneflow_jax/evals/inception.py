"""The FID Inception network in Flax Linen: a reproduction of pytorch-fid's `fid_inception_v3` (its port of
TensorFlow's 2015-12-05 Inception graph, the network every published FID is computed with), up to the 2048-d pool3
features.

    variables = inception.load("pt_inception-2015-12-05-6726825d.safetensors")
    feats = FIDInceptionV3().apply(variables, images)        # images: float [B, H, W, 3] in [0, 1] -> [B, 2048]

Differences from pytorch-fid are layout only: images are NHWC here (NCHW there), conv kernels HWIO (OIHW there).
What the network does, in order (pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`):
  * bilinear resize to 299x299 as torch's `F.interpolate(mode="bilinear", align_corners=False)` (no antialiasing,
    in up- and down-sampling alike), then x -> 2x - 1;
  * torchvision's Inception3 stem and blocks, every conv a `BasicConv2d` (conv without bias, BatchNorm with
    eps=0.001 and its running statistics, relu), with pytorch-fid's FID patches: the 3x3 average pools of Mixed_5*,
    Mixed_6b..e and Mixed_7b exclude the zero padding from the average (TF's behaviour, `count_include_pad=False`),
    and Mixed_7c pools its last branch with a 3x3 *max* pool;
  * global average pool -> [B, 2048].
Module and parameter names are those of the torch state dict, so `convert_pytorch_fid_state` is a name mapping:
`Mixed_5b.branch1x1.conv.weight` <-> params["Mixed_5b"]["branch1x1"]["conv"]["kernel"], `...bn.running_mean` <->
batch_stats[...]["bn"]["mean"].

The weights are pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, converted once to safetensors (pickle-free) by
`python -m oneflow_jax.convert_weights --inception_pth F.pth --out F.safetensors` (`convert_weights` below).
"""
from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oneflow_jax.cli import UserError
from oneflow_jax.convert import safetensors_io

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299
FEATURE_DIM = 2048
# Tensors of the .pth that the pool3 features do not use: the 1008-way classifier and BatchNorm's step counters.
_IGNORED = ("fc.weight", "fc.bias")
_IGNORED_SUFFIX = ".num_batches_tracked"


# ----------------------------------------------------------------------------------------------------- the network
def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """[B, H, W, C] -> [B, size, size, C] as torch's `F.interpolate(x, (size, size), mode="bilinear",
    align_corners=False)`: half-pixel centres, edge pixels repeated, no antialiasing kernel when downsampling."""
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, size, size, c), method="bilinear", antialias=False)


def _avg_pool_3x3(x):
    """F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False): the FID patch (TF ignores the padding)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    """nn.MaxPool2d(kernel_size=3, stride=2) / F.max_pool2d(x, 3, stride=2): no padding, floor of the output size."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BatchNorm(eps=0.001, running statistics) -> relu."""
    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    pad: tuple[int, int] = (0, 0)               # torch's symmetric `padding=(ph, pw)`
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=[(p, p) for p in self.pad],
                    use_bias=False, precision=self.precision, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


class _Block(nn.Module):
    """Base of the Inception blocks: `self.conv(name, features, kernel, stride, pad)(x)` builds a named BasicConv2d."""
    precision: Any = None

    def conv(self, name, features, kernel=(1, 1), stride=1, pad=(0, 0)):
        return BasicConv2d(features, kernel, stride, pad, precision=self.precision, name=name)


class FIDInceptionA(_Block):
    """Mixed_5b/5c/5d: torchvision's InceptionA with pytorch-fid's patch (average pool without the padding)."""
    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 64)(x)
        b5 = self.conv("branch5x5_1", 48)(x)
        b5 = self.conv("branch5x5_2", 64, (5, 5), pad=(2, 2))(b5)
        b3 = self.conv("branch3x3dbl_1", 64)(x)
        b3 = self.conv("branch3x3dbl_2", 96, (3, 3), pad=(1, 1))(b3)
        b3 = self.conv("branch3x3dbl_3", 96, (3, 3), pad=(1, 1))(b3)
        bp = self.conv("branch_pool", self.pool_features)(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """Mixed_6a (unpatched): 35x35 -> 17x17."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3", 384, (3, 3), stride=2)(x)
        bd = self.conv("branch3x3dbl_1", 64)(x)
        bd = self.conv("branch3x3dbl_2", 96, (3, 3), pad=(1, 1))(bd)
        bd = self.conv("branch3x3dbl_3", 96, (3, 3), stride=2)(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(_Block):
    """Mixed_6b..6e: torchvision's InceptionC (factorised 7x7 convs) with the average-pool patch."""
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = self.conv("branch1x1", 192)(x)
        b7 = self.conv("branch7x7_1", c7)(x)
        b7 = self.conv("branch7x7_2", c7, (1, 7), pad=(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), pad=(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c7)(x)
        bd = self.conv("branch7x7dbl_2", c7, (7, 1), pad=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_3", c7, (1, 7), pad=(0, 3))(bd)
        bd = self.conv("branch7x7dbl_4", c7, (7, 1), pad=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7), pad=(0, 3))(bd)
        bp = self.conv("branch_pool", 192)(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """Mixed_7a (unpatched): 17x17 -> 8x8."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3_1", 192)(x)
        b3 = self.conv("branch3x3_2", 320, (3, 3), stride=2)(b3)
        b7 = self.conv("branch7x7x3_1", 192)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), pad=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), pad=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, (3, 3), stride=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(_Block):
    """Mixed_7b (pytorch-fid's FIDInceptionE_1: average pool without the padding) and Mixed_7c (FIDInceptionE_2,
    `max_pool=True`: a 3x3 stride-1 max pool, padded with -inf as torch's F.max_pool2d(x, 3, 1, padding=1))."""
    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 320)(x)
        b3 = self.conv("branch3x3_1", 384)(x)
        b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), pad=(0, 1))(b3),
                              self.conv("branch3x3_2b", 384, (3, 1), pad=(1, 0))(b3)], axis=-1)
        bd = self.conv("branch3x3dbl_1", 448)(x)
        bd = self.conv("branch3x3dbl_2", 384, (3, 3), pad=(1, 1))(bd)
        bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), pad=(0, 1))(bd),
                              self.conv("branch3x3dbl_3b", 384, (3, 1), pad=(1, 0))(bd)], axis=-1)
        pooled = (nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1))) if self.max_pool
                  else _avg_pool_3x3(x))
        bp = self.conv("branch_pool", 192)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """images [B, H, W, 3], float in [0, 1] (any H, W) -> pool3 features [B, 2048] (float32).

    `precision` is that of every conv: "highest" by default, so that accelerators compute the float32 features FID
    is defined with rather than bfloat16 passes (on CPU it changes nothing)."""
    precision: Any = "highest"

    @nn.compact
    def __call__(self, images):
        p = self.precision
        conv = functools.partial(BasicConv2d, precision=p)
        x = 2.0 * resize_bilinear(images.astype(jnp.float32)) - 1.0                  # [0, 1] -> [-1, 1]
        x = conv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)                      # 149 x 149 x 32
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)                                # 147 x 147 x 32
        x = conv(64, (3, 3), pad=(1, 1), name="Conv2d_2b_3x3")(x)                    # 147 x 147 x 64
        x = _max_pool_3x3_s2(x)                                                      # 73 x 73 x 64
        x = conv(80, name="Conv2d_3b_1x1")(x)                                        # 73 x 73 x 80
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)                               # 71 x 71 x 192
        x = _max_pool_3x3_s2(x)                                                      # 35 x 35 x 192
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = FIDInceptionA(p, pool_features, name=name)(x)                        # 35 x 35 x 256, 288, 288
        x = InceptionB(p, name="Mixed_6a")(x)                                        # 17 x 17 x 768
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = FIDInceptionC(p, c7, name=name)(x)                                   # 17 x 17 x 768
        x = InceptionD(p, name="Mixed_7a")(x)                                        # 8 x 8 x 1280
        x = FIDInceptionE(p, max_pool=False, name="Mixed_7b")(x)                     # 8 x 8 x 2048
        x = FIDInceptionE(p, max_pool=True, name="Mixed_7c")(x)                      # 8 x 8 x 2048
        return jnp.mean(x, axis=(1, 2))                                              # AdaptiveAvgPool2d(1)


# -------------------------------------------------------------------------------------------------------- weights
def abstract_variables():
    """Shapes of {"params", "batch_stats"} (jax.ShapeDtypeStruct leaves), without computing anything."""
    return jax.eval_shape(lambda: FIDInceptionV3().init(jax.random.key(0), jnp.zeros((1, 75, 75, 3))))


def torch_name(collection: str, path: tuple[str, ...]) -> str:
    """Flax variable path -> torch state-dict name: ("params", ("Mixed_5b", "branch1x1", "conv", "kernel")) ->
    "Mixed_5b.branch1x1.conv.weight"; ("batch_stats", (..., "bn", "mean")) -> "...bn.running_mean"."""
    leaf = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
            ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}[collection, path[-1]]
    return ".".join(path[:-1] + (leaf,))


def _torch_shape(shape) -> tuple[int, ...]:
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape)     # HWIO -> OIHW


def _expected() -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """{torch name: (collection, Flax path, Flax shape)} of every variable of the network."""
    out = {}
    for collection, tree in abstract_variables().items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            keys = tuple(k.key for k in path)
            out[torch_name(collection, keys)] = (collection, keys, leaf.shape)
    return out


def _used(name: str) -> bool:
    return name not in _IGNORED and not name.endswith(_IGNORED_SUFFIX)


def convert_pytorch_fid_state(tensors, source: str = "pytorch-fid state") -> dict:
    """{torch state-dict name: array} of pt_inception-2015-12-05-6726825d.pth (or of our safetensors copy) ->
    {"params", "batch_stats"} (float32; conv OIHW -> HWIO). `fc.*` and `*.num_batches_tracked` are ignored; every
    other missing, unexpected or wrongly shaped tensor is reported by name (safetensors_io.SafetensorsError)."""
    found = {k: v for k, v in tensors.items() if _used(k)}
    expected = _expected()
    safetensors_io.check_names_and_shapes({k: tuple(np.shape(v)) for k, v in found.items()},
                                          {k: _torch_shape(shape) for k, (_, _, shape) in expected.items()}, source)
    variables: dict = {"params": {}, "batch_stats": {}}
    for name, (collection, path, _) in expected.items():
        x = np.asarray(found[name], np.float32)
        node = variables[collection]
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = x.transpose(2, 3, 1, 0) if x.ndim == 4 else x
    return variables


def _missing_weights(path: str) -> str:
    return (f"{path}: no such file; download pytorch-fid's Inception weights from {WEIGHTS_URL} and convert them "
            f"once with `python -m oneflow_jax.convert_weights --inception_pth pt_inception-2015-12-05-6726825d.pth "
            f"--out {path}`")


def load(path: str) -> dict:
    """{"params", "batch_stats"} from the safetensors file that `convert_weights` wrote. A missing file is a
    one-line UserError that says where to get the weights and how to convert them."""
    if not os.path.exists(path):
        raise UserError(_missing_weights(path))
    tensors, _ = safetensors_io.load_file(path)
    return convert_pytorch_fid_state(tensors, source=path)


def random_variables(seed: int = 0) -> dict:
    """Random weights for tests and benchmarks: Flax's init with the conv kernels scaled to He's variance (2 / fan-in),
    so that features keep their scale through the ReLUs instead of vanishing (and every FID being ~0)."""
    variables = jax.jit(lambda k: FIDInceptionV3().init(k, jnp.zeros((1, 75, 75, 3))))(jax.random.key(seed))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * np.sqrt(2.0) if path[-1].key == "kernel" else x, jax.device_get(variables))


def save(path: str, variables) -> None:
    """Writes {"params", "batch_stats"} as the safetensors file `load` reads (torch names and layout): random-weight
    networks for tests and benchmarks."""
    tensors = {}
    for name, (collection, keys, _) in _expected().items():
        x = np.asarray(functools.reduce(lambda node, k: node[k], keys, variables[collection]), np.float32)
        tensors[name] = x.transpose(3, 2, 0, 1) if x.ndim == 4 else x                       # HWIO -> OIHW
    safetensors_io.save_file(tensors, path, {"format": "pt", "source": "oneflow_jax"})


def convert_weights(pth_path: str, out_path: str) -> int:
    """One-time conversion of pytorch-fid's .pth (a torch state dict, read with `weights_only=True`: no arbitrary
    unpickling) into a safetensors file of the same names and torch layout, float32, without `fc.*` and the
    BatchNorm step counters. The names and shapes are checked before anything is written. Needs torch (the `torch`
    extra). Returns the number of tensors written."""
    if not os.path.exists(pth_path):
        raise UserError(f"{pth_path}: no such file; download pytorch-fid's Inception weights from {WEIGHTS_URL}")
    try:
        import torch
    except ImportError:
        raise UserError("reading a .pth needs torch: pip install 'oneflow_jax[torch]' (or any CPU torch)") from None
    try:
        state = torch.load(pth_path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except  (a truncated or non-torch file: pickle, zip, EOF errors)
        raise UserError(f"{pth_path}: not a readable torch state dict ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if not isinstance(state, dict):
        raise UserError(f"{pth_path}: holds a {type(state).__name__}, not a state dict")
    tensors = {k: v.detach().to(torch.float32).numpy() for k, v in state.items() if _used(k)}
    convert_pytorch_fid_state(tensors, source=pth_path)                    # raises, naming the tensors, on a mismatch
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    safetensors_io.save_file(tensors, out_path, {"format": "pt", "source": os.path.basename(pth_path)})
    return len(tensors)
