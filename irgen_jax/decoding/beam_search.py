"""Constrained beam search over the valid-identifier index, and the exhaustive scorer that is its oracle.

``beam_search`` is one jitted, pure function of (decode functions, params, index arrays, queries): batched
over queries and beams, the M identifier steps unrolled in Python under ``jit`` (every step has static
shapes) or, for long identifiers, a ``lax.scan`` over the levels (``loop``), a KV cache owned by the
decode functions, scores that are sums of ``log_softmax`` (the reference multiplies raw probabilities,
which underflows for long identifiers), illegal tokens masked *after*
``log_softmax``, top-B over B×L candidates per step, caches reordered by a gather along the beam axis, and
the beams' identifiers expanded to database images (CSR map, bounded by K) inside the same program.

Everything the search needs from the model is the decode-function contract (``DecodeFns``); the search
never imports a model, so it is tested against toy transition tables with no network
(tests/test_beam_search.py), the way t5x tests its decoding.

Legal tokens. At a dense level of the index a beam gathers its node's bit-mask row (W uint32 words) and the
child of the chosen token is a running count plus one popcount; at a sparse level it gathers its node's
sorted child tokens (a static number of slots, the level's largest fan-out rounded up to a power of two)
and the child is the count of smaller tokens. Either way the work per step is O(Q·B·(W + fan-out + L)),
independent of the number of database images.

Dead beams. A prefix may have fewer than B legal continuations, and an index may hold fewer than B
identifiers. A candidate is *legal* when its beam is alive and its token is a set bit of the beam's node;
illegal candidates get a finite large negative (so arithmetic never meets ``-inf - -inf``) and always rank
below legal ones; a selected illegal candidate becomes a dead beam with score ``-inf`` that expands to no
image. So the output never holds an invalid or duplicate image: unfilled slots are id -1, score -inf.

Recompilation. The program depends on the shapes of the queries and of the index tables, and on the static
arguments. ``search`` pads query batches to powers of two up to ``max_batch``; ``Index.device_arrays`` pads
the tables to a few sizes, so inserts rarely change them. ``decode_fns`` is a static argument: pass the
same (hashable) object every call, e.g. one NamedTuple made once, or every call retraces.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from irgen_jax.decoding.index import IndexArrays

# What an illegal token's log-probability becomes: finite, so sums and comparisons stay well defined, and
# far below any real log-probability (float32 log_softmax of finite logits is > -1e30 by a wide margin).
ILLEGAL_LOGPROB = -1e30

# What a class-first search with ``fill`` subtracts, once, from an identifier whose prefix leaves the
# query's class: more than any identifier's -log-probability (float32 log_softmax of a trained model's
# logits stays above -100 a token), so every in-class identifier ranks first; small enough that float32
# still resolves the out-of-class scores below it to ~0.01.
OUT_OF_CLASS = 1e5

REORDER_MODES = ("gather", "one_hot")


class DecodeFns(NamedTuple):
  """The decode-function contract: everything the search needs from a model (a hashable tuple of
  callables, so it can be a static argument of ``jit``; build it once and pass the same object).

  Q queries, B beams per query, L tokens per level, M levels. ``queries`` and ``context`` are pytrees whose
  leaves all have leading dim Q; ``cache`` is a pytree whose leaves all have leading dims [Q, B] (the search
  reorders it along axis 1).

  init(params, queries) -> context: per-query work done once (encoder, cross-attention keys/values).
  init_cache(num_queries, beam_size) -> cache: the empty decoding cache, zeros, every leaf [Q, B, ...].
  step(params, context, cache, prev_tokens, t) -> (logits, cache): logits (float [Q, B, L]) of
    identifier token t given tokens 0..t-1, and the updated cache. ``prev_tokens`` is int32 [Q, B], token
    t-1 of every beam (ignored at t = 0); ``t`` is a Python int, or a traced int32 scalar where the
    search scans its levels (``loop``), so a step must accept both.
  """
  init: Any
  init_cache: Any
  step: Any


class SearchResult(NamedTuple):
  """Per query: the top-K images and the identifiers they came from.

  image_ids: int32 [Q, K], best first, -1 where fewer than K images were found.
  scores: float32 [Q, K], the log-probability of each image's identifier; -inf where image_ids is -1.
  identifiers: int32 [Q, B, M], the final beams' (or, for the exhaustive search, the top identifiers')
    tokens, best first; meaningless where identifier_scores is -inf.
  identifier_scores: float32 [Q, B], their log-probabilities; -inf for dead beams.
  pruned_bound: float32 [Q], an upper bound on the log-probability of every valid identifier the
    search did not return: the best legal candidate it dropped at any step (log-probabilities only
    decrease along a prefix). -inf when nothing legal was dropped (and for the exhaustive search).
    Where the K-th image's score is above it, the result is provably the exact top-K (``certified``).
  """
  image_ids: jax.Array
  scores: jax.Array
  identifiers: jax.Array
  identifier_scores: jax.Array
  pruned_bound: jax.Array


class PrefixClasses(NamedTuple):
  """A search within one class's part of the index: an identifier is allowed when the class of each of
  its first D prefixes is the query's ``target`` (the prefixes' classes: ``decoding.hedge``).

  tables: D int32 arrays, ``tables[t]`` the class of every depth-(t + 1) node of the index (every
    prefix of t + 1 tokens), as long as the index's ``child_token[t]`` (padded the same way; -1: none,
    never a target); ``hedge.node_classes`` builds them, D up to M.
  target: int32 [Q], each query's class.
  """
  tables: tuple
  target: jax.Array


def child_classes(index: IndexArrays, table: jax.Array, t: int, node: jax.Array,
                  alive: jax.Array) -> jax.Array:
  """int32 [Q, B, L]: the class (``table``, per depth-(t + 1) node) of the child of every beam's node
  (``node`` int32 [Q, B], at depth t) by every token; -1 where that child does not exist (or the beam
  is dead). The child's id is its rank among the node's children plus the node's first child's: at a
  dense level a running count over the mask's bits, at a sparse one the slot of the token."""
  num_tokens = index.num_tokens
  if index.masks[t] is not None:
    legal = _legal_tokens(index.masks[t][node], num_tokens) & alive[..., None]
    child = index.first_child[t][node][..., None] + jnp.cumsum(legal, axis=-1, dtype=jnp.int32) - 1
    return jnp.where(legal, table[jnp.where(legal, child, 0)], -1)
  toks, used, child = _sparse_slots(index.first_child[t], index.child_token[t], index.max_fanout[t],
                                    node, alive)
  cls = jnp.where(used, table[jnp.where(used, child, 0)], -1)                 # [Q, B, F]
  return _slot_values_per_token(toks, used, cls, num_tokens, -1)


def _allowed(classes: PrefixClasses, index: IndexArrays, beams: "_Beams", t: int) -> jax.Array:
  """bool [Q, B, L] (B = 1 at the root): the tokens at level t whose prefix, the beam's tokens 0..t-1
  plus the token, has the query's class."""
  cls = child_classes(index, classes.tables[t], t, beams.node, beams.alive)
  return cls == classes.target[:, None, None]


def _num_queries(queries: Any) -> int:
  leaves = jax.tree.leaves(queries)
  if not leaves:
    raise ValueError("queries is an empty pytree; expected arrays with a leading query dimension.")
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
        f"Every leaf of queries needs the same leading (query) dim; got {sorted(map(str, sizes))}.")
  return sizes.pop()


def _legal_tokens(rows: jax.Array, num_tokens: int) -> jax.Array:
  """bool [..., L] from mask rows uint32 [..., W]: bit c % 32 of word c // 32."""
  bits = (rows[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
  return bits.reshape(*rows.shape[:-1], rows.shape[-1] * 32)[..., :num_tokens].astype(bool)


# Sparse levels with at most this many child slots build the legal mask by comparison ([Q, B, F, L]
# booleans, vectorizes well); wider ones scatter the F tokens instead (O(Q·B·F)).
_COMPARE_MAX_FANOUT = 8


def _sparse_slots(first_child: jax.Array, child_token: jax.Array, fanout: int, node: jax.Array,
                  alive: jax.Array):
  """A sparse level's child slots of every beam: (tokens int32 [Q,B,F], used bool [Q,B,F], child ids
  int32 [Q,B,F]); ``fanout`` is the level's static number of slots."""
  start = first_child[node]
  count = first_child[node + 1] - start
  slot = jnp.arange(fanout, dtype=jnp.int32)
  used = (slot < count[..., None]) & alive[..., None]                          # [Q, B, F]
  child = start[..., None] + slot
  toks = child_token[jnp.where(used, child, 0)].astype(jnp.int32)
  return toks, used, child


def _slot_values_per_token(toks: jax.Array, used: jax.Array, values: jax.Array, num_tokens: int,
                           fill) -> jax.Array:
  """[Q, B, L]: each used slot's value at its token, ``fill`` elsewhere (a node's tokens are distinct)."""
  q, b, fanout = toks.shape
  if fanout <= _COMPARE_MAX_FANOUT:
    hit = (toks[..., None] == jnp.arange(num_tokens)) & used[..., None]         # [Q, B, F, L]
    if values.dtype == bool:   # the legal mask (values = used): a reduction XLA vectorizes well
      return hit.any(axis=2)
    return jnp.where(hit, values[..., None], fill).max(axis=2)
  return jnp.full((q, b, num_tokens), fill, values.dtype).at[
      jnp.arange(q)[:, None, None], jnp.arange(b)[None, :, None], jnp.where(used, toks, num_tokens)
  ].set(values, mode="drop")


def _sparse_children(first_child: jax.Array, child_token: jax.Array, fanout: int, num_tokens: int,
                     node: jax.Array, alive: jax.Array):
  """A sparse level's children of every beam: (legal bool [Q,B,L], tokens int32 [Q,B,F], used [Q,B,F]).

  ``first_child``/``child_token`` are the level's tables, ``fanout`` its static number of child slots."""
  toks, used, _ = _sparse_slots(first_child, child_token, fanout, node, alive)
  return _slot_values_per_token(toks, used, used, num_tokens, False), toks, used


def _reorder(cache: Any, beam_idx: jax.Array, mode: str) -> Any:
  """Every cache leaf [Q, B, ...] reordered along the beam axis: out[q, b] = leaf[q, beam_idx[q, b]]."""
  q = jnp.arange(beam_idx.shape[0])[:, None]

  def one(x):
    if mode == "one_hot" and jnp.issubdtype(x.dtype, jnp.floating):
      # A [B, B] permutation matmul per query: MXU-friendly on TPU; HIGHEST keeps it an exact copy.
      sel = jax.nn.one_hot(beam_idx, x.shape[1], dtype=x.dtype)
      return jnp.einsum("qbc,qc...->qb...", sel, x, precision=jax.lax.Precision.HIGHEST)
    return x[q, beam_idx]
  return jax.tree.map(one, cache)


def _check_logits(logits: jax.Array, q: int, b: int, num_tokens: int, t: int) -> None:
  if logits.shape != (q, b, num_tokens):
    raise ValueError(f"decode_fns.step(t={t}) returned logits of shape {logits.shape}; expected "
                     f"[Q={q}, B={b}, L={num_tokens}] (L from the index).")


def beam_widths(beam_size: int | tuple[int, ...], num_levels: int) -> tuple[int, ...]:
  """The beams kept after each of the M levels: ``B`` for every level, or a tuple of M widths (e.g. a
  search that widens its last levels so that its list holds more identifiers)."""
  widths = ((beam_size,) * num_levels if isinstance(beam_size, int) else
            tuple(beam_size) if isinstance(beam_size, tuple) else ())
  if len(widths) != num_levels or not all(
      isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
    raise ValueError(f"beam_size must be a positive int (or a tuple of {num_levels} of them, one per "
                     f"level); got {beam_size!r}.")
  return widths


LOOP_MODES = ("auto", "unroll", "scan")
# loop="auto" scans a run of levels at least this long (long identifiers); shorter ones are unrolled,
# where every step is its own program with a static cache slice (faster for short M; benchmarks/
# beam_search.py --parts length measures both).
SCAN_MIN_LEVELS = 8


def scanned_levels(index: IndexArrays, widths: tuple[int, ...], loop: str) -> tuple[int, int]:
  """The levels [s0, s1) that ``loop`` runs as one ``lax.scan`` ((0, 0): none): the longest run of sparse
  levels after the root that keep the width their beams come in with (a scan's carry has one shape)."""
  if loop == "unroll":
    return 0, 0
  best, t, m = (0, 0), 1, index.num_levels
  while t < m:
    if index.masks[t] is not None or widths[t] != widths[t - 1]:
      t += 1
      continue
    end = t
    while end < m and index.masks[end] is None and widths[end] == widths[t - 1]:
      end += 1
    if end - t > best[1] - best[0]:
      best = (t, end)
    t = end
  if best[1] - best[0] < (1 if loop == "scan" else SCAN_MIN_LEVELS):
    return 0, 0
  return best


def _stacked_levels(index: IndexArrays, s0: int, s1: int):
  """Levels [s0, s1)'s sparse tables stacked for a scan: first_child int32 [S, n+1] (padded with each
  level's last value: padded nodes have no children), child_token [S, c] (padded with 0), and one
  fan-out bound, the largest of the levels'."""
  fc = [index.first_child[t] for t in range(s0, s1)]
  ct = [index.child_token[t] for t in range(s0, s1)]
  n, c = max(f.shape[0] for f in fc), max(max(x.shape[0] for x in ct), 1)
  fc = jnp.stack([jnp.concatenate([f, jnp.broadcast_to(f[-1:], (n - f.shape[0],))]) for f in fc])
  ct = jnp.stack([jnp.concatenate([x, jnp.zeros((c - x.shape[0],), x.dtype)]) for x in ct])
  return fc, ct, max(index.max_fanout[s0:s1])


class _Beams(NamedTuple):
  """The beam loop's state: Q queries x B beams (B = 1 before the root's step)."""
  cache: Any
  node: jax.Array      # int32 [Q, B]: the index node of each beam's prefix
  alive: jax.Array     # bool [Q, B]
  scores: jax.Array    # float32 [Q, B]
  tokens: jax.Array    # int32 [Q, B, M]
  prev: jax.Array      # int32 [Q, B]: the last token
  bound: jax.Array     # float32 [Q]: the best legal candidate dropped so far
  stray: jax.Array     # bool [Q, B]: a ``fill`` search's prefixes that left the query's class


def _level(decode_fns: DecodeFns, params: Any, context: Any, beams: _Beams, t: Any, w: int,
           num_tokens: int, legal_of, child_of, reorder_cache: bool, reorder: str,
           allowed: jax.Array | None = None, fill: bool = False) -> _Beams:
  """One level: decode, mask, keep the W best of B x L candidates, follow them in the index.

  ``legal_of(node, alive) -> (legal [Q,B,L], aux)`` and ``child_of(aux, parent, beam_idx, tok) -> rank``
  are the level's index lookups (dense bit masks or sparse child lists; ``None`` unconstrained); ``t``
  an int or, inside a scan, a traced scalar; ``allowed`` (bool [Q, B or 1, L]) narrows the beams' legal
  tokens further (a level of a ``PrefixClasses`` search), or with ``fill`` ranks the others below every
  allowed one (``OUT_OF_CLASS``, once per prefix: a stray stays one)."""
  q, b = beams.node.shape
  rows_q = jnp.arange(q)[:, None]
  logits, cache = decode_fns.step(params, context, beams.cache, beams.prev, t)
  _check_logits(logits, q, b, num_tokens, t)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if legal_of is None:
    legal, aux = jnp.broadcast_to(beams.alive[..., None], logp.shape), None
  else:
    legal, aux = legal_of(beams.node, beams.alive)
  strays = None
  if allowed is not None and fill:
    strays = beams.stray[..., None] | ~allowed                       # [Q, B, L]
    logp = logp - jnp.where(strays & ~beams.stray[..., None], OUT_OF_CLASS, 0.0)
    strays = strays.reshape(q, b * num_tokens)
  elif allowed is not None:
    legal = legal & allowed
  cand = (beams.scores[..., None] + jnp.where(legal, logp, ILLEGAL_LOGPROB)).reshape(q, b * num_tokens)
  legal_flat = legal.reshape(q, b * num_tokens)
  if b * num_tokens < w + 1:  # fewer candidates than kept: the missing ones are dead beams
    pad = w + 1 - b * num_tokens
    cand = jnp.concatenate([cand, jnp.full((q, pad), -jnp.inf, cand.dtype)], axis=1)
    legal_flat = jnp.concatenate([legal_flat, jnp.zeros((q, pad), bool)], axis=1)
    if strays is not None:
      strays = jnp.concatenate([strays, jnp.zeros((q, pad), bool)], axis=1)
  # One candidate more than kept: the best dropped one bounds every identifier below it. The barrier
  # keeps XLA's CPU backend on its partial-sort top-k: it lowers top_k to a full sort plus a slice and
  # turns that back into a top-k only when a single slice reads the result, and here two do (the W
  # kept, the one dropped). Without it a [256, 100 x 256] level ran a full sort, 1.6 s instead of
  # 23 ms, and the evaluate stage's search took 2.4x as long; the values are the same.
  top, flat = jax.lax.optimization_barrier(jax.lax.top_k(cand, w + 1))
  dropped = jnp.take_along_axis(legal_flat, flat[:, w:], axis=1)[:, 0]
  bound = jnp.maximum(beams.bound, jnp.where(dropped, top[:, w], -jnp.inf))
  top, flat = top[:, :w], flat[:, :w]
  alive = jnp.take_along_axis(legal_flat, flat, axis=1)
  beam_idx = jnp.minimum(flat // num_tokens, b - 1)  # padded slots are dead: any row will do
  tok = jnp.where(alive, flat % num_tokens, 0)
  scores = jnp.where(alive, top, -jnp.inf)
  if legal_of is None:
    node = jnp.zeros((q, w), jnp.int32)
  else:
    parent = jnp.where(alive, beams.node[rows_q, beam_idx], 0)
    node = jnp.where(alive, child_of(aux, parent, beam_idx, tok), 0)
  tokens = beams.tokens[rows_q, beam_idx]
  tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[..., None], t, axis=2)
  stray = beams.stray[rows_q, beam_idx] if strays is None else jnp.take_along_axis(strays, flat, axis=1)
  if reorder_cache:
    cache = _reorder(cache, beam_idx, reorder)
  return _Beams(cache, node, alive, scores, tokens, tok, bound, stray & alive)


def _dense_lookups(masks: jax.Array, word_rank: jax.Array, first_child: jax.Array, num_tokens: int):
  def legal_of(node, alive):
    rows = masks[node]                                          # [Q, B, W]: one gather per beam
    return _legal_tokens(rows, num_tokens) & alive[..., None], rows

  def child_of(rows, parent, beam_idx, tok):
    # rank of tok among the parent's set bits: running count of earlier words + one popcount
    rows_q = jnp.arange(parent.shape[0])[:, None]
    word = tok >> 5
    word_bits = jnp.take_along_axis(rows[rows_q, beam_idx], word[..., None], axis=-1)[..., 0]
    below = word_bits & ((jnp.uint32(1) << (tok & 31).astype(jnp.uint32)) - jnp.uint32(1))
    rank = word_rank[parent, word].astype(jnp.int32) + jax.lax.population_count(below).astype(jnp.int32)
    return first_child[parent] + rank
  return legal_of, child_of


def _sparse_lookups(first_child: jax.Array, child_token: jax.Array, fanout: int, num_tokens: int):
  def legal_of(node, alive):
    legal, toks, used = _sparse_children(first_child, child_token, fanout, num_tokens, node, alive)
    return legal, (toks, used)

  def child_of(aux, parent, beam_idx, tok):
    # rank of tok among the parent's (sorted) child tokens
    toks, used = aux
    rows_q = jnp.arange(parent.shape[0])[:, None]
    sel_toks, sel_used = toks[rows_q, beam_idx], used[rows_q, beam_idx]
    return first_child[parent] + ((sel_toks < tok[..., None]) & sel_used).sum(-1, dtype=jnp.int32)
  return legal_of, child_of


def _decode(decode_fns: DecodeFns, params: Any, index: IndexArrays, queries: Any,
            beam_size: int | tuple[int, ...], constrained: bool, reorder: str, loop: str,
            classes: PrefixClasses | None = None, fill: bool = False):
  """The beam loop. Returns (tokens int32 [Q,W,M], leaf ids int32 [Q,W], scores f32 [Q,W], alive [Q,W],
  pruned_bound f32 [Q]) with W the last level's width.

  Levels are unrolled (each its own program, static shapes), except the run ``scanned_levels`` picks,
  which is one ``lax.scan`` over stacked sparse tables (the program's size stays flat in M)."""
  q, m, num_tokens = _num_queries(queries), index.num_levels, index.num_tokens
  widths = beam_widths(beam_size, m)
  depth = len(classes.tables) if classes is not None else 0
  s0, s1 = scanned_levels(index, widths, loop) if constrained else (0, 0)
  context = decode_fns.init(params, queries)
  # Level 0 decodes the root once per query (every beam would see the same prefix); its W best tokens
  # become the beams, gathered from that one row.
  beams = _Beams(cache=decode_fns.init_cache(q, 1), node=jnp.zeros((q, 1), jnp.int32),
                 alive=jnp.ones((q, 1), bool), scores=jnp.zeros((q, 1), jnp.float32),
                 tokens=jnp.zeros((q, 1, m), jnp.int32), prev=jnp.zeros((q, 1), jnp.int32),
                 bound=jnp.full((q,), -jnp.inf, jnp.float32), stray=jnp.zeros((q, 1), bool))

  def lookups(t):
    if not constrained:
      return None, None
    if index.masks[t] is not None:
      return _dense_lookups(index.masks[t], index.word_rank[t], index.first_child[t], num_tokens)
    return _sparse_lookups(index.first_child[t], index.child_token[t], index.max_fanout[t], num_tokens)

  def unrolled(beams, t):
    legal_of, child_of = lookups(t)
    # The last step's cache is never read.
    return _level(decode_fns, params, context, beams, t, widths[t], num_tokens, legal_of, child_of,
                  t + 1 < m, reorder, _allowed(classes, index, beams, t) if t < depth else None, fill)

  for t in range(s0):
    beams = unrolled(beams, t)
  if s1 > s0:
    fc, ct, fanout = _stacked_levels(index, s0, s1)
    # A class-restricted search scans too (identifiers of 64+ tokens restricted at every level): each
    # scanned level's node classes, stacked and padded like its child tokens (-1), and whether the
    # level is restricted at all.
    cls = jnp.stack([jnp.pad(classes.tables[t] if t < depth else jnp.zeros((0,), jnp.int32),
                             (0, ct.shape[1] - (classes.tables[t].shape[0] if t < depth else 0)),
                             constant_values=-1) for t in range(s0, s1)]) if depth > s0 else None
    restricted = jnp.arange(s0, s1) < depth

    def body(beams, xs):
      level, first_child, child_token, table, restrict = xs
      legal_of, child_of = _sparse_lookups(first_child, child_token, fanout, num_tokens)
      allowed = None
      if table is not None:
        toks, used, child = _sparse_slots(first_child, child_token, fanout, beams.node, beams.alive)
        ok = used & (table[jnp.where(used, child, 0)] == classes.target[:, None, None])
        allowed = _slot_values_per_token(toks, ok, ok, num_tokens, False) | ~restrict
      # The scan reorders the cache at every level (its body is one program); after the last level
      # of the search the reorder is wasted, once.
      return _level(decode_fns, params, context, beams, level, widths[s0], num_tokens, legal_of,
                    child_of, True, reorder, allowed, fill), None
    beams, _ = jax.lax.scan(body, beams, (jnp.arange(s0, s1, dtype=jnp.int32), fc, ct, cls, restricted))
  for t in range(s1, m):   # s0 = s1 = 0 when nothing is scanned: every level here
    beams = unrolled(beams, t)
  leaves = beams.node if constrained else jnp.full(beams.node.shape, -1, jnp.int32)
  return beams.tokens, leaves, beams.scores, beams.alive, beams.bound


def _expand(leaves: jax.Array, scores: jax.Array, alive: jax.Array, offsets: jax.Array,
            image_ids: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
  """Identifiers (best first) → their images, cut at K: ids int32 [Q, K] (-1 pad), scores [Q, K] (-inf pad).

  Output slot k belongs to the first beam whose cumulative image count exceeds k (a searchsorted over B),
  so the work is O(Q·K·B), independent of how many images an identifier has.
  """
  b = leaves.shape[1]
  leaves = jnp.where(alive, leaves, 0)
  start = offsets[leaves]
  count = jnp.where(alive, offsets[leaves + 1] - start, 0)
  cum = jnp.cumsum(count, axis=1)                             # [Q, B]
  slots = jnp.arange(top_k, dtype=cum.dtype)
  beam = jax.vmap(lambda c: jnp.searchsorted(c, slots, side="right", method="compare_all"))(cum)
  found = beam < b                                            # [Q, K]
  beam = jnp.minimum(beam, b - 1)
  before = jnp.take_along_axis(cum - count, beam, axis=1)
  pos = jnp.take_along_axis(start, beam, axis=1) + (slots - before)
  ids = jnp.where(found, image_ids[jnp.where(found, pos, 0)], -1)
  return ids.astype(jnp.int32), jnp.where(found, jnp.take_along_axis(scores, beam, axis=1), -jnp.inf)


def _check_classes(classes: PrefixClasses, q: int, index: IndexArrays, constrained: bool) -> None:
  if not constrained:
    raise ValueError("classes need the index's constraint (constrained=True): the prefixes' classes are "
                     "its nodes'.")
  shapes = [tuple(x.shape) for x in classes.tables]
  want = [tuple(x.shape) for x in index.child_token]
  if not 1 <= len(shapes) <= len(want) or shapes != want[:len(shapes)]:
    raise ValueError(f"classes.tables must be 1..{len(want)} int arrays shaped like the index's "
                     f"child_token tables {want} (one class per node, hedge.node_classes); got {shapes}.")
  if tuple(classes.target.shape) != (q,):
    raise ValueError(f"classes.target must be int [Q={q}]; got shape {tuple(classes.target.shape)}.")


def _check_static(top_k: int, reorder: str, loop: str) -> None:
  """The static arguments but ``beam_size`` (``beam_widths`` checks it against the index's M)."""
  if not isinstance(top_k, int) or top_k < 1:
    raise ValueError(f"top_k must be a positive int; got {top_k!r}.")
  if reorder not in REORDER_MODES:
    raise ValueError(f"reorder must be one of {REORDER_MODES}; got {reorder!r}.")
  if loop not in LOOP_MODES:
    raise ValueError(f"loop must be one of {LOOP_MODES}; got {loop!r}.")


@functools.partial(jax.jit, static_argnames=("decode_fns", "beam_size", "top_k", "reorder", "constrained",
                                             "loop", "fill"))
def beam_search(decode_fns: DecodeFns, params: Any, index: IndexArrays, queries: Any, *, beam_size: int,
                top_k: int, reorder: str = "gather", constrained: bool = True,
                loop: str = "auto", classes: PrefixClasses | None = None,
                fill: bool = False) -> SearchResult:
  """Constrained beam search: the top-K database images of every query.

  Args:
    decode_fns: the model's decode functions (``DecodeFns``); static, so pass the same object every call.
    params: the model parameters (any pytree; passed to ``init`` and ``step``).
    index: ``IndexArrays`` (``Index.device_arrays()``); an argument, never a compiled-in constant.
    queries: pytree, every leaf [Q, ...] (e.g. images float32 [Q, H, W, C]).
    beam_size: B, beams per query (static); or M widths, the beams kept after each level
      (``beam_widths``), e.g. ``(30, 30, 100, 100)`` to list at least ~100 identifiers at beam 30.
    top_k: K, images returned per query (static).
    reorder: how caches follow their beams: "gather" (default) or "one_hot" (a permutation einsum).
    constrained: False skips the index (every token legal; identifiers may not exist, no images are
      returned): only to measure the constraint's cost.
    loop: how the M steps run: "unroll" (a Python loop under ``jit``: one small program per step,
      static cache slices), "scan" (the longest run of sparse, equal-width levels as one ``lax.scan``:
      program size and compile time flat in M, for 64-256-token identifiers), or "auto" (scan only a
      run of at least ``SCAN_MIN_LEVELS`` levels). Both give the same search up to float rounding.
    classes: optional ``PrefixClasses``: only identifiers whose first D prefixes (D <= M) have the
      query's class (on top of the index's constraint), e.g. the search within one class
      (``decoding.hedge``). The pruned bound then covers only the identifiers it allows.
    fill: with ``classes``, the identifiers they do not allow are not dropped but ranked after every
      allowed one, their scores lowered by ``OUT_OF_CLASS`` (static): a class holding fewer than K
      images still lists K, its own first. The allowed identifiers, their order and scores are the
      search without ``fill``'s (out-of-class beams take only the places no allowed prefix fills);
      the bound is then over every identifier, in these scores.
  Returns:
    ``SearchResult``: image_ids int32 [Q, K], scores float32 [Q, K], identifiers int32 [Q, W, M],
    identifier_scores float32 [Q, W] (W: the last level's width); beams in score order, each
    identifier's images in database order.
  """
  _check_static(top_k, reorder, loop)
  beam_widths(beam_size, index.num_levels)
  if classes is not None:
    _check_classes(classes, _num_queries(queries), index, constrained)
  tokens, leaves, scores, alive, bound = _decode(decode_fns, params, index, queries, beam_size,
                                                 constrained, reorder, loop, classes,
                                                 fill and classes is not None)
  if constrained:
    ids, image_scores = _expand(leaves, scores, alive, index.offsets, index.image_ids, top_k)
  else:
    q = tokens.shape[0]
    ids, image_scores = jnp.full((q, top_k), -1, jnp.int32), jnp.full((q, top_k), -jnp.inf, jnp.float32)
  return SearchResult(ids, image_scores, tokens, scores, bound)


def certified(image_scores: Any, pruned_bound: Any) -> np.ndarray:
  """bool [Q]: results provably equal to the exact top-K (``exhaustive_search``).

  Every identifier a search dropped scores at most ``pruned_bound``; when the K-th returned image's
  identifier scores strictly more, nothing dropped could have entered the top K. With fewer than K
  images returned, only a search that dropped nothing is exact.
  """
  last = np.asarray(image_scores)[:, -1]
  bound = np.asarray(pruned_bound)
  return np.where(np.isfinite(last), last > bound, bound == -np.inf)


# ------------------------------------------------------------------------------------------ exhaustive


def _score_chunk(decode_fns: DecodeFns, params: Any, context: Any, ids: jax.Array, q: int,
                 num_tokens: int) -> jax.Array:
  """Teacher-forced log-probabilities f32 [Q, C] of C identifiers ``ids`` int32 [C, M] (as C "beams")."""
  c, m = ids.shape
  cache = decode_fns.init_cache(q, c)
  total = jnp.zeros((q, c), jnp.float32)
  for t in range(m):
    prev = jnp.broadcast_to(ids[:, t - 1] if t else jnp.zeros((c,), jnp.int32), (q, c))
    logits, cache = decode_fns.step(params, context, cache, prev, t)
    _check_logits(logits, q, c, num_tokens, t)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    total = total + jnp.take_along_axis(logp, jnp.broadcast_to(ids[:, t], (q, c))[..., None], axis=-1)[..., 0]
  return total


def _chunks(identifiers: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  """identifiers [U, M] → [U'/C, C, M] padded with copies of row 0, and the validity mask [U'/C, C]."""
  u = identifiers.shape[0]
  n = max(1, -(-u // chunk))
  pad = n * chunk - u
  ids = jnp.concatenate([identifiers, jnp.broadcast_to(identifiers[:1], (pad, identifiers.shape[1]))])
  valid = jnp.arange(n * chunk) < u
  return ids.reshape(n, chunk, -1).astype(jnp.int32), valid.reshape(n, chunk)


@functools.partial(jax.jit, static_argnames=("decode_fns", "num_tokens", "chunk"))
def score_identifiers(decode_fns: DecodeFns, params: Any, queries: Any, identifiers: jax.Array, *,
                      num_tokens: int, chunk: int = 256) -> jax.Array:
  """The log-probability of every identifier for every query: float32 [Q, U] (teacher forcing).

  ``identifiers`` int32 [U, M] (e.g. ``Index.identifiers()``), scored ``chunk`` at a time (sequentially,
  so memory is O(Q · chunk) activations plus the [Q, U] result).
  """
  if identifiers.shape[0] == 0:
    return jnp.zeros((_num_queries(queries), 0), jnp.float32)
  q = _num_queries(queries)
  context = decode_fns.init(params, queries)
  ids, _ = _chunks(identifiers, chunk)
  out = jax.lax.map(lambda c: _score_chunk(decode_fns, params, context, c, q, num_tokens), ids)
  return jnp.moveaxis(out, 0, 1).reshape(q, -1)[:, :identifiers.shape[0]]


@functools.partial(jax.jit, static_argnames=("decode_fns", "top_k", "chunk"))
def exhaustive_search(decode_fns: DecodeFns, params: Any, index: IndexArrays, identifiers: jax.Array,
                      queries: Any, *, top_k: int, chunk: int = 256) -> SearchResult:
  """The exact top-K images: every identifier scored by teacher forcing (the beam search's oracle).

  ``identifiers`` int32 [U, M] must be ``Index.identifiers()`` of the index ``index`` came from (row u is
  leaf u). A running top-K over chunks of ``chunk`` identifiers keeps memory O(Q · (K + chunk)). Ties
  go to the lexicographically smaller identifier. ``identifiers``/``identifier_scores`` of the result hold
  the top min(K, U) identifiers ([Q, K, M], [Q, K]).
  """
  if not isinstance(top_k, int) or top_k < 1:
    raise ValueError(f"top_k must be a positive int; got {top_k!r}.")
  q, m = _num_queries(queries), index.num_levels
  if identifiers.ndim != 2 or identifiers.shape[1] != m:
    raise ValueError(f"identifiers must be int32 [U, M={m}]; got shape {identifiers.shape}.")
  best_leaf = jnp.zeros((q, top_k), jnp.int32)
  best_score = jnp.full((q, top_k), -jnp.inf, jnp.float32)
  best_alive = jnp.zeros((q, top_k), bool)
  if identifiers.shape[0]:
    context = decode_fns.init(params, queries)
    ids, valid = _chunks(identifiers, chunk)
    leaf = jnp.arange(ids.shape[0] * chunk, dtype=jnp.int32).reshape(ids.shape[0], chunk)

    def merge(carry, xs):
      b_leaf, b_score, b_alive = carry
      c_ids, c_valid, c_leaf = xs
      s = _score_chunk(decode_fns, params, context, c_ids, q, index.num_tokens)
      # Rank dead entries by a finite key below every real score, so they never displace one.
      all_leaf = jnp.concatenate([b_leaf, jnp.broadcast_to(c_leaf, (q, chunk))], axis=1)
      all_alive = jnp.concatenate([b_alive, jnp.broadcast_to(c_valid, (q, chunk))], axis=1)
      all_score = jnp.concatenate([b_score, s], axis=1)
      key = jnp.where(all_alive, all_score, ILLEGAL_LOGPROB)
      _, pick = jax.lax.top_k(key, top_k)
      take = lambda a: jnp.take_along_axis(a, pick, axis=1)  # noqa: E731
      alive = take(all_alive)
      return (take(all_leaf), jnp.where(alive, take(all_score), -jnp.inf), alive), None

    (best_leaf, best_score, best_alive), _ = jax.lax.scan(
        merge, (best_leaf, best_score, best_alive), (ids, valid, leaf))
  image_ids, scores = _expand(best_leaf, best_score, best_alive, index.offsets, index.image_ids, top_k)
  tokens = identifiers.astype(jnp.int32)[best_leaf] if identifiers.shape[0] else \
      jnp.zeros((q, top_k, m), jnp.int32)
  return SearchResult(image_ids, scores, tokens, best_score, jnp.full((q,), -jnp.inf, jnp.float32))


# ------------------------------------------------------------------------------------------ host wrapper


def batch_buckets(max_batch: int) -> tuple[int, ...]:
  """The padded batch sizes ``search`` compiles for: powers of two below ``max_batch``, and ``max_batch``."""
  sizes, s = [], 1
  while s < max_batch:
    sizes.append(s)
    s *= 2
  return (*sizes, max_batch)


def _batched(run: Any, queries: Any, max_batch: int, top_k: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Runs ``run(padded chunk) -> SearchResult`` over chunks of ``max_batch`` host queries; numpy
  ``(image_ids, scores, pruned_bound)``."""
  if not isinstance(max_batch, int) or max_batch < 1:
    raise ValueError(f"max_batch must be a positive int; got {max_batch!r}.")
  queries = jax.tree.map(np.asarray, queries)
  total = _num_queries(queries)
  buckets = batch_buckets(max_batch)
  pending = []
  for start in range(0, total, max_batch):
    n = min(max_batch, total - start)
    size = next(s for s in buckets if s >= n)
    # Padding repeats the chunk's first query (a real input: no NaN or degenerate-input surprises).
    chunk = jax.tree.map(
        lambda x: np.concatenate([x[start:start + n], np.repeat(x[start:start + 1], size - n, axis=0)]),
        queries)
    res = run(chunk)
    pending.append((n, res.image_ids, res.scores, res.pruned_bound))  # dispatch all before fetching
  if not pending:
    return (np.zeros((0, top_k), np.int32), np.zeros((0, top_k), np.float32),
            np.zeros((0,), np.float32))
  return tuple(np.concatenate([np.asarray(p[j])[:p[0]] for p in pending]) for j in (1, 2, 3))


def search(decode_fns: DecodeFns, params: Any, index: Any, queries: Any, *, beam_size: int, top_k: int,
           max_batch: int = 64, reorder: str = "gather") -> tuple[np.ndarray, np.ndarray]:
  """``beam_search`` over host queries of any count: chunks of ``max_batch``, each padded to a bucket.

  Batch sizes are padded to ``batch_buckets(max_batch)`` (powers of two up to ``max_batch``), so calls with
  varying numbers of queries compile at most log2(max_batch) + 1 programs.

  Args:
    index: ``IndexArrays`` (convert once with ``Index.device_arrays()`` and reuse it), or an ``Index``
      (converted, i.e. copied to the device, on every call).
    queries: numpy array (or pytree of arrays), leading dim Q >= 0.
  Returns:
    (image_ids int32 [Q, K] with -1 padding, scores float32 [Q, K] with -inf padding), numpy.
  """
  if not isinstance(index, IndexArrays):
    index = index.device_arrays()
  ids, scores, _ = _batched(lambda q: beam_search(decode_fns, params, index, q, beam_size=beam_size,
                                                  top_k=top_k, reorder=reorder),
                            queries, max_batch, top_k)
  return ids, scores


def search_exhaustive(decode_fns: DecodeFns, params: Any, index: Any, queries: Any, *, top_k: int,
                      max_batch: int = 64, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """``exhaustive_search`` (the exact top-K) over host queries of any count, like ``search``.

  ``index`` is the host ``Index`` (its identifiers are read from it).
  """
  arrays, identifiers = index.device_arrays(), jnp.asarray(index.identifiers())
  ids, scores, _ = _batched(lambda q: exhaustive_search(decode_fns, params, arrays, identifiers, q,
                                                        top_k=top_k, chunk=chunk),
                            queries, max_batch, top_k)
  return ids, scores


def search_exact(decode_fns: DecodeFns, params: Any, index: Any, queries: Any, *, top_k: int,
                 beam_size: int, max_batch: int = 64, max_beam_size: int = 1024, chunk: int = 256
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """The exact top-K (as ``search_exhaustive``) at a fraction of its cost: certified beam searches.

  Beam search at ``beam_size``, then doubled beams for the queries whose result is not ``certified``,
  up to ``max_beam_size``; queries still uncertified are scored exhaustively. Exhaustive scoring costs
  U identifiers x M steps per query; a certified beam search costs B x M. ``index`` is the host
  ``Index``. Returns ``(image_ids, scores, info)`` with ``info['certified_at']`` int [Q], the beam size
  that certified each query (0 = exhaustive).
  """
  queries = jax.tree.map(np.asarray, queries)
  total = _num_queries(queries)
  arrays = index.device_arrays()
  ids = np.full((total, top_k), -1, np.int32)
  scores = np.full((total, top_k), -np.inf, np.float32)
  certified_at = np.zeros(total, np.int64)
  todo = np.arange(total)
  b = beam_size
  while len(todo) and b <= max_beam_size:
    sub = jax.tree.map(lambda x: x[todo], queries)
    got_ids, got_scores, bound = _batched(
        lambda q: beam_search(decode_fns, params, arrays, q, beam_size=b, top_k=top_k),  # noqa: B023
        sub, max_batch, top_k)
    ok = certified(got_scores, bound) | (b >= index.num_identifiers)
    ids[todo[ok]], scores[todo[ok]], certified_at[todo[ok]] = got_ids[ok], got_scores[ok], b
    todo = todo[~ok]
    b *= 2
  if len(todo):
    sub = jax.tree.map(lambda x: x[todo], queries)
    ids[todo], scores[todo] = search_exhaustive(decode_fns, params, index, sub, top_k=top_k,
                                                max_batch=max_batch, chunk=chunk)
  return ids, scores, {"certified_at": certified_at}
