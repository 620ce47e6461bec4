"""Stage-2 training pairs: each train image gets a database image of its class as the target.

The retriever learns to emit the identifier of the target given the source image. As in the paper,
the target is a uniformly random database image of the same class (possibly the image itself), drawn
anew every epoch; optionally it is drawn from a per-image candidate table instead (e.g. the nearest
same-class database neighbours in the tokenizer's feature space, computed by the trainer), which
gives the decoder a within-class order to learn.

The draw is a pure function of ``(seed, epoch, index)`` (a counter-based hash, no RNG state), so a
restored input pipeline reproduces exactly the pairs of an uninterrupted run, whatever the process
count or order in which records are read.

Train images whose class has no database image (In-shop's train split: its item ids never occur in the
gallery), or whose candidate row holds no valid entry, cannot have a target: they are *excluded*
(``eligible`` lists the kept ones; the count is logged). If none is left it is an error.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from irgen_jax.data import randomness

log = logging.getLogger(__name__)

# Distinguishes the pair draw from other uses of the same seed (e.g. augmentation).
_STREAM = 0x9A125


def pair_hash(seed: int, epoch: int, index: int) -> int:
  """The 64-bit hash behind the draw of train record ``index`` in ``epoch``."""
  return randomness.hash64(_STREAM, seed, epoch, index)


def pair_hash_np(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
  """``pair_hash`` over an array of indices → uint64."""
  return randomness.hash64_np((_STREAM, seed, epoch), indices)


class PairSampler:
  """Draws, for train record ``index`` in ``epoch``, a same-class database index.

  Args:
    train_labels: int [N_train], labels of the train role.
    database_labels: int [N_db], labels of the database role.
    seed: the draw's seed.
    candidates: optional int [N_train, k] of database indices to draw from instead of the whole class;
      ``-1`` pads rows with fewer than k candidates. Every other entry must be a database image of the
      row's class (checked here: a table that crosses classes is a bug upstream).
  """

  def __init__(self, train_labels: np.ndarray, database_labels: np.ndarray, *, seed: int,
               candidates: np.ndarray | None = None):
    self.seed = int(seed)
    self.train_labels = np.asarray(train_labels, np.int64)
    self.database_labels = np.asarray(database_labels, np.int64)
    if self.train_labels.ndim != 1 or self.database_labels.ndim != 1:
      raise ValueError("train_labels and database_labels must be 1-D label arrays.")
    if len(self.database_labels) == 0:
      raise ValueError("The database is empty: there is nothing to pair with.")
    if (self.train_labels < 0).any() or (self.database_labels < 0).any():
      raise ValueError("Labels must be non-negative.")
    if candidates is None:
      self._mode = "class"
      num_classes = int(max(self.train_labels.max(initial=0), self.database_labels.max())) + 1
      counts = np.bincount(self.database_labels, minlength=num_classes)
      self._order = np.argsort(self.database_labels, kind="stable")  # database indices by class
      self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
      self._counts = counts.astype(np.int64)
      self.num_choices = self._counts[self.train_labels]
    else:
      self._mode = "candidates"
      self._table, self.num_choices = self._check_candidates(np.asarray(candidates))
    self.eligible = np.flatnonzero(self.num_choices > 0).astype(np.int64)
    self.num_excluded = len(self.train_labels) - len(self.eligible)
    if not len(self.eligible):
      raise ValueError("No train image has a database image of its class (or a valid candidate): "
                       "stage 2 has no training pair.")
    if self.num_excluded:
      log.info("Pair sampler: %d of %d train images have no same-class database image; excluded.",
               self.num_excluded, len(self.train_labels))

  def _check_candidates(self, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if table.ndim != 2 or table.shape[0] != len(self.train_labels) or table.shape[1] == 0:
      raise ValueError(f"candidates must be int [N_train={len(self.train_labels)}, k>0]; got shape "
                       f"{table.shape}.")
    if not np.issubdtype(table.dtype, np.integer):
      raise ValueError(f"candidates must be integers; got {table.dtype}.")
    table = table.astype(np.int64)
    n_db = len(self.database_labels)
    bad = (table < -1) | (table >= n_db)
    if bad.any():
      r, c = np.argwhere(bad)[0]
      raise ValueError(f"candidates[{r}, {c}] = {table[r, c]} is not a database index in [0, {n_db}) "
                       "(or -1 for padding).")
    valid = table >= 0
    crossing = valid & (self.database_labels[np.where(valid, table, 0)] != self.train_labels[:, None])
    if crossing.any():
      r, c = np.argwhere(crossing)[0]
      raise ValueError(
          f"candidates[{r}, {c}] = database image {table[r, c]} of class "
          f"{self.database_labels[table[r, c]]}, but train image {r} is of class "
          f"{self.train_labels[r]}: targets must share the source's class.")
    # Valid entries first (stable: keeps the trainer's order), so a draw is one modulo.
    order = np.argsort(~valid, axis=1, kind="stable")
    return np.take_along_axis(table, order, axis=1), valid.sum(axis=1).astype(np.int64)

  def target(self, index: int, epoch: int) -> int:
    """The database index paired with train record ``index`` in ``epoch`` (it must be eligible)."""
    n = int(self.num_choices[index])
    if n == 0:
      raise ValueError(f"Train record {index} has no same-class database image (not eligible).")
    k = pair_hash(self.seed, epoch, int(index)) % n
    if self._mode == "class":
      return int(self._order[self._starts[self.train_labels[index]] + k])
    return int(self._table[index, k])

  def targets(self, indices: np.ndarray, epoch: int) -> np.ndarray:
    """``target`` over an array of eligible train indices → int64 array of database indices."""
    indices = np.asarray(indices, np.int64)
    n = self.num_choices[indices]
    if (n == 0).any():
      raise ValueError(f"Train record {int(indices[np.argmin(n)])} is not eligible.")
    k = (pair_hash_np(self.seed, epoch, indices) % n.astype(np.uint64)).astype(np.int64)
    if self._mode == "class":
      return self._order[self._starts[self.train_labels[indices]] + k]
    return self._table[indices, k]

  def add_target(self, record: dict[str, Any], epoch: int) -> dict[str, Any]:
    """The record with ``target_index`` (int32) for its ``index`` in ``epoch``."""
    return {**record, "target_index": np.int32(self.target(record["index"], epoch))}
