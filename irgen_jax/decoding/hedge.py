"""How IRGen's list spends its places across classes: class first (``search.class_first``) and a hedge
for the runner-up class (``search.hedge``).

The retriever's targets are uniform within a class, so its identifier probabilities are about
p(class | query) / (images of the class): the beam lists one class, and which one depends on how the
class's mass spreads over first tokens as much as on the mass itself. Both policies read the class the
retriever decides on directly:

1. every prefix's *group* (class) is the majority label of the database images under it
   (``prefix_groups``, from the index's codes and the database labels: meaningful when classes are
   coarser than first tokens, as with Fashion-MNIST's 10 classes over 256 first tokens, not for
   In-shop's item ids);
2. the retriever's first-token distribution summed per group is its class posterior
   (``group_posterior``), from the search's root step;
3. ``class_first``: the search is restricted to the identifiers whose first ``search.class_levels``
   prefixes have the likeliest group (``beam_search(classes=PrefixClasses(...))``), so the list starts
   in the class of most mass, not in a class of less mass concentrated on fewer first tokens; at two
   levels it also skips the other classes' images that share a first token with the class's (a first
   token's images are ~89% one class on Fashion-MNIST, a two-token prefix's ~95%);
4. the hedge: where the runner-up group's posterior is at least ``threshold``, a second, narrow search
   within that group's prefixes gives ``slots`` images, which take the last ``slots`` of the first
   ``at`` places (``merge``); the main list moves down by as much, without the images the hedge lists.

Without the hedge a query whose class the retriever gets wrong has no positive at all, so recall@K
stays near precision@1 while a linear scan's neighbours mix classes where the query is ambiguous. The
hedge trades precision for recall at K >= ``at``: a hedged query gives up ``slots`` of its first ``at``
places and gains a positive wherever the runner-up class is the right one; lists of queries below the
threshold are untouched. The report names the settings that produced each column.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from irgen_jax.config_lib import MAX_PREFIX_CLASS_ENTRIES


class Hedge(NamedTuple):
  """The hedge's settings (static, hashable): ``slots`` images of the runner-up group at places
  ``at - slots .. at - 1`` where its posterior is >= ``threshold``, from a search of ``beam_size``
  beams. ``slots = 0``: no hedge."""
  slots: int = 0
  at: int = 10
  threshold: float = 0.2
  beam_size: int = 10

  @classmethod
  def from_config(cls, search_config) -> "Hedge":
    h = search_config.get("hedge", None)
    if not h:
      return cls()
    return cls(int(h.slots), int(h.at), float(h.threshold), int(h.beam_size))

  @property
  def enabled(self) -> bool:
    return self.slots > 0

  def settings(self) -> dict:
    return {"hedge_slots": self.slots, "hedge_at": self.at, "hedge_threshold": self.threshold,
            "hedge_beam_size": self.beam_size}


def prefix_groups(codes: np.ndarray, labels: np.ndarray, num_tokens: int, depth: int = 1) -> tuple:
  """The class of every prefix of 1..``depth`` tokens: a tuple of ``depth`` int32 tables, the t-th of
  shape [L] * (t + 1) (``beam_search.PrefixClasses``), each entry the majority label of the database
  images whose identifier starts with that prefix (ties to the smaller label), -1 for a prefix no
  labeled image starts with. ``codes`` int [N, M], ``labels`` int [N] (-1 = unknown, ignored)."""
  codes, labels = np.asarray(codes), np.asarray(labels)
  if not 1 <= depth <= codes.shape[1] or num_tokens ** depth > MAX_PREFIX_CLASS_ENTRIES:
    raise ValueError(f"prefix classes need 1 <= depth <= M={codes.shape[1]} and L^depth <= "
                     f"{MAX_PREFIX_CLASS_ENTRIES}; got depth={depth}, L={num_tokens}.")
  keep = labels >= 0
  codes, lab = codes[keep].astype(np.int64), labels[keep].astype(np.int64)
  tables = []
  for d in range(1, depth + 1):
    size = num_tokens ** d
    out = np.full(size, -1, np.int32)
    if len(lab):
      key = np.ravel_multi_index(tuple(codes[:, :d].T), (num_tokens,) * d)
      used, key = np.unique(key, return_inverse=True)     # counts over used prefixes only: O(N + U*C)
      counts = np.zeros((len(used), int(lab.max()) + 1), np.int64)
      np.add.at(counts, (key.reshape(-1), lab), 1)
      out[used] = counts.argmax(1)
    tables.append(out.reshape((num_tokens,) * d))
  return tuple(tables)


def index_groups(index, labels: np.ndarray, depth: int = 1) -> tuple[tuple, int]:
  """(``prefix_groups`` tables, G) of an ``Index`` whose images carry ``labels`` (int [N], -1 unknown):
  every prefix's majority label to ``depth`` tokens, and G = the largest label + 1 (0 when no image
  is labeled)."""
  labels = np.asarray(labels)
  return (prefix_groups(index.codes(), labels, index.num_tokens, depth),
          int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0)


def group_posterior(root_logits: jax.Array, groups: jax.Array, num_groups: int) -> jax.Array:
  """float32 [Q, G]: the first-token distribution (softmax of ``root_logits`` [Q, L]) summed per group
  (``groups`` int32 [L], -1 = none: that mass is left out, so rows may sum to less than 1)."""
  p = jax.nn.softmax(root_logits.astype(jnp.float32), axis=-1)
  one_hot = jax.nn.one_hot(groups, num_groups, dtype=p.dtype)       # -1 -> a zero row
  return p @ one_hot


def merge(main_ids: jax.Array, main_scores: jax.Array, hedge_ids: jax.Array, hedge_scores: jax.Array,
          use: jax.Array, at: int) -> tuple[jax.Array, jax.Array]:
  """The hedged lists: ``main`` [Q, K] with ``hedge`` [Q, R] at places ``at - R .. at - 1`` where ``use``
  (bool [Q]); the main list's images that the hedge lists are dropped, the rest move down, the list
  is cut at K, and missing images (-1, from either list) are squeezed out to the end. Elsewhere the
  main list as it is."""
  k, r = main_ids.shape[1], hedge_ids.shape[1]
  head = max(0, min(at, k) - r)
  dup = ((main_ids[:, :, None] == hedge_ids[:, None, :]) & (hedge_ids[:, None, :] >= 0)).any(-1)
  # Stable compaction of the main list without the duplicates (their order kept).
  order = jnp.argsort(dup, axis=1, stable=True)
  kept_ids = jnp.where(jnp.take_along_axis(dup, order, 1), -1, jnp.take_along_axis(main_ids, order, 1))
  kept_scores = jnp.take_along_axis(main_scores, order, 1)
  ids = jnp.concatenate([kept_ids[:, :head], hedge_ids, kept_ids[:, head:]], axis=1)
  scores = jnp.concatenate([kept_scores[:, :head], hedge_scores, kept_scores[:, head:]], axis=1)
  # Missing images to the end, the others in place.
  order = jnp.argsort(ids < 0, axis=1, stable=True)
  ids, scores = jnp.take_along_axis(ids, order, 1)[:, :k], jnp.take_along_axis(scores, order, 1)[:, :k]
  scores = jnp.where(ids >= 0, scores, -jnp.inf)
  return jnp.where(use[:, None], ids, main_ids), jnp.where(use[:, None], scores, main_scores)
