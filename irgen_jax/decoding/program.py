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
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from irgen_jax import inference, parallel
from irgen_jax.data import registry
from irgen_jax.decoding import beam_search
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


def evaluation_beams(c: ml_collections.ConfigDict, num_images: int) -> int | tuple[int, ...]:
  """The beams the evaluate stage searches with: ``search.beam_size`` B at every level, or, with
  ``search.widen_to_list``, the last two levels widened to the list length K (``list_length``).

  Identifiers are nearly unique (a node two levels above the leaves has a few children, one above them
  about one), so B beams list about B images: metrics that read K > B images (MAP@100) would see a
  list capped at B. Widening the last two levels lists about K identifiers, at the cost of 2 of the M
  levels decoded with K beams instead of B; the first B of the list are at least as good as beam B's.
  """
  b, m = int(c.search.beam_size), int(c.ids.length)
  k = list_length(c, num_images)
  if not c.search.get("widen_to_list", False) or k <= b:
    return b
  return (b,) * (m - 2) + (k,) * min(2, m)


def search_function(model: Retriever, *, beam_size: int | tuple[int, ...], top_k: int,
                    loop: str = "auto"):
  """Jitted ``(params, IndexArrays, images float32 [Q, S, S, 3]) -> (image_ids int32 [Q, K], scores
  float32 [Q, K], pruned_bound float32 [Q])``: best first, -1 / -inf where fewer than K images were
  found; a list whose K-th score is above its pruned bound is the exact top K
  (``beam_search.certified``). ``loop``: unrolled or scanned levels (``beam_search.beam_search``)."""
  fns = retriever_decode_fns(model)

  @jax.jit
  def search(params, arrays, images):
    res = beam_search.beam_search(fns, params, arrays, images, beam_size=beam_size, top_k=top_k,
                                  loop=loop)
    return res.image_ids, res.scores, res.pruned_bound
  return search


class SearchProgram:
  """A trained retriever over an index, ready to search: ``run(source)`` -> ids, scores, seconds."""

  def __init__(self, c: ml_collections.ConfigDict, model: Retriever, params: Any,
               index: Index | IndexArrays, *, mesh, beam_size: int | tuple[int, ...] | None = None,
               top_k: int | None = None):
    """``beam_size``: B, or one width per level (``beam_search.beam_widths``); default: the
    evaluate stage's (``evaluation_beams``). ``top_k``: default ``list_length``."""
    self.config, self.model, self.mesh = c, model, mesh
    self.arrays = index.device_arrays() if isinstance(index, Index) else index
    num_images = index.num_images if isinstance(index, Index) else int(self.arrays.image_ids.shape[0])
    self.beam_size = beam_size or evaluation_beams(c, num_images)
    self.top_k = int(top_k or list_length(c, num_images))
    self.params = parallel.replicate(params, mesh)
    self.arrays = parallel.replicate(self.arrays, mesh)
    self._search = functools.partial(
        search_function(model, beam_size=self.beam_size, top_k=self.top_k,
                        loop=c.search.get("loop", "auto")),
        self.params, self.arrays)

  def map(self, fn, source, *, warm_up: bool = False, description: str = ""):
    """``inference.map_split(fn, source)`` with the run's eval transform; ``warm_up`` runs one batch
    first so that compiles are not in the returned seconds."""
    c = self.config
    return inference.map_split(
        fn, source, mesh=self.mesh, batch_size=inference.batch_for(len(source), c.search.query_batch_size),
        image_size=c.data.image_size, resize_size=c.data.resize_size, warm_up=warm_up,
        description=description)

  def run(self, source, *, warm_up: bool = False, description: str = ""):
    """Every record of ``source`` searched: ``((image_ids [N, K], scores [N, K], pruned_bound [N]),
    seconds)``."""
    return self.map(self._search, source, warm_up=warm_up, description=description)

  def encode_seconds(self, source) -> float:
    """The encoder's time alone on ``source`` (after a warm-up batch): QPS with and without it."""
    encode = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method="encode"))
    _, seconds = self.map(functools.partial(encode, self.params), source, warm_up=True)
    return seconds


def aot_program(c: ml_collections.ConfigDict, mesh) -> dict[str, Any]:
  """``{"beam_search": (jitted, (params, index, images))}`` from shapes only (``irgen_jax.aot``).

  ``search.query_batch_size`` queries (rounded up to a multiple of the chips, as a run rounds them) split
  over the ``data`` axis, the largest index of the config's N database images (``abstract_arrays``; N
  from ``registry.database_size``), K = ``list_length``; params and index tables replicated, as in a run.
  """
  num_images = registry.database_size(c.data)
  model = build.retriever(c)
  rep = parallel.replicated(mesh)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                        build.retriever_param_shapes(c, model))
  arrays = abstract_arrays(num_images, c.ids.length, c.ids.codebook_size, rep)
  q, s = inference.round_batch(c.search.query_batch_size, mesh), c.data.image_size
  images = jax.ShapeDtypeStruct((q, s, s, 3), jnp.float32, sharding=parallel.batch_sharded(mesh))
  fn = search_function(model, beam_size=evaluation_beams(c, num_images),
                       top_k=list_length(c, num_images), loop=c.search.get("loop", "auto"))
  return {"beam_search": (fn, (params, arrays, images))}
