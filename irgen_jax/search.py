"""Search a finished run's index with your own images: the top-K database images, as text and HTML.

  python -m irgen_jax.search --workdir=workdirs/fashion_mnist --k=10 shoe.jpg shirt.png
  python -m irgen_jax.search --workdir=DIR --html=results.html photos/*.jpg

Each image file (any format PIL reads; gray, palette, CMYK or RGBA become RGB, transparency over white)
goes through the run's eval transform (shorter side to ``data.resize_size``, center crop
``data.image_size``, CLIP normalization), the retriever's encoder, and the constrained beam search over
the workdir's index (``WORKDIR/index.irgx``, inserted images included: ``irgen_jax.insert``). Printed per
query: rank, database image id, label and class name (where known), and the score, the log-probability
of the image's identifier (images sharing an identifier share a score). The HTML page
(default ``WORKDIR/search/results.html``) shows the same with thumbnails.

Every file is read before any model is loaded: an unreadable or missing file is an error naming it.
``search_images`` is the whole command as a function.
"""

from __future__ import annotations

import dataclasses
import html
import os
import sys
from typing import Any, Sequence

import numpy as np

from irgen_jax.data import images as images_lib


class UnreadableQueryError(ValueError):
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


def preprocess(pixels: Sequence[np.ndarray], *, image_size: int, resize_size: int) -> np.ndarray:
  """The eval transform of the data pipeline: float32 [Q, S, S, 3], normalized."""
  from irgen_jax.data import pipeline
  batch = np.zeros((len(pixels), image_size, image_size, 3), np.uint8)
  for i, img in enumerate(pixels):
    pipeline.eval_resize(img, image_size, resize_size, batch[i])
  return pipeline.Normalizer()(batch)


def search_images(workdir: str, paths: Sequence[str], *, k: int = 10, html_path: str | None = "",
                  beam_size: int | None = None) -> SearchOutput:
  """The ``irgen_jax.search`` command: top-``k`` database images of every image file in ``paths``.

  Args:
    html_path: where the HTML page goes; "" = ``WORKDIR/search/results.html``, None = no page.
    beam_size: beams of the constrained search (default: the run's ``search.beam_size``, raised to
      ``k`` so that k identifiers can be found).
  Raises:
    UnreadableQueryError (before any compute), FileNotFoundError for a workdir without the needed
    stages.
  """
  if k < 1:
    raise ValueError(f"k={k}: expected >= 1.")
  if not paths:
    raise ValueError("No image files to search with.")
  pixels = read_images(paths)

  from irgen_jax import catalog
  c = catalog.load_config(workdir)
  params_dir = os.path.join(workdir, "retriever", "params")
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"No trained retriever at {params_dir}: run the retriever stage first.")
  cat = catalog.Catalog.open(workdir, c, require_data=False)

  from irgen_jax import beam_search
  from irgen_jax.models import retriever as retriever_model
  from irgen_jax.trainers import retriever as retriever_trainer
  model, params = retriever_trainer.load_params(c, workdir)
  queries = preprocess(pixels, image_size=c.data.image_size, resize_size=c.data.resize_size)
  beams = int(beam_size or max(c.search.beam_size, k))
  ids, scores = beam_search.search(retriever_model.make_decode_fns(model), params,
                                   cat.index.device_arrays(), queries, beam_size=beams, top_k=int(k),
                                   max_batch=int(c.search.query_batch_size))
  results = []
  for path, row_ids, row_scores in zip(paths, ids, scores):
    hits = []
    for rank, (j, s) in enumerate(zip(row_ids.tolist(), row_scores.tolist()), start=1):
      if j < 0:
        break
      d = cat.describe(j)
      hits.append(Hit(rank=rank, id=int(j), score=float(s), label=d["label"],
                      class_name=d["class_name"], source=d["source"]))
    results.append(QueryResult(path=os.fspath(path), hits=hits))
  out_path = None
  if html_path is not None:
    out_path = html_path or os.path.join(workdir, "search", "results.html")
    write_html(out_path, results, pixels, cat, title=f"Search — {c.data.name} ({workdir})")
  return SearchOutput(results=results, html_path=out_path, num_database=cat.num_images)


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
  from irgen_jax.evaluators import gallery
  esc = html.escape
  cache: dict[int, tuple[str, int, int, bool] | None] = {}

  def thumb(j: int):
    if j not in cache:
      img = cat.image(j)
      cache[j] = None if img is None else gallery.encode_thumbnail(img)
    return cache[j]

  parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{esc(title)}</title>",
           f"<style>{gallery._CSS}"  # pylint: disable=protected-access
           " figure { margin: 0; display: inline-block; text-align: center; font-size: 11px; }"
           " figure figcaption { max-width: 120px; overflow-wrap: anywhere; }</style></head><body>",
           f"<h1>{esc(title)}</h1>",
           '<p class="legend">Best first. Score: log-probability of the image\'s identifier under the '
           "retriever (images with the same identifier share it).</p>"]
  for r, img in zip(results, pixels):
    parts.append('<section class="query">')
    parts.append(f"<h2>{esc(r.path)}</h2>")
    parts.append('<div class="row"><div class="name">query</div>'
                 + gallery._img_tag(gallery.encode_thumbnail(img), "query-img",  # pylint: disable=protected-access
                                    os.path.basename(r.path), r.path) + "</div>")
    cells = []
    for h in r.hits:
      name = h.class_name or "?"
      caption = f"#{h.rank} · id {h.id}<br>{esc(name)}<br>{h.score:.3f}"
      encoded = thumb(h.id)
      tip = f"rank {h.rank}, id {h.id}, label {h.label}, {name}, score {h.score:.4f}, {h.source}"
      tag = (gallery._img_tag(encoded, "", f"rank {h.rank}", tip)  # pylint: disable=protected-access
             if encoded else f'<span class="empty" title="{esc(tip)}"></span>')
      cells.append(f"<figure>{tag}<figcaption>{caption}</figcaption></figure>")
    if not cells:
      cells.append("<em>no database image found</em>")
    parts.append('<div class="row"><div class="name">results</div>' + "".join(cells) + "</div>")
    parts.append("</section>")
  parts.append("</body></html>")
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("\n".join(parts))
  os.replace(tmp, path)


def main(argv: Sequence[str]) -> None:
  from absl import app
  paths = list(argv[1:])
  if not paths:
    raise app.UsageError("Give one or more image files: python -m irgen_jax.search --workdir=DIR "
                         "IMAGE...")
  try:
    out = search_images(_WORKDIR.value, paths, k=_K.value,
                        html_path=_HTML.value, beam_size=_BEAM.value or None)
  except (UnreadableQueryError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(out.text())
  print(f"\nSearched {out.num_database} database images; HTML: {out.html_path}")


if __name__ == "__main__":
  from absl import app, flags
  _WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's directory.")
  _K = flags.DEFINE_integer("k", 10, "Database images per query.")
  _HTML = flags.DEFINE_string("html", "", "The HTML page to write (default WORKDIR/search/results.html).")
  _BEAM = flags.DEFINE_integer("beam_size", 0, "Beams (default: the run's search.beam_size, at least k).")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
