"""Expected targets for the retriever (``retriever.soft_targets``): the paper's loss without its draw noise.

The paper trains the decoder on the identifier of one uniformly random same-class database image x2,
drawn anew every step. Teacher-forced on x2's prefix t_<m, the loss at level m is CE(p, one_hot(t_m)),
whose expectation over the draws that share that prefix is CE(p, q_m) with

    q_m(t) = share of the class's database images with prefix t_<m whose token m is t.

So the same objective in expectation (the same optimum: the class-conditional distribution over
identifiers), with the noise of the one-hot draw integrated out: at the first level a one-hot is one of
the ~L/C first tokens a class spreads over, where q_0 is all of them at once. The prefix is still drawn
(x2's), so every level's target conditions on a real prefix.

Tables (``tables``; host numpy, then replicated on the device): per level m, every (class, prefix of
length m) group's token counts as entries ``(token, share)``, sorted by group; and per database image
its group's first entry and count. ``distributions`` turns a batch of target images into their q_m
rows on the device: O(B · M · L) gathers and one scatter-add, no [B, N] work.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Tables(NamedTuple):
  """Per level m (axis 0), M levels, N database images, E entries (padded to the longest level)."""
  start: np.ndarray    # int32 [M, N]: the first entry of image j's group at level m
  length: np.ndarray   # int32 [M, N]: its group's number of distinct tokens (<= L)
  token: np.ndarray    # int32 [M, E]: entries' tokens (0 in padding)
  share: np.ndarray    # float32 [M, E]: entries' shares of their group (0 in padding)


def tables(codes: np.ndarray, labels: np.ndarray) -> Tables:
  """The tables of database identifiers ``codes`` int [N, M] with ``labels`` int [N] (>= 0)."""
  codes, labels = np.asarray(codes, np.int64), np.asarray(labels, np.int64)
  n, m = codes.shape
  if len(labels) != n:
    raise ValueError(f"labels has {len(labels)} entries for {n} identifiers.")
  if n and labels.min() < 0:
    raise ValueError("soft targets need every database image labeled (labels >= 0).")
  start, length = np.zeros((m, n), np.int32), np.zeros((m, n), np.int32)
  tokens, shares = [], []
  for level in range(m):
    # Group = (class, prefix t_<level); within a group, the counts of token t_level.
    keys = np.concatenate([labels[:, None], codes[:, :level + 1]], axis=1)
    entries, entry_of, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    groups, group_of_entry = np.unique(entries[:, :-1], axis=0, return_inverse=True)
    group_of_entry = group_of_entry.reshape(-1)
    first = np.searchsorted(group_of_entry, np.arange(len(groups)))   # entries are sorted by group
    size = np.bincount(group_of_entry, minlength=len(groups))
    total = np.bincount(group_of_entry, weights=counts, minlength=len(groups))
    g = group_of_entry[entry_of.reshape(-1)]
    start[level], length[level] = first[g], size[g]
    tokens.append(entries[:, -1].astype(np.int32))
    shares.append((counts / total[group_of_entry]).astype(np.float32))
  e = max([len(t) for t in tokens], default=0) or 1

  def padded(rows, dtype):
    out = np.zeros((len(rows), e), dtype)
    for level, row in enumerate(rows):
      out[level, :len(row)] = row
    return out
  return Tables(start, length, padded(tokens, np.int32), padded(shares, np.float32))


def distributions(t: Tables, target_index: jax.Array, num_tokens: int) -> jax.Array:
  """float32 [B, M, L]: q_m of every target image (``target_index`` int [B] into the database)."""
  start, length = t.start[:, target_index], t.length[:, target_index]     # [M, B]
  slot = jnp.arange(num_tokens, dtype=jnp.int32)
  valid = slot < length[..., None]                                        # [M, B, L]: a group has <= L
  at = jnp.where(valid, start[..., None] + slot, 0)
  token = jax.vmap(lambda tok, i: tok[i])(t.token, at)
  share = jnp.where(valid, jax.vmap(lambda s, i: s[i])(t.share, at), 0.0)
  m, b = start.shape
  out = jnp.zeros((m, b, num_tokens), jnp.float32).at[
      jnp.arange(m)[:, None, None], jnp.arange(b)[None, :, None], token].add(share)
  return jnp.moveaxis(out, 0, 1)
