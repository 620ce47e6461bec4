"""The evaluation report of one run: metrics.json, results.md, PNG plots and gallery.html.

``write_report`` evaluates every method (``evaluate_method``) on the same queries and writes, under out_dir
(``workdir/report/`` by convention):
  metrics.json         {"dataset", "num_database", "num_queries", "ks", "methods": {name: {"precision@K",
                       "recall@K", "map@100", "mrr@K", "qps", ...}}, ...}: metric values in [0, 1], seconds,
                       bytes; plus "method_info" (kind, settings), "curves" (precision / TPR over K) and the
                       definitions used.
  results.md           the paper's Table 1 (precision@K) and Table 2 (recall@K) layout, grouped by search
                       kind, then MAP@100 and MRR, speed and index size, and the reference code's precision.
  precision_at_k.png, pr_curve.png, mrr.png
  <stage>_curves.png   each trained stage's logged training curves (``figures``; results.md shows them
                       under Time, where the timing names them).
  gallery.html         when image callbacks are given (gallery.py).

The whole report is written into a fresh sibling directory, then swapped in by rename, so a crash leaves
either the previous complete report or none, never a mix of old and new files or a truncated one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from irgen_jax import failpoints
from irgen_jax.evaluators import gallery as gallery_lib
from irgen_jax.evaluators import metrics as metrics_lib
from irgen_jax.evaluators import plots
from irgen_jax.evaluators.baselines import recall_vs_exact
from irgen_jax.evaluators.results import KIND_TITLES, MethodResult, kind_title

# Kinds whose results approximate an exact scan over the same features: they get recall_vs_exact@K.
APPROXIMATE_KINDS = ("faiss_ivfpq", "scann")

DEFINITIONS = {
    "precision@K": "hits in the top K / K; empty slots are misses; mean over queries",
    "recall@K": "fraction of queries with at least one positive in the top K (the paper's Recall@K)",
    "map@R": "mean of AP@R = sum_{i<=R} precision@i * rel_i / min(#positives, R)",
    "mrr@K": "mean of 1 / rank of the first positive within the top K (0 when none)",
    "reference_precision@K": "the public reference's precision: hits@K / K, or hits@K / rank of the last "
                             "positive when every positive is already in the top K; NOT standard precision",
    "pr_curve": "mean precision@K against mean true-positive rate hits@K / #positives, K = 1..max",
    "recall_vs_exact@K": "fraction of the exact scan's top K that the approximate method's top K holds",
    "qps": "queries per second of the search alone (query features given)",
    "qps_with_encoder": "queries per second including the query encoder's time",
    "positives": "database images with the query's label; queries without any score 0 on every metric",
}


def evaluate_method(result: MethodResult, *, query_labels: Any, database_labels: Any, ks: Sequence[int],
                    exact_ids: np.ndarray | None = None, map_at: int = metrics_lib.DEFAULT_MAP_AT,
                    mrr_ks: Sequence[int] = metrics_lib.DEFAULT_MRR_KS) -> dict[str, float | int | None]:
  """Every number reported for one method: metrics (metrics.evaluate), costs and extras.

  Keys: precision@K, recall@K, mrr@K, reference_precision@K, map@{map_at}; qps, qps_with_encoder, search_s,
  encode_s, build_s, index_bytes (None where not applicable); num_retrieved (the list width),
  mean_listed (the images a list holds, on average);
  recall_vs_exact@K for K <= both widths when ``exact_ids int [Q, >=K]`` is given; then ``result.extra``.
  """
  out: dict[str, float | int | None] = dict(metrics_lib.evaluate(
      result.ids, query_labels, database_labels, ks, map_at=map_at, mrr_ks=mrr_ks))
  out.update(qps=result.qps, qps_with_encoder=result.qps_with_encoder, search_s=float(result.search_s),
             encode_s=float(result.encode_s),
             build_s=None if result.build_s is None else float(result.build_s),
             index_bytes=None if result.index_bytes is None else int(result.index_bytes),
             num_retrieved=int(np.shape(result.ids)[1]),
             # The images a list really holds (a beam search may fill fewer places than its width).
             mean_listed=float((np.asarray(result.ids) >= 0).sum(1).mean()) if len(result.ids) else 0.0)
  if exact_ids is not None:
    width = min(np.shape(result.ids)[1], np.shape(exact_ids)[1])
    for k in metrics_lib.check_ks(ks):
      if k <= width:
        out[f"recall_vs_exact@{k}"] = recall_vs_exact(result.ids, exact_ids, k)
  for key, v in result.extra.items():
    if key in out:
      raise ValueError(f"Extra metric {key!r} would overwrite a computed one.")
    out[key] = float(v)
  return out


def _exact_reference(name: str, methods: Mapping[str, MethodResult], exact_method: str) -> str | None:
  """The exact method an approximate one is compared with (None: no comparison).

  ``result.exact_reference`` when set; otherwise, for approximate kinds, ``exact_method`` unless its metric
  differs from the method's (an L2 scan is no ground truth for a cosine index), then the only linear scan
  with the method's metric, if there is exactly one.
  """
  m = methods[name]
  if m.exact_reference is not None:
    if m.exact_reference not in methods:
      raise ValueError(f"methods[{name!r}].exact_reference={m.exact_reference!r} is not one of "
                       f"{sorted(methods)}.")
    return m.exact_reference
  if m.kind not in APPROXIMATE_KINDS:
    return None
  metric = m.settings.get("metric")
  if exact_method in methods and methods[exact_method].settings.get("metric") in (None, metric):
    return exact_method
  same = [n for n, e in methods.items() if e.kind == "linear_scan" and e.settings.get("metric") == metric]
  return same[0] if len(same) == 1 else None


def _ordered(methods: Mapping[str, MethodResult]) -> list[str]:
  """Method names grouped by kind in the paper's order (unknown kinds last), insertion order inside."""
  rank = {k: i for i, k in enumerate(KIND_TITLES)}
  names = list(methods)
  return sorted(names, key=lambda n: (rank.get(methods[n].kind, len(rank)), names.index(n)))


def _pct(v: float | None) -> str:
  return "–" if v is None else f"{100 * v:.1f}"


def _num(v: float | None, fmt: str) -> str:
  return "–" if v is None else format(v, fmt)


def _qps(v: float | None) -> str:
  return "–" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _bytes(n: int | None) -> str:
  if n is None:
    return "–"
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError("unreachable")


def _table(names: list[str], methods: Mapping[str, MethodResult], columns: list[tuple[str, str]],
           values: Mapping[str, Mapping[str, Any]], fmt: Callable[[Any], str], bold_best: bool) -> list[str]:
  """A markdown table in the paper's layout: a bold group row per search kind, then its methods."""
  lines = ["| Method | " + " | ".join(title for _, title in columns) + " |",
           "|:--|" + "--:|" * len(columns)]
  best = {}
  if bold_best:
    for key, _ in columns:
      vals = [values[n].get(key) for n in names if values[n].get(key) is not None]
      best[key] = max(vals) if vals else None
  group = None
  for n in names:
    if methods[n].kind != group:
      group = methods[n].kind
      lines.append(f"| **{kind_title(group)}** |" + " |" * len(columns))
    cells = []
    for key, _ in columns:
      v = values[n].get(key)
      s = fmt(v)
      cells.append(f"**{s}**" if bold_best and v is not None and v == best[key] else s)
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
  return lines


def _settings_summary(settings: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v}" for k, v in settings.items())


def results_markdown(*, dataset: str, num_database: int, num_queries: int, ks: Sequence[int],
                     methods: Mapping[str, MethodResult], values: Mapping[str, Mapping[str, Any]],
                     map_at: int, mrr_ks: Sequence[int], extra: str = "") -> str:
  """results.md: Tables 1-2 layout (rows = methods grouped by search kind, columns = K), then MAP / MRR,
  speed and index size, the reference code's precision, ``extra`` sections, and the definitions."""
  names = _ordered(methods)
  max_k = max(ks)
  out = [f"# Retrieval results — {dataset}", "",
         f"{num_queries} queries against {num_database} database images. Metrics in %, best per column in "
         "bold; definitions at the end.", "",
         "## Precision@K (Table 1 layout)", ""]
  out += _table(names, methods, [(f"precision@{k}", str(k)) for k in ks], values, _pct, True)
  out += ["", "## Recall@K (Table 2 layout: at least one positive in the top K)", ""]
  out += _table(names, methods, [(f"recall@{k}", str(k)) for k in ks], values, _pct, True)
  out += ["", f"## MAP@{map_at} and MRR", ""]
  mrr_cols = sorted(set(mrr_ks) | set(ks))
  columns = [(f"map@{map_at}", f"MAP@{map_at}")] + [(f"mrr@{k}", f"MRR@{k}") for k in mrr_cols]
  out += _table(names, methods, columns, values, _pct, True)
  listed = [f"{n} (beams per level {methods[n].settings['beams_per_level']})" for n in names
            if "beams_per_level" in methods[n].settings]
  if listed:
    out += ["", "Every column of " + ", ".join(listed) + " comes from that one search: its last levels "
            "are widened so that its list is as long as the longest a metric reads."]
  for n in names:
    st = methods[n].settings
    prefixes = ("first tokens" if st.get("class_levels", 1) == 1 else
                f"prefixes to {st['class_levels']} tokens")
    if st.get("class_first"):
      levels = " (search.class_levels)" if st.get("class_levels", 1) > 1 else ""
      out += ["", f"{n} searches class first (search.class_first): within the {prefixes}{levels} "
              "of the class its retriever finds likeliest (the first-token distribution summed per "
              "class; a prefix's class is the majority label of the database images under it), "
              "then, where that class holds fewer images than the list, the best of the others."]
    if st.get("hedge_slots"):
      r, at = st["hedge_slots"], st["hedge_at"]
      places = f"place {at} holds" if r == 1 else f"places {at - r + 1}-{at} hold"
      out += ["", f"{n}'s lists are hedged (search.hedge): where the retriever's runner-up class has "
              f"posterior >= {st['hedge_threshold']}, {places} that class's best images, from a search of "
              f"{st['hedge_beam_size']} beams within its {prefixes}, and the rest moves down: its "
              f"columns at K >= {at - r + 1} come from the hedged list."]
  listed = lambda n: values[n].get("mean_listed", values[n]["num_retrieved"])  # noqa: E731
  short = [n for n in names if listed(n) < map_at - 0.5]
  if short:
    out += ["", f"Listed fewer than {map_at} images per query on average (missing places count as "
            "misses): " + ", ".join(f"{n} ({listed(n):.1f})" for n in short) + "."]
  out += ["", "## Speed and index", "",
          "| Method | QPS (search) | QPS (with encoder) | Build (s) | Index size | "
          f"Recall vs exact@{max_k} | Settings |", "|:--|--:|--:|--:|--:|--:|:--|"]
  group = None
  for n in names:
    m, v = methods[n], values[n]
    if m.kind != group:
      group = m.kind
      out.append(f"| **{kind_title(group)}** | | | | | | |")
    out.append(f"| {n} | {_qps(v['qps'])} | {_qps(v['qps_with_encoder'])} | "
               f"{_num(v['build_s'], '.3g')} | {_bytes(v['index_bytes'])} | "
               f"{_pct(v.get(f'recall_vs_exact@{max_k}'))} | {_settings_summary(m.settings)} |")
  extra_keys = sorted({k for n in names for k in methods[n].extra})
  if extra_keys:
    out += ["", "## Other metrics", "",
            "| Method | " + " | ".join(extra_keys) + " |", "|:--|" + "--:|" * len(extra_keys)]
    for n in (n for n in names if methods[n].extra):
      out.append(f"| {n} | " + " | ".join(_num(values[n].get(k), '.4g') if k in methods[n].extra else "–"
                                          for k in extra_keys) + " |")
  out += ["", "## The reference code's precision (not standard precision@K; for comparison with its README)",
          ""]
  out += _table(names, methods, [(f"reference_precision@{k}", str(k)) for k in ks], values, _pct, False)
  if extra:
    out.append(extra.rstrip("\n"))
  out += ["", "## Definitions", ""]
  out += [f"- **{k}**: {d}" for k, d in DEFINITIONS.items()]
  return "\n".join(out) + "\n"


def diagnostics_markdown(d: Mapping[str, Any], values: Mapping[str, Mapping[str, Any]],
                         ks: Sequence[int]) -> str:
  """results.md's "Where precision is lost" section: the tokenizer's class head and identifiers, the
  retriever's token accuracy on held-out pairs, and whether the beam is wide enough."""
  if not d:
    return ""
  out = ["", "## Diagnostics: where precision is lost", ""]
  tok, ret, beam = d.get("tokenizer", {}), d.get("retriever", {}), d.get("beam", {})
  irgen = values.get("irgen", {})
  line = []
  if "head_accuracy" in tok:
    line.append(f"the tokenizer's class head is right on **{_pct(tok['head_accuracy'])}%** of the queries")
  if "class_accuracy" in ret:
    line.append(f"the retriever's class (its first-token distribution summed per class) on "
                f"**{_pct(ret['class_accuracy'])}%**, one of its two likeliest on "
                f"{_pct(ret['class_accuracy_top2'])}%")
  if "precision@1" in irgen:
    line.append(f"IRGen's first image on **{_pct(irgen['precision@1'])}%** (retriever and beam)")
  if "precision_change@1" in beam:
    line.append(f"twice the beams change that by {100 * beam['precision_change@1']:+.1f} points (on "
                f"{beam['queries']} queries)")
  if line:
    out += ["Top 1: " + "; ".join(line) + ". The head is about what the tokenizer's features "
            "separate; a gap to the retriever's class is the retriever's loss, from there to the first "
            "image the beam's.", ""]
  if "hedged" in ret:
    out += [f"**Hedge**: {_pct(ret['hedged'])}% of the lists hold images of the retriever's runner-up "
            "class (search.hedge).", ""]
  lists = d.get("lists", {})
  if lists.get("images"):
    k = lists["k"]
    names = "; ".join(f"image {m['image']} (label {m['label']}) in the top {k} of {_pct(m['lists'])}% of "
                      f"the queries ({_pct(m['of_wrong_places'])}% of those places)" for m in lists["images"])
    out += [f"**Lists**: {_pct(lists['wrong_places'])}% of IRGen's top-{k} places hold non-positives. "
            f"Listed most often where they are not positives: {names}. Within a class the retriever's "
            "lists are nearly the same for every query, so one such image near the top costs the "
            "class's queries at once.", ""]
  if tok.get("levels"):
    out += [f"**Tokenizer identifiers**: {tok.get('num_identifiers')} distinct, at most "
            f"{tok.get('images_per_identifier_max')} images on one.", "",
            "| Level | Perplexity | Unused codes | Prefix purity | Relative error |",
            "|--:|--:|--:|--:|--:|"]
    for m, lv in enumerate(tok["levels"], start=1):
      out.append(f"| {m} | {_num(lv.get('perplexity'), '.1f')} | {_num(lv.get('unused_codes'), '.0f')} | "
                 f"{_pct(lv.get('purity'))} | {_num(lv.get('relative_error'), '.4f')} |")
    out += ["", "Prefix purity: the share of images whose level-m prefix carries its majority class."]
  v = tok.get("rqvae")
  if v:
    purity = ", ".join(f"{_pct(p)}% (@{m})" for m, p in v.get("purity", {}).items())
    out += [f"**RQ-VAE identifiers**: {tok.get('num_identifiers')} distinct, at most "
            f"{tok.get('images_per_identifier_max')} images on one; the shared codebook's perplexity "
            f"{_num(v.get('codebook_perplexity'), '.1f')} of {v.get('codebook_size')} codes, "
            f"{_num(v.get('codebook_unused_codes'), '.0f')} unused; reconstruction MSE "
            f"{_num(v.get('reconstruction_mse'), '.4f')} (normalized pixels); prefix purity {purity} "
            "(the share of images whose first m tokens carry their majority class). Database images "
            "(top) over their reconstructions from the codes:", "",
            f"![RQ-VAE reconstructions]({v.get('reconstructions')})", ""]
  if tok.get("levels") or v:
    out += [f"- **Warning**: {w}." for w in tok.get("warnings", [])]
    out.append("")
  if ret.get("token_accuracy"):
    acc = " / ".join(f"{_pct(a)}%" for a in ret["token_accuracy"])
    out += [f"**Retriever** on {ret['pairs']} held-out pairs (a query, a random same-class database "
            f"image's identifier): token accuracy per level {acc}, whole identifier "
            f"{_pct(ret['sequence_accuracy'])}%, NLL {ret['nll']:.3f} nats. Within a class the target is "
            "uniform, so past the class-deciding levels low accuracy is expected.", ""]
  if beam.get("beams"):
    text = f"**Beam**: beams per level {beam['beams']}"
    if "queries" in beam:
      k = max(ks)
      text += (f"; searched again with {beam['check_beams']} on {beam['queries']} queries, the top {k} "
               f"keeps {_pct(beam[f'overlap@{k}'])}% of its images and precision changes by "
               + ", ".join(f"{100 * beam[f'precision_change@{kk}']:+.2f} (@{kk})" for kk in ks)
               + " points")
    text += (f"; {_pct(beam.get('certified'))}% of the lists are provably the exact top K under the "
             "model. A precision change near 0 means the beam is wide enough.")
    out += [text, ""]
  return "\n".join(out)


def timing_markdown(t: Mapping[str, Any]) -> str:
  if not t:
    return ""
  out = ["", "## Time", "", "| Stage | Wall (s) | Steps | Steps/s |", "|:--|--:|--:|--:|"]
  for stage, v in t.items():
    wall = v.get("wall_s", v.get("wall_s_until_report"))
    out.append(f"| {stage} | {_num(wall, '.1f')} | {v.get('steps', '–')} | "
               f"{_num(v.get('steps_per_sec'), '.2f')} |")
  out += ["", "Evaluate: until this report was written. Steps/s: the median of the logged windows "
          "after the first (which holds the compile)."]
  for stage, v in t.items():
    if v.get("curves"):
      out += ["", f"![The {stage}'s training curves]({v['curves']})"]
  return "\n".join(out) + "\n"


def _swap_in(tmp: Path, out: Path) -> None:
  """Replaces directory ``out`` by ``tmp`` with renames (atomic each; ``out`` never half-written)."""
  if out.exists():
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "report")
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, out)


def write_report(out_dir: str | os.PathLike, *, dataset: str, ks: Sequence[int], query_labels: Any,
                 database_labels: Any, methods: Mapping[str, MethodResult],
                 query_image: Callable[[int], Any] | None = None,
                 database_image: Callable[[int], Any] | None = None, num_gallery_queries: int = 8,
                 gallery_k: int | None = None, seed: int = 0, exact_method: str = "linear_scan",
                 map_at: int = metrics_lib.DEFAULT_MAP_AT,
                 mrr_ks: Sequence[int] = metrics_lib.DEFAULT_MRR_KS,
                 diagnostics: Mapping[str, Any] | None = None,
                 timing: Mapping[str, Any] | None = None,
                 figures: Mapping[str, bytes] | None = None) -> dict[str, Any]:
  """Evaluates ``methods`` and writes the report directory ``out_dir``, replacing it as a whole.

  figures: extra PNG files of the report ({file name: bytes}, e.g. the RQ-VAE's reconstructions).
  diagnostics: where precision is lost (tokenizer, retriever, beam; see ``diagnostics_markdown``),
    reported in results.md and kept as is in metrics.json. timing: each stage's wall time and steps/s.

  methods: name -> MethodResult on the same Q queries (conventional names: irgen, linear_scan,
    linear_scan_cosine, faiss_ivfpq, scann). Approximate kinds get recall_vs_exact@K against
    ``result.exact_reference`` or, when that is None, ``exact_method`` or the linear scan with their metric
    (see ``_exact_reference``; metrics.json's method_info says which).
  query_image(i), database_image(j): uint8 HWC (or HW) images; both or neither. With them, gallery.html shows
    ``num_gallery_queries`` queries drawn with ``seed`` and each method's top ``gallery_k`` (default
    min(10, max(ks))).
  Returns the metrics.json content. Inputs are validated before anything is written.
  """
  ks = metrics_lib.check_ks(ks)
  mrr_ks = metrics_lib.check_ks(mrr_ks, "mrr_ks")
  query_labels, database_labels = np.asarray(query_labels), np.asarray(database_labels)
  if not methods:
    raise ValueError("methods is empty: nothing to report.")
  q = len(query_labels)
  for name, m in methods.items():
    if not isinstance(m, MethodResult):
      raise ValueError(f"methods[{name!r}] must be a MethodResult, got {type(m).__name__}.")
    if m.num_queries != q:
      raise ValueError(f"methods[{name!r}] has {m.num_queries} query rows but there are {q} query labels.")
  if (query_image is None) != (database_image is None):
    raise ValueError("Pass both query_image and database_image, or neither.")
  if num_gallery_queries < 0:
    raise ValueError(f"num_gallery_queries={num_gallery_queries} must be >= 0.")
  gallery_k = min(10, max(ks)) if gallery_k is None else gallery_k
  if gallery_k < 1:
    raise ValueError(f"gallery_k={gallery_k} must be >= 1.")

  values: dict[str, dict[str, Any]] = {}
  curves: dict[str, dict[str, list]] = {}
  npos = metrics_lib.num_positives(query_labels, database_labels)
  refs = {name: _exact_reference(name, methods, exact_method) for name in methods}
  for name, m in methods.items():
    ref = refs[name]
    exact_ids = None if ref is None or ref == name else methods[ref].ids
    values[name] = evaluate_method(m, query_labels=query_labels, database_labels=database_labels, ks=ks,
                                   exact_ids=exact_ids, map_at=map_at, mrr_ks=mrr_ks)
    rel = metrics_lib.relevance(m.ids, query_labels, database_labels)
    c = metrics_lib.precision_recall_curve(rel, npos, max(max(ks), rel.shape[1]))
    curves[name] = {key: np.asarray(v).tolist() for key, v in c.items()}

  report = {
      "dataset": str(dataset), "num_database": int(len(database_labels)), "num_queries": int(q),
      "ks": list(ks), "map_at": int(map_at), "mrr_ks": list(mrr_ks),
      "methods": values,
      "diagnostics": dict(diagnostics or {}), "timing": dict(timing or {}),
      "method_info": {n: {"kind": m.kind, "title": kind_title(m.kind), "settings": m.settings,
                          "exact_reference": refs[n]} for n, m in methods.items()},
      "curves": curves,
      "definitions": DEFINITIONS,
  }
  gallery_queries: list[int] = []
  if query_image is not None and num_gallery_queries > 0:
    rng = np.random.default_rng(seed)
    gallery_queries = sorted(rng.choice(q, size=min(num_gallery_queries, q), replace=False).tolist())
  report["gallery_queries"] = gallery_queries

  kinds = {n: m.kind for n, m in methods.items()}
  ordered = _ordered(methods)
  files: dict[str, bytes] = {
      "results.md": results_markdown(
          dataset=dataset, num_database=len(database_labels), num_queries=q, ks=ks, methods=methods,
          values=values, map_at=map_at, mrr_ks=mrr_ks,
          extra=diagnostics_markdown(diagnostics or {}, values, ks) + timing_markdown(timing or {})
      ).encode(),
      "precision_at_k.png": plots.precision_at_k_png({n: curves[n] for n in ordered}, kinds, ks, dataset),
      "pr_curve.png": plots.precision_recall_png({n: curves[n] for n in ordered}, kinds, dataset),
      "mrr.png": plots.mrr_png({n: {k: values[n][f"mrr@{k}"] for k in mrr_ks} for n in ordered}, kinds,
                               dataset),
  }
  for fname, png in (figures or {}).items():
    if fname in files or "/" in fname:
      raise ValueError(f"figure name {fname!r}: expected a file name other than the report's own.")
    files[fname] = png
  if gallery_queries:
    files["gallery.html"] = gallery_lib.gallery_html(
        dataset=dataset, query_indices=gallery_queries, query_labels=query_labels,
        database_labels=database_labels, ranked={n: methods[n].ids for n in ordered},
        query_image=query_image, database_image=database_image, k=gallery_k).encode()
  # allow_nan=False: a NaN would make the file invalid JSON for strict readers; fail here instead.
  files["metrics.json"] = json.dumps(report, indent=1, allow_nan=False, default=_json_default).encode()

  out = Path(out_dir)
  out.parent.mkdir(parents=True, exist_ok=True)
  for stale in out.parent.glob(f".{out.name}.*-*"):  # what a writer killed earlier left behind
    shutil.rmtree(stale, ignore_errors=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    # mkdtemp makes the directory private (0700); the report should be as readable as any new directory.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for fname, data in files.items():
      with open(tmp / fname, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      failpoints.hit("report.file")
    _swap_in(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return report


def _json_default(x: Any) -> Any:
  """numpy scalars and arrays in settings -> JSON."""
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"Cannot write {type(x).__name__} to metrics.json.")
