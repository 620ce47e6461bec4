"""Retrieval metrics over ranked lists of database indices.

Inputs shared by every function here:
  retrieved        int [Q, W]: database indices per query, best first; -1 marks an empty slot (a beam search
                   that found fewer than W images, an ANN index whose probed cells held fewer than W points).
  query_labels     [Q] and database_labels [N]: any comparable dtype (ints, strings); a database image is a
                   positive for a query when the labels are equal (class for CUB/Cars, item id for In-shop).

Ranks are positions in the list. When several images share one IRGen identifier the beam search lists them
consecutively (database order) with equal scores; each takes its own slot, so an identifier holding three
images uses three of the K slots, and a tie group cut by K counts only the members listed before the cut —
the order the producer gave, as the public reference evaluates it. Ties are not averaged over orders.

Metrics (per query; every average is over all Q queries, and a query with no positive in the database scores
0 on all of them — it cannot be answered):
  precision@K       hits in the top K / K. Empty slots and slots beyond W are misses.
  recall@K          1 if the top K hold at least one positive, else 0 (the paper's Recall@K, Table 2).
  mrr@K             1 / rank of the first positive within the top K, 0 when there is none.
  map@R (R=100)     AP@R = sum_{i<=R} P@i * rel_i / min(#positives, R). The min() lets a perfect ranking
                    score 1 when a class has more than R positives (ImageNet: ~1,300 per class; dividing by
                    #positives would cap AP@100 near 100/1,300 and could never give the paper's 76.0 in
                    Table 5), while still charging for positives missing from the top R (dividing by the
                    hits found, as some hashing code does, would not). The public reference uses the same
                    form with R = 10.
  pr curve          for K = 1..max_k: mean precision@K and mean true-positive rate hits@K / #positives
                    (the paper's Figure 3, "recall" as TPR — not the Recall@K above).
  reference_precision@K
                    the public reference's "precision": hits@K / K, except when every positive of the query
                    is already within the top K, then hits@K / rank of the last positive. It inflates
                    precision for classes with fewer than K positives; reported only beside the standard
                    one, named as such.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

DEFAULT_MAP_AT = 100
# The paper's Figure 4.
DEFAULT_MRR_KS = (1, 2, 4, 8)


def check_ks(ks: Sequence[int], name: str = "ks") -> tuple[int, ...]:
  """Returns ``ks`` as a tuple of positive Python ints; raises naming the bad value."""
  out = []
  for k in ks:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"{name} must hold positive integers, got {k!r} in {list(ks)!r}.")
    out.append(int(k))
  if not out:
    raise ValueError(f"{name} must not be empty.")
  return tuple(out)


def check_retrieved(retrieved: Any, num_queries: int, num_database: int) -> np.ndarray:
  """Validates a ranked list ``int [Q, W]`` and returns it as int64.

  Raises when it is not 2-D integers, has the wrong number of rows, holds an index outside [-1, N), or lists a
  database image twice for one query (duplicates would count a positive several times).
  """
  r = np.asarray(retrieved)
  if r.ndim != 2:
    raise ValueError(f"retrieved must be 2-D [num_queries, K], got shape {r.shape}.")
  if r.size and not np.issubdtype(r.dtype, np.integer):
    raise ValueError(f"retrieved must hold integer database indices, got dtype {r.dtype}.")
  r = r.astype(np.int64, copy=False)
  if r.shape[0] != num_queries:
    raise ValueError(f"retrieved has {r.shape[0]} rows but there are {num_queries} query labels.")
  if r.size:
    lo, hi = int(r.min()), int(r.max())
    if lo < -1 or hi >= num_database:
      bad = lo if lo < -1 else hi
      raise ValueError(f"retrieved holds index {bad}; expected -1 (empty) or a database index in "
                       f"[0, {num_database}).")
    s = np.sort(r, axis=1)
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    if dup.any():
      q, j = np.argwhere(dup)[0]
      raise ValueError(f"retrieved lists database index {int(s[q, j + 1])} twice for query {int(q)}.")
  return r


def _label_codes(query_labels: Any, database_labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Dense label codes: (database codes int [N], query codes int [Q] (-1 = absent), counts int [C])."""
  db = np.asarray(database_labels)
  q = np.asarray(query_labels)
  if db.ndim != 1 or q.ndim != 1:
    raise ValueError(f"labels must be 1-D, got query_labels {q.shape} and database_labels {db.shape}.")
  uniq, db_codes = np.unique(db, return_inverse=True)
  counts = np.bincount(db_codes, minlength=len(uniq))
  if len(uniq) == 0:
    return db_codes, np.full(len(q), -1, np.int64), counts
  pos = np.clip(np.searchsorted(uniq, q), 0, len(uniq) - 1)
  q_codes = np.where(uniq[pos] == q, pos, -1)
  return db_codes.astype(np.int64), q_codes.astype(np.int64), counts


def num_positives(query_labels: Any, database_labels: Any) -> np.ndarray:
  """int64 [Q]: how many database images share each query's label (0 when the label is absent)."""
  _, q_codes, counts = _label_codes(query_labels, database_labels)
  # Code -1 (label absent from the database) picks the appended 0.
  return np.append(counts, 0).astype(np.int64)[q_codes]


def relevance(retrieved: Any, query_labels: Any, database_labels: Any) -> np.ndarray:
  """bool [Q, W]: whether each retrieved slot holds a positive (empty slots are False)."""
  db_codes, q_codes, _ = _label_codes(query_labels, database_labels)
  r = check_retrieved(retrieved, len(q_codes), len(db_codes))
  if r.size == 0:
    return np.zeros(r.shape, bool)
  # An absent query label has code -1 and an empty slot is masked, so neither can match.
  return (r >= 0) & (db_codes[np.maximum(r, 0)] == q_codes[:, None])


def _window(rel: np.ndarray, k: int) -> np.ndarray:
  """The first k columns of ``rel``, padded with misses when fewer than k were retrieved."""
  if rel.shape[1] >= k:
    return rel[:, :k]
  return np.pad(rel, ((0, 0), (0, k - rel.shape[1])))


def precision_at(rel: np.ndarray, k: int) -> np.ndarray:
  """float64 [Q]: hits in the top k / k."""
  return _window(rel, k).sum(axis=1) / k


def recall_at(rel: np.ndarray, k: int) -> np.ndarray:
  """float64 [Q]: 1.0 when the top k hold a positive, else 0.0 (the paper's Recall@K)."""
  return _window(rel, k).any(axis=1).astype(np.float64)


def reciprocal_rank_at(rel: np.ndarray, k: int) -> np.ndarray:
  """float64 [Q]: 1 / rank of the first positive within the top k, 0 when none."""
  w = _window(rel, k)
  first = np.argmax(w, axis=1)  # 0 for rows without hits; masked below
  return np.where(w.any(axis=1), 1.0 / (first + 1), 0.0)


def average_precision_at(rel: np.ndarray, npos: np.ndarray, r: int = DEFAULT_MAP_AT) -> np.ndarray:
  """float64 [Q]: AP@r = sum_{i<=r} precision@i * rel_i / min(#positives, r); 0 without positives."""
  w = _window(rel, r)
  prec = np.cumsum(w, axis=1) / np.arange(1, r + 1)
  denom = np.minimum(np.asarray(npos), r)
  return np.where(denom > 0, (prec * w).sum(axis=1) / np.maximum(denom, 1), 0.0)


def reference_precision_at(rel: np.ndarray, npos: np.ndarray, k: int) -> np.ndarray:
  """float64 [Q]: the public reference's precision (module docstring); not the standard precision@K."""
  w = _window(rel, k)
  hits = w.sum(axis=1)
  # 1-based rank of the last positive within the top k (0 when there is none).
  last = np.where(w.any(axis=1), k - np.argmax(w[:, ::-1], axis=1), 0)
  all_found = (hits == np.asarray(npos)) & (hits > 0)
  return hits / np.where(all_found, last, k)


def precision_recall_curve(rel: np.ndarray, npos: np.ndarray, max_k: int) -> dict[str, np.ndarray]:
  """The precision / true-positive-rate curve over K = 1..max_k, averaged over queries.

  Returns ``{"k": int [max_k], "precision": float64 [max_k], "recall": float64 [max_k]}`` where recall is
  hits@K / #positives of the query (0 for a query without positives).
  """
  w = _window(rel, max_k)
  cum = np.cumsum(w, axis=1, dtype=np.float64)
  npos = np.asarray(npos, np.float64)
  tpr = np.where(npos[:, None] > 0, cum / np.maximum(npos, 1)[:, None], 0.0)
  ks = np.arange(1, max_k + 1)
  return {"k": ks, "precision": (cum / ks).mean(axis=0) if len(w) else np.zeros(max_k),
          "recall": tpr.mean(axis=0) if len(w) else np.zeros(max_k)}


def evaluate(retrieved: Any, query_labels: Any, database_labels: Any, ks: Sequence[int], *,
             map_at: int = DEFAULT_MAP_AT, mrr_ks: Sequence[int] = DEFAULT_MRR_KS) -> dict[str, float]:
  """Every scalar metric of one method, averaged over queries (floats in [0, 1]).

  Keys: ``precision@K``, ``recall@K``, ``reference_precision@K`` for K in ks; ``mrr@K`` for K in ks and
  mrr_ks; ``map@{map_at}``. Definitions in the module docstring. Raises on malformed inputs before computing.
  """
  ks = check_ks(ks)
  mrr_ks = check_ks(mrr_ks, "mrr_ks")
  (map_at,) = check_ks([map_at], "map_at")
  rel = relevance(retrieved, query_labels, database_labels)
  if rel.shape[0] == 0:
    raise ValueError("There are no queries (query_labels is empty).")
  npos = num_positives(query_labels, database_labels)
  out: dict[str, float] = {}
  for k in ks:
    out[f"precision@{k}"] = float(precision_at(rel, k).mean())
  for k in ks:
    out[f"recall@{k}"] = float(recall_at(rel, k).mean())
  for k in sorted(set(ks) | set(mrr_ks)):
    out[f"mrr@{k}"] = float(reciprocal_rank_at(rel, k).mean())
  out[f"map@{map_at}"] = float(average_precision_at(rel, npos, map_at).mean())
  for k in ks:
    out[f"reference_precision@{k}"] = float(reference_precision_at(rel, npos, k).mean())
  return out
