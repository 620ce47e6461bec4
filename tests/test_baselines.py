"""Search baselines on small clustered data: exact scan vs brute force, IVF-PQ / ScaNN sanity, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from irgen_jax.evaluators import baselines as B
from irgen_jax.evaluators import metrics as M

N, Q, D, C, K = 800, 40, 16, 8, 20


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(C, D)) * 2.0
  db_labels = rng.integers(0, C, N)
  q_labels = rng.integers(0, C, Q)
  db = (centers[db_labels] + rng.normal(size=(N, D))).astype(np.float32)
  q = (centers[q_labels] + rng.normal(size=(Q, D))).astype(np.float32)
  return db, q, db_labels, q_labels


def true_scores(db, q, metric):
  """float64 [Q, N] similarity (higher is better), computed the plainest way."""
  db, q = db.astype(np.float64), q.astype(np.float64)
  if metric == "l2":
    return -((q[:, None, :] - db[None, :, :]) ** 2).sum(-1)
  db = db / np.linalg.norm(db, axis=1, keepdims=True)
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  return q @ db.T


def assert_valid(result, n=N, q=Q, k=K):
  ids = result.ids
  assert ids.shape == (q, k) and ids.dtype == np.int64 and result.scores.shape == (q, k)
  assert ((ids >= -1) & (ids < n)).all()
  M.check_retrieved(ids, q, n)  # no duplicates per row
  assert np.isneginf(result.scores[ids < 0]).all() and np.isfinite(result.scores[ids >= 0]).all()
  # Best first.
  s = np.where(ids >= 0, result.scores, -1e30)  # -inf - -inf would be NaN
  assert (np.diff(s, axis=1) <= 1e-5).all()
  assert result.search_s > 0 and result.build_s >= 0 and result.index_bytes > 0 and result.qps > 0


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("backend", ["faiss", "numpy"])
def test_linear_scan_matches_brute_force(data, metric, backend):
  db, q, _, _ = data
  res = B.linear_scan(db, q, K, metric=metric, backend=backend)
  assert_valid(res)
  assert res.kind == "linear_scan" and res.settings["metric"] == metric
  s = true_scores(db, q, metric)
  expected = -np.sort(-s, axis=1)[:, :K]
  got = np.take_along_axis(s, res.ids, axis=1)
  # Comparing the true scores of the returned ids is immune to the order of exact ties.
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(res.scores, got, rtol=1e-4, atol=1e-3)
  np.testing.assert_array_equal(res.ids, np.argsort(-s, axis=1, kind="stable")[:, :K])


def test_brute_force_blocks_give_the_same_result(data):
  db, q, _, _ = data
  ids_a, sc_a = B.brute_force(db, q, K, "l2")
  ids_b, sc_b = B.brute_force(db, q, K, "l2", max_block_elems=3 * N)  # 3 queries per block
  np.testing.assert_array_equal(ids_a, ids_b)
  np.testing.assert_allclose(sc_a, sc_b, rtol=1e-5)  # BLAS kernels differ with the block shape


@pytest.fixture(scope="module")
def exact(data):
  db, q, _, _ = data
  return {m: B.linear_scan(db, q, K, metric=m) for m in ("l2", "cosine")}


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_faiss_ivfpq_returns_valid_ids_with_reasonable_recall(data, exact, metric):
  db, q, db_labels, q_labels = data
  res = B.faiss_ivfpq(db, q, K, nlist=16, metric=metric, encode_s=2.0)
  assert_valid(res)
  assert res.kind == "faiss_ivfpq"
  assert res.settings == {"metric": metric, "nlist": 16, "num_subspaces": 4, "nbits": 8, "nprobe": 16,
                          "seed": 1234, "threads": res.settings["threads"]}
  assert B.recall_vs_exact(res.ids, exact[metric].ids) > 0.5
  # On well-separated clusters the retrieved images are nearly all of the query's class.
  assert M.evaluate(res.ids, q_labels, db_labels, [K])[f"precision@{K}"] > 0.9
  # 4 bytes of PQ code per vector (+ 8-byte id) instead of 64 bytes of floats.
  assert res.index_bytes < exact[metric].index_bytes
  assert res.qps_with_encoder < res.qps and res.encode_s == 2.0


def test_faiss_ivfpq_with_one_probe_pads_missing_results(data):
  db, q, _, _ = data
  res = B.faiss_ivfpq(db, q, 200, nlist=16, nprobe=1)  # a cell holds ~50 points: fewer than 200
  assert (res.ids == -1).any()
  assert_valid(res, k=200)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_scann_returns_valid_ids_with_reasonable_recall(data, exact, metric):
  db, q, _, _ = data
  res = B.scann_search(db, q, K, metric=metric)
  assert_valid(res)
  assert res.kind == "scann" and res.settings["scoring"] == "tree+ah+reorder"
  assert res.settings["num_leaves"] == round(np.sqrt(N))
  assert B.recall_vs_exact(res.ids, exact[metric].ids) > 0.8
  # Rescoring is exact, so the scores of what it found agree with the exact scan's.
  s = true_scores(db, q, metric)
  np.testing.assert_allclose(res.scores, np.take_along_axis(s, res.ids, axis=1), rtol=1e-3, atol=1e-2)


def test_scann_is_deterministic(data):
  db, q, _, _ = data
  a = B.scann_search(db, q, K, num_leaves_to_search=2)
  b = B.scann_search(db, q, K, num_leaves_to_search=2)
  np.testing.assert_array_equal(a.ids, b.ids)


def test_scann_small_database_falls_back_to_brute_force(data):
  db, q, _, _ = data
  res = B.scann_search(db[:10], q, 5)
  assert res.settings["scoring"] == "brute_force"
  assert_valid(res, n=10, k=5)
  np.testing.assert_array_equal(res.ids, B.linear_scan(db[:10], q, 5).ids)


def test_scann_settings_follow_the_recipe():
  s = B.scann_settings(1_000_000, 10)
  assert s == {"num_leaves": 1000, "num_leaves_to_search": 50, "reorder": 100,
               "training_sample_size": 250_000}
  s = B.scann_settings(6000, 100)  # CUB-sized, k = 100: enough leaves to hold the 1,000 rescored points
  assert s["num_leaves"] == 77 and s["reorder"] == 1000
  assert s["num_leaves_to_search"] * 6000 / 77 >= 1000


def test_recall_vs_exact_hand_computed():
  approx = [[1, 2, 3], [4, -1, -1]]
  exact = [[3, 2, 9], [4, 5, -1]]
  assert B.recall_vs_exact(approx, exact) == pytest.approx(3 / 5)
  assert B.recall_vs_exact(approx, exact, k=1) == pytest.approx(1 / 2)
  # Ids of one row must not count for another.
  assert B.recall_vs_exact([[7], [1]], [[1], [7]]) == 0.0


@pytest.mark.parametrize("fn", [B.linear_scan, B.scann_search,
                                lambda *a, **kw: B.faiss_ivfpq(*a, nlist=16, **kw)])
def test_bad_inputs_raise_naming_the_value(data, fn):
  db, q, _, _ = data
  with pytest.raises(ValueError, match=f"database has dim {D}, queries have dim {D - 1}"):
    fn(db, q[:, :-1], K)
  with pytest.raises(ValueError, match=f"k={N + 1} must be an integer in \\[1, N={N}\\]"):
    fn(db, q, N + 1)
  with pytest.raises(ValueError, match="k=0"):
    fn(db, q, 0)
  with pytest.raises(ValueError, match="metric must be one of"):
    fn(db, q, K, metric="hamming")
  bad = q.copy()
  bad[3, 2] = np.nan
  with pytest.raises(ValueError, match="queries holds non-finite"):
    fn(db, bad, K)


def test_ivfpq_specific_bad_inputs(data):
  db, q, _, _ = data
  with pytest.raises(ValueError, match="dim 15 is not divisible by num_subspaces=4"):
    B.faiss_ivfpq(db[:, :15], q[:, :15], K, nlist=16)
  with pytest.raises(ValueError, match="N=200 .* need N >= 256"):
    B.faiss_ivfpq(db[:200], q, K, nlist=16)
  with pytest.raises(ValueError, match="nprobe=32 exceeds nlist=16"):
    B.faiss_ivfpq(db, q, K, nlist=16, nprobe=32)
  with pytest.raises(ValueError, match="N=800 .* nlist=1000"):
    B.faiss_ivfpq(db, q, K, nlist=1000, nprobe=1)
