"""Property tests (hypothesis) of the index, the beam search and the metrics, on generated inputs.

- Index: any codes build a consistent index whose tables give every image back its identifier, whose
  lookups list each identifier's images in database order, and whose insert equals a rebuild.
- Beam search: with as many beams as nodes at every depth it is exact (brute force over a toy model
  with no network); at any widths every beam is a valid identifier with its true log-probability.
- Metrics: bounds and monotonicity that hold for any ranking.
- Identifier diagnostics: prefix purity equals a count by dictionary, for any codes and labels.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from irgen_jax import identifiers
from irgen_jax.decoding import beam_search as bs
from irgen_jax.decoding.index import Index, IndexArrays
from irgen_jax.evaluators import metrics as M

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def code_arrays(draw, max_images=80, max_levels=4, max_tokens=300):
  m = draw(st.integers(1, max_levels))
  l = draw(st.integers(2, max_tokens))
  # Few distinct tokens sometimes, so prefixes are shared and identifiers collide.
  top = draw(st.sampled_from([2, 3, l]))
  codes = draw(hnp.arrays(np.int64, st.tuples(st.integers(0, max_images), st.just(m)),
                          elements=st.integers(0, min(top, l) - 1)))
  return codes, l


@FAST
@given(code_arrays(), st.sampled_from(["auto", "dense", "sparse"]))
def test_index_gives_every_image_its_identifier(case, layout):
  codes, l = case
  index = Index.build(codes, l, layout=layout)
  assert index.check_consistency() is None
  np.testing.assert_array_equal(index.codes(), codes)
  assert index.num_identifiers == len({tuple(c) for c in codes.tolist()})
  for u, ident in enumerate(index.identifiers()):
    want = np.flatnonzero((codes == ident).all(axis=1))
    np.testing.assert_array_equal(index.lookup(ident), want)   # database order
    np.testing.assert_array_equal(index.images_of(u), want)


@FAST
@given(code_arrays(max_images=40), st.integers(0, 40), st.data())
def test_insert_equals_rebuild(case, n_new, data):
  codes, l = case
  new = data.draw(hnp.arrays(np.int64, (n_new, codes.shape[1]), elements=st.integers(0, l - 1)))
  inserted = Index.build(codes, l).insert(new)
  rebuilt = Index.build(np.concatenate([codes, new]), l)
  for a, b in zip(inserted._named_arrays(), rebuilt._named_arrays()):
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


# --- beam search over a toy model: logits a fixed function of (query, prefix) -----------------------

L, LEVELS, ROWS = 6, 3, 64


def toy_fns():
  table = np.random.default_rng(0).standard_normal((7919, L)).astype(np.float32) * 2

  def init(params, queries):
    return {"q": queries.astype(jnp.int32)}

  def init_cache(q, b):
    return {"h": jnp.zeros((q, b), jnp.int32)}

  def step(params, context, cache, prev, t):
    q, b = prev.shape
    h = (cache["h"] * 31 + jnp.where(t > 0, prev + 1, 0) + context["q"][:, None] * 7 + t) % 7919
    return params[h], {"h": h}

  return bs.DecodeFns(init, init_cache, step), jnp.asarray(table)


FNS, PARAMS = toy_fns()


def toy_logprob(query, ident):
  h, total = 0, 0.0
  table = np.asarray(PARAMS, np.float64)
  for t, tok in enumerate(ident):
    h = (h * 31 + (ident[t - 1] + 1 if t else 0) + query * 7 + t) % 7919
    logits = table[h]
    total += logits[tok] - logits.max() - np.log(np.exp(logits - logits.max()).sum())
  return total


def padded(index: Index) -> IndexArrays:
  """Tables padded to fixed shapes, so every example runs the same compiled search."""
  def pad(a, fill=0, extra=0):
    if a is None:
      return None
    return jnp.asarray(np.concatenate([a, np.full((ROWS + extra - a.shape[0], *a.shape[1:]), fill, a.dtype)]))
  return IndexArrays(first_child=tuple(pad(f, f[-1], extra=1) for f in index.first_child),
                     child_token=tuple(pad(t) for t in index.child_token),
                     masks=tuple(pad(m) for m in index.masks), word_rank=tuple(pad(r) for r in index.word_rank),
                     offsets=pad(index.offsets, index.num_images, extra=1),
                     image_ids=pad(index.image_ids, -1), num_tokens=L, max_fanout=(0,) * LEVELS)


# A few width schedules (each one compiled program): narrow, widening, narrowing, uneven.
WIDTHS = [(1, 1, 1), (2, 4, 8), (8, 2, 1), (3, 5, 3)]
# As many beams as the nodes any 24 codes of 3 tokens in [0, 6) can make at each depth: exact.
FULL = (L, L * L, 24)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hnp.arrays(np.int64, (24, LEVELS), elements=st.integers(0, L - 1)), st.sampled_from(WIDTHS))
def test_beam_search_is_exact_when_wide_and_valid_always(codes, widths):
  index = Index.build(codes, L, layout="dense")
  queries = jnp.arange(3, dtype=jnp.int32)
  arrays = padded(index)
  idents = index.identifiers()
  scores = np.array([[toy_logprob(q, u) for u in idents.tolist()] for q in range(3)])
  res = jax.tree.map(np.asarray, bs.beam_search(FNS, PARAMS, arrays, queries, beam_size=widths, top_k=5))
  valid = {tuple(u) for u in idents.tolist()}
  for i in range(3):
    alive = np.isfinite(res.identifier_scores[i])
    beams = [tuple(b) for b in res.identifiers[i][alive].tolist()]
    assert set(beams) <= valid and len(set(beams)) == len(beams)
    np.testing.assert_allclose(res.identifier_scores[i][alive], [toy_logprob(i, b) for b in beams],
                               rtol=1e-5, atol=1e-4)
    missed = [s for u, s in zip(idents.tolist(), scores[i]) if tuple(u) not in set(beams)]
    assert max(missed, default=-np.inf) <= res.pruned_bound[i] + 1e-4   # the bound is sound
  # Wide enough at every depth: the exact top identifiers.
  full = jax.tree.map(np.asarray, bs.beam_search(FNS, PARAMS, arrays, queries, top_k=5, beam_size=FULL))
  for i in range(3):
    best = np.sort(scores[i])[::-1][:index.num_identifiers]
    got = full.identifier_scores[i][np.isfinite(full.identifier_scores[i])]
    np.testing.assert_allclose(got, best, rtol=1e-5, atol=1e-4)


# --- metrics -------------------------------------------------------------------------------------------


@FAST
@given(hnp.arrays(np.int64, st.tuples(st.integers(1, 12), st.integers(1, 15)), elements=st.integers(-1, 30)),
       st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_metric_bounds_and_monotonicity(retrieved, num_classes, seed):
  rng = np.random.default_rng(seed)
  database_labels = rng.integers(0, num_classes, 31)
  query_labels = rng.integers(0, num_classes, retrieved.shape[0])
  # Distinct ids per row (a ranking), -1 padding at the end.
  ranked = np.full_like(retrieved, -1)
  for i, row in enumerate(retrieved):
    seen = list(dict.fromkeys(x for x in row.tolist() if x >= 0))
    ranked[i, :len(seen)] = seen
  rel = M.relevance(ranked, query_labels, database_labels)
  npos = M.num_positives(query_labels, database_labels)
  ks = range(1, ranked.shape[1] + 1)
  recall = [M.recall_at(rel, k) for k in ks]
  for k, r in zip(ks, recall):
    p = M.precision_at(rel, k)
    assert ((0 <= p) & (p <= 1)).all() and ((0 <= r) & (r <= 1)).all()
    assert (M.reciprocal_rank_at(rel, k) <= r + 1e-12).all()   # MRR counts only found positives
  assert all((a <= b).all() for a, b in zip(recall, recall[1:]))  # recall@K never falls with K
  ap = M.average_precision_at(rel, npos, r=ranked.shape[1])
  assert ((0 <= ap) & (ap <= 1 + 1e-12)).all()


@FAST
@given(code_arrays(max_images=60, max_tokens=5), st.integers(1, 4), st.data())
def test_prefix_purity_equals_a_count_by_dictionary(case, num_labels, data):
  codes, _ = case
  if not len(codes):
    return
  labels = data.draw(hnp.arrays(np.int64, len(codes), elements=st.integers(0, num_labels - 1)))
  got = identifiers.prefix_purity(codes, labels)
  for m in range(1, codes.shape[1] + 1):
    groups = {}
    for code, label in zip(map(tuple, codes[:, :m]), labels):
      groups.setdefault(code, []).append(int(label))
    want = sum(max(np.bincount(g)) for g in groups.values()) / len(codes)
    assert abs(got[m - 1] - want) < 1e-12, (m, got, want)
  assert all(a <= b + 1e-12 for a, b in zip(got, got[1:]))   # finer prefixes are never less pure


def test_collapse_warnings_name_the_level():
  healthy = {"unused_codes_l1": 3, "perplexity_l1": 200.0, "unused_codes_l2": 0, "perplexity_l2": 180.0,
             "purity_l1": 0.9}
  assert identifiers.collapse_warnings(healthy, 2, 256) == []
  collapsed = dict(healthy, unused_codes_l2=250)
  assert [w[:8] for w in identifiers.collapse_warnings(collapsed, 2, 256)] == ["level 2:"]
  peaked = dict(healthy, perplexity_l1=4.0)
  assert "perplexity 4.0" in identifiers.collapse_warnings(peaked, 2, 256)[0]
  mixed = dict(healthy, purity_l1=0.3)
  assert "not semantic" in identifiers.collapse_warnings(mixed, 2, 256)[0]
