"""MethodResult: what one retrieval method returned for a query set, and what it cost.

Baselines (baselines.py) return one; IRGen's caller builds one from its beam search output; the report
(report.py) reads them. Holding arrays and numbers only keeps evaluators free of trainers and models.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Search kinds in the order of the paper's Tables 1-2, with their group titles.
KIND_TITLES = {
    "linear_scan": "Linear scan search",
    "faiss_ivfpq": "Faiss IVF PQ search",
    "scann": "ScaNN search",
    "beam_search": "Beam search",
}


def kind_title(kind: str) -> str:
  """The Table 1 group title of a search kind (an unknown kind is its own title)."""
  return KIND_TITLES.get(kind, kind)


@dataclasses.dataclass(frozen=True)
class MethodResult:
  """One method's ranked results and costs.

  ids         int64 [Q, K]: database indices, best first; -1 pads an empty slot.
  scores      float32 [Q, K]: higher is better (log-probability for the beam search, cosine similarity,
              or minus the squared L2 distance); -inf pads an empty slot.
  kind        search kind, a key of KIND_TITLES ("linear_scan", "faiss_ivfpq", "scann", "beam_search")
              or any other string (grouped last under its own name).
  search_s    seconds to answer all Q queries from query features (or images, for the beam search when
              the caller times encoder and decoder together; then leave encode_s at 0).
  encode_s    seconds the query encoder took for the Q queries (0 when included in search_s or unknown).
  build_s     seconds to build the index from database features (None when not applicable).
  index_bytes size of the serialized index (None when not applicable).
  settings    JSON-able description (metric, nlist, nprobe, ...), reported as is.
  extra       additional scalar metrics reported beside the standard ones (e.g. ``beam_agreement``).
  exact_reference
              name of the exact method whose top K this one is compared with (``recall_vs_exact@K``);
              None: the report's default for approximate kinds.
  """
  ids: np.ndarray
  scores: np.ndarray
  kind: str
  search_s: float
  encode_s: float = 0.0
  build_s: float | None = None
  index_bytes: int | None = None
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  extra: dict[str, float] = dataclasses.field(default_factory=dict)
  exact_reference: str | None = None

  def __post_init__(self):
    ids, scores = np.asarray(self.ids), np.asarray(self.scores)
    if ids.ndim != 2 or scores.shape != ids.shape:
      raise ValueError(f"ids and scores must both be [num_queries, K]; got {ids.shape} and {scores.shape}.")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"ids must be integer database indices, got dtype {ids.dtype}.")
    # Host numpy with the documented dtypes, whatever came in (jax arrays from the beam search: int32).
    object.__setattr__(self, "ids", ids.astype(np.int64, copy=False))
    object.__setattr__(self, "scores", scores.astype(np.float32, copy=False))
    if self.search_s is None or not self.search_s >= 0:
      raise ValueError(f"search_s must be a non-negative number of seconds, got {self.search_s!r}.")
    if not self.encode_s >= 0:
      raise ValueError(f"encode_s must be a non-negative number of seconds, got {self.encode_s!r}.")

  @property
  def num_queries(self) -> int:
    return int(np.shape(self.ids)[0])

  @property
  def qps(self) -> float | None:
    """Queries per second of the search alone (query features given); None when search_s is 0."""
    return self.num_queries / self.search_s if self.search_s > 0 else None

  @property
  def qps_with_encoder(self) -> float | None:
    """Queries per second including the query encoder."""
    total = self.search_s + self.encode_s
    return self.num_queries / total if total > 0 else None
