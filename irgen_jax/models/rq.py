"""Residual quantization (paper section 3.1, eqs. 1-2): greedy assignment, prefix reconstructions,
straight-through estimates, and the per-level k-means that fits the codebooks.

Conventions (every function):
- ``codebooks`` is float32 ``[M, L, D]``: M levels, L codewords of width D per level.
- ``codes`` is int32 ``[B, M]`` with values in ``[0, L)``; code ``m`` indexes ``codebooks[m]``.
- the prefix reconstruction ``f̂≤m = Σ_{i≤m} codebooks[i, codes[:, i]]`` is stored at index ``m - 1``
  of a ``[B, M, D]`` array, so ``prefix[:, -1]`` is the full reconstruction.
- residual ``r_m = x - f̂≤m`` (eq. 2 with ``r_0 = x``), likewise ``[B, M, D]``.

Assignment is greedy (beam size 1), exactly faiss' ``ResidualQuantizer`` with ``max_beam_size=1``
(tested for parity). Distances use the expansion ``||r||² - 2 r·c + ||c||²`` so a level costs one
``[B, D] x [D, L]`` matmul and never materializes a ``[B, L, D]`` difference tensor.

The jnp functions here are pure and jit-friendly (M, L, D are static shapes). The codebook fitting
and the statistics helpers run eagerly on the host around jitted kernels, since k-means is a
between-epoch job over the whole database, not part of a train step.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Distances decide discrete codes, so they are computed in full float32 even on TPU, whose default
# matmul precision (bfloat16 passes) would flip near-tie argmins and make codes backend-dependent.
_HIGHEST = jax.lax.Precision.HIGHEST


class Quantized(NamedTuple):
  """Output of :func:`quantize` for ``x [B, D]`` and ``codebooks [M, L, D]``."""
  codes: jax.Array       # int32 [B, M]
  prefix: jax.Array      # float32 [B, M, D]: f̂≤m for m = 1..M
  residuals: jax.Array   # float32 [B, M, D]: r_m = x - f̂≤m


def _check_codebooks(codebooks: jax.Array, width: int | None = None) -> None:
  if codebooks.ndim != 3:
    raise ValueError(f"codebooks has shape {codebooks.shape}: expected [M, L, D].")
  if width is not None and codebooks.shape[-1] != width:
    raise ValueError(f"codebooks width {codebooks.shape[-1]} does not match the feature width {width}.")


def _scores(r: jax.Array, words: jax.Array, words_sq: jax.Array) -> jax.Array:
  """``||c||² - 2 r·c`` for ``r [B, D]``, ``words [L, D]``: the squared distance minus ``||r||²``.

  ``||r||²`` is the same for every codeword of a row, so the argmin does not need it.
  """
  return words_sq[None, :] - 2.0 * jnp.matmul(r, words.T, precision=_HIGHEST)


def quantize(x: jax.Array, codebooks: jax.Array) -> Quantized:
  """Greedy residual quantization of ``x [B, D]`` with ``codebooks [M, L, D]`` (eqs. 1-2).

  Level m picks the codeword nearest to the current residual ``r_{m-1}`` (ties: lowest index, as
  ``argmin``) and subtracts it. Returns codes int32 ``[B, M]``, prefix reconstructions and residuals
  float32 ``[B, M, D]``. No gradient flows to ``codebooks`` through the codes (they are integers); the
  reconstructions are differentiable in ``codebooks`` only — wrap them in ``stop_gradient`` (or use
  :func:`straight_through`) where that is not wanted.
  """
  x = jnp.asarray(x, jnp.float32)
  codebooks = jnp.asarray(codebooks, jnp.float32)
  _check_codebooks(codebooks, x.shape[-1])
  words_sq = jnp.sum(codebooks * codebooks, axis=-1)  # [M, L]
  r = x
  codes, prefixes, residuals = [], [], []
  # M is small (4 in the paper) and static: unrolling keeps each level a plain matmul + argmin.
  for m in range(codebooks.shape[0]):
    idx = jnp.argmin(_scores(r, codebooks[m], words_sq[m]), axis=-1).astype(jnp.int32)
    r = r - jnp.take(codebooks[m], idx, axis=0)
    codes.append(idx)
    residuals.append(r)
    # x - r rather than a running sum: the same number within rounding, and r is what the next level
    # must see exactly.
    prefixes.append(x - r)
  return Quantized(jnp.stack(codes, 1), jnp.stack(prefixes, 1), jnp.stack(residuals, 1))


def assign(x: jax.Array, codebooks: jax.Array) -> jax.Array:
  """Greedy RQ codes, int32 ``[B, M]``, of ``x [B, D]`` under ``codebooks [M, L, D]``."""
  return quantize(x, codebooks).codes


def reconstruct_prefixes(codes: jax.Array, codebooks: jax.Array) -> jax.Array:
  """Prefix reconstructions ``f̂≤m``, float32 ``[B, M, D]``, of ``codes int32 [B, M]``."""
  codebooks = jnp.asarray(codebooks, jnp.float32)
  _check_codebooks(codebooks)
  if codes.shape[-1] != codebooks.shape[0]:
    raise ValueError(f"codes have {codes.shape[-1]} levels, codebooks {codebooks.shape[0]}.")
  words = codebooks[jnp.arange(codebooks.shape[0])[None, :], codes]  # [B, M, D]
  return jnp.cumsum(words, axis=1)


def reconstruct(codes: jax.Array, codebooks: jax.Array) -> jax.Array:
  """Full reconstruction ``f̂≤M``, float32 ``[B, D]``."""
  return reconstruct_prefixes(codes, codebooks)[:, -1]


def straight_through(x: jax.Array, prefix: jax.Array) -> jax.Array:
  """``x + sg(f̂≤m - x)`` for every level: the value of ``prefix [B, M, D]``, the gradient of ``x [B, D]``.

  The paper's estimator (after VQ-VAE): a loss on the quantized vector sends its gradient unchanged
  to the continuous feature. Nothing reaches ``prefix`` (hence nothing reaches the codebooks).
  """
  x = x[:, None, :]
  return x + jax.lax.stop_gradient(prefix - x)


# ----------------------------------------------------------------------------------------------------
# Host-level encoding of a whole database.

@jax.jit
def _assign_jit(x, codebooks):
  return assign(x, codebooks)


def encode(features, codebooks, *, chunk_size: int = 16384) -> np.ndarray:
  """Codes, int32 numpy ``[N, M]``, of ``features [N, D]``, computed ``chunk_size`` rows at a time.

  Chunks bound the ``[chunk, L]`` distance matrix; the last chunk is zero-padded to the same shape so
  the jitted kernel compiles once.
  """
  features = np.asarray(features, np.float32)
  codebooks = jnp.asarray(codebooks, jnp.float32)
  _check_codebooks(codebooks, features.shape[-1])
  n = features.shape[0]
  chunk = max(1, min(chunk_size, n))
  out = np.empty((n, codebooks.shape[0]), np.int32)
  for start in range(0, n, chunk):
    part = features[start:start + chunk]
    rows = part.shape[0]
    if rows < chunk:
      part = np.concatenate([part, np.zeros((chunk - rows, part.shape[1]), np.float32)])
    out[start:start + rows] = np.asarray(_assign_jit(part, codebooks))[:rows]
  return out


# ----------------------------------------------------------------------------------------------------
# k-means per level on the previous level's residuals.

def _chunked(points: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """``[N, D]`` -> ``([K, C, D], valid bool [K, C])`` with K·C ≥ N and the least padding for K chunks."""
  n, d = points.shape
  k = max(1, math.ceil(n / chunk_size))
  c = math.ceil(n / k)
  pad = k * c - n
  valid = jnp.arange(k * c) < n
  points = jnp.concatenate([points, jnp.zeros((pad, d), points.dtype)]) if pad else points
  return points.reshape(k, c, d), valid.reshape(k, c)


def _assign_pass(chunks, valid, centroids):
  """One pass over the chunks: nearest centroid, its squared distance, per-cluster sums and counts.

  Returns ``(sums [L, D], counts [L], idx int32 [K, C], dist [K, C])``; padded rows count nowhere and get
  distance -1 so they are never picked as "farthest".
  """
  num = centroids.shape[0]
  c_sq = jnp.sum(centroids * centroids, axis=-1)

  def body(carry, inp):
    sums, counts = carry
    x, v = inp
    s = _scores(x, centroids, c_sq)
    idx = jnp.argmin(s, axis=-1).astype(jnp.int32)
    # Clamped: the expansion can go slightly negative for a point sitting on its centroid.
    dist = jnp.maximum(jnp.min(s, axis=-1) + jnp.sum(x * x, axis=-1), 0.0)
    onehot = ((idx[:, None] == jnp.arange(num)[None, :]) & v[:, None]).astype(x.dtype)
    # A one-hot matmul rather than a scatter-add: deterministic on every backend (GPU scatter-adds
    # of floats are not) and as fast as the distance matmul it mirrors.
    sums = sums + jnp.matmul(onehot.T, x, precision=_HIGHEST)
    counts = counts + jnp.sum(onehot, axis=0)
    return (sums, counts), (idx, jnp.where(v, dist, -1.0))

  init = (jnp.zeros_like(centroids), jnp.zeros((num,), centroids.dtype))
  (sums, counts), (idx, dist) = jax.lax.scan(body, init, (chunks, valid))
  return sums, counts, idx, dist


def _lloyd_step(chunks, valid, centroids):
  sums, counts, _, dist = _assign_pass(chunks, valid, centroids)
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  # Empty clusters restart on the points currently worst served (largest distance to their centroid),
  # the j-th empty cluster on the j-th farthest point: deterministic, and it spends the codeword where
  # the quantization error is largest.
  empty = counts == 0
  flat = dist.reshape(-1)
  _, far = jax.lax.top_k(flat, min(centroids.shape[0], flat.shape[0]))
  far_points = chunks.reshape(-1, chunks.shape[-1])[far]
  rank = jnp.clip(jnp.cumsum(empty) - 1, 0, far_points.shape[0] - 1)
  return jnp.where(empty[:, None], far_points[rank], means)


def _lloyd_loop(chunks, valid, centroids, iters):
  """``iters`` Lloyd steps, then the assignment to the final centroids: ``([L, D], int32 [K, C])``."""
  centroids = jax.lax.fori_loop(0, iters, lambda _, c: _lloyd_step(chunks, valid, c), centroids)
  return centroids, _assign_pass(chunks, valid, centroids)[2]


def lloyd(points, centroids, *, iters: int, chunk_size: int = 16384) -> tuple[np.ndarray, np.ndarray]:
  """Runs ``iters`` Lloyd iterations on ``points [N, D]`` from ``centroids [L, D]``.

  Empty clusters are re-seeded on the farthest points. Returns the centroids float32 ``[L, D]`` and the
  final assignment int32 ``[N]`` of every point to them.
  """
  points = jnp.asarray(points, jnp.float32)
  c, idx = _lloyd_jit(points, jnp.asarray(centroids, jnp.float32), iters=iters, chunk_size=chunk_size)
  return np.asarray(c), np.asarray(idx)


@functools.partial(jax.jit, static_argnames=("iters", "chunk_size"))
def _lloyd_jit(points, centroids, *, iters, chunk_size):
  chunks, valid = _chunked(points, chunk_size)
  c, idx = _lloyd_loop(chunks, valid, centroids, iters)
  return c, idx.reshape(-1)[:points.shape[0]]


def _kmeanspp(key, sample, num):
  """k-means++ seeding: ``num`` rows of ``sample [n, D]``, each drawn with probability ∝ D(x)²."""
  n = sample.shape[0]
  # One uniform per draw, inverted through the CDF of D²: no per-step random stream over all n points
  # (a categorical draw would generate n Gumbels per step), and a much smaller program to compile.
  u = jax.random.uniform(key, (num,))
  s_sq = jnp.sum(sample * sample, axis=-1)

  def d2(c):
    # Expanded form: one matrix-vector product per step instead of an [n, D] difference tensor.
    return jnp.maximum(s_sq - 2.0 * jnp.matmul(sample, c, precision=_HIGHEST) + jnp.dot(c, c), 0.0)

  def draw(i, min_d2):
    cdf = jnp.cumsum(min_d2)
    # side='right' skips zero-mass points; all mass zero (fewer distinct points than codewords, e.g.
    # residuals already exact) falls back to a uniform pick instead of an undefined 0/0 distribution.
    weighted = jnp.searchsorted(cdf, u[i] * cdf[-1], side="right")
    idx = jnp.where(cdf[-1] > 0, weighted, jnp.floor(u[i] * n).astype(weighted.dtype))
    return sample[jnp.clip(idx, 0, n - 1)]

  first = draw(0, jnp.zeros((n,), sample.dtype))
  centers = jnp.zeros((num, sample.shape[1]), sample.dtype).at[0].set(first)

  def body(i, carry):
    centers, min_d2 = carry
    c = draw(i, min_d2)
    return centers.at[i].set(c), jnp.minimum(min_d2, d2(c))

  centers, _ = jax.lax.fori_loop(1, num, body, (centers, d2(first)))
  return centers


def _init_centroids(key, points, num, init, init_sample_size):
  n = points.shape[0]
  if init == "random":
    return points[jax.random.choice(key, n, (num,), replace=False)]
  k_sub, k_pp = jax.random.split(key)
  m = n if init_sample_size is None else max(num, min(n, init_sample_size))
  sample = points if m == n else points[jax.random.choice(k_sub, n, (m,), replace=False)]
  return _kmeanspp(k_pp, sample, num)


@functools.partial(jax.jit, static_argnames=("num", "iters", "init", "init_sample_size", "chunk_size"))
def _fit_level(key, residual, *, num, iters, init, init_sample_size, chunk_size):
  """One level: seed, Lloyd, and the next residual ``r - c[assignment]``, as one compiled program."""
  start = _init_centroids(key, residual, num, init, init_sample_size)
  chunks, valid = _chunked(residual, chunk_size)
  centroids, idx = _lloyd_loop(chunks, valid, start, iters)
  idx = idx.reshape(-1)[:residual.shape[0]]
  # Same arithmetic as quantize(): r_m = r_{m-1} - c_{l_m}.
  return centroids, residual - centroids[idx]


def fit_residual_codebooks(
    features, num_levels: int, codebook_size: int, *, iters: int = 20, init: str = "kmeans++",
    seed: int = 0, init_sample_size: int | None = 16384, chunk_size: int = 16384,
) -> np.ndarray:
  """Fits RQ codebooks, float32 numpy ``[M, L, D]``, by k-means per level on the residuals.

  Level 1 clusters ``features [N, D]``; level m clusters the residuals left by greedy assignment to the
  first m-1 fitted codebooks (exactly the residuals :func:`quantize` produces), as the reference does
  with faiss k-means, L=256 per level.

  Args:
    features: float ``[N, D]`` (numpy or jax), N ≥ ``codebook_size``.
    num_levels: M, the identifier length.
    codebook_size: L, codewords per level.
    iters: Lloyd iterations per level (fixed count: no tolerance test, so runs are reproducible).
    init: ``'kmeans++'`` (D²-sampling) or ``'random'`` (L distinct points drawn uniformly).
    seed: every random choice derives from it; the same seed gives the same codebooks bit for bit
      on a given backend.
    init_sample_size: k-means++ seeds on this many points drawn without replacement (None: all N).
      Seeding is L sequential passes over its sample, so a subsample keeps it a small share of the fit;
      Lloyd iterations always use every point.
    chunk_size: rows per assignment chunk; bounds the ``[chunk, L]`` distance matrix.

  Raises:
    ValueError: N < L. k-means cannot place L distinct codewords on fewer points, and padding the
      codebook with duplicates would yield codewords no image can ever get; choose L ≤ N instead.
  """
  features = jnp.asarray(features, jnp.float32)
  if features.ndim != 2:
    raise ValueError(f"features has shape {features.shape}: expected [N, D].")
  n = features.shape[0]
  if num_levels < 1 or codebook_size < 1 or iters < 0:
    raise ValueError(f"num_levels={num_levels}, codebook_size={codebook_size}, iters={iters}: expected "
                     "positive levels and codebook size, non-negative iterations.")
  if n < codebook_size:
    raise ValueError(f"{n} feature vectors cannot fit codebook_size={codebook_size} codewords per "
                     f"level: use codebook_size <= {n} or more data.")
  if init not in ("kmeans++", "random"):
    raise ValueError(f"init={init!r}: expected 'kmeans++' or 'random'.")

  key = jax.random.key(seed)
  residual = features
  books = []
  for m in range(num_levels):
    # Every level has the same shapes, so the program compiles once per fit configuration.
    centroids, residual = _fit_level(
        jax.random.fold_in(key, m), residual, num=codebook_size, iters=iters, init=init,
        init_sample_size=init_sample_size, chunk_size=chunk_size)
    books.append(np.asarray(centroids))
  return np.stack(books)


# ----------------------------------------------------------------------------------------------------
# Usage and error statistics.

def code_counts(codes: jax.Array, codebook_size: int) -> jax.Array:
  """How often each code is used per level: int32 ``[M, L]`` from codes int32 ``[B, M]`` (jit-friendly)."""
  onehot = codes[:, :, None] == jnp.arange(codebook_size)[None, None, :]
  return jnp.sum(onehot, axis=0, dtype=jnp.int32)


def usage_from_counts(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-level perplexity ``exp(H(p))`` (float32 ``[M]``) and unused codes (int32 ``[M]``) of counts.

  ``counts`` is ``[M, L]`` (:func:`code_counts`).

  Perplexity is the effective number of codewords in use: L for uniform use, 1 for a collapsed level.
  Over a batch of B it cannot exceed B.
  """
  counts = jnp.asarray(counts, jnp.float32)
  p = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
  return jnp.exp(entropy), jnp.sum(counts == 0, axis=-1).astype(jnp.int32)


def quantization_errors(x: jax.Array, prefix: jax.Array) -> jax.Array:
  """Mean squared error per level, float32 ``[M]``: mean over batch and dims of ``(x - f̂≤m)²``.

  The mean over dims (not the sum) is the quantity the tokenizer's λ2 term penalizes.
  """
  return jnp.mean((x[:, None, :] - prefix) ** 2, axis=(0, 2))


def identifier_stats(codes) -> dict[str, float]:
  """Collisions of whole identifiers in ``codes [N, M]``: how many distinct ones, how many images each.

  Returns ``num_identifiers`` (unique rows), ``images_per_identifier_mean`` (N / unique) and
  ``images_per_identifier_max``.
  """
  codes = np.asarray(codes)
  if codes.ndim != 2 or codes.shape[0] == 0:
    raise ValueError(f"codes has shape {codes.shape}: expected a non-empty [N, M].")
  _, counts = np.unique(codes, axis=0, return_counts=True)
  return {"num_identifiers": int(counts.size),
          "images_per_identifier_mean": float(codes.shape[0] / counts.size),
          "images_per_identifier_max": int(counts.max())}


@functools.partial(jax.jit, static_argnames=("size",))
def _usage_jit(codes, size):
  return usage_from_counts(code_counts(codes, size))


@jax.jit
def _sq_err_jit(x, codes, codebooks):
  """Σ over rows and dims of ``(x - f̂≤m)²`` per level, float32 ``[M]``."""
  return jnp.sum((x[:, None, :] - reconstruct_prefixes(codes, codebooks)) ** 2, axis=(0, 2))


def rq_statistics(features, codebooks, *, codes=None, chunk_size: int = 16384) -> dict[str, float]:
  """Database-level report of a residual quantizer, as flat ``{name: number}`` for logs.

  Per level m (1-based): ``perplexity_l{m}``, ``unused_codes_l{m}``, ``mse_l{m}`` (mean over points and
  dims of ``(x - f̂≤m)²``) and ``relative_error_l{m}`` (``Σ||x - f̂≤m||² / Σ||x||²``); plus
  :func:`identifier_stats`. ``codes`` default to :func:`encode` of ``features``.
  """
  features = np.asarray(features, np.float32)
  codebooks = np.asarray(codebooks, np.float32)
  codes = encode(features, codebooks, chunk_size=chunk_size) if codes is None else np.asarray(codes)
  num_levels, size, _ = codebooks.shape
  perplexity, unused = _usage_jit(jnp.asarray(codes), size)
  out = {}
  sq_err = np.zeros(num_levels, np.float64)
  for start in range(0, features.shape[0], chunk_size):
    sq_err += np.asarray(_sq_err_jit(features[start:start + chunk_size],
                                     codes[start:start + chunk_size], codebooks), np.float64)
  total = float(np.sum(features.astype(np.float64) ** 2))
  for m in range(num_levels):
    out[f"perplexity_l{m + 1}"] = float(perplexity[m])
    out[f"unused_codes_l{m + 1}"] = int(unused[m])
    out[f"mse_l{m + 1}"] = float(sq_err[m] / features.size)
    out[f"relative_error_l{m + 1}"] = float(sq_err[m] / total) if total > 0 else 0.0
  out.update(identifier_stats(codes))
  return out
