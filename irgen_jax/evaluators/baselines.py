"""The paper's search baselines over one set of features (Table 1 rows): exact scan, Faiss IVF-PQ, ScaNN.

Every function takes ``database float [N, D]`` and ``queries float [Q, D]`` (features from the same encoder)
and returns a ``MethodResult`` with ``ids int64 [Q, k]`` (-1 pads an empty slot), ``scores float32 [Q, k]``
(higher is better, -inf pads), and the costs: ``build_s`` (index construction, training included),
``search_s`` (all Q queries in one batched call, features given: QPS without the encoder),
``index_bytes`` (the serialized index). Pass ``encode_s``, the time the query encoder took, so the report
can give QPS with the encoder as well.

Metrics (the paper: cosine for CLIP features, Euclidean for the others):
  "l2"      squared Euclidean distance; score = -distance.
  "cosine"  vectors L2-normalized first; score = cosine similarity. IVF-PQ then searches L2 over the
            normalized vectors (same ranking, ||a - b||^2 = 2 - 2 cos) and reports 1 - distance / 2.

Faiss and ScaNN are imported inside the functions: metrics and reports do not need them.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

import numpy as np

from irgen_jax.evaluators.results import MethodResult

METRICS = ("l2", "cosine")

# The paper's IVF-PQ settings (section 4): coarse clusters per dataset, 4 sub-spaces x 256 centroids.
PAPER_IVF_NLIST = {"inshop": 300, "cub": 100, "cars": 200}
IVFPQ_SUBSPACES = 4
IVFPQ_NBITS = 8
# The paper does not state nprobe (Faiss's own default is 1 cell). 16 cells is 5-16% of the database for
# the paper's 100-300 clusters: enough candidates to fill k=100 (the MAP@100 window) on CUB-sized
# databases, still far from a full scan. Pass nprobe=1 to see Faiss's default behaviour.
DEFAULT_NPROBE = 16

# ScaNN: AH codebooks have 16 centers per block and cannot be trained on fewer points; below this, scoring
# is exact brute force (on such a database any index is pointless anyway).
SCANN_MIN_AH_POINTS = 16
# Its recipe (docs/algorithms.md, README): ~sqrt(N) leaves, search about 5% of them (README: 100 of 2,000),
# AH with 2 dimensions per block, anisotropic threshold 0.2 for dot product, then exact rescoring of
# 10x the final count (README: reorder(100) for k=10).
SCANN_LEAVES_SEARCHED_FRACTION = 0.05
SCANN_REORDER_FACTOR = 10
SCANN_MAX_TRAINING_SAMPLE = 250_000


def _check_inputs(database: Any, queries: Any, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
  """Validates shapes, k and metric; returns float32 C-contiguous arrays (normalized copies for cosine)."""
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
  db, q = np.asarray(database), np.asarray(queries)
  if db.ndim != 2 or q.ndim != 2:
    raise ValueError(f"database and queries must be 2-D [num, dim]; got {db.shape} and {q.shape}.")
  if db.shape[1] != q.shape[1]:
    raise ValueError(f"Feature dimension mismatch: database has dim {db.shape[1]}, queries have dim "
                     f"{q.shape[1]}.")
  n = db.shape[0]
  if n == 0 or q.shape[0] == 0:
    raise ValueError(f"Need at least one database vector and one query; got N={n}, Q={q.shape[0]}.")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
    raise ValueError(f"k={k!r} must be an integer in [1, N={n}] (the database size).")
  for name, x in (("database", db), ("queries", q)):
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"{name} must be numeric features, got dtype {x.dtype}.")
    if not np.isfinite(x).all():
      raise ValueError(f"{name} holds non-finite values (NaN or inf).")
  # No copy when already float32 C-contiguous (a million-image database is GBs); nothing below writes to them.
  db = np.ascontiguousarray(db, dtype=np.float32)
  q = np.ascontiguousarray(q, dtype=np.float32)
  if metric == "cosine":
    db, q = _normalize(db), _normalize(q)
  return db, q


def _normalize(x: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  # A zero vector stays zero (cosine 0 with everything) instead of becoming NaN.
  return x / np.where(norms > 0, norms, 1.0)


def _pad_missing(ids: np.ndarray, scores: np.ndarray, missing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  ids = np.where(missing, -1, ids).astype(np.int64)
  scores = np.where(missing, -np.inf, scores).astype(np.float32)
  return ids, scores


def brute_force(database: np.ndarray, queries: np.ndarray, k: int, metric: str = "l2",
                max_block_elems: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k in numpy: ``(ids int64 [Q, k], scores float32 [Q, k])``, ties broken by lower index.

  Scores are computed in blocks of queries (at most ``max_block_elems`` score entries at once) so memory
  stays bounded for million-image databases.
  """
  db, q = _check_inputs(database, queries, k, metric)
  n = db.shape[0]
  db_sq = (db * db).sum(axis=1)
  block = max(1, max_block_elems // n)
  ids = np.empty((q.shape[0], k), np.int64)
  scores = np.empty((q.shape[0], k), np.float32)
  for start in range(0, q.shape[0], block):
    qb = q[start:start + block]
    s = qb @ db.T
    if metric == "l2":
      # Minus the squared distance; |q|^2 does not change the ranking but keeps the score a distance.
      s = 2 * s - db_sq[None, :] - (qb * qb).sum(axis=1, keepdims=True)
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    top = np.sort(top, axis=1)  # stable sort below then breaks ties by index
    ts = np.take_along_axis(s, top, axis=1)
    order = np.argsort(-ts, axis=1, kind="stable")
    ids[start:start + len(qb)] = np.take_along_axis(top, order, axis=1)
    scores[start:start + len(qb)] = np.take_along_axis(ts, order, axis=1)
  return ids, scores


def linear_scan(database: Any, queries: Any, k: int, *, metric: str = "l2", backend: str = "faiss",
                encode_s: float = 0.0) -> MethodResult:
  """Exact k-nearest-neighbour scan (the paper's "Linear scan search").

  backend "faiss": IndexFlatL2 / IndexFlatIP (BLAS, multi-threaded); "numpy": ``brute_force``.
  """
  db, q = _check_inputs(database, queries, k, metric)
  if backend == "numpy":
    t0 = time.perf_counter()
    ids, scores = brute_force(db, q, k, metric)
    search_s = time.perf_counter() - t0
    return MethodResult(ids=ids, scores=scores, kind="linear_scan", search_s=search_s, encode_s=encode_s,
                        build_s=0.0, index_bytes=int(db.nbytes),
                        settings={"metric": metric, "backend": "numpy"})
  if backend != "faiss":
    raise ValueError(f"backend must be 'faiss' or 'numpy', got {backend!r}.")
  import faiss  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  index = faiss.IndexFlatL2(db.shape[1]) if metric == "l2" else faiss.IndexFlatIP(db.shape[1])
  index.add(db)
  build_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  dist, ids = index.search(q, k)
  search_s = time.perf_counter() - t0
  scores = -dist if metric == "l2" else dist
  ids, scores = _pad_missing(ids, scores, ids < 0)
  return MethodResult(ids=ids, scores=scores, kind="linear_scan", search_s=search_s, encode_s=encode_s,
                      build_s=build_s, index_bytes=int(faiss.serialize_index(index).nbytes),
                      settings={"metric": metric, "backend": "faiss", "threads": faiss.omp_get_max_threads()})


def faiss_ivfpq(database: Any, queries: Any, k: int, *, nlist: int, metric: str = "l2",
                num_subspaces: int = IVFPQ_SUBSPACES, nbits: int = IVFPQ_NBITS, nprobe: int = DEFAULT_NPROBE,
                seed: int = 1234, encode_s: float = 0.0) -> MethodResult:
  """Faiss IVF-PQ: ``nlist`` coarse k-means cells, residuals coded by ``num_subspaces`` x 2^nbits PQ.

  The paper: nlist 300 (In-shop), 100 (CUB), 200 (Cars) — ``PAPER_IVF_NLIST`` — with 4 x 256 PQ.
  ``nprobe`` cells are visited per query (see DEFAULT_NPROBE). The index is trained on the whole
  database, seeded.
  Requires D divisible by num_subspaces and N >= max(nlist, 2^nbits) (k-means needs a point per centroid).
  A query may get fewer than k results when its probed cells hold fewer points: those slots are -1.
  """
  db, q = _check_inputs(database, queries, k, metric)
  n, d = db.shape
  for name, v in (("nlist", nlist), ("num_subspaces", num_subspaces), ("nbits", nbits), ("nprobe", nprobe)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be a positive integer, got {v!r}.")
  if d % num_subspaces:
    raise ValueError(f"Feature dim {d} is not divisible by num_subspaces={num_subspaces} (PQ splits the "
                     "vector into equal sub-spaces).")
  if n < max(nlist, 2**nbits):
    raise ValueError(f"N={n} database vectors are too few to train nlist={nlist} cells and 2^{nbits}="
                     f"{2**nbits} PQ centroids; need N >= {max(nlist, 2**nbits)}.")
  if nprobe > nlist:
    raise ValueError(f"nprobe={nprobe} exceeds nlist={nlist}.")
  import faiss  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  quantizer = faiss.IndexFlatL2(d)
  index = faiss.IndexIVFPQ(quantizer, d, nlist, num_subspaces, nbits)
  index.cp.seed = seed
  index.pq.cp.seed = seed
  index.train(db)
  index.add(db)
  build_s = time.perf_counter() - t0
  index.nprobe = nprobe
  t0 = time.perf_counter()
  dist, ids = index.search(q, k)
  search_s = time.perf_counter() - t0
  scores = -dist if metric == "l2" else 1.0 - dist / 2.0
  ids, scores = _pad_missing(ids, scores, ids < 0)
  return MethodResult(
      ids=ids, scores=scores, kind="faiss_ivfpq", search_s=search_s, encode_s=encode_s, build_s=build_s,
      index_bytes=int(faiss.serialize_index(index).nbytes),
      settings={"metric": metric, "nlist": int(nlist), "num_subspaces": int(num_subspaces),
                "nbits": int(nbits), "nprobe": int(nprobe), "seed": int(seed),
                "threads": faiss.omp_get_max_threads()})


def scann_settings(n: int, k: int) -> dict[str, int]:
  """ScaNN's recommended recipe scaled to N points and k results (see the module constants)."""
  reorder = min(n, SCANN_REORDER_FACTOR * k)
  num_leaves = max(2, round(math.sqrt(n)))
  # ~5% of the leaves, but at least enough leaves to hold the points that get rescored on average.
  to_search = max(math.ceil(SCANN_LEAVES_SEARCHED_FRACTION * num_leaves), math.ceil(reorder * num_leaves / n))
  return {"num_leaves": num_leaves, "num_leaves_to_search": min(num_leaves, to_search), "reorder": reorder,
          "training_sample_size": min(n, SCANN_MAX_TRAINING_SAMPLE)}


def scann_search(database: Any, queries: Any, k: int, *, metric: str = "l2", num_leaves: int | None = None,
                 num_leaves_to_search: int | None = None, reorder: int | None = None,
                 encode_s: float = 0.0) -> MethodResult:
  """ScaNN: k-means tree partitioning + asymmetric hashing (AH) scoring + exact rescoring.

  builder(db, k, "squared_l2" | "dot_product").tree(num_leaves, num_leaves_to_search).score_ah(2, ...)
  .reorder(reorder).build(); unset values come from ``scann_settings(N, k)``. Cosine uses dot product over
  normalized vectors with anisotropic quantization (threshold 0.2, the recipe's value; it applies to dot
  product only). Below SCANN_MIN_AH_POINTS database vectors the tree and AH cannot be trained and scoring is
  brute force (``settings["scoring"]`` says which ran). Search runs batched over all cores.
  """
  db, q = _check_inputs(database, queries, k, metric)
  n = db.shape[0]
  cfg = scann_settings(n, k)
  for name, v in (("num_leaves", num_leaves), ("num_leaves_to_search", num_leaves_to_search),
                  ("reorder", reorder)):
    if v is not None:
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}.")
      cfg[name] = int(v)
  if cfg["num_leaves"] > n:
    raise ValueError(f"num_leaves={cfg['num_leaves']} exceeds the N={n} database vectors.")
  if num_leaves is not None and num_leaves_to_search is None:
    cfg["num_leaves_to_search"] = min(cfg["num_leaves_to_search"], cfg["num_leaves"])
  if cfg["num_leaves_to_search"] > cfg["num_leaves"]:
    raise ValueError(f"num_leaves_to_search={cfg['num_leaves_to_search']} exceeds num_leaves="
                     f"{cfg['num_leaves']}.")
  import scann  # pylint: disable=import-outside-toplevel

  distance = "squared_l2" if metric == "l2" else "dot_product"
  t0 = time.perf_counter()
  builder = scann.scann_ops_pybind.builder(db, k, distance)
  if n >= SCANN_MIN_AH_POINTS:
    # random_init=False (k-means++): ScaNN's default random initialization depends on hash-table iteration
    # order, so the index (and every metric) would change from run to run.
    builder = builder.tree(num_leaves=cfg["num_leaves"], num_leaves_to_search=cfg["num_leaves_to_search"],
                           training_sample_size=cfg["training_sample_size"], random_init=False)
    threshold = 0.2 if metric == "cosine" else float("nan")
    builder = builder.score_ah(2, anisotropic_quantization_threshold=threshold)
    builder = builder.reorder(max(k, cfg["reorder"]))
    settings = {"scoring": "tree+ah+reorder", **cfg}
  else:
    builder = builder.score_brute_force()
    settings = {"scoring": "brute_force"}
  searcher = builder.build()
  build_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  ids, dist = searcher.search_batched_parallel(q, final_num_neighbors=k)
  search_s = time.perf_counter() - t0
  ids, dist = np.asarray(ids).astype(np.int64), np.asarray(dist, np.float32)
  # ScaNN pads a short result list with index 0 and a NaN distance.
  missing = ~np.isfinite(dist)
  if ids.shape[1] < k:  # a short result list comes back narrower on some versions
    pad = k - ids.shape[1]
    ids = np.pad(ids, ((0, 0), (0, pad)))
    dist = np.pad(dist, ((0, 0), (0, pad)))
    missing = np.pad(missing, ((0, 0), (0, pad)), constant_values=True)
  # ScaNN returns the similarity itself for dot product, the distance for squared L2.
  scores = -dist if metric == "l2" else dist
  ids, scores = _pad_missing(ids, scores, missing)
  with tempfile.TemporaryDirectory() as tmp:
    searcher.serialize(tmp)
    index_bytes = sum(os.path.getsize(os.path.join(root, f))
                      for root, _, files in os.walk(tmp) for f in files)
  return MethodResult(ids=ids, scores=scores, kind="scann", search_s=search_s, encode_s=encode_s,
                      build_s=build_s, index_bytes=int(index_bytes), settings={"metric": metric, **settings})


def recall_vs_exact(approx_ids: Any, exact_ids: Any, k: int | None = None) -> float:
  """Fraction of the exact top-k (non-empty slots) that the approximate top-k also holds, over all queries.

  ``approx_ids`` and ``exact_ids`` are ``int [Q, >=k]`` database indices (-1 = empty); k defaults to the
  exact list's width.
  """
  a, e = np.asarray(approx_ids, np.int64), np.asarray(exact_ids, np.int64)
  if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
    raise ValueError(f"approx_ids and exact_ids must be [Q, K] with the same Q; got {a.shape} and {e.shape}.")
  k = e.shape[1] if k is None else k
  if not 1 <= k <= min(a.shape[1], e.shape[1]):
    raise ValueError(f"k={k} must be in [1, {min(a.shape[1], e.shape[1])}] (the narrower list's width).")
  a, e = a[:, :k], e[:, :k]
  # Offsetting each row's ids by row * (max id + 2) makes one flat isin do every row at once; +1 keeps -1
  # slots from colliding with ids of the previous row.
  stride = int(max(a.max(), e.max(), 0)) + 2
  rows = np.arange(a.shape[0])[:, None] * stride
  found = np.isin(e + 1 + rows, a + 1 + rows) & (e >= 0)
  total = int((e >= 0).sum())
  return float(found.sum() / total) if total else 0.0
