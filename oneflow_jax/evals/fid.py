"""Frechet Inception Distance (Heusel et al. 2017) with pytorch-fid's network and formula.

    features = fid.InceptionFeatures.from_file("pt_inception-2015-12-05-6726825d.safetensors")
    reference = fid.cached_feature_stats("ref_stats.npz", real_batches, features)    # computed once, then read
    score = fid.fid_from_images(generated_batches, reference, features)

Images are NHWC with 3 channels, either uint8 in 0..255 or float in [0, 1], at any size (the network resizes to
299x299 as pytorch-fid does). Features are the 2048-d pool3 activations (`inception.FIDInceptionV3`); statistics
are accumulated on the host in float64 (`FeatureStats`), so that any number of images, in batches of any size and
from any number of processes (`FeatureStats.merge`), give numpy's mean and unbiased covariance of all of them.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from oneflow_jax.evals import inception

_STATS_FORMAT = "oneflow_jax.FeatureStats/1"


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """|mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2)), in float64.

    tr((cov1 cov2)^(1/2)) is computed from eigenvalues, not with pytorch-fid's `scipy.linalg.sqrtm(cov1 @ cov2)`:
    with cov1 = V diag(w) V^T (eigh), cov1 cov2 is similar to the symmetric PSD matrix
    M = diag(sqrt w) V^T cov2 V diag(sqrt w), so the trace is the sum of the square roots of M's eigenvalues
    (eigvalsh). Eigenvalues of cov1 and of M below the numerical-rank tolerance (np.linalg.matrix_rank's:
    max * size * eps) are rounding noise of exact zeros: they are dropped (M shrinks to rank x rank) or count as 0.
    The same value as sqrtm's trace, but from symmetric decompositions only: singular covariances (fewer images than
    dimensions) need no eps fallback, leak no sqrt(noise) into the trace and give no complex parts, and it is several
    times faster than sqrtm at 2048 dimensions."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, cov {cov1.shape} / {cov2.shape}")
    w, v = np.linalg.eigh((cov1 + cov1.T) / 2)
    keep = w > _rank_tolerance(w)
    root_w, v = np.sqrt(w[keep]), v[:, keep]
    m = root_w[:, None] * (v.T @ cov2 @ v) * root_w[None, :]
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(eig[eig > _rank_tolerance(eig)]).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * tr_covmean)


def _rank_tolerance(eigenvalues: np.ndarray) -> float:
    """Below this, an eigenvalue of a PSD matrix is indistinguishable from 0 (np.linalg.matrix_rank's tolerance)."""
    return max(eigenvalues.max(initial=0.0), 0.0) * len(eigenvalues) * np.finfo(np.float64).eps


class FeatureStats:
    """Streaming mean and covariance of feature vectors: count, sum and sum of outer products, in float64.

    `update` adds a batch, `merge` adds another accumulator (another process's, e.g. gathered with
    jax.experimental.multihost_utils.process_allgather), `mean_cov` gives (mean, unbiased covariance) as
    `np.mean(x, 0), np.cov(x, rowvar=False)` of all features seen. `save` / `load` cache them as a pickle-free .npz."""

    def __init__(self, dim: int = inception.FEATURE_DIM):
        self.dim = dim
        self.count = 0
        self.sum = np.zeros(dim, np.float64)
        self.sum_outer = np.zeros((dim, dim), np.float64)

    def update(self, features) -> "FeatureStats":
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features of shape {x.shape}, expected [N, {self.dim}]")
        self.count += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of {other.dim}-d features into {self.dim}-d ones")
        self.count += other.count
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mean = self.sum / self.count
        cov = (self.sum_outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return mean, (cov + cov.T) / 2

    def save(self, path: str) -> None:
        """Writes `path` (exactly that name; .npz content) atomically: a tmp file, then a rename."""
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, format=np.array(_STATS_FORMAT), count=np.array(self.count, np.int64), sum=self.sum,
                     sum_outer=self.sum_outer)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "FeatureStats":
        with np.load(path, allow_pickle=False) as f:
            if "format" not in f or str(f["format"]) != _STATS_FORMAT:
                raise ValueError(f"{path}: not a FeatureStats file (expected format {_STATS_FORMAT!r})")
            out = cls(int(f["sum"].shape[0]))
            out.count, out.sum, out.sum_outer = int(f["count"]), f["sum"].astype(np.float64), f["sum_outer"]
        if out.sum_outer.shape != (out.dim, out.dim):
            raise ValueError(f"{path}: sum_outer has shape {out.sum_outer.shape}, expected {(out.dim, out.dim)}")
        return out


@functools.lru_cache(maxsize=None)
def _sharded_features(devices: tuple, precision):
    """(jitted features(variables, images), batch sharding, replicated sharding) over a 1-d 'data' mesh of
    `devices`; cached, so that every InceptionFeatures on the same devices shares the compilations."""
    mesh = Mesh(np.array(devices), ("data",))
    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    model = inception.FIDInceptionV3(precision=precision)

    def features(variables, images):
        x = images.astype(jnp.float32)
        if images.dtype == jnp.uint8:
            x = x / 255.0
        return model.apply(variables, x)

    return jax.jit(features, in_shardings=(replicated, batch), out_shardings=batch), batch, replicated


class InceptionFeatures:
    """images -> pool3 features [N, 2048] (numpy float32), data-parallel over `devices` (default: this process's
    local devices): each batch is split over a 1-d mesh ('data' axis), the weights are replicated.

    Input: NHWC with 3 channels, uint8 in 0..255 (divided by 255 on the device) or float in [0, 1]; any height and
    width. Calls take any number of images: they run in chunks of at most `batch_size`, the last chunk zero-padded
    to a multiple of the device count (the padding's features are dropped). Each new input shape or dtype compiles
    once."""

    def __init__(self, variables, batch_size: int = 128, devices: Sequence[jax.Device] | None = None,
                 precision="highest"):
        devices = tuple(devices if devices is not None else jax.local_devices())
        self.num_devices = len(devices)
        self.batch_size = -(-batch_size // self.num_devices) * self.num_devices     # a multiple of the device count
        self._features, self._batch, replicated = _sharded_features(devices, precision)
        self.variables = jax.device_put(variables, replicated)

    @classmethod
    def from_file(cls, path: str, **kwargs) -> "InceptionFeatures":
        """From the converted weights (`inception.load`; a missing file is a one-line UserError)."""
        return cls(inception.load(path), **kwargs)

    def __call__(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images of shape {images.shape}, expected [N, H, W, 3] (NHWC, RGB)")
        if images.dtype != np.uint8:
            if not jnp.issubdtype(images.dtype, jnp.floating):           # float16, bfloat16, float32, float64
                raise ValueError(f"images of dtype {images.dtype}, expected uint8 (0..255) or float (0..1)")
            images = images.astype(np.float32)
        out = [np.zeros((0, inception.FEATURE_DIM), np.float32)]
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            n = len(chunk)
            pad = -n % self.num_devices
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            feats = self._features(self.variables, jax.device_put(chunk, self._batch))
            out.append(np.asarray(feats)[:n])
        return np.concatenate(out)


def feature_stats(batches: Iterable, features: InceptionFeatures) -> FeatureStats:
    """Streams image batches (each as `InceptionFeatures` takes them) into a FeatureStats."""
    stats = FeatureStats()
    for images in batches:
        stats.update(features(images))
    return stats


def cached_feature_stats(path: str, batches: Iterable, features: InceptionFeatures) -> FeatureStats:
    """The statistics saved at `path` if it exists, else those of `batches`, saved there: reference statistics
    (a dataset's real images) are computed once. A generator for `batches` is not iterated when the cache exists."""
    if os.path.exists(path):
        return FeatureStats.load(path)
    stats = feature_stats(batches, features)
    stats.save(path)
    return stats


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(*a.mean_cov(), *b.mean_cov())


def fid_from_images(batches: Iterable, reference: FeatureStats | str, features: InceptionFeatures) -> float:
    """FID between the images of `batches` and `reference`: a FeatureStats or the path of a saved one."""
    if isinstance(reference, str):
        reference = FeatureStats.load(reference)
    return fid_from_stats(feature_stats(batches, features), reference)
