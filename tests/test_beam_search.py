"""Beam search against brute force, with a toy scorer given by random transition tables (no network).

The toy "model" hashes (query, whole prefix) into rows of random tables, carries the running hash, the
token history and a float accumulator in its cache (so a wrong cache reorder changes the scores), and is
re-implemented independently in numpy to recompute every log-probability.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from irgen_jax.decoding import beam_search as bs
from irgen_jax.decoding.index import Index, IndexArrays

V = 4093  # hash buckets of the toy tables


def _mix(x, xp):
  """A 32-bit integer hash (same in numpy and jnp: uint32 arithmetic wraps)."""
  x = x ^ (x >> 16)
  x = x * xp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * xp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def toy_params(num_tokens, seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  return {"a": (scale * rng.standard_normal((V, num_tokens))).astype(np.float32),
          "b": (scale * rng.standard_normal((V, num_tokens))).astype(np.float32),
          "w": rng.standard_normal(num_tokens).astype(np.float32)}


def make_toy_decode_fns(num_levels, counter=None):
  """Decode functions whose logits depend on the query and the whole prefix; queries are int32 [Q]."""
  m = num_levels
  coef = (np.arange(m, dtype=np.uint32) * np.uint32(2654435761) + np.uint32(12345)).astype(np.uint32)

  def init(params, queries):
    if counter is not None:
      counter.append(1)  # runs once per trace
    return {"q": _mix(queries.astype(jnp.uint32) + jnp.uint32(1), jnp)}

  def init_cache(q, b):
    return {"h": jnp.zeros((q, b), jnp.uint32), "hist": jnp.zeros((q, b, m), jnp.int32),
            "acc": jnp.zeros((q, b), jnp.float32)}

  def step(params, context, cache, prev, t):
    # t is a Python int (unrolled search) or a traced int32 scalar (scanned levels): one code path.
    q, b = prev.shape
    first = t == 0
    h = jnp.where(first, jnp.broadcast_to(context["q"][:, None], (q, b)),
                  _mix(cache["h"] * jnp.uint32(1000003) + prev.astype(jnp.uint32) + jnp.uint32(1), jnp))
    hist = jnp.where(first, cache["hist"], cache["hist"].at[:, :, jnp.maximum(t - 1, 0)].set(prev))
    acc = jnp.where(first, cache["acc"], cache["acc"] + 0.25 * prev.astype(jnp.float32))
    h2 = _mix((hist.astype(jnp.uint32) * jnp.asarray(coef)).sum(-1, dtype=jnp.uint32)
              + context["q"][:, None] + jnp.asarray(t, jnp.uint32), jnp)
    logits = (params["a"][(h % V).astype(jnp.int32)] + 0.5 * params["b"][(h2 % V).astype(jnp.int32)]
              + 0.1 * acc[..., None] * params["w"])
    return logits, {"h": h, "hist": hist, "acc": acc}

  return bs.DecodeFns(init, init_cache, step)


def numpy_logprob(params, query, identifier):
  """Log-probability (float64) of one identifier for one query: the toy model, re-implemented in numpy."""
  m = len(identifier)
  coef = (np.arange(m, dtype=np.uint32) * np.uint32(2654435761) + np.uint32(12345)).astype(np.uint32)
  qh = _mix(np.array([query], np.uint32) + np.uint32(1), np)
  h, hist, acc, total = qh, np.zeros(m, np.uint32), 0.0, 0.0
  for t in range(m):
    if t > 0:
      prev = identifier[t - 1]
      h = _mix(h * np.uint32(1000003) + np.uint32(prev) + np.uint32(1), np)
      hist[t - 1] = prev
      acc = np.float32(acc + np.float32(0.25) * np.float32(prev))
    h2 = _mix(np.array([(hist * coef).sum(dtype=np.uint32)], np.uint32) + qh + np.uint32(t), np)
    logits = (params["a"][int(h[0] % V)].astype(np.float64) + 0.5 * params["b"][int(h2[0] % V)]
              + 0.1 * float(acc) * params["w"])
    logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    total += logp[identifier[t]]
  return total


def brute_force(params, queries, index: Index, top_k):
  """Exact top-K images per query by enumeration: ids [Q, K], scores [Q, K], identifier scores [Q, U]."""
  idents = index.identifiers()
  all_scores = np.array([[numpy_logprob(params, q, u) for u in idents] for q in queries])
  ids = np.full((len(queries), top_k), -1)
  scores = np.full((len(queries), top_k), -np.inf)
  for i in range(len(queries)):
    order = np.argsort(-all_scores[i], kind="stable")
    images = [(img, all_scores[i, u]) for u in order for img in index.images_of(u)][:top_k]
    ids[i, :len(images)] = [x for x, _ in images]
    scores[i, :len(images)] = [s for _, s in images]
  return ids, scores, all_scores


def _index_cases():
  rng = np.random.default_rng(0)
  pool = rng.integers(0, 40, (9, 3))
  return {
      "random": (rng.integers(0, 40, (150, 3)), 40),                    # W = 2 words, U ~ 150
      "heavy_collisions": (pool[rng.integers(0, 9, 200)], 40),           # 9 identifiers, 200 images
      "tiny": (np.array([[3, 1, 4], [3, 1, 5], [3, 9, 2]]), 40),          # U = 3: fewer than B
      "one_image": (np.array([[7, 7, 7]]), 40),
      "narrow_prefixes": (np.concatenate([np.tile([[0, 0]], (5, 1)), rng.integers(0, 8, (40, 2))]), 8),
      "L256_M4": (rng.integers(0, 256, (120, 4)), 256),
  }


QUERIES = np.array([0, 1, 2, 17, 123456], np.int32)
TOP_K = 12
ROWS, FANOUT = 256, 64  # the M=3, L=40 cases share padded table shapes, so they share compiled programs
BEAMS = (1, 5, 160)  # 160 >= U of every M=3, L=40 case: the search must then be exact


@functools.lru_cache(maxsize=None)
def reference(name):
  """(codes, L, params, brute-force ids, scores, identifier scores) of an index case, computed once."""
  codes, l = _index_cases()[name]
  params = toy_params(l)
  return (codes, l, params, *brute_force(params, QUERIES, Index.build(codes, l), TOP_K))


def padded_arrays(index: Index) -> IndexArrays:
  """Device tables padded to ROWS rows and sparse fan-out FANOUT (Index.device_arrays pads to its buckets)."""
  def pad(a, fill=0, extra=0):
    if a is None:
      return None
    assert a.shape[0] <= ROWS + extra
    return jnp.asarray(np.concatenate([a, np.full((ROWS + extra - a.shape[0], *a.shape[1:]), fill, a.dtype)]))
  assert max(index.max_fanout(d) for d in range(index.num_levels)) <= FANOUT
  return IndexArrays(first_child=tuple(pad(f, f[-1], extra=1) for f in index.first_child),
                        child_token=tuple(pad(t) for t in index.child_token),
                        masks=tuple(pad(m) for m in index.masks),
                        word_rank=tuple(pad(r) for r in index.word_rank),
                        offsets=pad(index.offsets, index.num_images, extra=1),
                        image_ids=pad(index.image_ids, -1), num_tokens=index.num_tokens,
                        max_fanout=tuple(0 if m is not None else FANOUT for m in index.masks))


def device_tables(index: Index) -> IndexArrays:
  if index.num_levels == 3 and index.num_tokens == 40 and index.layout != "auto":
    return padded_arrays(index)
  return index.device_arrays()


@pytest.fixture(scope="module")
def toy():
  return {m: make_toy_decode_fns(m) for m in (2, 3, 4)}


def check_result(res, index, params, beam, top_k):
  """Every beam valid and distinct, scores true, images = the beams' images in order, padding."""
  valid = {tuple(x) for x in index.identifiers()}
  u = index.num_identifiers
  for i, q in enumerate(QUERIES):
    alive = np.isfinite(res.identifier_scores[i])
    # Dead beams only where fewer than B identifiers exist, and always at the end.
    assert alive.sum() == min(beam, u) and alive[:alive.sum()].all()
    beams = [tuple(x) for x in res.identifiers[i][alive]]
    assert set(beams) <= valid and len(set(beams)) == len(beams)
    np.testing.assert_allclose(res.identifier_scores[i][alive],
                               [numpy_logprob(params, q, b) for b in beams], rtol=1e-5, atol=1e-4)
    assert (np.diff(res.identifier_scores[i][alive]) <= 0).all()
    # Images: exactly the beams' images in beam order (database order within a beam), cut at K.
    images = [(img, s) for b, s in zip(beams, res.identifier_scores[i][alive]) for img in index.lookup(b)]
    images = images[:top_k]
    n = len(images)
    np.testing.assert_array_equal(res.image_ids[i, :n], [x for x, _ in images])
    np.testing.assert_array_equal(res.scores[i, :n], np.float32([s for _, s in images]))
    assert (res.image_ids[i, n:] == -1).all() and np.isneginf(res.scores[i, n:]).all()
    assert len(set(res.image_ids[i, :n])) == n


# The M=3, L=40 cases run with every level dense and every level sparse (fan-out slots scattered); the
# others with the default mixed layout (L256_M4: dense root, sparse levels below with compared slots).
CASES = [(name, layout) for name in ("random", "heavy_collisions", "tiny", "one_image")
         for layout in ("dense", "sparse")] + [("narrow_prefixes", "auto"), ("L256_M4", "auto")]


@pytest.mark.parametrize("name, layout", CASES)
def test_beam_search_against_brute_force(toy, name, layout):
  codes, l, params, want_ids, want_scores, _ = reference(name)
  index = Index.build(codes, l, layout=layout)
  m, u = codes.shape[1], index.num_identifiers
  fns, arrays = toy[m], device_tables(index)
  beams = BEAMS if (m, l) == (3, 40) else (4, u + 3) if m == 2 else (1, 12, u + 3)
  assert beams[-1] > u
  for beam in beams:
    res = jax.tree.map(np.asarray, bs.beam_search(fns, params, arrays, jnp.asarray(QUERIES),
                                                   beam_size=beam, top_k=TOP_K))
    check_result(res, index, params, beam, TOP_K)
    if beam >= u:  # enough beams to keep every prefix: the exact answer
      np.testing.assert_array_equal(res.image_ids, want_ids)
      np.testing.assert_allclose(res.scores, want_scores, rtol=1e-5, atol=1e-4)
    # The bound is sound: no identifier missing from the beams scores above it ...
    all_scores = reference(name)[5]
    for i in range(len(QUERIES)):
      kept = {tuple(x) for x in res.identifiers[i][np.isfinite(res.identifier_scores[i])]}
      missed = [all_scores[i, j] for j, x in enumerate(index.identifiers()) if tuple(x) not in kept]
      assert max(missed, default=-np.inf) <= res.pruned_bound[i] + 1e-4
    # ... so a certified result is the exact one.
    ok = bs.certified(res.scores, res.pruned_bound)
    np.testing.assert_array_equal(res.image_ids[ok], want_ids[ok])
    if name == "random" and beam == 1:  # the toy is hard enough that greedy search is not exact
      assert (res.image_ids[:, 0] != want_ids[:, 0]).any()


def test_per_level_widths(toy):
  """Widths per level: as many beams as nodes at every depth is exact; a search narrow at the top and
  widened at its last levels lists more identifiers, every one valid, scored right, bound sound."""
  codes, l, params, want_ids, want_scores, all_scores = reference("random")
  index = Index.build(codes, l)
  fns, arrays, q = toy[3], device_tables(index), jnp.asarray(QUERIES)
  n = index.nodes_per_depth
  full = bs.beam_search(fns, params, arrays, q, beam_size=(n[1], n[2], index.num_identifiers),
                        top_k=TOP_K)
  np.testing.assert_array_equal(np.asarray(full.image_ids), want_ids)
  narrow = jax.tree.map(np.asarray, bs.beam_search(fns, params, arrays, q, beam_size=2, top_k=TOP_K))
  wide = jax.tree.map(np.asarray, bs.beam_search(fns, params, arrays, q, beam_size=(2, 40, 40),
                                                  top_k=TOP_K))
  assert wide.identifiers.shape == (len(QUERIES), 40, 3)
  assert ((wide.image_ids >= 0).sum(1) >= (narrow.image_ids >= 0).sum(1)).all()
  assert ((wide.image_ids >= 0).sum(1) > 2).all()
  valid = {tuple(x) for x in index.identifiers()}
  for i, query in enumerate(QUERIES):
    alive = np.isfinite(wide.identifier_scores[i])
    beams = [tuple(x) for x in wide.identifiers[i][alive]]
    assert set(beams) <= valid and len(set(beams)) == len(beams)
    np.testing.assert_allclose(wide.identifier_scores[i][alive],
                               [numpy_logprob(params, query, b) for b in beams], rtol=1e-5, atol=1e-4)
    missed = [all_scores[i, j] for j, x in enumerate(index.identifiers()) if tuple(x) not in set(beams)]
    assert max(missed, default=-np.inf) <= wide.pruned_bound[i] + 1e-4
  with pytest.raises(ValueError, match="one per level"):
    bs.beam_search(fns, params, arrays, q, beam_size=(2, 3), top_k=TOP_K)
  with pytest.raises(ValueError, match="positive int"):
    bs.beam_search(fns, params, arrays, q, beam_size=(2, 0, 3), top_k=TOP_K)


@pytest.mark.parametrize("layout,depth", [("dense", 1), ("sparse", 1), ("dense", 2), ("sparse", 2),
                                          ("auto", 3), ("sparse", 3)])
def test_prefix_classes_search_within_the_query_class(toy, layout, depth):
  """A search within one class's prefixes (class first, the hedge's second search) is, with beams for
  every prefix, the exact top K among the identifiers whose first ``depth`` prefixes have the query's
  class; narrower, its beams all have them, and its bound covers the allowed identifiers it dropped.
  Classes are per node (every depth-d prefix its own draw), down to the identifiers at depth M = 3."""
  codes, l, params, _, _, all_scores = reference("random")
  index = Index.build(codes, l, layout=layout)
  idents = index.identifiers()
  fns, arrays, q = toy[3], device_tables(index), jnp.asarray(QUERIES)
  rng = np.random.default_rng(3)
  tables = tuple(rng.integers(-1, 3, arrays.child_token[t].shape).astype(np.int32) for t in range(depth))
  target = rng.integers(0, 3, len(QUERIES)).astype(np.int32)
  target[-1] = 7  # a class no prefix has: every beam dead, no image
  classes = bs.PrefixClasses(tuple(map(jnp.asarray, tables)), jnp.asarray(target))

  def node_of(prefix):
    node = 0
    for t, token in enumerate(prefix):
      node = index.child(t, node, int(token))
    return node

  def allowed(ident, i):
    return all(tables[t][node_of(ident[:t + 1])] == target[i] for t in range(depth))
  wide = index.num_identifiers + 3
  # (scan, at a sparse layout: the restricted levels 1..depth-1 run inside the scan)
  for beam, loop in ((4, "unroll"), (wide, "unroll"), (wide, "scan")):
    res = jax.tree.map(np.asarray, bs.beam_search(fns, params, arrays, q, beam_size=beam, top_k=TOP_K,
                                                  classes=classes, loop=loop))
    for i in range(len(QUERIES)):
      ok = np.array([allowed(x, i) for x in idents])
      alive = np.isfinite(res.identifier_scores[i])
      if beam > index.num_identifiers:
        assert alive.sum() == ok.sum()
        order = np.flatnonzero(ok)[np.argsort(-all_scores[i][ok], kind="stable")]
        want = [img for u in order for img in index.images_of(u)][:TOP_K]
        np.testing.assert_array_equal(res.image_ids[i, :len(want)], want)
        assert (res.image_ids[i, len(want):] == -1).all()
      assert all(allowed(x, i) for x in res.identifiers[i][alive])
      kept = {tuple(x) for x in res.identifiers[i][alive]}
      missed = [all_scores[i, j] for j in np.flatnonzero(ok) if tuple(idents[j]) not in kept]
      assert max(missed, default=-np.inf) <= res.pruned_bound[i] + 1e-4
    assert not np.isfinite(res.identifier_scores[-1]).any() and (res.image_ids[-1] == -1).all()
    # Filled: the same in-class list, then the out-of-class images (OUT_OF_CLASS lower, best first).
    filled = jax.tree.map(np.asarray, bs.beam_search(fns, params, arrays, q, beam_size=beam, top_k=TOP_K,
                                                     classes=classes, loop=loop, fill=True))
    for i in range(len(QUERIES)):
      own = res.image_ids[i] >= 0
      n = own.sum()
      np.testing.assert_array_equal(filled.image_ids[i, :n], res.image_ids[i, :n])
      np.testing.assert_array_equal(filled.scores[i, :n], res.scores[i, :n])
      alive = np.isfinite(filled.identifier_scores[i])
      assert alive.sum() == min(beam, index.num_identifiers)   # every beam used
      listed = sum(len(index.lookup(tuple(x))) for x in filled.identifiers[i][alive])
      assert (filled.image_ids[i] >= 0).sum() == min(TOP_K, listed)
      assert len(set(filled.image_ids[i][filled.image_ids[i] >= 0])) == min(TOP_K, listed)
      got = filled.scores[i, :min(TOP_K, listed)]
      assert (got[n:] < -bs.OUT_OF_CLASS / 2).all() and (np.diff(got) <= 0).all()
      strays = [x for x in filled.identifiers[i][alive] if not allowed(x, i)]
      np.testing.assert_allclose(filled.identifier_scores[i][alive][-len(strays) or len(alive):],
                                 [numpy_logprob(params, QUERIES[i], x) - bs.OUT_OF_CLASS for x in strays],
                                 rtol=1e-6, atol=0.02)
      if beam > index.num_identifiers:   # every identifier kept: the strays in score order (to ~0.01)
        want = np.flatnonzero(~np.array([allowed(x, i) for x in idents]))
        assert {tuple(x) for x in strays} == {tuple(idents[j]) for j in want}
        np.testing.assert_allclose([numpy_logprob(params, QUERIES[i], x) for x in strays],
                                   np.sort(all_scores[i][want])[::-1], atol=0.02)
  with pytest.raises(ValueError, match="classes.target must be int"):
    bs.beam_search(fns, params, arrays, q, beam_size=4, top_k=TOP_K,
                   classes=classes._replace(target=jnp.zeros(2, jnp.int32)))
  with pytest.raises(ValueError, match="classes.tables must be"):
    bs.beam_search(fns, params, arrays, q, beam_size=4, top_k=TOP_K,
                   classes=classes._replace(tables=(jnp.zeros((l, l), jnp.int32),)))
  with pytest.raises(ValueError, match="classes need the index's constraint"):
    bs.beam_search(fns, params, arrays, q, beam_size=4, top_k=TOP_K, classes=classes, constrained=False)


def test_compiled_search_keeps_every_top_k_a_partial_sort(toy):
  """Each level's top-(W + 1) feeds two slices (the W kept, the best dropped for the pruned bound).
  XLA's CPU backend lowers top_k to a full sort and turns it back into a partial-sort TopK only when a
  single slice reads it; without beam_search's optimization barrier every level compiled to a sort of
  all B x L candidates (1.6 s instead of 23 ms at 256 queries x 100 x 256 here). The compiled program
  returning the bound must hold TopK calls and no sort."""
  codes, l, params, *_ = reference("random")
  index = Index.build(codes, l)
  search = jax.jit(lambda q: bs.beam_search(toy[3], params, device_tables(index), q, beam_size=(2, 8, 8),
                                            top_k=TOP_K))
  hlo = search.lower(jnp.asarray(QUERIES)).compile().as_text()
  assert re.search(r'custom_call_target="TopK"', hlo), "no TopK in the compiled search"
  assert not re.search(r"\ssort\(", hlo), [line for line in hlo.splitlines() if " sort(" in line][:2]


def test_search_exact_equals_brute_force_and_certifies_some_queries_early(toy):
  codes, l, params, want_ids, want_scores, _ = reference("L256_M4")
  index = Index.build(codes, l)
  ids, scores, info = bs.search_exact(toy[4], params, index, QUERIES, top_k=TOP_K, beam_size=2,
                                      max_beam_size=16, max_batch=8)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-4)
  # Beams of 2..16 cover at most 16 of the ~120 identifiers: whatever was certified was certified by a
  # bound, not by exhausting the index; the rest went to the exhaustive scorer (0).
  assert set(info["certified_at"]) <= {0, 2, 4, 8, 16}


def test_exhaustive_scorer_against_brute_force(toy):
  codes, l, params, want_ids, want_scores, all_scores = reference("random")
  index = Index.build(codes, l)
  fns = toy[codes.shape[1]]
  idents = jnp.asarray(index.identifiers())
  got = bs.score_identifiers(fns, params, jnp.asarray(QUERIES), idents, num_tokens=l, chunk=16)
  np.testing.assert_allclose(np.asarray(got), all_scores, rtol=1e-5, atol=1e-4)
  res = bs.exhaustive_search(fns, params, index.device_arrays(), idents, jnp.asarray(QUERIES), top_k=TOP_K,
                             chunk=16)
  np.testing.assert_array_equal(np.asarray(res.image_ids), want_ids)
  np.testing.assert_allclose(np.asarray(res.scores), want_scores, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(res.identifier_scores), -np.sort(-all_scores, axis=1)[:, :TOP_K],
                             rtol=1e-5, atol=1e-4)
  # The host wrapper (5 queries padded to a batch of 8) gives the same.
  ids, scores = bs.search_exhaustive(fns, params, index, QUERIES, top_k=TOP_K, max_batch=8, chunk=16)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-4)


def test_large_beam_equals_exhaustive_scorer(toy):
  """The oracle relation used with the real model: B >= U gives exactly the exhaustive top-K."""
  codes, l = _index_cases()["heavy_collisions"]  # 9 identifiers, 200 images: K cuts inside a beam
  index = Index.build(codes, l, layout="sparse")
  params, fns, arrays = toy_params(l, seed=3), toy[3], device_tables(index)
  q = jnp.asarray(QUERIES)
  beam = bs.beam_search(fns, params, arrays, q, beam_size=160, top_k=TOP_K)
  exact = bs.exhaustive_search(fns, params, arrays, jnp.asarray(index.identifiers()), q, top_k=TOP_K,
                               chunk=16)
  np.testing.assert_array_equal(np.asarray(beam.image_ids), np.asarray(exact.image_ids))
  np.testing.assert_allclose(np.asarray(beam.scores), np.asarray(exact.scores), rtol=1e-6, atol=1e-5)
  assert (np.asarray(exact.image_ids) >= 0).all()


def test_one_hot_reorder_agrees_with_gather(toy):
  codes, l, params, *_ = reference("L256_M4")
  arrays, q = Index.build(codes, l).device_arrays(), jnp.asarray(QUERIES)
  ref = bs.beam_search(toy[4], params, arrays, q, beam_size=12, top_k=TOP_K)  # compiled above already
  one_hot = bs.beam_search(toy[4], params, arrays, q, beam_size=12, top_k=TOP_K, reorder="one_hot")
  np.testing.assert_array_equal(np.asarray(one_hot.image_ids), np.asarray(ref.image_ids))
  np.testing.assert_allclose(np.asarray(one_hot.scores), np.asarray(ref.scores), rtol=1e-6)


def test_unconstrained_mode_ignores_the_index(toy):
  codes, l = _index_cases()["tiny"]
  index = Index.build(codes, l, layout="dense")
  res = bs.beam_search(toy[3], toy_params(l), device_tables(index), jnp.asarray(QUERIES), beam_size=4,
                       top_k=12, constrained=False)
  assert np.isfinite(np.asarray(res.identifier_scores)).all()  # 4 live beams; the index has 3 identifiers
  assert (np.asarray(res.image_ids) == -1).all()


def test_search_wrapper_pads_to_buckets_without_retracing():
  codes, l = _index_cases()["random"]
  index = Index.build(codes, l)
  params, arrays = toy_params(l), index.device_arrays()
  traces = []
  fns = make_toy_decode_fns(3, counter=traces)
  queries = np.arange(40, dtype=np.int32)
  kw = dict(beam_size=4, top_k=5, max_batch=8)
  assert bs.batch_buckets(8) == (1, 2, 4, 8) and bs.batch_buckets(12) == (1, 2, 4, 8, 12)
  ref_ids, ref_scores = bs.search(fns, params, arrays, queries, **kw)  # chunks of 8: one trace
  assert len(traces) == 1
  for n in (5, 6, 7, 8, 21):  # 21 = 8 + 8 + 5: still bucket 8
    ids, scores = bs.search(fns, params, arrays, queries[:n], **kw)
    np.testing.assert_array_equal(ids, ref_ids[:n])
    np.testing.assert_array_equal(scores, ref_scores[:n])
  assert len(traces) == 1
  bs.search(fns, params, arrays, queries[:3], **kw)  # bucket 4: a second program
  bs.search(fns, params, arrays, queries[:4], **kw)
  assert len(traces) == 2
  # Per-query results do not depend on the batch a query was padded into.
  ids, _ = bs.search(fns, params, arrays, queries[:3], **kw)
  np.testing.assert_array_equal(ids, ref_ids[:3])
  empty_ids, empty_scores = bs.search(fns, params, arrays, queries[:0], **kw)
  assert empty_ids.shape == (0, 5) and empty_scores.shape == (0, 5)
  # An index that grew by a few images (here on existing identifiers) keeps its bucketed shapes: no retrace.
  grown = index.insert(codes[:3]).device_arrays()
  bs.search(fns, params, grown, queries[:8], **kw)
  assert len(traces) == 2


def test_search_finds_new_images_without_retraining(toy):
  """Inserted images are found by the unchanged model: the grown index's search = brute force on a rebuild."""
  codes, l = _index_cases()["random"]
  base = Index.build(codes, l, layout="dense")
  params, fns, q = toy_params(l), toy[3], jnp.asarray(QUERIES)
  top = np.asarray(bs.beam_search(fns, params, device_tables(base), q, beam_size=160, top_k=12).image_ids)
  # A new image on query 0's best identifier, and new identifiers.
  new = np.concatenate([codes[top[0, :1]], np.random.default_rng(9).integers(0, l, (8, 3))])
  grown = base.insert(new)
  got = bs.beam_search(fns, params, device_tables(grown), q, beam_size=160, top_k=12)
  want_ids, want_scores, _ = brute_force(params, QUERIES, Index.build(np.concatenate([codes, new]), l), 12)
  np.testing.assert_array_equal(np.asarray(got.image_ids), want_ids)
  assert len(codes) in np.asarray(got.image_ids)[0]


def test_errors_name_the_bad_value(toy):
  index = Index.build(np.array([[1, 2, 3]]), 40)
  params, fns, arrays = toy_params(40), toy[3], index.device_arrays()
  q = jnp.asarray(QUERIES)
  with pytest.raises(ValueError, match=r"beam_size must be a positive int \(or a tuple .*got 0\."):
    bs.beam_search(fns, params, arrays, q, beam_size=0, top_k=3)
  with pytest.raises(ValueError, match=r"got \(4, 0, 4\)"):
    bs.beam_search(fns, params, arrays, q, beam_size=(4, 0, 4), top_k=3)
  with pytest.raises(ValueError, match="reorder must be one of"):
    bs.beam_search(fns, params, arrays, q, beam_size=2, top_k=3, reorder="scatter")
  other_l = Index.build(np.array([[1, 2, 3]]), 64).device_arrays()
  # The root is decoded once per query (one row), so step 0's logits are [Q, 1, L].
  with pytest.raises(ValueError,
                     match=r"step\(t=0\) returned logits of shape \(5, 1, 40\); expected \[Q=5, B=1, L=64\]"):
    bs.beam_search(fns, params, other_l, q, beam_size=2, top_k=3)


# ------------------------------------------------------------------ the real decoder


def tiny_retriever(m, l, depth):
  """A real retriever (ViT of width 16 on 8x8 images, decoder of ``depth`` blocks) over M-token
  identifiers of L codes: (model, random params, 3 images, its decode functions, the rng)."""
  from irgen_jax.decoding import program
  from irgen_jax.models import retriever
  model = retriever.Model(dict(width=16, depth=1, num_heads=2, patch_size=4, image_size=8),
                          width=16, depth=depth, num_heads=2, num_levels=m, num_tokens=l)
  rng = np.random.default_rng(0)
  # Random weights straight from the parameter shapes: no compiled init (slow on a loaded CPU).
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                        retriever.param_shapes(model))
  images = jnp.asarray(rng.standard_normal((3, 8, 8, 3)), jnp.float32)
  return model, params, images, program.retriever_decode_fns(model), rng


def test_real_decoder_beam_equals_exhaustive_scorer():
  """With the real (tiny, random) retriever: B >= U gives the exhaustive scorer's top-K exactly, and the
  beams' scores are the model's own teacher-forced log-probabilities (an independent code path)."""
  m, l = 3, 16
  model, params, images, fns, rng = tiny_retriever(m, l, depth=1)
  codes = np.concatenate([rng.integers(0, l, (40, m)), np.tile(rng.integers(0, l, (1, m)), (6, 1))])
  index = Index.build(codes, l)  # 41 identifiers or fewer, one of them on 6 images
  arrays, idents = index.device_arrays(), jnp.asarray(index.identifiers())
  u = index.num_identifiers
  beam = jax.tree.map(np.asarray, bs.beam_search(fns, params, arrays, images, beam_size=u, top_k=16))
  exact = jax.tree.map(np.asarray, bs.exhaustive_search(fns, params, arrays, idents, images, top_k=16,
                                                        chunk=16))
  np.testing.assert_array_equal(beam.image_ids, exact.image_ids)
  np.testing.assert_allclose(beam.scores, exact.scores, rtol=1e-5, atol=1e-5)
  assert (exact.image_ids >= 0).all() and len(set(exact.image_ids[0])) == 16
  # Every beam is a distinct valid identifier, scored as the teacher-forced model scores it.
  assert {tuple(x) for x in beam.identifiers[0]} == {tuple(x) for x in index.identifiers()}
  teacher = jax.jit(lambda p, x, c: jax.nn.log_softmax(model.apply({"params": p}, x, c), axis=-1))
  flat = beam.identifiers.reshape(-1, m)
  logp = np.asarray(teacher(params, jnp.repeat(images, u, axis=0), jnp.asarray(flat)))
  want = np.take_along_axis(logp, flat[..., None], axis=-1)[..., 0].sum(-1).reshape(-1, u)
  np.testing.assert_allclose(beam.identifier_scores, want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Long identifiers: levels scanned (lax.scan) instead of unrolled


def test_scanned_levels_pick_the_longest_sparse_equal_width_run():
  index = Index.build(np.random.default_rng(0).integers(0, 8, (300, 10)), 8).device_arrays()
  dense = [t for t in range(10) if index.masks[t] is not None]
  assert dense and max(dense) < 4, dense   # the deep levels of 300 random codes are sparse
  widths = (4,) * 10
  s0, s1 = bs.scanned_levels(index, widths, "scan")
  assert (s0, s1) == (max(dense) + 1, 10)
  assert bs.scanned_levels(index, widths, "unroll") == (0, 0)
  assert bs.scanned_levels(index, widths, "auto") == ((s0, s1) if s1 - s0 >= bs.SCAN_MIN_LEVELS else (0, 0))
  # A widened last level ends the run (a scan's carry keeps one shape).
  assert bs.scanned_levels(index, (4,) * 9 + (16,), "scan") == (s0, 9)


@pytest.mark.parametrize("beam", [1, 6, (6,) * 10, (3, 6, 6, 6, 6, 6, 6, 6, 6, 24)])
def test_scan_equals_unroll_on_the_toy_model(beam):
  """Same model, same index: the scanned search returns the unrolled one's images, identifiers and
  scores bit for bit (the toy's arithmetic is integer hashing and the same float sums)."""
  m, l = 10, 8
  codes = np.random.default_rng(1).integers(0, l, (300, m))
  index = Index.build(codes, l)
  arrays, params, fns = index.device_arrays(), toy_params(l), make_toy_decode_fns(m)
  widths = bs.beam_widths(beam, m)
  s0, s1 = bs.scanned_levels(arrays, widths, "scan")
  assert s1 - s0 >= 5, (s0, s1)   # the scan really runs most levels
  q = jnp.asarray(QUERIES)
  got = jax.tree.map(np.asarray, bs.beam_search(fns, params, arrays, q, beam_size=beam, top_k=TOP_K,
                                                 loop="scan"))
  want = jax.tree.map(np.asarray, bs.beam_search(fns, params, arrays, q, beam_size=beam, top_k=TOP_K,
                                                  loop="unroll"))
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  assert (got.image_ids[:, 0] >= 0).all()


def test_scan_equals_unroll_with_the_real_decoder():
  """A real (tiny, random) retriever over 12-token identifiers: the scanned search's decoder step
  (traced t: the whole cache read, later positions masked) gives the unrolled search's results."""
  m, l = 12, 16
  _, params, images, fns, rng = tiny_retriever(m, l, depth=2)
  arrays = Index.build(rng.integers(0, l, (200, m)), l).device_arrays()
  s0, s1 = bs.scanned_levels(arrays, bs.beam_widths(8, m), "auto")
  assert s1 - s0 >= bs.SCAN_MIN_LEVELS   # auto scans identifiers this long
  got = jax.tree.map(np.asarray, bs.beam_search(fns, params, arrays, images, beam_size=8, top_k=8))
  want = jax.tree.map(np.asarray, bs.beam_search(fns, params, arrays, images, beam_size=8, top_k=8,
                                                  loop="unroll"))
  np.testing.assert_array_equal(got.image_ids, want.image_ids)
  np.testing.assert_array_equal(got.identifiers, want.identifiers)
  np.testing.assert_allclose(got.identifier_scores, want.identifier_scores, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="loop must be one of"):
    bs.beam_search(fns, params, arrays, images, beam_size=8, top_k=8, loop="while")
