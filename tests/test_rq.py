"""Residual quantization: greedy assignment against brute force and faiss, k-means fitting, statistics."""

from __future__ import annotations

import math

import faiss
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from irgen_jax.models import rq


def _greedy_numpy(x, codebooks):
  """Brute-force greedy RQ with explicit [B, L, D] differences (the oracle)."""
  r = x.astype(np.float64)
  codes, prefixes = [], []
  for book in codebooks.astype(np.float64):
    d = np.sum((r[:, None, :] - book[None]) ** 2, axis=-1)
    idx = np.argmin(d, axis=-1)
    r = r - book[idx]
    codes.append(idx)
    prefixes.append(x - r)
  return np.stack(codes, 1), np.stack(prefixes, 1)


def _faiss_codes(x, codebooks):
  """Codes of faiss' ResidualQuantizer (beam 1) with our codebooks injected, unpacked to [N, M]."""
  num_levels, size, dim = codebooks.shape
  nbits = int(math.log2(size))
  q = faiss.ResidualQuantizer(dim, num_levels, nbits)
  # The codebooks live in one flat std::vector [M * L * D] (level-major); nothing to retrain.
  faiss.copy_array_to_vector(np.ascontiguousarray(codebooks, np.float32).ravel(), q.codebooks)
  q.is_trained = True
  q.max_beam_size = 1
  packed = q.compute_codes(np.ascontiguousarray(x, np.float32))  # uint8 [N, code_size]
  # faiss packs codes with its BitstringWriter: level 0 first, least significant bit first, so with
  # nbits=8 byte m is code m, and with nbits=4 byte 0 holds level 0 in its low nibble.
  bits = np.unpackbits(packed, axis=1, bitorder="little")[:, :num_levels * nbits]
  weights = 1 << np.arange(nbits)
  return (bits.reshape(len(x), num_levels, nbits) * weights).sum(-1).astype(np.int32), q.decode(packed)


def _blobs(rng, centers, per, noise):
  labels = np.repeat(np.arange(len(centers)), per)
  x = centers[labels] + noise * rng.normal(size=(len(labels), centers.shape[1]))
  return x.astype(np.float32), labels


def _is_bijection(a, b):
  pairs = set(zip(a.tolist(), b.tolist()))
  return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_quantize_matches_bruteforce_greedy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8)).astype(np.float32)
  books = rng.normal(size=(3, 16, 8)).astype(np.float32)
  out = rq.quantize(x, books)
  want_codes, want_prefix = _greedy_numpy(x, books)
  assert out.codes.dtype == jnp.int32 and out.codes.shape == (64, 3)
  assert out.prefix.shape == out.residuals.shape == (64, 3, 8)
  np.testing.assert_array_equal(out.codes, want_codes)
  np.testing.assert_allclose(out.prefix, want_prefix, atol=1e-5)
  np.testing.assert_allclose(out.residuals, x[:, None] - want_prefix, atol=1e-5)
  np.testing.assert_array_equal(rq.assign(x, books), want_codes)
  np.testing.assert_allclose(rq.reconstruct_prefixes(out.codes, books), out.prefix, atol=1e-5)
  np.testing.assert_allclose(rq.reconstruct(out.codes, books), out.prefix[:, -1], atol=1e-5)
  # Jit gives the same codes (M, L, D static).
  np.testing.assert_array_equal(jax.jit(rq.assign)(x, books), want_codes)


def test_quantize_rejects_mismatched_width():
  with pytest.raises(ValueError, match="width"):
    rq.quantize(np.zeros((2, 5), np.float32), np.zeros((2, 4, 6), np.float32))


def test_straight_through_has_prefix_value_and_identity_gradient():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  books = jnp.asarray(rng.normal(size=(3, 8, 6)), jnp.float32)
  prefix = rq.quantize(x, books).prefix
  np.testing.assert_allclose(rq.straight_through(x, prefix), prefix, atol=1e-6)
  w = jnp.asarray(rng.normal(size=(4, 3, 6)), jnp.float32)
  gx, gp = jax.grad(lambda x, p: jnp.sum(w * rq.straight_through(x, p)), argnums=(0, 1))(x, prefix)
  np.testing.assert_allclose(gx, w.sum(1), rtol=1e-6)  # every level's gradient copied onto x
  np.testing.assert_array_equal(gp, 0.0)
  gb = jax.grad(lambda b: jnp.sum(w * rq.straight_through(x, rq.quantize(x, b).prefix)))(books)
  np.testing.assert_array_equal(gb, 0.0)


@pytest.mark.parametrize("size", [16, 256])
def test_codes_equal_faiss_residual_quantizer_beam1(size):
  rng = np.random.default_rng(size)
  x = rng.normal(size=(3000, 32)).astype(np.float32)
  # Codebooks like k-means would give (each level drawn from the residuals it will see), and unrelated
  # random ones.
  drawn, r = [], x
  for _ in range(4):
    drawn.append(r[rng.choice(len(r), size, replace=False)])
    r = np.asarray(rq.quantize(r, np.stack(drawn[-1:])).residuals[:, 0])
  random_books = (0.5 * rng.normal(size=(4, size, 32))).astype(np.float32)
  for books in (np.stack(drawn), random_books):
    theirs, decoded = _faiss_codes(x, books)
    ours = rq.encode(x, books, chunk_size=1024)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(rq.reconstruct(jnp.asarray(ours), books), decoded, atol=1e-5)


def test_encode_in_chunks_equals_one_pass():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1000, 8)).astype(np.float32)
  books = rng.normal(size=(2, 32, 8)).astype(np.float32)
  got = rq.encode(x, books, chunk_size=300)  # 4 chunks, the last padded
  assert got.dtype == np.int32 and got.shape == (1000, 2)
  np.testing.assert_array_equal(got, rq.assign(x, books))


# Most fits below share N=400, D=16, L=8, iters=10: one compiled program (compiling dominates here).
_FIT = dict(codebook_size=8, iters=10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeanspp_fit_recovers_separated_clusters(seed):
  rng = np.random.default_rng(seed)
  centers = 10.0 * rng.normal(size=(8, 16))
  x, labels = _blobs(rng, centers, 50, 0.05)
  books = rq.fit_residual_codebooks(x, 1, init="kmeans++", seed=seed, **_FIT)
  assert books.shape == (1, 8, 16) and books.dtype == np.float32
  dist = np.linalg.norm(centers[:, None] - books[0][None], axis=-1)
  assert dist.min(axis=1).max() < 0.05, dist.min(axis=1)  # every true center has a codeword on it
  assert _is_bijection(rq.encode(x, books)[:, 0], labels)


def test_fit_follows_residual_structure_across_levels():
  # x = coarse[i] + fine[j]: level 1 must find the coarse centers, level 2 the fine offsets.
  rng = np.random.default_rng(3)
  coarse = 20.0 * rng.normal(size=(4, 16))
  fine = 2.0 * rng.normal(size=(4, 16))
  i, j = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
  i, j = np.repeat(i.ravel(), 30), np.repeat(j.ravel(), 30)
  x = (coarse[i] + fine[j] + 0.01 * rng.normal(size=(len(i), 16))).astype(np.float32)
  books = rq.fit_residual_codebooks(x, 2, 4, iters=10, seed=0)
  codes = rq.encode(x, books)
  assert _is_bijection(codes[:, 0], i)
  assert _is_bijection(codes[:, 1], j)
  stats = rq.rq_statistics(x, books, codes=codes)
  assert stats["mse_l2"] < 1e-3 < stats["mse_l1"]
  assert stats["num_identifiers"] == 16 and stats["images_per_identifier_max"] == 30


def test_empty_clusters_are_reseeded_on_farthest_points():
  rng = np.random.default_rng(4)
  centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  x, labels = _blobs(rng, centers, 50, 0.1)
  # Every point is nearest to the first centroid: the other two start empty.
  start = np.array([[0.0, 0.0], [100.0, 100.0], [-100.0, -100.0]], np.float32)
  one, _ = rq.lloyd(x, start, iters=1)
  # Restarted on the two points farthest from the centroid they were assigned to, in order.
  farthest = np.argsort(-np.linalg.norm(x - start[0], axis=1))[:2]
  np.testing.assert_array_equal(one[1:], x[farthest])
  np.testing.assert_allclose(one[0], x.mean(0), rtol=1e-5)
  final, assignment = rq.lloyd(x, start, iters=10)
  assert np.isfinite(final).all()
  assert _is_bijection(assignment, labels)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_fit_is_deterministic_per_seed(init):
  rng = np.random.default_rng(5)
  x = rng.normal(size=(400, 16)).astype(np.float32)
  a = rq.fit_residual_codebooks(x, 2, init=init, seed=11, **_FIT)
  b = rq.fit_residual_codebooks(x, 2, init=init, seed=11, **_FIT)
  c = rq.fit_residual_codebooks(x, 2, init=init, seed=12, **_FIT)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_fit_with_chunks_matches_one_chunk():
  rng = np.random.default_rng(6)
  x, _ = _blobs(rng, 10.0 * rng.normal(size=(8, 16)), 50, 0.1)
  a = rq.fit_residual_codebooks(x, 2, seed=0, **_FIT)
  b = rq.fit_residual_codebooks(x, 2, seed=0, chunk_size=128, **_FIT)  # 4 chunks of 100
  np.testing.assert_allclose(a, b, atol=1e-4)


def test_fit_error_decreases_with_levels():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(400, 16)).astype(np.float32)
  books = rq.fit_residual_codebooks(x, 3, seed=0, **_FIT)
  stats = rq.rq_statistics(x, books)
  errs = [stats[f"mse_l{m}"] for m in (1, 2, 3)]
  assert errs[0] > errs[1] > errs[2] and errs[0] < np.mean(x ** 2)


def test_fit_rejects_bad_arguments():
  x = np.zeros((10, 4), np.float32)
  with pytest.raises(ValueError, match="codebook_size <= 10"):
    rq.fit_residual_codebooks(x, 2, 16)
  with pytest.raises(ValueError, match="init="):
    rq.fit_residual_codebooks(x, 2, 4, init="kmeans")
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    rq.fit_residual_codebooks(np.zeros((10,), np.float32), 2, 4)


def test_fit_survives_fewer_distinct_points_than_codewords():
  # 3 distinct points, L=8: level 1 is exact, level 2 sees all-zero residuals; no NaN anywhere.
  x = np.repeat(np.eye(3, 16, dtype=np.float32), 134, axis=0)[:400]
  books = rq.fit_residual_codebooks(x, 2, seed=0, **_FIT)
  assert np.isfinite(books).all()
  np.testing.assert_allclose(rq.reconstruct(jnp.asarray(rq.encode(x, books)), books), x, atol=1e-6)


def test_usage_and_identifier_stats_on_a_hand_example():
  codes = jnp.array([[0, 1], [0, 1], [2, 1], [3, 0]], jnp.int32)
  counts = rq.code_counts(codes, 4)
  np.testing.assert_array_equal(counts, [[2, 0, 1, 1], [1, 3, 0, 0]])
  perplexity, unused = rq.usage_from_counts(counts)
  h2 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
  np.testing.assert_allclose(perplexity, [2 ** 1.5, math.exp(h2)], rtol=1e-6)
  np.testing.assert_array_equal(unused, [1, 2])
  assert rq.identifier_stats(np.asarray(codes)) == {
      "num_identifiers": 3, "images_per_identifier_mean": 4 / 3, "images_per_identifier_max": 2}


def test_rq_statistics_errors_match_numpy():
  rng = np.random.default_rng(8)
  x = rng.normal(size=(50, 4)).astype(np.float32)
  books = rng.normal(size=(2, 8, 4)).astype(np.float32)
  stats = rq.rq_statistics(x, books, chunk_size=16)
  _, prefix = _greedy_numpy(x, books)
  for m in range(2):
    err = (x - prefix[:, m]) ** 2
    assert stats[f"mse_l{m + 1}"] == pytest.approx(err.mean(), rel=1e-5)
    assert stats[f"relative_error_l{m + 1}"] == pytest.approx(err.sum() / (x ** 2).sum(), rel=1e-5)
  np.testing.assert_allclose(rq.quantization_errors(jnp.asarray(x), jnp.asarray(prefix)),
                             [((x - prefix[:, m]) ** 2).mean() for m in range(2)], rtol=1e-5)
  assert {"perplexity_l1", "unused_codes_l1", "perplexity_l2", "unused_codes_l2"} <= set(stats)
