"""Constrained beam search over the valid-identifier index, and the exhaustive scorer that is its oracle.

``beam_search`` is one jitted, pure function of (decode functions, params, index arrays, queries): batched
over queries and beams, the M identifier steps unrolled in Python under ``jit`` (every step has static
shapes), a KV cache owned by the decode functions, scores that are sums of ``log_softmax`` (the reference
multiplies raw probabilities, which underflows for long identifiers), illegal tokens masked *after*
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
    t-1 of every beam (ignored at t = 0); ``t`` is a Python int.
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


def _sparse_children(index: IndexArrays, t: int, node: jax.Array, alive: jax.Array):
  """A sparse level's children of every beam: (legal bool [Q,B,L], tokens int32 [Q,B,F], used [Q,B,F])."""
  q, b = node.shape
  fanout, num_tokens = index.max_fanout[t], index.num_tokens
  start = index.first_child[t][node]
  count = index.first_child[t][node + 1] - start
  slot = jnp.arange(fanout, dtype=jnp.int32)
  used = (slot < count[..., None]) & alive[..., None]                          # [Q, B, F]
  toks = index.child_token[t][jnp.where(used, start[..., None] + slot, 0)].astype(jnp.int32)
  if fanout <= _COMPARE_MAX_FANOUT:
    legal = ((toks[..., None] == jnp.arange(num_tokens)) & used[..., None]).any(axis=2)
  else:
    legal = jnp.zeros((q, b, num_tokens), bool).at[
        jnp.arange(q)[:, None, None], jnp.arange(b)[None, :, None], jnp.where(used, toks, num_tokens)
    ].set(True, mode="drop")
  return legal, toks, used


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


def _decode(decode_fns: DecodeFns, params: Any, index: IndexArrays, queries: Any, beam_size: int,
            constrained: bool, reorder: str):
  """The beam loop. Returns (tokens int32 [Q,B,M], leaf ids int32 [Q,B], scores f32 [Q,B], alive [Q,B],
  pruned_bound f32 [Q])."""
  q, b, m, num_tokens = _num_queries(queries), beam_size, index.num_levels, index.num_tokens
  context = decode_fns.init(params, queries)
  cache = decode_fns.init_cache(q, b)
  rows_q = jnp.arange(q)[:, None]
  # Every beam starts at the root; only beam 0 is alive, so step 0 does not pick the same token B times.
  node = jnp.zeros((q, b), jnp.int32)
  alive = jnp.zeros((q, b), bool).at[:, 0].set(True)
  scores = jnp.where(alive, 0.0, -jnp.inf).astype(jnp.float32)
  tokens = jnp.zeros((q, b, m), jnp.int32)
  prev = jnp.zeros((q, b), jnp.int32)
  bound = jnp.full((q,), -jnp.inf, jnp.float32)
  for t in range(m):
    logits, cache = decode_fns.step(params, context, cache, prev, t)
    _check_logits(logits, q, b, num_tokens, t)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    dense = index.masks[t] is not None
    if not constrained:
      legal = jnp.broadcast_to(alive[..., None], logp.shape)
    elif dense:
      rows = index.masks[t][node]                                 # [Q, B, W]: one gather per beam
      legal = _legal_tokens(rows, num_tokens) & alive[..., None]  # [Q, B, L]
    else:
      legal, child_toks, used = _sparse_children(index, t, node, alive)
    cand = scores[..., None] + jnp.where(legal, logp, ILLEGAL_LOGPROB)
    # One candidate more than kept: the best dropped one bounds every identifier below it.
    top, flat = jax.lax.top_k(cand.reshape(q, b * num_tokens), b + 1)
    dropped = jnp.take_along_axis(legal.reshape(q, b * num_tokens), flat[:, b:], axis=1)[:, 0]
    bound = jnp.maximum(bound, jnp.where(dropped, top[:, b], -jnp.inf))
    top, flat = top[:, :b], flat[:, :b]
    beam_idx, tok = flat // num_tokens, flat % num_tokens
    alive = jnp.take_along_axis(legal.reshape(q, b * num_tokens), flat, axis=1)
    scores = jnp.where(alive, top, -jnp.inf)
    if constrained:
      parent = jnp.where(alive, node[rows_q, beam_idx], 0)
      if dense:
        # rank of tok among the parent's set bits: running count of earlier words + one popcount
        word = tok >> 5
        word_bits = jnp.take_along_axis(rows[rows_q, beam_idx], word[..., None], axis=-1)[..., 0]
        below = word_bits & ((jnp.uint32(1) << (tok & 31).astype(jnp.uint32)) - jnp.uint32(1))
        rank = (index.word_rank[t][parent, word].astype(jnp.int32)
                + jax.lax.population_count(below).astype(jnp.int32))
      else:
        # rank of tok among the parent's (sorted) child tokens
        sel_toks, sel_used = child_toks[rows_q, beam_idx], used[rows_q, beam_idx]
        rank = ((sel_toks < tok[..., None]) & sel_used).sum(-1, dtype=jnp.int32)
      node = jnp.where(alive, index.first_child[t][parent] + rank, 0)
    tokens = tokens[rows_q, beam_idx].at[:, :, t].set(tok)
    prev = tok
    if t + 1 < m:  # the last step's cache is never read
      cache = _reorder(cache, beam_idx, reorder)
  leaves = node if constrained else jnp.full((q, b), -1, jnp.int32)
  return tokens, leaves, scores, alive, bound


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


def _check_static(beam_size: int, top_k: int, reorder: str) -> None:
  if not isinstance(beam_size, int) or beam_size < 1:
    raise ValueError(f"beam_size must be a positive int; got {beam_size!r}.")
  if not isinstance(top_k, int) or top_k < 1:
    raise ValueError(f"top_k must be a positive int; got {top_k!r}.")
  if reorder not in REORDER_MODES:
    raise ValueError(f"reorder must be one of {REORDER_MODES}; got {reorder!r}.")


@functools.partial(jax.jit, static_argnames=("decode_fns", "beam_size", "top_k", "reorder", "constrained"))
def beam_search(decode_fns: DecodeFns, params: Any, index: IndexArrays, queries: Any, *, beam_size: int,
                top_k: int, reorder: str = "gather", constrained: bool = True) -> SearchResult:
  """Constrained beam search: the top-K database images of every query.

  Args:
    decode_fns: the model's decode functions (``DecodeFns``); static, so pass the same object every call.
    params: the model parameters (any pytree; passed to ``init`` and ``step``).
    index: ``IndexArrays`` (``Index.device_arrays()``); an argument, never a compiled-in constant.
    queries: pytree, every leaf [Q, ...] (e.g. images float32 [Q, H, W, C]).
    beam_size: B, beams per query (static).
    top_k: K, images returned per query (static).
    reorder: how caches follow their beams: "gather" (default) or "one_hot" (a permutation einsum).
    constrained: False skips the index (every token legal; identifiers may not exist, no images are
      returned): only to measure the constraint's cost.
  Returns:
    ``SearchResult``: image_ids int32 [Q, K], scores float32 [Q, K], identifiers int32 [Q, B, M],
    identifier_scores float32 [Q, B]; beams in score order, each identifier's images in database order.
  """
  _check_static(beam_size, top_k, reorder)
  tokens, leaves, scores, alive, bound = _decode(decode_fns, params, index, queries, beam_size,
                                                 constrained, reorder)
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
