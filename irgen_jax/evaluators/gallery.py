"""A self-contained HTML gallery of retrieval examples (the paper's figures 7-9).

For each sampled query: the query image, then one row per method with its top-k database images, framed green
when the image shares the query's label and red when not; an empty slot is a dashed grey box. Images are
inlined as base64 PNG data URIs and the styling is an inline <style>, so the file opens in a browser from
disk with nothing else to fetch.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

ImageFn = Callable[[int], Any]

# Tiny images (28x28 Fashion-MNIST) are upscaled by an integer factor to at least THUMB_MIN pixels, nearest
# neighbour, so every source pixel stays a crisp square; others are resized to THUMB_HEIGHT (aspect kept),
# which also keeps a gallery of photos to a few MB. Thumbnails are shown at their natural size.
THUMB_MIN = 64
THUMB_HEIGHT = 96

HIT_COLOR = "#1f9d3a"   # green: relevant (same label as the query)
MISS_COLOR = "#d32f2f"  # red: not relevant
QUERY_COLOR = "#1e63c6"

CSS = f"""
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 18px; background: #f6f6f6;
       color: #222; }}
h1 {{ font-size: 20px; margin: 0 0 6px 0; }}
p.legend {{ margin: 0 0 14px 0; font-size: 13px; }}
.key {{ display: inline-block; width: 12px; height: 12px; vertical-align: middle; border: 3px solid; }}
section.query {{ background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px 12px;
                 margin-bottom: 14px; }}
section.query h2 {{ font-size: 15px; margin: 0 0 8px 0; }}
.row {{ display: flex; align-items: center; gap: 6px; margin: 5px 0; flex-wrap: wrap; }}
.name {{ width: 150px; font-size: 13px; overflow-wrap: anywhere; }}
.name small {{ display: block; color: #666; }}
img.thumb {{ border: 4px solid #999; border-radius: 3px; }}
img.upscaled {{ image-rendering: pixelated; }}
span.empty {{ width: 56px; height: 56px; display: inline-block; border: 4px dashed #aaa; border-radius: 3px;
              background: #eee; }}
.hit {{ border-color: {HIT_COLOR} !important; }}
.miss {{ border-color: {MISS_COLOR} !important; }}
.query-img {{ border-color: {QUERY_COLOR} !important; }}
"""


def to_pil(img: Any) -> Image.Image:
  """uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> a PIL image (gray, RGB or RGBA)."""
  a = np.asarray(img)
  if a.dtype != np.uint8:
    raise ValueError(f"Images must be uint8 HWC, got dtype {a.dtype} with shape {a.shape}.")
  if a.ndim == 3 and a.shape[2] == 1:
    a = a[:, :, 0]
  if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4)):
    return Image.fromarray(np.ascontiguousarray(a))  # uint8 [H, W] -> "L", [H, W, 3|4] -> "RGB"|"RGBA"
  raise ValueError(f"Images must be [H, W] or [H, W, C] with C in (1, 3, 4), got shape {a.shape}.")


def thumbnail(img: Any) -> tuple[Image.Image, bool]:
  """(the image scaled for display, whether it was upscaled by nearest neighbour)."""
  im = to_pil(img)
  w, h = im.size
  if max(w, h) < THUMB_MIN:
    f = math.ceil(THUMB_MIN / max(w, h))
    return im.resize((w * f, h * f), Image.Resampling.NEAREST), True
  if h != THUMB_HEIGHT:
    # Panoramas would make one thumbnail as wide as a row: cap the width at 3x the height.
    new_w = max(1, min(3 * THUMB_HEIGHT, round(w * THUMB_HEIGHT / h)))
    im = im.resize((new_w, THUMB_HEIGHT), Image.Resampling.LANCZOS)
  return im, False


def encode_thumbnail(img: Any) -> tuple[str, int, int, bool]:
  """(PNG data URI of the thumbnail, width, height, whether it was upscaled)."""
  im, upscaled = thumbnail(img)
  buf = io.BytesIO()
  im.save(buf, format="PNG", optimize=True)
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), *im.size, upscaled


def img_tag(encoded: tuple[str, int, int, bool], css_class: str, alt: str, title: str) -> str:
  uri, w, h, upscaled = encoded
  cls = f"thumb {css_class}" + (" upscaled" if upscaled else "")
  return (f'<img class="{cls}" width="{w}" height="{h}" alt="{html.escape(alt)}" '
          f'title="{html.escape(title)}" src="{uri}">')


def gallery_html(*, dataset: str, query_indices: Sequence[int], query_labels: Any, database_labels: Any,
                 ranked: Mapping[str, np.ndarray], query_image: ImageFn, database_image: ImageFn,
                 k: int) -> str:
  """The gallery page.

  ranked[name] is ``int [Q, >=1]`` database indices per query (-1 = empty), best first; the first k are
  shown, empty slots and slots beyond the list as dashed boxes. ``query_image(i)`` / ``database_image(j)``
  return uint8 HWC (or HW) images.
  """
  query_labels, database_labels = np.asarray(query_labels), np.asarray(database_labels)
  # Methods often retrieve the same images: encode each once.
  cache: dict[int, tuple[str, int, int, bool]] = {}

  def db_thumb(j: int) -> tuple[str, int, int, bool]:
    if j not in cache:
      cache[j] = encode_thumbnail(database_image(j))
    return cache[j]

  esc = html.escape
  empty = '<span class="empty" title="{}"></span>'
  parts = [
      "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
      f"<title>Retrieval examples — {esc(dataset)}</title>", f"<style>{CSS}</style></head><body>",
      f"<h1>Retrieval examples — {esc(dataset)}</h1>",
      f'<p class="legend">Top {k} per method, best first. <span class="key hit"></span> same label as the '
      f'query (relevant) &nbsp; <span class="key miss"></span> different label &nbsp; '
      f'<span class="key query-img"></span> query. Hover an image for its rank, index and label.</p>',
  ]
  for i in query_indices:
    i = int(i)
    ql = query_labels[i]
    parts.append('<section class="query">')
    parts.append(f"<h2>Query {i} &middot; label {esc(str(ql))}</h2>")
    parts.append('<div class="row"><div class="name">query</div>'
                 + img_tag(encode_thumbnail(query_image(i)), "query-img", f"query {i}",
                            f"query {i}, label {ql}") + "</div>")
    for name, ids in ranked.items():
      row = np.asarray(ids)[i, :k].tolist()
      cells, hits = [], 0
      for rank, j in enumerate(row, start=1):
        if j < 0:
          cells.append(empty.format(f"rank {rank}: empty slot"))
          continue
        dl = database_labels[j]
        rel = bool(dl == ql)
        hits += rel
        cells.append(img_tag(db_thumb(j), "hit" if rel else "miss", f"rank {rank}",
                              f"rank {rank}, database {j}, label {dl}"))
      cells += [empty.format(f"rank {r}: not retrieved") for r in range(len(row) + 1, k + 1)]
      parts.append(f'<div class="row"><div class="name">{esc(name)}<small>{hits}/{k} relevant</small></div>'
                   + "".join(cells) + "</div>")
    parts.append("</section>")
  parts.append("</body></html>")
  return "\n".join(parts)
