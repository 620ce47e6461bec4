"""Search a finished run's index with your own images: the top-K database images, as text and HTML.

  python -m irgen_jax.search --workdir=workdirs/fashion_mnist --k=10 shoe.jpg shirt.png
  python -m irgen_jax.search --workdir=DIR --html=results.html photos/*.jpg

Each image file (any format PIL reads; gray, palette, CMYK or RGBA become RGB, transparency over white)
goes through the run's eval transform (shorter side to ``data.resize_size``, center crop
``data.image_size``, CLIP normalization), the retriever's encoder, and the constrained beam search over
the workdir's index (``WORKDIR/index.irgx``, inserted images included: ``irgen_jax.insert``): the same
program the evaluate stage runs (``decoding.program.SearchProgram``). Printed per query: rank, database
image id, label and class name (where known), and the score, the log-probability of the image's
identifier (images sharing an identifier share a score). The HTML page (default
``WORKDIR/search/results.html``) shows the same with thumbnails.

Every file is read before any model is loaded: an unreadable or missing file is an error naming it.
``search_images`` is the whole command as a function. Serving stands on its own: this module imports
neither the trainers nor optax.
"""

from __future__ import annotations

import dataclasses
import html
import os
from typing import Any, Sequence

import numpy as np

from irgen_jax import cli, files, parallel
from irgen_jax.data import images as images_lib
from irgen_jax.data.records import ArraySource
from irgen_jax.decoding.program import SearchProgram, uses_classes
from irgen_jax.errors import UserError
from irgen_jax.evaluators import gallery
from irgen_jax.workdir import SEARCH_HTML, Workdir, open_trained_retriever


class UnreadableQueryError(UserError):
  """One or more query image files cannot be read; ``paths`` lists them (the message names each)."""

  def __init__(self, errors: Sequence[images_lib.UnreadableImageError]):
    self.paths = [e.path for e in errors]
    super().__init__("Cannot search: " + "; ".join(str(e) for e in errors))


@dataclasses.dataclass
class Hit:
  rank: int
  id: int             # database image id (index row; ids past the tokenizer's database were inserted)
  score: float        # log-probability of the image's identifier
  label: int          # -1 when unknown
  class_name: str     # "" when unknown
  source: str         # "database[<row>]" or the file an inserted image came from


@dataclasses.dataclass
class QueryResult:
  path: str
  hits: list[Hit]


@dataclasses.dataclass
class SearchOutput:
  results: list[QueryResult]
  html_path: str | None
  num_database: int

  def text(self) -> str:
    return format_text(self.results)


def read_images(paths: Sequence[str]) -> list[np.ndarray]:
  """uint8 [H, W, 3] RGB pixels of every file; ``UnreadableQueryError`` naming every bad file."""
  out, errors = [], []
  for path in paths:
    try:
      out.append(images_lib.decode(images_lib.encode_file(os.fspath(path))))
    except images_lib.UnreadableImageError as e:
      errors.append(e)
  if errors:
    raise UnreadableQueryError(errors)
  return out


def search_images(workdir: str, paths: Sequence[str], *, k: int = 10, html_path: str | None = "",
                  beam_size: int | None = None, mesh=None) -> SearchOutput:
  """The ``irgen_jax.search`` command: top-``k`` database images of every image file in ``paths``.

  Args:
    html_path: where the HTML page goes; "" = ``WORKDIR/search/results.html``, None = no page.
    beam_size: beams of the constrained search (default: the run's ``search.beam_size``, raised to
      ``k`` so that k identifiers can be found).
  Raises:
    UnreadableQueryError (before any compute), MissingFileError for a workdir without the needed
    stages, UserError for a bad ``k`` or ``beam_size``.
  """
  if k < 1:
    raise UserError(f"--k={k}: expected the number of database images per query, >= 1.")
  if beam_size is not None and beam_size < 1:
    raise UserError(f"--beam_size={beam_size}: expected >= 1 (or 0 for the run's own).")
  if not paths:
    raise UserError("no image files to search with.")
  pixels = read_images(paths)

  wd = Workdir(workdir)
  run = open_trained_retriever(wd, require_data=False)
  c, indexed, model, params = run.config, run.indexed, run.model, run.params
  beams = int(beam_size or max(c.search.beam_size, k))
  # The run's list policy; class first and the hedge need the classes of the database's prefixes.
  labels = indexed.labels() if uses_classes(c) else None
  program = SearchProgram(c, model, params, indexed.index, mesh=mesh or parallel.make_mesh(),
                          beam_size=beams, top_k=int(k), labels=labels)
  found, _ = program.run(ArraySource(pixels, np.full(len(pixels), -1), name="queries"))
  ids, scores = found.image_ids, found.scores
  results = []
  for path, row_ids, row_scores in zip(paths, ids, scores):
    hits = []
    for rank, (j, s) in enumerate(zip(row_ids.tolist(), row_scores.tolist()), start=1):
      if j < 0:
        break
      d = indexed.describe(j)
      hits.append(Hit(rank=rank, id=int(j), score=float(s), label=d["label"],
                      class_name=d["class_name"], source=d["source"]))
    results.append(QueryResult(path=os.fspath(path), hits=hits))
  out_path = None
  if html_path is not None:
    out_path = html_path or wd.path(SEARCH_HTML)
    write_html(out_path, results, pixels, indexed, title=f"Search — {c.data.name} ({workdir})")
  return SearchOutput(results=results, html_path=out_path, num_database=indexed.num_images)


def format_text(results: Sequence[QueryResult]) -> str:
  lines = []
  for r in results:
    lines.append(f"{r.path}: top {len(r.hits)}")
    if not r.hits:
      lines.append("  (no database image found)")
      continue
    lines.append(f"  {'rank':>4}  {'id':>8}  {'label':>5}  {'class':<20}  {'score':>9}")
    for h in r.hits:
      label = str(h.label) if h.label >= 0 else "?"
      name = h.class_name or "?"
      lines.append(f"  {h.rank:>4}  {h.id:>8}  {label:>5}  {name:<20}  {h.score:>9.4f}")
  return "\n".join(lines)


def write_html(path: str, results: Sequence[QueryResult], pixels: Sequence[np.ndarray], cat: Any,
               *, title: str) -> None:
  """A self-contained page: per query its image and its hits (thumbnails with id, class and score)."""
  esc = html.escape
  cache: dict[int, tuple[str, int, int, bool] | None] = {}

  def thumb(j: int):
    if j not in cache:
      img = cat.image(j)
      cache[j] = None if img is None else gallery.encode_thumbnail(img)
    return cache[j]

  parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{esc(title)}</title>",
           f"<style>{gallery.CSS}"
           " figure { margin: 0; display: inline-block; text-align: center; font-size: 11px; }"
           " figure figcaption { max-width: 120px; overflow-wrap: anywhere; }</style></head><body>",
           f"<h1>{esc(title)}</h1>",
           '<p class="legend">Best first. Score: log-probability of the image\'s identifier under the '
           "retriever (images with the same identifier share it).</p>"]
  for r, img in zip(results, pixels):
    parts.append('<section class="query">')
    parts.append(f"<h2>{esc(r.path)}</h2>")
    parts.append('<div class="row"><div class="name">query</div>'
                 + gallery.img_tag(gallery.encode_thumbnail(img), "query-img",
                                   os.path.basename(r.path), r.path) + "</div>")
    cells = []
    for h in r.hits:
      name = h.class_name or "?"
      caption = f"#{h.rank} · id {h.id}<br>{esc(name)}<br>{h.score:.3f}"
      encoded = thumb(h.id)
      tip = f"rank {h.rank}, id {h.id}, label {h.label}, {name}, score {h.score:.4f}, {h.source}"
      tag = (gallery.img_tag(encoded, "", f"rank {h.rank}", tip)
             if encoded else f'<span class="empty" title="{esc(tip)}"></span>')
      cells.append(f"<figure>{tag}<figcaption>{caption}</figcaption></figure>")
    if not cells:
      cells.append("<em>no database image found</em>")
    parts.append('<div class="row"><div class="name">results</div>' + "".join(cells) + "</div>")
    parts.append("</section>")
  parts.append("</body></html>")
  files.write_text(path, "\n".join(parts))


def main(argv: Sequence[str]) -> None:
  paths = list(argv[1:])
  if not paths:
    raise UserError("give one or more image files: python -m irgen_jax.search --workdir=DIR IMAGE...")
  out = search_images(_WORKDIR.value, paths, k=_K.value, html_path=_HTML.value,
                      beam_size=_BEAM.value or None)
  print(out.text())
  print(f"\nSearched {out.num_database} database images; HTML: {out.html_path}")


if __name__ == "__main__":
  from absl import flags
  _WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's directory.")
  _K = flags.DEFINE_integer("k", 10, "Database images per query.")
  _HTML = flags.DEFINE_string("html", "", "The HTML page to write (default WORKDIR/search/results.html).")
  _BEAM = flags.DEFINE_integer("beam_size", 0, "Beams (default: the run's search.beam_size, at least k).")
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
