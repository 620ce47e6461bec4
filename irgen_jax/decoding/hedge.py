"""How IRGen's list spends its places across classes: class first (``search.class_first``) and a hedge
for the runner-up class (``search.hedge``).

The retriever's targets are uniform within a class, so its identifier probabilities are about
p(class | query) / (images of the class): the beam lists one class, and which one depends on how the
class's mass spreads over first tokens as much as on the mass itself. Both policies read the class the
retriever decides on directly:

1. every prefix's *group* (class) is the majority label of the database images under it, one per node
   of the index (``node_classes``, from the index and the database labels: meaningful when classes are
   coarser than first tokens, as with Fashion-MNIST's 10 classes over 256 first tokens, not for
   In-shop's item ids);
2. the retriever's first-token distribution summed per group is its class posterior
   (``group_posterior``), from the search's root step;
3. ``class_first``: the search is restricted to the identifiers whose first ``search.class_levels``
   prefixes have the likeliest group (``beam_search(classes=PrefixClasses(...))``), so the list starts
   in the class of most mass, not in a class of less mass concentrated on fewer first tokens; deeper
   levels also skip the other classes' images that share a prefix with the class's (a first token's
   images are ~89% one class on Fashion-MNIST, a two-token prefix's ~95%, a three-token one's
   ~99.7%), and at every level (``class_levels = M``) every listed identifier's images are mostly of
   the class;
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

from irgen_jax.decoding import index as index_lib


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


def image_nodes(index) -> tuple[np.ndarray, list[np.ndarray]]:
  """The index's node of every image's prefix at every depth: ``(image_ids int [N], nodes)``, with
  ``nodes[t]`` int [N] the depth-(t + 1) node (the (t + 1)-token prefix, ``decoding.index``) of image
  ``image_ids[i]``; images in index (lexicographic) order, ``nodes[M - 1]`` their identifiers."""
  m = index.num_levels
  node = np.repeat(np.arange(index.num_identifiers, dtype=np.int64), np.diff(index.offsets))
  nodes = [node]
  for d in range(m - 1, 0, -1):   # a depth-(d + 1) node's parent at depth d
    parent = np.repeat(np.arange(index.nodes_per_depth[d], dtype=np.int64), np.diff(index.first_child[d]))
    node = parent[node]
    nodes.append(node)
  return np.asarray(index.image_ids), nodes[::-1]


def node_classes(index, labels: np.ndarray, depth: int = 1, *, bucket: bool = True) -> tuple:
  """The class of every prefix of 1..``depth`` tokens of an ``Index``: a tuple of ``depth`` int32
  tables, ``tables[t]`` indexed by the depth-(t + 1) node id and padded as ``index.device_arrays(
  bucket=bucket)`` pads that level's nodes (``beam_search.PrefixClasses``): the majority label of the
  database images under the node (ties to the smaller label), -1 for a node no labeled image is under
  (and padding). ``labels`` int [N] by image id (-1 = unknown, ignored).

  Per node, not per prefix: a table of L^D entries would bound D by memory (two levels at L = 256),
  while the nodes are at most N per level, so a search can keep every level of the identifier, down to
  the identifiers themselves, within its class."""
  labels = np.asarray(labels)
  if not 1 <= depth <= index.num_levels:
    raise ValueError(f"prefix classes need 1 <= depth <= M={index.num_levels}; got depth={depth}.")
  if labels.shape != (index.num_images,):
    raise ValueError(f"labels must be int [N={index.num_images}]; got shape {labels.shape}.")
  image_ids, nodes = image_nodes(index)
  lab = labels[image_ids].astype(np.int64)
  keep = lab >= 0
  g = int(lab.max()) + 1 if keep.any() else 1
  tables = []
  for t in range(depth):
    n = index.nodes_per_depth[t + 1] if t + 1 < index.num_levels else index.num_identifiers
    size = index_lib.bucket_rows(n) if bucket else max(n, 1)
    out = np.full(size, -1, np.int32)
    # The majority label per node from the (node, label) pairs' counts: sorted by node, then count
    # (most first), then label (ties to the smaller); each node's first pair. O(N log N), no [n, G] table.
    pairs, counts = np.unique(nodes[t][keep] * g + lab[keep], return_counts=True)
    node, label = pairs // g, pairs % g
    order = np.lexsort((label, -counts, node))
    first = order[np.concatenate([[True], np.diff(node[order]) != 0])] if len(order) else order
    out[node[first]] = label[first]
    tables.append(out)
  return tuple(tables)


def index_groups(index, labels: np.ndarray, depth: int = 1) -> tuple[tuple, int]:
  """(``node_classes`` tables, G) of an ``Index`` whose images carry ``labels`` (int [N], -1 unknown):
  every prefix's majority label to ``depth`` tokens, and G = the largest label + 1 (0 when no image
  is labeled)."""
  labels = np.asarray(labels)
  return (node_classes(index, labels, depth),
          int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0)


def image_classes(index, tables: tuple) -> np.ndarray:
  """int32 [N, D]: the class (``node_classes`` tables) of every image's prefixes of 1..D tokens, by
  image id: what a search within a class (``beam_search.PrefixClasses``) compares with its target."""
  image_ids, nodes = image_nodes(index)
  out = np.empty((index.num_images, len(tables)), np.int32)
  for t, table in enumerate(tables):
    out[image_ids, t] = np.asarray(table)[nodes[t]]
  return out


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
