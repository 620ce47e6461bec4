"""The evaluate stage: IRGen's beam search over every query, the baselines on the same features, the report.

- IRGen: the retriever encodes each query once and the constrained beam search returns its top-K
  database images (``decoding.program.SearchProgram``), batched and sharded over the mesh, with the
  last two levels widened to the list length (``program.evaluation_beams``), so every column IRGen is
  reported in comes from a list at least that long (MAP@100 from 100 images).
- Baselines (the paper's Table 1 rows) over the tokenizer's f_cls of the same run: exact linear scan
  (L2, and cosine), Faiss IVF-PQ, ScaNN; and over a second encoder (CLIP) when ``eval.extra_encoder``
  names a checkpoint.
- Diagnostics (where precision is lost): the tokenizer's class head on the queries, its identifiers
  per level (perplexity, unused codes, prefix purity, collapse warnings), the retriever's per-level
  token accuracy on held-out pairs (query, a same-class database image's identifier), and whether the
  beam is wide enough (``eval.beam_check_queries`` queries searched again with twice the beams: how
  much of the list and of its precision changes; and the share of lists provably exact).
- Report (``WORKDIR/report/``): metrics.json, results.md, plots, gallery.html; stage times and steps/s.

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

from irgen_jax import failpoints, features, files, identifiers, inference, parallel
from irgen_jax.decoding import beam_search
from irgen_jax.decoding import hedge as hedge_lib
from irgen_jax.decoding.program import SearchProgram, list_length
from irgen_jax.evaluators import baselines, metrics, plots, report
from irgen_jax.evaluators.results import MethodResult
from irgen_jax.models import build, vit
from irgen_jax.workdir import (REPORT, RQVAE, RQVAE_RECONSTRUCTIONS, TOKENIZER_STATS, IndexedImages,
                               Workdir)

log = logging.getLogger(__name__)


def _beams(beam_size) -> list[int]:
  return [beam_size] if isinstance(beam_size, int) else list(beam_size)


def _irgen(c, wd: Workdir, mesh, ds, indexed: IndexedImages, top_k) -> tuple[MethodResult, dict]:
  model, params = wd.load_retriever(c)
  index, labels = indexed.index, indexed.labels()
  # The classes always: the diagnostics report the retriever's class decision whatever the policy.
  program = SearchProgram(c, model, params, index, mesh=mesh, top_k=top_k, labels=labels)
  found, total_s = program.run(ds.query, warm_up=True, description="beam search")
  encode_s = program.encode_seconds(ds.query)
  beams = _beams(program.beam_size)
  diagnostics = {"beam": _beam_check(c, mesh, ds, indexed, model, params, program, found),
                 "retriever": {**_pair_accuracy(c, mesh, ds, indexed, model, params),
                               **_class_accuracy(found, ds.labels("query"), program.hedge)},
                 "lists": recurring_misses(found.image_ids, ds.labels("query"), labels)}
  stats_path = wd.path(TOKENIZER_STATS)
  build_s = files.read_json(stats_path).get("index_build_s") if os.path.exists(stats_path) else None
  settings = {"beam_size": c.search.beam_size}
  if len(set(beams)) > 1:
    settings["beams_per_level"] = beams
  if program.class_first:
    settings["class_first"] = True
  if program.class_first or program.hedge.enabled:
    settings["class_levels"] = program.class_levels
  if program.hedge.enabled:
    settings.update(program.hedge.settings())
  result = MethodResult(ids=found.image_ids, scores=found.scores, kind="beam_search", build_s=build_s,
                        search_s=max(total_s - encode_s, 1e-9), encode_s=encode_s,
                        index_bytes=index.nbytes, settings=settings,
                        extra={"index_bytes_per_image": index.bytes_per_image})
  return result, diagnostics


def _class_accuracy(found, query_labels: np.ndarray, hedge: hedge_lib.Hedge) -> dict[str, Any]:
  """The retriever's class decision (its first-token distribution summed per class): how often the
  likeliest class is the query's (top-1) or one of the two likeliest (top-2), and the share of lists
  hedged."""
  top = np.asarray(found.top_groups)
  if not len(top) or (top[:, 0] < 0).all():
    return {}
  hit = top == np.asarray(query_labels)[:, None]
  out = {"class_accuracy": float(hit[:, 0].mean()), "class_accuracy_top2": float(hit.any(1).mean())}
  if hedge.enabled:
    out["hedged"] = float(np.asarray(found.hedged).mean())
  return out


def recurring_misses(image_ids: np.ndarray, query_labels: np.ndarray, labels: np.ndarray, k: int = 10,
                     top: int = 3) -> dict[str, Any]:
  """The images IRGen lists most often where they are not positives, in the top ``k``.

  Within a class the retriever's lists are nearly the same for every query (its targets are uniform
  over the class), so one non-positive near the top of a class's list costs that class's queries at
  once (seen: one pullover under a two-token coat prefix was in the top 4 of 68% of the coat queries'
  lists). ``wrong_places``: the share of the listed top-``k`` places that hold a non-positive;
  ``images``: the ``top`` most frequent, each with its label, the share of all queries whose top ``k``
  holds it as a non-positive, and its share of all non-positive places."""
  ids = np.asarray(image_ids)[:, :k]
  if not ids.size:
    return {}
  labels = np.asarray(labels)
  listed = ids >= 0
  wrong = listed & ~metrics.relevance(ids, query_labels, labels)
  counts = np.bincount(ids[wrong], minlength=len(labels))
  total = max(1, int(wrong.sum()))
  images = [{"image": int(i), "label": int(labels[i]), "lists": float(counts[i] / len(ids)),
             "of_wrong_places": float(counts[i] / total)}
            for i in np.argsort(-counts, kind="stable")[:top] if counts[i]]
  return {"k": int(ids.shape[1]), "wrong_places": float(wrong.sum() / max(1, listed.sum())),
          "images": images}


def _sample(c, ds) -> np.ndarray:
  """The queries the diagnostics look at: ``eval.beam_check_queries`` spread over the split."""
  n = min(int(c.eval.get("beam_check_queries", 0)), len(ds.query))
  return np.unique(np.linspace(0, len(ds.query) - 1, n).round().astype(np.int64)) if n > 0 else \
      np.zeros(0, np.int64)


def _beam_check(c, mesh, ds, indexed, model, params, program, found) -> dict[str, Any]:
  """Is the beam wide enough? The sampled queries searched again with twice the beams at every level.

  ``overlap@K``: the share of the wider search's top K images that the run's top K holds;
  ``precision_change@K``: precision@K of the wider search minus the run's, on the sample (what a wider
  beam would buy); ``certified``: share of all queries whose list is provably the exact top K under the
  model (``beam_search.certified``), which uniform same-class targets make rare.
  """
  ids = found.image_ids
  out = {"beams": _beams(program.beam_size),
         # A hedged list's last places are not the search's top K: it certifies nothing. (Class
         # first, a list is certified the exact top K within its class's first tokens.)
         "certified": float((beam_search.certified(found.scores, found.pruned_bound)
                             & ~np.asarray(found.hedged)).mean())}
  rows = _sample(c, ds)
  if not len(rows):
    return out
  t0 = time.perf_counter()
  wider = tuple(2 * b for b in out["beams"])
  check = SearchProgram(c, model, params, program.arrays, mesh=mesh, beam_size=wider,
                        top_k=program.top_k, groups=program.groups, num_groups=program.num_groups,
                        hedge=program.hedge)
  wide_ids = check.run(inference.Subset(ds.query, rows))[0].image_ids
  labels, q_labels = indexed.labels(), ds.labels("query")[rows]
  rel_b = metrics.relevance(ids[rows], q_labels, labels)
  rel_w = metrics.relevance(wide_ids, q_labels, labels)
  out.update(queries=len(rows), check_beams=list(wider))
  for k in c.eval.ks:
    overlap = [len(np.intersect1d(a[:k][a[:k] >= 0], b[:k][b[:k] >= 0])) / max(1, (b[:k] >= 0).sum())
               for a, b in zip(ids[rows], wide_ids)]
    out[f"overlap@{k}"] = float(np.mean(overlap))
    out[f"precision_change@{k}"] = float(metrics.precision_at(rel_w, k).mean()
                                         - metrics.precision_at(rel_b, k).mean())
  out["seconds"] = time.perf_counter() - t0
  log.info("Beam check on %d queries at beams %s: overlap@%d %.3f, precision change@%d %+.4f; %.1f%% "
           "of the lists certified exact (%.1f s).", len(rows), wider, max(c.eval.ks),
           out[f"overlap@{max(c.eval.ks)}"], max(c.eval.ks),
           out[f"precision_change@{max(c.eval.ks)}"], 100 * out["certified"], out["seconds"])
  return out


def _pair_accuracy(c, mesh, ds, indexed, model, params) -> dict[str, Any]:
  """The retriever's per-level token accuracy on held-out pairs: each sampled query with the
  identifier of a random database image of its class (teacher forcing), as in training."""
  rows = _sample(c, ds)
  if not len(rows):
    return {}
  labels, codes = indexed.labels(), indexed.index.codes()
  rng = np.random.default_rng([int(c.seed), 0x9A1])
  targets = np.empty((len(rows), codes.shape[1]), np.int32)
  for i, label in enumerate(ds.labels("query")[rows]):
    same = np.flatnonzero(labels == label)
    targets[i] = codes[rng.choice(same)]
  images, _ = inference.map_split(lambda x: x, inference.Subset(ds.query, rows), mesh=mesh,
                                  batch_size=c.search.query_batch_size,
                                  image_size=c.data.image_size, resize_size=c.data.resize_size)
  logits_fn = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
  hits, nll = [], []
  for start in range(0, len(rows), c.search.query_batch_size):
    sl = slice(start, start + c.search.query_batch_size)
    logits = np.asarray(logits_fn(params, jnp.asarray(images[sl]), jnp.asarray(targets[sl])),
                        np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    hits.append(logits.argmax(-1) == targets[sl])
    nll.append(-np.take_along_axis(logp, targets[sl][..., None], -1)[..., 0].sum(-1))
  hits = np.concatenate(hits)
  return {"pairs": len(rows), "token_accuracy": hits.mean(0).tolist(),
          "sequence_accuracy": float(hits.all(1).mean()), "nll": float(np.concatenate(nll).mean())}


def _tokenizer_diagnostics(c, wd: Workdir, ds, q_logits) -> dict[str, Any]:
  stats = files.read_json(wd.path(TOKENIZER_STATS)) if os.path.exists(wd.path(TOKENIZER_STATS)) else {}
  out = {"head_accuracy": float((np.asarray(q_logits).argmax(-1) == ds.labels("query")).mean()),
         "num_identifiers": stats.get("num_identifiers"),
         "images_per_identifier_max": stats.get("images_per_identifier_max"), "levels": []}
  out["warnings"] = identifiers.collapse_warnings(stats, c.ids.length, c.ids.codebook_size)
  if c.ids.kind == "rqvae":
    # H·W·D positions, not levels of one quantizer: the shared codebook's use, and prefix purity at
    # a few prefix lengths.
    lengths = sorted({m for m in (1, 2, 4, 8, 16, 32, 64, 128, 256) if m <= c.ids.length}
                     | {c.ids.length})
    out["rqvae"] = {"reconstruction_mse": stats.get("reconstruction_mse"),
                    "codebook_perplexity": stats.get("codebook_perplexity"),
                    "codebook_unused_codes": stats.get("codebook_unused_codes"),
                    "codebook_size": c.ids.codebook_size,
                    "purity": {m: stats.get(f"purity_l{m}") for m in lengths},
                    "reconstructions": RECONSTRUCTIONS_FIGURE}
    return out
  for m in range(1, c.ids.length + 1):
    out["levels"].append({k: stats.get(f"{k}_l{m}") for k in
                          ("perplexity", "unused_codes", "purity", "relative_error")})
  return out


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


RECONSTRUCTIONS_FIGURE = "rqvae_reconstructions.png"


def _figures(c, wd: Workdir) -> dict[str, bytes]:
  """The tokenizer stage's figures the report shows: the RQ-VAE's reconstructions."""
  if c.ids.kind != "rqvae" or not os.path.exists(wd.path(RQVAE_RECONSTRUCTIONS)):
    return {}
  with open(wd.path(RQVAE_RECONSTRUCTIONS), "rb") as f:
    return {RECONSTRUCTIONS_FIGURE: f.read()}


# Each trained stage's curves in the report, the panels that tell its story (evaluators/plots.py).
_CURVE_PANELS = {"tokenizer": plots.TOKENIZER_PANELS, "retriever": plots.RETRIEVER_PANELS}


def _training_curves(wd: Workdir) -> dict[str, tuple[str, bytes]]:
  """``{stage: (file name, PNG)}``: each trained stage's curves, the tokenizer's codebook refits marked
  (its losses jump at each: a user sees whether they settle before the next)."""
  out = {}
  for stage, panels in _CURVE_PANELS.items():
    rows = wd.training_log(stage)
    if not rows:
      continue
    refits = wd.refit_steps() if stage == "tokenizer" else []
    png = plots.training_curves_png({stage: rows}, panels=panels, refits={stage: refits},
                                    title=f"The {stage}'s training")
    out[stage] = (f"{stage}_curves.png", png)
  return out


def _training_speed(lines: list[dict[str, Any]]) -> dict[str, Any]:
  """``steps`` and ``steps_per_sec`` from a training log (``Workdir.training_log``), if it has any."""
  # The first logged window holds the compile; the rest is the training speed.
  speeds = [r["steps_per_sec"] for r in lines[1:] if "steps_per_sec" in r]
  if not speeds:
    return {}
  return {"steps_per_sec": float(np.median(speeds)), "steps": int(lines[-1]["step"])}


def _timing(wd: Workdir, started: float) -> dict[str, Any]:
  """Each stage's wall time (its done marker) and training speed (its metrics log), for the report;
  with RQ-VAE identifiers also the RQ-VAE's, which trains inside the tokenizer stage (whose time
  includes it)."""
  out = {}
  for stage in ("data", "tokenizer", "retriever"):
    entry = {}
    if os.path.exists(wd.done_marker(stage)):
      entry["wall_s"] = files.read_json(wd.done_marker(stage)).get("wall_s")
    entry.update(_training_speed(wd.training_log(stage)))
    if entry:
      out[stage] = entry
    if stage == "tokenizer":
      stats = files.read_json(wd.path(TOKENIZER_STATS)) if os.path.exists(wd.path(TOKENIZER_STATS)) else {}
      rqvae = {"wall_s": stats["rqvae_s"]} if "rqvae_s" in stats else {}
      rqvae.update(_training_speed(wd.training_log(RQVAE)))
      if rqvae:
        out["rqvae"] = rqvae
  out["evaluate"] = {"wall_s_until_report": time.perf_counter() - started}
  return out


def run(c: ml_collections.ConfigDict, wd: Workdir, mesh) -> dict[str, Any]:
  started = time.perf_counter()
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
  irgen, diagnostics = _irgen(c, wd, mesh, ds, indexed, top_k)
  methods: dict[str, MethodResult] = {"irgen": irgen}
  failpoints.hit("evaluate.searched")

  tok_model, tok_params = wd.load_tokenizer(c, ds.num_classes)
  db_feats = indexed.features()
  (q_feats, q_logits), q_encode_s = inference.map_split(
      functools.partial(features.features_and_logits_fn(tok_model), tok_params), ds.query, mesh=mesh,
      batch_size=c.search.query_batch_size, image_size=c.data.image_size,
      resize_size=c.data.resize_size, warm_up=True)
  diagnostics["tokenizer"] = _tokenizer_diagnostics(c, wd, ds, q_logits)
  methods.update(_baselines(c, "", db_feats, q_feats, q_encode_s, top_k, metric="l2"))
  if c.eval.extra_encoder:
    clip_db, clip_q, clip_s = _clip_features(c, c.eval.extra_encoder, ds, indexed.source(), mesh)
    methods.update(_baselines(c, "clip_", clip_db, clip_q, clip_s, top_k, metric="cosine"))

  out_dir = wd.path(REPORT)
  result = {}
  if jax.process_index() == 0:
    timing, figures = _timing(wd, started), _figures(c, wd)
    for stage, (name, png) in _training_curves(wd).items():
      timing.setdefault(stage, {})["curves"] = name
      figures[name] = png
    result = report.write_report(
        out_dir, dataset=c.data.name, ks=tuple(c.eval.ks), query_labels=ds.labels("query"),
        database_labels=database_labels, methods=methods,
        query_image=lambda i: ds.query[int(i)]["image"],
        database_image=lambda j: indexed.image_or_placeholder(int(j)),
        num_gallery_queries=c.eval.gallery_queries, seed=c.seed, map_at=c.eval.map_at,
        diagnostics=diagnostics, timing=timing, figures=figures)
  parallel.sync("report written")
  summary = {name: {k: v for k, v in m.items() if k.startswith(("precision@", "recall@"))}
             for name, m in result.get("methods", {}).items()}
  log.info("Report in %s: %s", out_dir, summary)
  return {"report": out_dir, "num_database": indexed.num_images, "inserted": inserted}
