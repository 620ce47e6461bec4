"""Retrieval metrics: hand-computed cases, edge cases, a slow per-query oracle, and a full-size run."""

from __future__ import annotations

import numpy as np
import pytest

from irgen_jax.evaluators import metrics as M

# Database labels; positives per label: 0 -> 3, 1 -> 2, 2 -> 4, 3 -> 1.
DB = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])


def test_hand_computed_query_with_hits_at_ranks_1_3_5():
  # Label 0 (3 positives: 0, 1, 2); slot 4 is empty; hits at ranks 1, 3, 5.
  r, q = [[0, 5, 1, -1, 2]], [0]
  rel = M.relevance(r, q, DB)
  np.testing.assert_array_equal(rel, [[True, False, True, False, True]])
  npos = M.num_positives(q, DB)
  assert M.precision_at(rel, 1)[0] == 1.0
  assert M.precision_at(rel, 2)[0] == 0.5
  assert M.precision_at(rel, 5)[0] == pytest.approx(3 / 5)
  assert M.precision_at(rel, 10)[0] == pytest.approx(3 / 10)  # slots past the list are misses
  assert M.recall_at(rel, 1)[0] == 1.0
  assert M.reciprocal_rank_at(rel, 8)[0] == 1.0
  assert M.average_precision_at(rel, npos, 5)[0] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
  assert M.average_precision_at(rel, npos, 2)[0] == pytest.approx(1 / 2)  # min(3 positives, R=2) = 2
  curve = M.precision_recall_curve(rel, npos, 5)
  np.testing.assert_allclose(curve["recall"], [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
  np.testing.assert_allclose(curve["precision"], [1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])


def test_fewer_positives_than_k():
  # Label 3 has a single positive (index 9), found at rank 3.
  r, q = [[3, 4, 9, 0, 1]], [3]
  rel = M.relevance(r, q, DB)
  npos = M.num_positives(q, DB)
  assert npos.tolist() == [1]
  assert M.precision_at(rel, 1)[0] == 0.0
  assert M.precision_at(rel, 3)[0] == pytest.approx(1 / 3)
  assert M.precision_at(rel, 5)[0] == pytest.approx(1 / 5)
  assert M.recall_at(rel, 2)[0] == 0.0 and M.recall_at(rel, 3)[0] == 1.0
  assert M.reciprocal_rank_at(rel, 2)[0] == 0.0
  assert M.reciprocal_rank_at(rel, 4)[0] == pytest.approx(1 / 3)
  # AP normalizes by min(#positives, R) = 1: the single positive at rank 3 gives 1/3 ...
  assert M.average_precision_at(rel, npos, 100)[0] == pytest.approx(1 / 3)
  # ... and at rank 1 a perfect 1, although 99 of the 100 slots cannot hold a positive.
  rel1 = M.relevance([[9, 3, 4]], q, DB)
  assert M.average_precision_at(rel1, npos, 100)[0] == 1.0


def test_more_positives_than_r_can_still_reach_ap_1():
  rel = M.relevance([[5, 6]], [2], DB)  # label 2 has 4 positives, R = 2
  assert M.average_precision_at(rel, M.num_positives([2], DB), 2)[0] == 1.0


def test_reference_precision_differs_from_precision_when_all_positives_come_early():
  # Label 0: all 3 positives within the top 4, the last at rank 4.
  r, q = [[0, 1, 5, 2, 3, 4, 6, 7, 8, 9]], [0]
  rel = M.relevance(r, q, DB)
  npos = M.num_positives(q, DB)
  assert M.precision_at(rel, 10)[0] == pytest.approx(3 / 10)
  assert M.reference_precision_at(rel, npos, 10)[0] == pytest.approx(3 / 4)
  # Not every positive found by rank 2: both definitions divide by K.
  assert M.reference_precision_at(rel, npos, 2)[0] == M.precision_at(rel, 2)[0] == 1.0
  # Last positive exactly at rank K: identical.
  assert M.reference_precision_at(rel, npos, 4)[0] == M.precision_at(rel, 4)[0] == pytest.approx(3 / 4)
  out = M.evaluate(r, q, DB, [10])
  assert out["precision@10"] == pytest.approx(0.3) and out["reference_precision@10"] == pytest.approx(0.75)


def test_identifier_shared_by_several_images_uses_one_slot_each_and_k_cuts_the_tie():
  # Images 3, 5, 4 share one identifier (equal scores, listed consecutively); labels 1, 2, 1. The query has
  # label 1. The group takes ranks 2-4, and K=3 cuts it after image 5: the listed order decides.
  retrieved = [[0, 3, 5, 4, 9]]
  scores = np.array([[-0.1, -0.5, -0.5, -0.5, -0.9]])  # what the beam search returns beside the ids
  assert scores[0, 1] == scores[0, 2] == scores[0, 3]
  out = M.evaluate(retrieved, [1], DB, [1, 2, 3, 4])
  assert out["precision@1"] == 0.0
  assert out["precision@2"] == 0.5
  assert out["precision@3"] == pytest.approx(1 / 3)
  assert out["precision@4"] == pytest.approx(2 / 4)
  assert out["mrr@2"] == 0.5 and out["recall@1"] == 0.0 and out["recall@2"] == 1.0
  # The reference's precision: both positives (3, 4) are within the top 4, the last at rank 4.
  assert out["reference_precision@4"] == pytest.approx(2 / 4)
  # The same group listed in another order changes precision@3: ties are not averaged.
  assert M.evaluate([[0, 3, 4, 5, 9]], [1], DB, [3])["precision@3"] == pytest.approx(2 / 3)


def test_empty_results_and_a_label_absent_from_the_database_score_zero():
  retrieved = np.array([[-1, -1, -1], [0, 1, 2]])
  out = M.evaluate(retrieved, [2, 7], DB, [1, 3], map_at=3)
  assert M.num_positives([2, 7], DB).tolist() == [4, 0]
  assert all(v == 0.0 for v in out.values()), out
  # A list with no columns at all is an empty result for every query.
  out = M.evaluate(np.zeros((2, 0), np.int64), [0, 1], DB, [1, 2])
  assert all(v == 0.0 for v in out.values()), out


def test_means_are_over_all_queries():
  retrieved = [[0, 5], [9, 0], [-1, -1]]  # query 1 (label 3): hit at rank 1; query 3: empty
  out = M.evaluate(retrieved, [0, 3, 1], DB, [1, 2], mrr_ks=[1, 2])
  assert out["precision@1"] == pytest.approx(2 / 3)
  assert out["precision@2"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
  assert out["recall@2"] == pytest.approx(2 / 3)
  assert out["mrr@2"] == pytest.approx(2 / 3)
  assert out["map@100"] == pytest.approx((1 / 3 + 1 + 0) / 3)


def test_string_labels_and_num_positives_match_a_loop():
  rng = np.random.default_rng(0)
  db = rng.choice(["a", "b", "c", "dd"], size=50)
  q = rng.choice(["a", "b", "zz", "dd"], size=20)
  np.testing.assert_array_equal(M.num_positives(q, db), [(db == x).sum() for x in q])


def _slow_metrics(retrieved, query_labels, database_labels, ks, map_at, mrr_ks):
  """The definitions written as plain per-query loops."""
  out = {}
  rows = []
  for r, ql in zip(retrieved, query_labels):
    rel = [j >= 0 and database_labels[j] == ql for j in r]
    npos = int(sum(database_labels == ql))
    rows.append((rel, npos))

  def mean(f):
    return sum(f(rel, npos) for rel, npos in rows) / len(rows)

  def top(rel, k):
    return (rel + [False] * k)[:k]

  for k in ks:
    out[f"precision@{k}"] = mean(lambda rel, npos: sum(top(rel, k)) / k)
    out[f"recall@{k}"] = mean(lambda rel, npos: float(any(top(rel, k))))

    def ref_p(rel, npos):
      t = top(rel, k)
      hits = sum(t)
      if hits and hits == npos:
        return hits / (max(i for i, x in enumerate(t) if x) + 1)
      return hits / k
    out[f"reference_precision@{k}"] = mean(ref_p)
  for k in sorted(set(ks) | set(mrr_ks)):
    out[f"mrr@{k}"] = mean(lambda rel, npos: next((1 / (i + 1) for i, x in enumerate(top(rel, k)) if x), 0.0))

  def ap(rel, npos):
    t, hits, s = top(rel, map_at), 0, 0.0
    for i, x in enumerate(t):
      if x:
        hits += 1
        s += hits / (i + 1)
    return s / min(npos, map_at) if npos else 0.0
  out[f"map@{map_at}"] = mean(ap)
  return out


def test_vectorized_metrics_match_a_per_query_loop():
  rng = np.random.default_rng(1)
  n, q, width = 300, 60, 25
  db = rng.integers(0, 12, n)
  ql = rng.integers(0, 13, q)  # label 12 has no positives
  retrieved = np.stack([rng.choice(n, width, replace=False) for _ in range(q)])
  retrieved[rng.random((q, width)) < 0.15] = -1
  retrieved[:3, 10:] = -1
  ks, mrr_ks = [1, 5, 10, 30], [1, 2, 4, 8]
  fast = M.evaluate(retrieved, ql, db, ks, map_at=20, mrr_ks=mrr_ks)
  slow = _slow_metrics(retrieved, ql, db, ks, 20, mrr_ks)
  assert fast.keys() == slow.keys()
  for key in fast:
    assert fast[key] == pytest.approx(slow[key], abs=1e-12), key
  assert any(0 < v < 1 for v in fast.values())


@pytest.mark.parametrize("retrieved, match", [
    ([[0, 10]], "index 10"),
    ([[0, -2]], "index -2"),
    ([[3, 1, 3]], "index 3 twice for query 0"),
    ([[0.0, 1.0]], "integer"),
    ([0, 1], "2-D"),
    ([[0], [1]], "2 rows but there are 1"),
])
def test_malformed_retrieved_lists_raise_naming_the_value(retrieved, match):
  with pytest.raises(ValueError, match=match):
    M.evaluate(retrieved, [0], DB, [1])


@pytest.mark.parametrize("ks", [[0], [1, -3], [], [2.5]])
def test_bad_ks_raise(ks):
  with pytest.raises(ValueError, match="ks"):
    M.evaluate([[0]], [0], DB, ks)


def test_ten_thousand_queries_at_k_100():
  # The scale of a real evaluation (timing belongs to benchmarks, not tests): the vectorized metrics
  # agree with direct counts over the whole [10k, 100] relevance table.
  rng = np.random.default_rng(0)
  n, q, k = 50_000, 10_000, 100
  db = rng.integers(0, 1000, n)
  ql = rng.integers(0, 1000, q)
  retrieved = (np.arange(k)[None, :] * 499 + rng.integers(0, n, (q, 1))) % n  # distinct per row
  out = M.evaluate(retrieved, ql, db, [1, 10, 20, 30, 100])
  curve = M.precision_recall_curve(M.relevance(retrieved, ql, db), M.num_positives(ql, db), k)
  hits = db[retrieved] == ql[:, None]
  npos = np.bincount(db, minlength=1000)[ql]
  for kk in (1, 10, 20, 30, 100):
    assert out[f"precision@{kk}"] == pytest.approx(hits[:, :kk].sum(axis=1).mean() / kk)
    assert out[f"recall@{kk}"] == pytest.approx(hits[:, :kk].any(axis=1).mean())
  assert 0 < out["precision@100"] < 1
  np.testing.assert_allclose(curve["precision"], hits.cumsum(axis=1).mean(axis=0) / np.arange(1, k + 1))
  np.testing.assert_allclose(curve["recall"], (hits.cumsum(axis=1) / npos[:, None]).mean(axis=0))
