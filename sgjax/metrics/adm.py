"""FID, sFID, Inception Score and precision/recall with the ADM evaluation suite's semantics.

The paper reports these numbers with openai/guided-diffusion's `evaluations/evaluator.py`;
the definitions here follow it, with two numerical choices stated where they are made:
- the trace of sqrt(sigma1 @ sigma2) comes from the eigenvalues of the symmetric matrix
  F^T sigma2 F with sigma1 = F F^T, which are those of the product, so the result is real
  by construction (the reference takes scipy's sqrtm of the product, adds 1e-6 to the
  diagonals when that is not finite and drops a negligible imaginary part); it agrees with
  the reference to rounding and costs one symmetric eigenvalue problem;
- pairwise distances for precision/recall are float32 (the reference tries float16 first).
The features come from `sgjax.metrics.inception`; these functions work on any features.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

IS_SPLIT_SIZE = 5000  # ADM: IS averaged over splits of 5000 samples (10 for 50k)
NEIGHBOURHOOD = 3  # ADM / Kynkaanniemi et al.: k = 3 nearest neighbours
_ROW_BLOCK = 1024  # rows of the pairwise-distance matrix computed at once


@dataclasses.dataclass(frozen=True)
class Statistics:
  """Mean [D] and covariance [D, D] of a feature set (what FID compares)."""

  mu: np.ndarray
  sigma: np.ndarray


def statistics(features: np.ndarray) -> Statistics:
  """features: [N, D] -> mean and unbiased covariance, in float64 as numpy computes them."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"statistics need features [N >= 2, D], got shape {features.shape}.")
  return Statistics(features.mean(axis=0), np.cov(features, rowvar=False))


def psd_factor(sigma: np.ndarray) -> np.ndarray:
  """F [D, r] with F @ F.T = sigma, r its numerical rank (pivoted Cholesky, LAPACK dpstrf).

  sigma: [D, D] symmetric positive semi-definite, e.g. a covariance of N < D samples.
  """
  sigma = np.asarray(sigma, np.float64)
  c, piv, rank, info = scipy.linalg.lapack.dpstrf((sigma + sigma.T) / 2, lower=1)
  if info < 0:
    raise ValueError(f"pivoted Cholesky failed (LAPACK info {info}).")
  lower = np.tril(c)[:, :rank]
  factor = np.empty_like(lower)
  factor[piv - 1] = lower  # dpstrf factors P^T sigma P = L L^T: undo the permutation P
  return factor


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr(sqrt(sigma1 @ sigma2)) for covariance matrices.

  With sigma1 = F F^T, sigma1 @ sigma2 has the nonzero eigenvalues of F^T sigma2 F, which is
  symmetric PSD and only r x r: the eigenvalues are real and >= 0, so no complex arithmetic
  or singular-product fallback is needed (and N < D samples make this cheap).
  """
  factor = psd_factor(sigma1)
  m = factor.T @ np.asarray(sigma2, np.float64) @ factor
  w = np.linalg.eigvalsh((m + m.T) / 2)
  # Eigenvalues below rounding level (numpy's rank tolerance) count as 0; their square roots
  # would otherwise add up to noise.
  tol = float(np.max(np.abs(w), initial=0.0)) * max(len(w), 1) * np.finfo(np.float64).eps
  return float(np.sum(np.sqrt(np.where(w > tol, w, 0.0))))


def frechet_distance(stats1: Statistics, stats2: Statistics) -> float:
  """||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2)): FID / sFID."""
  mu1, mu2 = np.atleast_1d(stats1.mu), np.atleast_1d(stats2.mu)
  sigma1, sigma2 = np.atleast_2d(stats1.sigma), np.atleast_2d(stats2.sigma)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"feature statistics differ in shape: mu {mu1.shape} vs {mu2.shape},"
                     f" sigma {sigma1.shape} vs {sigma2.shape}.")
  for name, x in (("mu", mu1), ("mu", mu2), ("sigma", sigma1), ("sigma", sigma2)):
    if not np.all(np.isfinite(x)):
      raise ValueError(f"feature statistics: {name} contains NaN or inf.")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * trace_sqrt_product(sigma1, sigma2))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  return frechet_distance(statistics(features1), statistics(features2))


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
  """exp(E_x KL(p(y|x) || p(y))), averaged over consecutive splits of `split_size` samples.

  logits: [N, C]. Computed with log-probabilities, so classes whose softmax underflows to 0
  add 0 (the reference's p * log p would give NaN there).
  """
  logits = np.asarray(logits, np.float64)
  log_p = logits - _logsumexp(logits, axis=1)
  scores = []
  for i in range(0, len(log_p), split_size):
    part = log_p[i:i + split_size]  # [n, C]
    log_marginal = _logsumexp(part, axis=0) - np.log(len(part))  # [1, C]
    kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores))


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
  m = np.max(x, axis=axis, keepdims=True)
  return m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def _sq_distances(u: jax.Array, v: jax.Array) -> jax.Array:
  """[R, D], [N, D] -> [R, N] squared Euclidean distances (clipped at 0 against rounding)."""
  uv = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
  d = jnp.sum(u * u, axis=1)[:, None] - 2.0 * uv + jnp.sum(v * v, axis=1)[None, :]
  return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour(rows: jax.Array, features: jax.Array, k: int) -> jax.Array:
  # Row i's own distance 0 is its nearest "neighbour", so the k-th other point is at k.
  neg_smallest, _ = jax.lax.top_k(-_sq_distances(rows, features), k + 1)
  return -neg_smallest[:, k]


@jax.jit
def _inside(rows: jax.Array, features: jax.Array, radii: jax.Array) -> jax.Array:
  return jnp.any(_sq_distances(rows, features) <= radii[None, :], axis=1)


def _row_blocks(fn, rows: np.ndarray, *args) -> np.ndarray:
  """Applies fn(block, *args) to row blocks of one padded size (one compile per N)."""
  block = min(_ROW_BLOCK, len(rows))
  args = [jnp.asarray(a) for a in args]  # to the device once, not once per block
  out = []
  for i in range(0, len(rows), block):
    chunk = rows[i:i + block]
    n = len(chunk)
    if n < block:
      chunk = np.concatenate([chunk, np.zeros((block - n,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(fn(chunk, *args))[:n])
  return np.concatenate(out)


def manifold_radii(features: np.ndarray, k: int = NEIGHBOURHOOD) -> np.ndarray:
  """[N, D] -> [N] squared distance from each feature to its k-th nearest neighbour."""
  features = np.asarray(features, np.float32)
  if len(features) <= k:
    raise ValueError(f"a k={k} manifold needs more than {k} features, got {len(features)}.")
  return _row_blocks(functools.partial(_kth_neighbour, k=k), features, features)


def coverage(features: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
  """Fraction of `queries` inside the manifold: within radii[j] of some features[j]."""
  return float(np.mean(_row_blocks(_inside, np.asarray(queries, np.float32),
                                   np.asarray(features, np.float32),
                                   np.asarray(radii, np.float32))))


def precision_recall(reference: np.ndarray, samples: np.ndarray,
                     k: int = NEIGHBOURHOOD) -> tuple[float, float]:
  """Improved precision/recall (Kynkaanniemi et al. 2019) as ADM's ManifoldEstimator.

  precision: fraction of samples within the k-NN radius of some reference feature;
  recall: fraction of reference features within the k-NN radius of some sample.
  """
  precision = coverage(reference, manifold_radii(reference, k), samples)
  recall = coverage(samples, manifold_radii(samples, k), reference)
  return precision, recall


def metrics(samples: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None = None,
            reference_stats: dict[str, Statistics] | None = None) -> dict[str, float]:
  """ADM's five numbers from Inception features ({pool, spatial, logits}, see inception).

  FID/sFID use `reference_stats` ({"pool", "spatial"} Statistics, e.g. the mu/sigma stored
  in an ADM reference batch) when given, else statistics of `reference`; precision/recall
  need the reference features themselves and are left out without them.
  """
  if reference_stats is None:
    if reference is None:
      raise ValueError("metrics need reference features or reference statistics.")
    reference_stats = {k: statistics(reference[k]) for k in ("pool", "spatial")}
  out = {
      "inception_score": inception_score(samples["logits"]),
      "fid": frechet_distance(statistics(samples["pool"]), reference_stats["pool"]),
      "sfid": frechet_distance(statistics(samples["spatial"]), reference_stats["spatial"]),
  }
  if reference is not None:
    out["precision"], out["recall"] = precision_recall(reference["pool"], samples["pool"])
  return out
