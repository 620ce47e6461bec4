"""The evaluate stage: IRGen's beam search over every query, the baselines on the same features, the report.

- IRGen: the retriever encodes each query once and the constrained beam search returns its top-K
  database images (``beam_search``), batched and sharded over the mesh. Beam agreement: on a fixed
  sample of queries, whether the beam's top-K equals the exact top-K under the model
  (``beam_search.search_exact``: certified wider beams, exhaustive scoring where they cannot certify),
  and the fraction of the exact top-K the beam's top-K holds (overlap).
- Baselines (the paper's Table 1 rows) over the tokenizer's f_cls of the same run: exact linear scan
  (L2, and cosine), Faiss IVF-PQ, ScaNN; and over a second encoder (CLIP) when ``eval.extra_encoder``
  names a checkpoint.
- Report (``WORKDIR/report/``): metrics.json, results.md, plots, gallery.html.

Timing: queries per second with the query encoder (everything from images to ids) and without it
(search only). The encoder's time is measured alone on the same queries; compiles happen before timing.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from irgen_jax import beam_search, catalog, inference, parallel
from irgen_jax.evaluators import baselines, report
from irgen_jax.evaluators.results import MethodResult
from irgen_jax.index import Index
from irgen_jax.models import retriever as retriever_model
from irgen_jax.models import vit
from irgen_jax.trainers import common
from irgen_jax.trainers import retriever as retriever_trainer
from irgen_jax.trainers import tokenizer as tokenizer_trainer

log = logging.getLogger(__name__)


def _timed_map(fn, source, c, mesh, description=""):
  """``inference.map_split`` after one warm-up batch, so compiles are not timed."""
  kw = dict(mesh=mesh, batch_size=c.search.query_batch_size, image_size=c.data.image_size,
            resize_size=c.data.resize_size)
  inference.map_split(fn, inference.Subset(source, [0]), **kw)
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
  stats_path = os.path.join(workdir, "tokenizer", "stats.json")
  build_s = None
  if os.path.exists(stats_path):
    with open(stats_path) as f:
      build_s = json.load(f).get("index_build_s")
  return MethodResult(ids=ids, scores=scores, kind="beam_search", build_s=build_s,
                      search_s=max(total_s - encode_s, 1e-9), encode_s=encode_s,
                      index_bytes=index.nbytes, settings={"beam_size": c.search.beam_size},
                      extra=extra)


def _agreement(c, mesh, ds, model, params, index, beam_ids) -> dict[str, float]:
  """Fraction of sampled queries whose beam top-K equals the exact top-K under the model.

  K is max(eval.ks), or the fewest images the beam listed for a sampled query if less (a beam of B
  identifiers lists fewer than K images when identifiers are nearly unique and B < K): the question
  is whether what the beam lists is the best-scoring list of that length, not whether it is long.
  """
  n = min(int(c.eval.agreement_queries), len(ds.query))
  if n <= 0:
    return {}
  rows = np.unique(np.linspace(0, len(ds.query) - 1, n).round().astype(np.int64))
  k = int(min(max(c.eval.ks), (beam_ids[rows] >= 0).sum(axis=1).min()))
  if k == 0:
    return {}
  images, _ = inference.map_split(lambda x: x, inference.Subset(ds.query, rows), mesh=mesh,
                                  batch_size=c.search.query_batch_size,
                                  image_size=c.data.image_size, resize_size=c.data.resize_size)
  t0 = time.perf_counter()
  exact_ids, _, info = beam_search.search_exact(
      retriever_model.make_decode_fns(model), params, index, images, top_k=k,
      beam_size=c.search.beam_size, max_beam_size=c.eval.get("agreement_max_beam", 1024),
      max_batch=c.search.query_batch_size)
  agree = (exact_ids == beam_ids[rows, :k]).all(axis=1)
  # Where the model's scores are nearly flat (uniform same-class targets make every identifier of a
  # class about as likely) exact equality is rare; the overlap says how much of the exact list the
  # beam found.
  overlap = np.mean([len(np.intersect1d(e[e >= 0], b[b >= 0])) / k
                     for e, b in zip(exact_ids, beam_ids[rows, :k])])
  certified_at = info["certified_at"]
  log.info("Beam agreement on %d queries: %.3f, overlap %.3f (exact top-%d in %.1f s; %d needed "
           "exhaustive scoring).", len(rows), agree.mean(), overlap, k, time.perf_counter() - t0,
           int((certified_at == 0).sum()))
  return {"beam_agreement": float(agree.mean()), "beam_overlap": float(overlap),
          "beam_agreement_queries": float(len(rows)),
          "beam_agreement_k": float(k),
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
    # PQ trains 2^nbits centroids per subspace on the database: small databases get fewer bits.
    nbits = max(1, min(int(c.eval.pq_bits), len(db_feats).bit_length() - 1))
    if nbits != c.eval.pq_bits:
      log.info("Faiss IVF-PQ: %d database vectors, so %d PQ bits instead of %d.", len(db_feats), nbits,
               c.eval.pq_bits)
    out[f"{prefix}faiss_ivfpq"] = baselines.faiss_ivfpq(
        db_feats, q_feats, top_k, nlist=nlist, metric=metric, num_subspaces=c.eval.pq_subspaces,
        nbits=nbits, nprobe=min(c.eval.ivf_nprobe, nlist), encode_s=encode_s)
  if "scann" in names:
    out[f"{prefix}scann"] = baselines.scann_search(db_feats, q_feats, top_k, metric=metric,
                                                   encode_s=encode_s)
  return out


def _clip_features(c, path: str, ds, database, mesh):
  """CLIP image embeddings (ln_post + projection of the class token) of database and queries."""
  module, params = vit.load_clip(path, image_size=c.data.image_size, ln_post=True, proj=True,
                                 dtype=common.compute_dtype(c))
  fn = jax.jit(lambda p, x: module.apply({"params": p}, x)[:, 0].astype(jnp.float32))
  db, _ = inference.map_split(functools.partial(fn, params), database, mesh=mesh,
                              batch_size=c.search.query_batch_size * 4,
                              image_size=c.data.image_size, resize_size=c.data.resize_size,
                              description="CLIP database features")
  q, encode_s = _timed_map(functools.partial(fn, params), ds.query, c, mesh)
  return db, q, encode_s


def _image_or_placeholder(cat: catalog.Catalog, j: int) -> np.ndarray:
  img = cat.image(j)
  return np.full((32, 32, 3), 200, np.uint8) if img is None else img


def run(c: ml_collections.ConfigDict, workdir: str, mesh) -> dict[str, Any]:
  # The database is what the index holds: the indexed records, then any inserted images
  # (``python -m irgen_jax.insert``; with data.indexed_fraction < 1 the held-out records).
  cat = catalog.Catalog.open(workdir, c)
  ds = cat.dataset
  database_labels = cat.labels()
  inserted = cat.num_images - cat.num_base
  if inserted:
    log.info("Evaluating over %d database images: %d indexed by the tokenizer stage, %d inserted "
             "since (%s).", cat.num_images, cat.num_base, inserted,
             ", ".join(f"{b['count']} {b['source']}" for b in cat.batches))
  elif ds.held_out:
    log.info("Evaluating over the %d indexed database images; %d held-out records are not inserted "
             "yet (python -m irgen_jax.insert --held_out).", cat.num_base, ds.held_out)
  # Every method lists at most the whole database (exact scans cannot list more).
  top_k = min(max(max(c.eval.ks), c.eval.map_at), cat.num_images)
  methods: dict[str, MethodResult] = {"irgen": _irgen(c, workdir, mesh, ds, top_k)}

  tok_model, tok_params = tokenizer_trainer.load_params(c, workdir, ds.num_classes)
  db_feats = cat.features()
  q_feats, q_encode_s = _timed_map(functools.partial(tokenizer_trainer.features_fn(tok_model),
                                                     tok_params), ds.query, c, mesh)
  methods.update(_baselines(c, "", db_feats, q_feats, q_encode_s, top_k, metric="l2"))
  if c.eval.extra_encoder:
    clip_db, clip_q, clip_s = _clip_features(c, c.eval.extra_encoder, ds, cat.source(), mesh)
    methods.update(_baselines(c, "clip_", clip_db, clip_q, clip_s, top_k, metric="cosine"))

  out_dir = os.path.join(workdir, "report")
  result = {}
  if jax.process_index() == 0:
    result = report.write_report(
        out_dir, dataset=c.data.name, ks=tuple(c.eval.ks), query_labels=ds.labels("query"),
        database_labels=database_labels, methods=methods,
        query_image=lambda i: ds.query[int(i)]["image"],
        database_image=lambda j: _image_or_placeholder(cat, int(j)),
        num_gallery_queries=c.eval.gallery_queries, seed=c.seed, map_at=c.eval.map_at)
  parallel.sync("report written")
  summary = {name: {k: v for k, v in m.items() if k.startswith(("precision@", "recall@"))}
             for name, m in result.get("methods", {}).items()}
  log.info("Report in %s: %s", out_dir, summary)
  return {"report": out_dir, "num_database": cat.num_images, "inserted": inserted}
