"""The evaluate stage: IRGen's beam search over every query, the baselines on the same features, the report.

- IRGen: the retriever encodes each query once and the constrained beam search returns its top-K
  database images (``decoding.program.SearchProgram``), batched and sharded over the mesh. Beam
  agreement: on a fixed sample of queries, whether the beam's top-K equals the exact top-K under the
  model (``beam_search.search_exact``: certified wider beams, exhaustive scoring where they cannot
  certify), and the fraction of the exact top-K the beam's top-K holds (overlap).
- Baselines (the paper's Table 1 rows) over the tokenizer's f_cls of the same run: exact linear scan
  (L2, and cosine), Faiss IVF-PQ, ScaNN; and over a second encoder (CLIP) when ``eval.extra_encoder``
  names a checkpoint.
- Report (``WORKDIR/report/``): metrics.json, results.md, plots, gallery.html.

Timing: queries per second with the query encoder (everything from images to ids) and without it
(search only). The encoder's time is measured alone on the same queries; compiles happen before timing.
Failpoint: ``evaluate.searched`` after IRGen's search, before the baselines (and the report's own).
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

from irgen_jax import failpoints, features, files, inference, parallel
from irgen_jax.decoding import beam_search
from irgen_jax.decoding.program import SearchProgram, list_length, retriever_decode_fns
from irgen_jax.evaluators import baselines, report
from irgen_jax.evaluators.results import MethodResult
from irgen_jax.models import build, vit
from irgen_jax.workdir import REPORT, TOKENIZER_STATS, IndexedImages, Workdir

log = logging.getLogger(__name__)


def _irgen(c, wd: Workdir, mesh, ds, indexed: IndexedImages, top_k) -> MethodResult:
  model, params = wd.load_retriever(c)
  index = indexed.index
  program = SearchProgram(c, model, params, index, mesh=mesh, top_k=top_k)
  (ids, scores), total_s = program.run(ds.query, warm_up=True, description="beam search")
  encode_s = program.encode_seconds(ds.query)
  extra = {"beam_size": c.search.beam_size, "index_bytes_per_image": index.bytes_per_image}
  extra.update(_agreement(c, mesh, ds, model, params, index, ids))
  stats_path = wd.path(TOKENIZER_STATS)
  build_s = files.read_json(stats_path).get("index_build_s") if os.path.exists(stats_path) else None
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
      retriever_decode_fns(model), params, index, images, top_k=k,
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
                                 dtype=build.compute_dtype(c))
  fn = jax.jit(lambda p, x: module.apply({"params": p}, x)[:, 0].astype(jnp.float32))
  db, _ = inference.map_split(functools.partial(fn, params), database, mesh=mesh,
                              batch_size=c.search.query_batch_size * 4,
                              image_size=c.data.image_size, resize_size=c.data.resize_size,
                              description="CLIP database features")
  q, encode_s = inference.map_split(functools.partial(fn, params), ds.query, mesh=mesh,
                                    batch_size=c.search.query_batch_size, warm_up=True,
                                    image_size=c.data.image_size, resize_size=c.data.resize_size)
  return db, q, encode_s


def run(c: ml_collections.ConfigDict, wd: Workdir, mesh) -> dict[str, Any]:
  # The database is what the index holds: the indexed records, then any inserted images
  # (``python -m irgen_jax.insert``; with data.indexed_fraction < 1 the held-out records).
  indexed = IndexedImages.open(wd, c)
  ds = indexed.dataset
  database_labels = indexed.labels()
  inserted = indexed.num_images - indexed.num_base
  if inserted:
    log.info("Evaluating over %d database images: %d indexed by the tokenizer stage, %d inserted "
             "since (%s).", indexed.num_images, indexed.num_base, inserted,
             ", ".join(f"{b['count']} {b['source']}" for b in indexed.batches))
  elif ds.held_out:
    log.info("Evaluating over the %d indexed database images; %d held-out records are not inserted "
             "yet (python -m irgen_jax.insert --held_out).", indexed.num_base, ds.held_out)
  top_k = list_length(c, indexed.num_images)
  methods: dict[str, MethodResult] = {"irgen": _irgen(c, wd, mesh, ds, indexed, top_k)}
  failpoints.hit("evaluate.searched")

  tok_model, tok_params = wd.load_tokenizer(c, ds.num_classes)
  db_feats = indexed.features()
  q_feats, q_encode_s = inference.map_split(
      functools.partial(features.features_fn(tok_model), tok_params), ds.query, mesh=mesh,
      batch_size=c.search.query_batch_size, image_size=c.data.image_size,
      resize_size=c.data.resize_size, warm_up=True)
  methods.update(_baselines(c, "", db_feats, q_feats, q_encode_s, top_k, metric="l2"))
  if c.eval.extra_encoder:
    clip_db, clip_q, clip_s = _clip_features(c, c.eval.extra_encoder, ds, indexed.source(), mesh)
    methods.update(_baselines(c, "clip_", clip_db, clip_q, clip_s, top_k, metric="cosine"))

  out_dir = wd.path(REPORT)
  result = {}
  if jax.process_index() == 0:
    result = report.write_report(
        out_dir, dataset=c.data.name, ks=tuple(c.eval.ks), query_labels=ds.labels("query"),
        database_labels=database_labels, methods=methods,
        query_image=lambda i: ds.query[int(i)]["image"],
        database_image=lambda j: indexed.image_or_placeholder(int(j)),
        num_gallery_queries=c.eval.gallery_queries, seed=c.seed, map_at=c.eval.map_at)
  parallel.sync("report written")
  summary = {name: {k: v for k, v in m.items() if k.startswith(("precision@", "recall@"))}
             for name, m in result.get("methods", {}).items()}
  log.info("Report in %s: %s", out_dir, summary)
  return {"report": out_dir, "num_database": indexed.num_images, "inserted": inserted}
