"""The one search program: query images → the top-K database images, sharded over every device.

``search_function(model, beam_size, top_k)`` is one jitted function of (retriever params, index tables,
query images ``float32 [Q, S, S, 3]``) that encodes the queries and runs the constrained beam search
(``beam_search.beam_search`` over the retriever's decode functions) down to image ids and scores. Its
users all call it, on the same path:

- ``SearchProgram.run(source)``: every record of a split (the evaluate stage's queries, the images a user
  gives the search command) through the eval transform, in batches placed on the mesh
  (``inference.map_split``): the evaluate stage, ``python -m irgen_jax.search``, ``insert --evaluate``;
- ``aot_program(config, mesh)``: the same function lowered from shapes only, for ``irgen_jax.aot``.

The decode functions of a retriever (``retriever_decode_fns``) are frozen dataclasses over the
(hashable) model rather than closures, so two calls give equal, equally hashed ``DecodeFns``:
``beam_search`` takes them as a static argument and does not recompile for a rebuilt model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from irgen_jax import inference, parallel
from irgen_jax.data import registry
from irgen_jax.decoding import beam_search
from irgen_jax.decoding import hedge as hedge_lib
from irgen_jax.decoding.hedge import Hedge
from irgen_jax.decoding.index import Index, IndexArrays, abstract_arrays
from irgen_jax.models import build
from irgen_jax.models.retriever import Retriever


@dataclasses.dataclass(frozen=True)
class _Init:
  model: Retriever
  from_tokens: bool = False

  def __call__(self, params: Any, queries: jax.Array) -> Any:
    method = Retriever.context_from_tokens if self.from_tokens else Retriever.init_context
    return self.model.apply({"params": params}, queries, method=method)


@dataclasses.dataclass(frozen=True)
class _InitCache:
  model: Retriever

  def __call__(self, num_queries: int, beam_size: int) -> Any:
    return self.model.decoder.init_cache(num_queries, beam_size)


@dataclasses.dataclass(frozen=True)
class _Step:
  model: Retriever

  def __call__(self, params: Any, context: Any, cache: Any, prev_tokens: jax.Array,
               t: int) -> tuple[jax.Array, Any]:
    return self.model.apply({"params": params}, context, cache, jnp.asarray(prev_tokens, jnp.int32), t,
                            method=Retriever.decode_step)


def retriever_decode_fns(model: Retriever, *, from_tokens: bool = False) -> beam_search.DecodeFns:
  """The decode functions of a retriever: queries are images ``[Q, H, W, C]`` (the encoder runs in
  ``init``), or with ``from_tokens`` precomputed encoder tokens ``[Q, T, De]``. Equal for equal models."""
  return beam_search.DecodeFns(_Init(model, from_tokens), _InitCache(model), _Step(model))


def list_length(c: ml_collections.ConfigDict, num_images: int) -> int:
  """K, the images every method lists per query: enough for every metric, at most the database."""
  return min(max(max(c.eval.ks), c.eval.map_at), num_images)


# A level is widened when its B beams are expected to hold fewer than K / WIDEN_MARGIN images. The
# expectation is the average node's (N / n images under each of the level's n nodes); beams follow
# likely prefixes, which hold more images than the average (Fashion-MNIST's B = 30 two-token prefixes
# hold 100+ images where the average gives 73), so the bar is half of K: measured on the default and
# three folders, every list reached K (report: "images listed").
WIDEN_MARGIN = 2


def evaluation_beams(c: ml_collections.ConfigDict, num_images: int,
                     nodes: tuple[int, ...] | None = None) -> int | tuple[int, ...]:
  """The beams the evaluate stage searches with: ``search.beam_size`` B at every level, or, with
  ``search.widen_to_list``, the levels from the first whose B prefixes hold too few images on from
  there widened to the list length K (``list_length``).

  Identifiers are nearly unique, so B beams at a level where nodes hold about one image each list about
  B images: metrics that read K > B images (MAP@100) would see a list capped at B. ``nodes`` (n_1, ...,
  n_M): the index's nodes per depth 1..M (``index_nodes``); a level t is widened, with every level after
  it, when B * N / n_{t+1} < K / ``WIDEN_MARGIN``. Without ``nodes`` the last two levels (60,000
  Fashion-MNIST images: the same beams). Widening costs the widened levels decoded with K beams instead
  of B; the first B of the list are at least as good as beam B's.
  """
  b, m = int(c.search.beam_size), int(c.ids.length)
  k = list_length(c, num_images)
  if not c.search.get("widen_to_list", False) or k <= b:
    return b
  if nodes is None:
    first = max(0, m - 2)
  else:
    few = [t for t in range(m) if b * num_images < nodes[t] * k / WIDEN_MARGIN]
    first = few[0] if few else m
  return (b,) * first + (k,) * (m - first) if first < m else b


def index_nodes(index: Index) -> tuple[int, ...]:
  """(n_1, ..., n_M): an index's nodes at depths 1..M (n_M: its identifiers), for ``evaluation_beams``."""
  return (*index.nodes_per_depth[1:], index.num_identifiers)


class Found(NamedTuple):
  """What the search program returns per query (numpy after ``SearchProgram.run``).

  image_ids int32 [Q, K] and scores float32 [Q, K]: best first (a hedged list's hedge slots carry their
    own, lower, scores), -1 / -inf where fewer than K images were found;
  pruned_bound float32 [Q]: the main search's bound (``beam_search.SearchResult``); a list whose K-th
    score is above it is the exact top K (``beam_search.certified``), for an unhedged list;
  top_groups int32 [Q, 2], group_probs float32 [Q, 2]: the retriever's two likeliest groups (classes,
    ``hedge.node_classes``) and their posteriors, when the program was given groups (else -1, 0);
  hedged bool [Q]: whose list holds hedge slots.
  """
  image_ids: jax.Array
  scores: jax.Array
  pruned_bound: jax.Array
  top_groups: jax.Array
  group_probs: jax.Array
  hedged: jax.Array


def search_function(model: Retriever, *, beam_size: int | tuple[int, ...], top_k: int,
                    loop: str = "auto", num_groups: int = 0, hedge: Hedge = Hedge(),
                    class_first: bool = False, compiler_options: dict[str, Any] | None = None):
  """Jitted ``(params, IndexArrays, images float32 [Q, S, S, 3], groups or None) -> Found``, compiled
  with XLA's ``compiler_options`` (``cpu_compiler_options``).

  ``loop``: unrolled or scanned levels (``beam_search.beam_search``). With ``num_groups`` > 0 the
  program takes the groups (classes) of the index's prefixes to D tokens, one table per level, one entry
  per node (``hedge.node_classes``), and also returns the retriever's group posterior; then
  (``decoding.hedge``) ``class_first`` lists the identifiers whose first D prefixes have the likeliest
  group first, then (where that group holds fewer than K images) the others (``beam_search``'s
  ``fill``: their scores ``OUT_OF_CLASS`` lower), and ``hedge`` gives a few places to the runner-up's.
  The encoder runs once: every search starts from its tokens."""
  if (hedge.enabled or class_first) and num_groups < 2:
    raise ValueError(f"a hedged or class-first search needs at least 2 groups (classes); got "
                     f"num_groups={num_groups}.")
  fns = retriever_decode_fns(model, from_tokens=True)

  @functools.partial(jax.jit, compiler_options=compiler_options or None)
  def search(params, arrays, images, groups=None):
    tokens = model.apply({"params": params}, images, method=Retriever.encode)
    q = images.shape[0]
    top = jnp.full((q, 2), -1, jnp.int32)
    probs = jnp.zeros((q, 2), jnp.float32)
    if num_groups:
      # The root step alone (one beam): the class posterior. Its context (cross-attention K/V) is
      # the search's own, which XLA computes once (compiled FLOPs: +0.02% on runlocal).
      root, _ = fns.step(params, fns.init(params, tokens), fns.init_cache(q, 1),
                         jnp.zeros((q, 1), jnp.int32), 0)
      first = beam_search.child_classes(arrays, groups[0], 0, jnp.zeros((1, 1), jnp.int32),
                                        jnp.ones((1, 1), bool))[0, 0]      # [L]: each first token's
      posterior = hedge_lib.group_posterior(root[:, 0], first, num_groups)
      posterior = jnp.pad(posterior, ((0, 0), (0, max(0, 2 - num_groups))))  # one group: a 0 runner-up
      probs, top = jax.lax.top_k(posterior, 2)
    res = beam_search.beam_search(fns, params, arrays, tokens, beam_size=beam_size, top_k=top_k,
                                  loop=loop, fill=True,
                                  classes=beam_search.PrefixClasses(groups, top[:, 0]) if class_first
                                  else None)
    ids, scores = res.image_ids, res.scores
    hedged = jnp.zeros((q,), bool)
    if hedge.enabled:
      extra = beam_search.beam_search(fns, params, arrays, tokens, beam_size=hedge.beam_size,
                                      top_k=hedge.slots, loop=loop,
                                      classes=beam_search.PrefixClasses(groups, top[:, 1]))
      hedged = probs[:, 1] >= hedge.threshold
      ids, scores = hedge_lib.merge(ids, scores, extra.image_ids, extra.scores, hedged, hedge.at)
      hedged = hedged & (extra.image_ids[:, 0] >= 0)
    return Found(ids, scores, res.pruned_bound, top.astype(jnp.int32), probs, hedged)
  return search


def class_levels(c: ml_collections.ConfigDict) -> int:
  """D, the levels (prefixes of 1..D tokens) a class-first or hedged search keeps within its class."""
  levels = int(c.search.get("class_levels", 1))
  return int(c.ids.length) if levels == -1 else levels


def cpu_compiler_options(c: ml_collections.ConfigDict, mesh) -> dict[str, Any] | None:
  """The config's ``search.xla_cpu_options`` where the mesh is of CPUs, else None (XLA's defaults)."""
  options = dict(c.search.get("xla_cpu_options") or {})
  return options if options and mesh.devices.flat[0].platform == "cpu" else None


def uses_classes(c: ml_collections.ConfigDict) -> bool:
  """Whether the config's list policy needs the database's classes: class first or a hedge."""
  return bool(c.search.get("class_first", False)) or Hedge.from_config(c.search).enabled


def list_policy(c: ml_collections.ConfigDict, num_groups: int, top_k: int,
                hedge: Hedge | None = None) -> tuple[bool, Hedge]:
  """(class_first, hedge) a search applies: the config's (``search.class_first``, ``search.hedge``;
  ``hedge`` overrides the latter), each dropped where it cannot apply: fewer than 2 groups (nothing to
  choose between) or, for the hedge, a list that ends before its places."""
  hedge = hedge if hedge is not None else Hedge.from_config(c.search)
  if num_groups < 2 or top_k < hedge.at:
    hedge = Hedge()
  return bool(c.search.get("class_first", False)) and num_groups >= 2, hedge


class SearchProgram:
  """A trained retriever over an index, ready to search: ``run(source)`` -> ``Found``, seconds."""

  def __init__(self, c: ml_collections.ConfigDict, model: Retriever, params: Any,
               index: Index | IndexArrays, *, mesh, beam_size: int | tuple[int, ...] | None = None,
               top_k: int | None = None, labels: Any = None, groups: tuple | None = None,
               num_groups: int = 0, hedge: Hedge | None = None):
    """``beam_size``: B, or one width per level (``beam_search.beam_widths``); default: the
    evaluate stage's (``evaluation_beams``). ``top_k``: default ``list_length``. The classes the
    index's prefixes stand for, for the retriever's class posterior, class first and the hedge: from
    ``labels`` (int [N], the database images' labels, -1 unknown; the prefixes to
    ``search.class_levels`` tokens of an ``Index``), or as already built, ``groups`` (D int32 tables,
    one per level, ``hedge.node_classes``) and ``num_groups``; neither: no classes (the plain
    beam). ``hedge``: default the config's ``search.hedge`` (only with classes)."""
    if labels is not None:
      if groups is not None:
        raise ValueError("SearchProgram: pass the database labels or the groups built from them, not both.")
      if not isinstance(index, Index):
        raise ValueError("SearchProgram: labels need an Index (the groups come from its codes), not "
                         "IndexArrays.")
      groups, num_groups = hedge_lib.index_groups(index, labels, class_levels(c))
    self.config, self.model, self.mesh = c, model, mesh
    self.arrays = index.device_arrays() if isinstance(index, Index) else index
    num_images = index.num_images if isinstance(index, Index) else int(self.arrays.image_ids.shape[0])
    self.beam_size = beam_size or evaluation_beams(
        c, num_images, index_nodes(index) if isinstance(index, Index) else None)
    self.top_k = int(top_k or list_length(c, num_images))
    self.groups = groups
    self.num_groups = int(num_groups) if groups is not None else 0
    self.class_levels = len(groups) if self.num_groups else 0
    self.class_first, self.hedge = list_policy(c, self.num_groups, self.top_k, hedge)
    self.params = parallel.replicate(params, mesh)
    self.arrays = parallel.replicate(self.arrays, mesh)
    fn = search_function(model, beam_size=self.beam_size, top_k=self.top_k,
                         loop=c.search.get("loop", "auto"), num_groups=self.num_groups, hedge=self.hedge,
                         class_first=self.class_first, compiler_options=cpu_compiler_options(c, mesh))
    extra = ((parallel.replicate(tuple(jnp.asarray(g, jnp.int32) for g in groups), mesh),)
             if self.num_groups else ())
    self._search = lambda images: fn(self.params, self.arrays, images, *extra)

  def map(self, fn, source, *, warm_up: bool = False, description: str = ""):
    """``inference.map_split(fn, source)`` with the run's eval transform; ``warm_up`` runs one batch
    first so that compiles are not in the returned seconds."""
    c = self.config
    return inference.map_split(
        fn, source, mesh=self.mesh, batch_size=inference.batch_for(len(source), c.search.query_batch_size),
        image_size=c.data.image_size, resize_size=c.data.resize_size, warm_up=warm_up,
        description=description)

  def run(self, source, *, warm_up: bool = False, description: str = "") -> tuple[Found, float]:
    """Every record of ``source`` searched: ``(Found of numpy arrays [N, ...], seconds)``."""
    return self.map(self._search, source, warm_up=warm_up, description=description)

  def encode_seconds(self, source) -> float:
    """The encoder's time alone on ``source`` (after a warm-up batch): QPS with and without it."""
    encode = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method="encode"))
    _, seconds = self.map(functools.partial(encode, self.params), source, warm_up=True)
    return seconds


def aot_program(c: ml_collections.ConfigDict, mesh) -> dict[str, Any]:
  """``{"beam_search": (jitted, (params, index, images, groups))}`` from shapes only (``irgen_jax.aot``).

  ``search.query_batch_size`` queries (rounded up to a multiple of the chips, as a run rounds them) split
  over the ``data`` axis, the largest index of the config's N database images (``abstract_arrays``; N
  from ``registry.database_size``), K = ``list_length``, the beams ``evaluation_beams`` gives that
  index; params and index tables replicated, as in a run.
  """
  num_images = registry.database_size(c.data)
  model = build.retriever(c)
  rep = parallel.replicated(mesh)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                        build.retriever_param_shapes(c, model))
  arrays = abstract_arrays(num_images, c.ids.length, c.ids.codebook_size, rep)
  q, s = inference.round_batch(c.search.query_batch_size, mesh), c.data.image_size
  images = jax.ShapeDtypeStruct((q, s, s, 3), jnp.float32, sharding=parallel.batch_sharded(mesh))
  # As the evaluate stage runs it: with the prefixes' classes (the class posterior, class first, the hedge).
  top_k, num_groups = list_length(c, num_images), registry.num_classes(c.data)
  class_first, hedge = list_policy(c, num_groups, top_k)
  groups = tuple(jax.ShapeDtypeStruct(arrays.child_token[t].shape, jnp.int32, sharding=rep)
                 for t in range(class_levels(c)))
  # The beams of the largest index too (its nodes, as ``abstract_arrays`` counts them): a real one's
  # are never wider.
  worst = tuple(min(c.ids.codebook_size ** d, num_images) for d in range(1, c.ids.length + 1))
  fn = search_function(model, beam_size=evaluation_beams(c, num_images, worst), top_k=top_k,
                       loop=c.search.get("loop", "auto"), num_groups=num_groups, hedge=hedge,
                       class_first=class_first)
  return {"beam_search": (fn, (params, arrays, images, groups))}
