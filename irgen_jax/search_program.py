"""The evaluate stage's beam search as one program, from shapes only, for ``irgen_jax.aot``.

What a real run executes (``evaluate.irgen_search_fn``): one jitted function of (retriever params,
index tables, query images) that encodes the queries and runs the constrained beam search
(``beam_search.beam_search`` over ``models.retriever.make_decode_fns``) down to the top-K image ids.
The encoder is inside that program (``DecodeFns.init`` encodes the images), so it is compiled here
as one program, ``beam_search``: ``search.query_batch_size`` queries (rounded up to a multiple of the
chips, as ``inference.round_batch`` does) split over the ``data`` axis, ``search.beam_size`` beams,
K = min(max(max(eval.ks), eval.map_at), N) images, M = ``ids.length``, L = ``ids.codebook_size``.
Params and index tables are replicated, as in a run.

The index tables' shapes depend on the identifiers, which do not exist before training. Assumed: the
worst case of the all-dense layout (``Index.build(..., layout="dense")``): every prefix is distinct
until there are as many as database images N, i.e. n_d = min(L^d, N) nodes at depth d and
U = min(L^M, N) identifiers, each table padded as ``Index.device_arrays()`` pads it. A real index
(``layout="auto"``, shared prefixes) is never larger. N is the catalogue's database size (or
``data.synthetic.num_database``), capped by ``data.max_database``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from irgen_jax import beam_search, index, inference, parallel
from irgen_jax.models import retriever as retriever_model
from irgen_jax.trainers import retriever as retriever_trainer


def database_size(c: ml_collections.ConfigDict) -> int:
  """N, the database images the index would hold, known without the data."""
  from irgen_jax.data import registry
  n = (c.data.synthetic.num_database if c.data.name == "synthetic"
       else registry.NUM_DATABASE.get(c.data.name))
  if not n:
    raise ValueError(f"config.data.name={c.data.name!r}: its database size is not known without "
                     "the data; ahead-of-time compilation supports the catalogue datasets.")
  return min(n, c.data.max_database) if c.data.max_database > 0 else n


def index_shapes(num_images: int, num_levels: int, num_tokens: int, sharding: Any
                 ) -> beam_search.IndexArrays:
  """Abstract ``IndexArrays`` of the worst-case all-dense index (see the module docstring)."""
  def struct(rows, dtype, *rest):
    return jax.ShapeDtypeStruct((rows, *rest), dtype, sharding=sharding)

  pad = index._bucket  # the row counts Index.device_arrays() pads to
  w, token, rank = (index.num_words(num_tokens), index._token_dtype(num_tokens),
                    index._rank_dtype(num_tokens))
  nodes = [min(num_tokens**d, num_images) for d in range(num_levels + 1)]  # nodes[M] = U
  return beam_search.IndexArrays(
      first_child=tuple(struct(pad(nodes[d]) + 1, jnp.int32) for d in range(num_levels)),
      child_token=tuple(struct(pad(nodes[d + 1]), token) for d in range(num_levels)),
      masks=tuple(struct(pad(nodes[d]), jnp.uint32, w) for d in range(num_levels)),
      word_rank=tuple(struct(pad(nodes[d]), rank, w) for d in range(num_levels)),
      offsets=struct(pad(nodes[num_levels]) + 1, jnp.int32),
      image_ids=struct(pad(num_images), jnp.int32),
      num_tokens=num_tokens, max_fanout=(0,) * num_levels)


def aot_program(c: ml_collections.ConfigDict, mesh) -> dict[str, Any]:
  """``{"beam_search": (jitted, (params, index, images))}``: encoder + constrained beam search."""
  model = retriever_trainer.build_model(c)
  fns = retriever_model.make_decode_fns(model)
  num_images = database_size(c)
  # evaluate.run's K: every method lists at most the whole database.
  beam_size, top_k = c.search.beam_size, min(max(max(c.eval.ks), c.eval.map_at), num_images)

  @jax.jit
  def search(params, arrays, images):  # as evaluate.irgen_search_fn
    res = beam_search.beam_search(fns, params, arrays, images, beam_size=beam_size, top_k=top_k)
    return res.image_ids, res.scores

  rep = parallel.replicated(mesh)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                        retriever_model.param_shapes(model, (c.data.image_size,) * 2 + (3,)))
  arrays = index_shapes(num_images, c.ids.length, c.ids.codebook_size, rep)
  q, s = inference.round_batch(c.search.query_batch_size, mesh), c.data.image_size
  images = jax.ShapeDtypeStruct((q, s, s, 3), jnp.float32, sharding=parallel.batch_sharded(mesh))
  return {"beam_search": (search, (params, arrays, images))}
