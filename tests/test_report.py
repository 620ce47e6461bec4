"""The report: metrics.json shape, results.md tables, PNG plots, the HTML gallery, atomic replacement."""

from __future__ import annotations

import dataclasses
import html.parser
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from irgen_jax.evaluators import baselines as B
from irgen_jax.evaluators import gallery as G
from irgen_jax.evaluators import metrics as M
from irgen_jax.evaluators import plots
from irgen_jax.evaluators import report as R
from irgen_jax.evaluators.results import MethodResult

KS = [1, 2, 4]
DB_LABELS = np.array([0, 0, 1, 1, 2, 2, 3, 3])
Q_LABELS = np.array([0, 1, 2])


def result(ids, kind, **kw):
  ids = np.asarray(ids, np.int64)
  scores = np.where(ids >= 0, -np.arange(ids.shape[1], dtype=np.float32)[None, :], -np.inf)
  return MethodResult(ids=ids, scores=scores, kind=kind, **{"search_s": 0.5, **kw})


def crafted_methods():
  """Four methods in scrambled order (the report regroups them the paper's way)."""
  return {
      "irgen": result([[1, 0, 4, 5], [2, -1, -1, -1], [7, 6, 5, 4]], "beam_search", encode_s=0.0,
                      extra={"beam_agreement": 0.75}),
      "scann": result([[0, 1, 2, 3], [2, 3, 0, 1], [4, 5, 6, 7]], "scann", build_s=0.1, index_bytes=900),
      "linear_scan": result([[0, 1, 2, 3], [2, 3, 0, 1], [4, 5, 6, 7]], "linear_scan", build_s=0.0,
                            index_bytes=4096, encode_s=0.5),
      "faiss_ivfpq": result([[0, 2, 1, -1], [3, 0, -1, -1], [6, 4, 5, 7]], "faiss_ivfpq", build_s=0.2,
                            index_bytes=300, settings={"nlist": 2, "nprobe": 1}),
  }


# Expected relevance of each shown slot (query -> method -> classes), worked out from the labels above.
EXPECTED_GALLERY = {
    0: {"irgen": ["hit", "hit", "miss", "miss"], "scann": ["hit", "hit", "miss", "miss"],
        "linear_scan": ["hit", "hit", "miss", "miss"], "faiss_ivfpq": ["hit", "miss", "hit", "empty"]},
    1: {"irgen": ["hit", "empty", "empty", "empty"], "scann": ["hit", "hit", "miss", "miss"],
        "linear_scan": ["hit", "hit", "miss", "miss"], "faiss_ivfpq": ["hit", "miss", "empty", "empty"]},
    2: {"irgen": ["miss", "miss", "hit", "hit"], "scann": ["hit", "hit", "miss", "miss"],
        "linear_scan": ["hit", "hit", "miss", "miss"], "faiss_ivfpq": ["miss", "hit", "hit", "miss"]},
}


def query_image(i):
  return np.full((28, 28), 40 * i, np.uint8)  # gray, no channel dim


def database_image(j):
  img = np.zeros((28, 28, 1), np.uint8)  # gray with C=1
  img[j:j + 10, j:j + 10] = 255
  return img


def write(out_dir, methods=None, **kw):
  args = dict(dataset="toy", ks=KS, query_labels=Q_LABELS, database_labels=DB_LABELS,
              methods=crafted_methods() if methods is None else methods, query_image=query_image,
              database_image=database_image, num_gallery_queries=3, gallery_k=4, seed=0)
  args.update(kw)
  return R.write_report(out_dir, **args)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("run") / "report"
  write(out)
  return out


def test_metrics_json_has_the_required_shape(report_dir):
  with open(report_dir / "metrics.json") as f:
    m = json.load(f)
  assert m["dataset"] == "toy" and m["num_database"] == 8 and m["num_queries"] == 3 and m["ks"] == KS
  assert set(m["methods"]) == {"irgen", "linear_scan", "faiss_ivfpq", "scann"}
  for name, v in m["methods"].items():
    required = [f"{metric}@{k}" for metric in ("precision", "recall", "mrr") for k in KS] + ["map@100"]
    for key in required:
      assert isinstance(v[key], float) and 0.0 <= v[key] <= 1.0, (name, key, v[key])
    assert isinstance(v["qps"], float) and v["qps"] == pytest.approx(3 / 0.5)
    for key, x in v.items():
      if key.split("@")[0] in ("precision", "recall", "mrr", "map", "reference_precision", "recall_vs_exact"):
        assert 0.0 <= x <= 1.0, (name, key, x)
  # Hand-computed values: irgen hits per query in the top 4: 2, 1, 2; first hits at ranks 1, 1, 3.
  irgen = m["methods"]["irgen"]
  assert irgen["precision@4"] == pytest.approx((2 + 1 + 2) / 12)
  assert irgen["precision@1"] == pytest.approx(2 / 3)
  assert irgen["recall@2"] == pytest.approx(2 / 3) and irgen["recall@4"] == 1.0
  assert irgen["mrr@4"] == pytest.approx((1 + 1 + 1 / 3) / 3)
  assert irgen["map@100"] == pytest.approx((1 + 1 / 2 + (1 / 3 + 2 / 4) / 2) / 3)
  assert irgen["beam_agreement"] == 0.75 and irgen["num_retrieved"] == 4
  assert m["methods"]["linear_scan"]["qps_with_encoder"] == pytest.approx(3 / 1.0)
  assert m["methods"]["faiss_ivfpq"]["index_bytes"] == 300
  # Approximate kinds are compared with the exact scan; the others are not.
  assert m["methods"]["faiss_ivfpq"]["recall_vs_exact@4"] == pytest.approx(9 / 12)
  assert m["methods"]["scann"]["recall_vs_exact@4"] == 1.0
  assert "recall_vs_exact@4" not in m["methods"]["irgen"]
  assert "recall_vs_exact@4" not in m["methods"]["linear_scan"]
  assert m["method_info"]["faiss_ivfpq"] == {"kind": "faiss_ivfpq", "title": "Faiss IVF PQ search",
                                              "settings": {"nlist": 2, "nprobe": 1},
                                              "exact_reference": "linear_scan"}
  # Mean TPR (hits@K / 2 positives per query) for K = 1..4; irgen's hits: q0 1,2,2,2; q1 1,1,1,1; q2 0,0,1,2.
  assert m["curves"]["irgen"]["recall"] == pytest.approx([1 / 3, 1 / 2, 2 / 3, 5 / 6])


def table(md, heading):
  """The markdown table under a heading: list of rows, each a list of cell strings."""
  section = md.split(heading, 1)[1].split("\n## ", 1)[0]
  return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
          if line.startswith("|") and not line.startswith("|:--")][1:]


def test_results_md_has_the_papers_table_layout(report_dir):
  md = (report_dir / "results.md").read_text()
  for heading in ("## Precision@K", "## Recall@K", "## MAP@100 and MRR", "## Speed and index",
                  "## The reference code's precision"):
    rows = table(md, heading)
    names = [r[0] for r in rows]
    # Grouped like Tables 1-2: Linear scan / Faiss IVF PQ / ScaNN / Beam search, one row per method.
    assert names == ["**Linear scan search**", "linear_scan", "**Faiss IVF PQ search**", "faiss_ivfpq",
                     "**ScaNN search**", "scann", "**Beam search**", "irgen"], heading
  header = md.split("## Precision@K", 1)[1].splitlines()[2]
  assert header == "| Method | 1 | 2 | 4 |"
  precision = {r[0]: r[1:] for r in table(md, "## Precision@K")}
  assert precision["irgen"] == ["66.7", "50.0", "41.7"]  # P@2 = (2/2 + 1/2 + 0/2) / 3
  assert precision["linear_scan"] == ["**100.0**", "**100.0**", "**50.0**"]  # best per column in bold
  speed = {r[0]: r for r in table(md, "## Speed and index")}
  assert speed["linear_scan"][1:4] == ["6", "3", "0"]  # QPS, QPS with encoder, build seconds
  assert "beam_agreement" in md


def test_pngs_are_valid_images(report_dir):
  for name in ("precision_at_k.png", "pr_curve.png", "mrr.png"):
    with Image.open(report_dir / name) as im:
      im.verify()
    with Image.open(report_dir / name) as im:
      assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
      # Not a blank canvas.
      assert len(np.unique(np.asarray(im.convert("L")))) > 10


class _GalleryParser(html.parser.HTMLParser):
  """Collects, per query section and row, the classes of the shown slots."""

  def __init__(self):
    super().__init__()
    self.sections, self.srcs, self._in_name = [], [], False

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    cls = a.get("class", "").split()
    if tag == "section":
      self.sections.append({})
    elif tag == "div" and "name" in cls:
      self._in_name, self._row = True, None
    elif tag == "img" and "thumb" in cls and self.sections:
      self.srcs.append(a["src"])
      if "query-img" not in cls:
        self.sections[-1][self._row].append("hit" if "hit" in cls else "miss" if "miss" in cls else "?")
    elif tag == "span" and "empty" in cls and self.sections:
      self.sections[-1][self._row].append("empty")

  def handle_data(self, data):
    if self._in_name and self._row is None and data.strip():
      self._row = data.strip()
      self.sections[-1][self._row] = []
      self._in_name = False


def test_training_curves_leave_out_unlogged_panels_and_refuse_when_none_is_logged():
  def size(png):
    with Image.open(io.BytesIO(png)) as im:
      assert im.format == "PNG" and len(np.unique(np.asarray(im.convert("L")))) > 10
      return im.size

  rows = [{"step": s, "loss": 10.0 / s, "ce_cls": 1.0 + 1.0 / s, "ce_rq": 9.0, "quant": 50.0 / s}
          for s in range(10, 201, 10)]
  four = size(plots.training_curves_png({"a": rows, "b": rows[:8]}, panels=plots.TOKENIZER_PANELS,
                                        title="t", refits={"a": [50, 120]}))
  # Two of the four keys logged: one row of two panels, the same width.
  two = size(plots.training_curves_png({"a": [{k: r[k] for k in ("step", "loss", "quant")} for r in rows]},
                                       panels=plots.TOKENIZER_PANELS, title="t"))
  assert two[0] == four[0] and two[1] < 0.7 * four[1]
  with pytest.raises(ValueError, match="none of the keys"):
    plots.training_curves_png({"a": rows}, panels=plots.RETRIEVER_PANELS[1:], title="t")


def test_gallery_is_self_contained_with_green_and_red_borders(report_dir):
  page = (report_dir / "gallery.html").read_text()
  assert "data:image/png;base64," in page
  # Nothing but inlined data may be referenced (base64 payloads removed first: they may contain "//").
  stripped = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "INLINE", page)
  assert not re.search(r"https?:|file:|//|url\(|src=\"(?!INLINE\")|href=", stripped, re.I)
  parser = _GalleryParser()
  parser.feed(page)
  assert all(src.startswith("data:image/png;base64,") for src in parser.srcs) and parser.srcs
  assert len(parser.sections) == 3  # num_gallery_queries = Q: every query, in order
  for q, section in enumerate(parser.sections):
    section.pop("query")
    assert section == EXPECTED_GALLERY[q], q
  # The classes are green and red.
  assert re.search(r"\.hit \{ border-color: #1f9d3a", page)
  assert re.search(r"\.miss \{ border-color: #d32f2f", page)
  assert "1/4 relevant" in page  # irgen, query 1


def test_gallery_sample_is_seeded_and_sized(tmp_path):
  a = write(tmp_path / "a", num_gallery_queries=2, seed=3)
  b = write(tmp_path / "b", num_gallery_queries=2, seed=3)
  assert a["gallery_queries"] == b["gallery_queries"] and len(a["gallery_queries"]) == 2
  assert (tmp_path / "a" / "gallery.html").read_text().count('<section class="query">') == 2


def test_thumbnails_upscale_tiny_gray_and_shrink_large_rgb():
  for img in (np.zeros((28, 28), np.uint8), np.zeros((28, 28, 1), np.uint8)):
    im, upscaled = G.thumbnail(img)
    assert im.size == (84, 84) and im.mode == "L" and upscaled  # integer factor 3: >= 64 px
  rgb = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
  im, upscaled = G.thumbnail(rgb)
  assert im.size == (144, 96) and im.mode == "RGB" and not upscaled
  # Nearest neighbour: every source pixel becomes a 3x3 block.
  checker = (np.indices((28, 28)).sum(0) % 2 * 255).astype(np.uint8)
  np.testing.assert_array_equal(np.asarray(G.thumbnail(checker)[0]),
                                np.kron(checker, np.ones((3, 3), np.uint8)))
  with pytest.raises(ValueError, match="uint8"):
    G.thumbnail(np.zeros((28, 28), np.float32))
  with pytest.raises(ValueError, match=r"\(28, 28, 2\)"):
    G.thumbnail(np.zeros((28, 28, 2), np.uint8))


@pytest.mark.parametrize("when", ["plotting", "writing"])
def test_a_crash_leaves_the_previous_report_whole(tmp_path, monkeypatch, when):
  out = tmp_path / "report"
  write(out)
  before = {p: (out / p).read_bytes() for p in os.listdir(out)}

  def boom(*args, **kwargs):
    raise RuntimeError("crash")
  if when == "plotting":
    monkeypatch.setattr(R.plots, "mrr_png", boom)
  else:  # after two of the files were written
    calls, real_fsync = [], os.fsync

    def fsync(fd):
      calls.append(fd)
      if len(calls) > 2:
        boom()
      real_fsync(fd)
    monkeypatch.setattr(R.os, "fsync", fsync)
  with pytest.raises(RuntimeError, match="crash"):
    write(out, dataset="second run")
  assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
  assert os.listdir(tmp_path) == ["report"]  # no temporary directories left behind
  with pytest.raises(RuntimeError):
    write(tmp_path / "fresh")
  assert not (tmp_path / "fresh").exists()


def test_a_new_report_replaces_the_old_one_entirely(tmp_path):
  out = tmp_path / "report"
  write(out)
  assert (out / "gallery.html").exists()
  write(out, query_image=None, database_image=None, dataset="no images")
  assert not (out / "gallery.html").exists()  # no stale file from the previous run
  assert json.loads((out / "metrics.json").read_text())["dataset"] == "no images"
  assert sorted(os.listdir(tmp_path)) == ["report"]


def test_bad_inputs_raise_before_writing(tmp_path):
  out = tmp_path / "report"
  methods = crafted_methods()
  methods["short"] = result([[0, 1]], "linear_scan")
  with pytest.raises(ValueError, match="'short'.* 1 query rows but there are 3"):
    write(out, methods=methods)
  with pytest.raises(ValueError, match="both query_image and database_image"):
    write(out, database_image=None)
  methods = crafted_methods()
  methods["scann"] = result(methods["scann"].ids, "scann", exact_reference="nope")
  with pytest.raises(ValueError, match="exact_reference='nope'"):
    write(out, methods=methods)
  with pytest.raises(ValueError, match="ks"):
    write(out, ks=[0])
  assert not out.exists()
  with pytest.raises(ValueError, match="search_s"):
    result([[0]], "scann", search_s=-1.0)
  with pytest.raises(ValueError, match="integer database indices, got dtype float64"):
    MethodResult(ids=np.zeros((1, 1)), scores=np.zeros((1, 1)), kind="scann", search_s=1.0)
  # int32 ids (what the beam search returns) are stored as the documented int64.
  assert MethodResult(ids=np.zeros((1, 1), np.int32), scores=np.zeros((1, 1)), kind="beam_search",
                      search_s=1.0).ids.dtype == np.int64


def test_evaluate_method_adds_costs_and_exact_recall():
  m = crafted_methods()
  v = R.evaluate_method(m["faiss_ivfpq"], query_labels=Q_LABELS, database_labels=DB_LABELS, ks=KS,
                        exact_ids=m["linear_scan"].ids)
  expected = M.evaluate(m["faiss_ivfpq"].ids, Q_LABELS, DB_LABELS, KS)
  assert {k: v[k] for k in expected} == expected
  assert v["qps"] == pytest.approx(6.0) and v["build_s"] == 0.2 and v["index_bytes"] == 300
  assert v["recall_vs_exact@1"] == pytest.approx(1 / 3)  # exact top-1: 0, 2, 4; IVF-PQ top-1: 0, 3, 6
  with pytest.raises(ValueError, match="overwrite"):
    R.evaluate_method(result([[0], [2], [4]], "beam_search", extra={"precision@1": 0.5}),
                      query_labels=Q_LABELS, database_labels=DB_LABELS, ks=[1])


def test_end_to_end_with_real_baselines(tmp_path):
  rng = np.random.default_rng(0)
  n, q, d, c = 400, 24, 16, 6
  centers = rng.normal(size=(c, d)) * 2
  db_labels, q_labels = rng.integers(0, c, n), rng.integers(0, c, q)
  db = (centers[db_labels] + rng.normal(size=(n, d))).astype(np.float32)
  qf = (centers[q_labels] + rng.normal(size=(q, d))).astype(np.float32)
  methods = {
      "linear_scan": B.linear_scan(db, qf, 100, encode_s=0.3),
      "linear_scan_cosine": B.linear_scan(db, qf, 100, metric="cosine", encode_s=0.3),
      "faiss_ivfpq": B.faiss_ivfpq(db, qf, 100, nlist=8, nprobe=4, encode_s=0.3),
      "scann": B.scann_search(db, qf, 100, encode_s=0.3),
      "scann_cosine": B.scann_search(db, qf, 100, metric="cosine", encode_s=0.3),
  }
  methods["linear_scan_again"] = dataclasses.replace(methods["linear_scan"], exact_reference="linear_scan")
  gray = lambda i: np.full((28, 28), i % 255, np.uint8)  # noqa: E731
  rep = R.write_report(tmp_path / "report", dataset="synthetic", ks=[1, 10, 20, 30], query_labels=q_labels,
                       database_labels=db_labels, methods=methods, query_image=gray, database_image=gray,
                       num_gallery_queries=2, seed=0)
  for name, v in rep["methods"].items():
    assert v["precision@10"] > 0.8 and v["recall@30"] == 1.0 and 0 < v["map@100"] <= 1, name
    assert v["qps"] > v["qps_with_encoder"] > 0
  assert rep["methods"]["scann"]["recall_vs_exact@30"] > 0.8
  assert rep["methods"]["scann_cosine"]["recall_vs_exact@30"] > 0.8
  assert "recall_vs_exact@30" in rep["methods"]["faiss_ivfpq"]
  # The cosine index is compared with the cosine scan, not the default L2 one; an explicit reference wins.
  refs = {n: info["exact_reference"] for n, info in rep["method_info"].items()}
  assert refs == {"linear_scan": None, "linear_scan_cosine": None, "faiss_ivfpq": "linear_scan",
                  "scann": "linear_scan", "scann_cosine": "linear_scan_cosine",
                  "linear_scan_again": "linear_scan"}
  assert rep["methods"]["linear_scan_again"]["recall_vs_exact@30"] == 1.0
  assert sorted(os.listdir(tmp_path / "report")) == [
      "gallery.html", "metrics.json", "mrr.png", "pr_curve.png", "precision_at_k.png", "results.md"]


def test_recurring_misses_count_the_non_positives_of_the_top_k():
  from irgen_jax.evaluate import recurring_misses
  labels = np.array([0, 0, 1, 1, 2])
  ids = np.array([[0, 2, 4, -1],     # a label-0 query: images 2 and 4 are non-positives
                  [2, 0, 1, 3],      # label 1: 0 and 1 (3 is past k)
                  [1, 2, -1, -1]])   # label 0: 2
  out = recurring_misses(ids, np.array([0, 1, 0]), labels, k=3, top=2)
  assert out["k"] == 3 and out["wrong_places"] == 5 / 8
  assert out["images"] == [{"image": 2, "label": 1, "lists": 2 / 3, "of_wrong_places": 0.4},
                           {"image": 0, "label": 0, "lists": 1 / 3, "of_wrong_places": 0.2}]
  assert recurring_misses(ids, np.array([0, 1, 0]), labels, k=1) == {   # every first image a positive
      "k": 1, "wrong_places": 0.0, "images": []}
  assert recurring_misses(np.zeros((0, 3), np.int64), np.zeros(0), labels) == {}
