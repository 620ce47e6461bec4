"""The evaluate stage: IRGen's beam search over every query, the baselines on the same features, the report.

- IRGen: the retriever encodes each query once and the constrained beam search returns its top-K
  database images (``beam_search``), batched and sharded over the mesh. Beam agreement: on a fixed
  sample of queries, whether the beam's top-K equals the exact top-K under the model
  (``beam_search.search_exact``: certified wider beams, exhaustive scoring where they cannot certify).
- Baselines (the paper's Table 1 rows) over the tokenizer's f_cls of the same run: exact linear scan
  (L2, and cosine), Faiss IVF-PQ, ScaNN; and over a second encoder (CLIP) when ``eval.extra_encoder``
  names a checkpoint.
- Report (``WORKDIR/report/``): metrics.json, results.md, plots, gallery.html.

Timing: queries per second with the query encoder (everything from images to ids) and without it
(search only). The encoder's time is measured alone on the same queries; compiles happen before timing.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from irgen_jax import beam_search, inference, parallel
from irgen_jax.evaluators import baselines, report
from irgen_jax.evaluators.results import MethodResult
from irgen_jax.index import Index
from irgen_jax.models import retriever as retriever_model
from irgen_jax.models import vit
from irgen_jax.trainers import common
from irgen_jax.trainers import retriever as retriever_trainer
from irgen_jax.trainers import tokenizer as tokenizer_trainer

log = logging.getLogger(__name__)


class Subset:
  """Rows of a random-access source, re-indexed 0..n-1 (for evaluating a sample of queries)."""

  def __init__(self, source, rows):
    self.source, self.rows = source, np.asarray(rows, np.int64)

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    return dict(self.source[int(self.rows[i])], index=int(i))


def _timed_map(fn, source, c, mesh, description=""):
  """``inference.map_split`` after one warm-up batch, so compiles are not timed."""
  kw = dict(mesh=mesh, batch_size=c.search.query_batch_size, image_size=c.data.image_size,
            resize_size=c.data.resize_size)
  inference.map_split(fn, Subset(source, [0]), **kw)
  return inference.map_split(fn, source, description=description, **kw)


def load_index(c, workdir: str) -> Index:
  return Index.load(os.path.join(workdir, tokenizer_trainer.INDEX_FILE), num_levels=c.ids.length,
                    num_tokens=c.ids.codebook_size)


def irgen_search_fn(model, params, arrays, *, beam_size: int, top_k: int):
  """Jitted ``images -> (image_ids, scores)`` for ``inference.map_split``."""
  fns = retriever_model.make_decode_fns(model)

  @jax.jit
  def run(params, arrays, images):
    res = beam_search.beam_search(fns, params, arrays, images, beam_size=beam_size, top_k=top_k)
    return res.image_ids, res.scores
  return functools.partial(run, params, arrays)


def _irgen(c, workdir, mesh, ds, top_k) -> MethodResult:
  model, params = retriever_trainer.load_params(c, workdir)
  index = load_index(c, workdir)
  arrays = index.device_arrays()
  search = irgen_search_fn(model, params, arrays, beam_size=c.search.beam_size, top_k=top_k)
  (ids, scores), total_s = _timed_map(search, ds.query, c, mesh, description="beam search")
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
  _, encode_s = _timed_map(functools.partial(encode, params), ds.query, c, mesh)
  extra = {"beam_size": c.search.beam_size, "index_bytes_per_image": index.bytes_per_image}
  extra.update(_agreement(c, mesh, ds, model, params, index, ids))
  return MethodResult(ids=ids, scores=scores, kind="beam_search",
                      search_s=max(total_s - encode_s, 1e-9), encode_s=encode_s,
                      index_bytes=index.nbytes, settings={"beam_size": c.search.beam_size},
                      extra=extra)


def _agreement(c, mesh, ds, model, params, index, beam_ids) -> dict[str, float]:
  """Fraction of sampled queries whose beam top-K equals the exact top-K under the model."""
  n = min(int(c.eval.agreement_queries), len(ds.query))
  if n <= 0:
    return {}
  k = max(c.eval.ks)
  rows = np.unique(np.linspace(0, len(ds.query) - 1, n).round().astype(np.int64))
  images, _ = inference.map_split(lambda x: x, Subset(ds.query, rows), mesh=mesh,
                                  batch_size=c.search.query_batch_size,
                                  image_size=c.data.image_size, resize_size=c.data.resize_size)
  t0 = time.perf_counter()
  exact_ids, _, info = beam_search.search_exact(
      retriever_model.make_decode_fns(model), params, index, images, top_k=k,
      beam_size=c.search.beam_size, max_beam_size=c.eval.get("agreement_max_beam", 1024),
      max_batch=c.search.query_batch_size)
  agree = (exact_ids == beam_ids[rows, :k]).all(axis=1)
  certified_at = info["certified_at"]
  log.info("Beam agreement on %d queries: %.3f (exact top-%d in %.1f s; %d needed exhaustive "
           "scoring).", len(rows), agree.mean(), k, time.perf_counter() - t0,
           int((certified_at == 0).sum()))
  return {"beam_agreement": float(agree.mean()), "beam_agreement_queries": float(len(rows)),
          "certified_at_beam_size": float((certified_at == c.search.beam_size).mean())}


def _baselines(c, prefix: str, db_feats, q_feats, encode_s: float, top_k: int, metric: str
               ) -> dict[str, MethodResult]:
  out = {}
  names = tuple(c.eval.baselines)
  if "linear_scan" in names:
    out[f"{prefix}linear_scan"] = baselines.linear_scan(db_feats, q_feats, top_k, metric=metric,
                                                       encode_s=encode_s)
    if metric == "l2":
      out[f"{prefix}linear_scan_cosine"] = baselines.linear_scan(db_feats, q_feats, top_k,
                                                                 metric="cosine", encode_s=encode_s)
  if "faiss_ivfpq" in names:
    nlist = max(1, min(c.eval.ivf_nlist, len(db_feats) // 39))  # faiss wants >= 39 points per cell
    out[f"{prefix}faiss_ivfpq"] = baselines.faiss_ivfpq(
        db_feats, q_feats, top_k, nlist=nlist, metric=metric, num_subspaces=c.eval.pq_subspaces,
        nbits=c.eval.pq_bits, nprobe=min(c.eval.ivf_nprobe, nlist), encode_s=encode_s)
  if "scann" in names:
    out[f"{prefix}scann"] = baselines.scann_search(db_feats, q_feats, top_k, metric=metric,
                                                   encode_s=encode_s)
  return out


def _clip_features(c, path: str, ds, mesh):
  """CLIP image embeddings (ln_post + projection of the class token) of database and queries."""
  module, params = vit.load_clip(path, image_size=c.data.image_size, ln_post=True, proj=True,
                                 dtype=common.compute_dtype(c))
  fn = jax.jit(lambda p, x: module.apply({"params": p}, x)[:, 0].astype(jnp.float32))
  db, _ = inference.map_split(functools.partial(fn, params), ds.database, mesh=mesh,
                              batch_size=c.search.query_batch_size * 4,
                              image_size=c.data.image_size, resize_size=c.data.resize_size,
                              description="CLIP database features")
  q, encode_s = _timed_map(functools.partial(fn, params), ds.query, c, mesh)
  return db, q, encode_s


def run(c: ml_collections.ConfigDict, workdir: str, mesh) -> dict[str, Any]:
  ds = common.load_dataset(c.data)
  top_k = max(max(c.eval.ks), c.eval.map_at)
  methods: dict[str, MethodResult] = {"irgen": _irgen(c, workdir, mesh, ds, top_k)}

  tok_model, tok_params = tokenizer_trainer.load_params(c, workdir, ds.num_classes)
  db_feats = np.load(os.path.join(workdir, "tokenizer", "database_features.npy"))
  q_feats, q_encode_s = _timed_map(functools.partial(tokenizer_trainer.features_fn(tok_model),
                                                     tok_params), ds.query, c, mesh)
  methods.update(_baselines(c, "", db_feats, q_feats, q_encode_s, top_k, metric="l2"))
  if c.eval.extra_encoder:
    clip_db, clip_q, clip_s = _clip_features(c, c.eval.extra_encoder, ds, mesh)
    methods.update(_baselines(c, "clip_", clip_db, clip_q, clip_s, top_k, metric="cosine"))

  out_dir = os.path.join(workdir, "report")
  result = {}
  if jax.process_index() == 0:
    result = report.write_report(
        out_dir, dataset=c.data.name, ks=tuple(c.eval.ks), query_labels=ds.labels("query"),
        database_labels=ds.labels("database"), methods=methods,
        query_image=lambda i: ds.query[int(i)]["image"],
        database_image=lambda j: ds.database[int(j)]["image"],
        num_gallery_queries=c.eval.gallery_queries, seed=c.seed, map_at=c.eval.map_at)
  parallel.sync("report written")
  summary = {name: {k: v for k, v in m.items() if k.startswith(("precision@", "recall@"))}
             for name, m in result.get("methods", {}).items()}
  log.info("Report in %s: %s", out_dir, summary)
  return {"report": out_dir}
