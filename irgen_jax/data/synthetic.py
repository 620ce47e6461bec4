"""Generated stand-in data for the `runlocal` variants of the paper's configs and for tests.

``generate`` writes a folder dataset (``ROOT/database/<class>/*.png``, ``ROOT/query/<class>/*.png``,
see ``folder.py``) of class-structured RGB images of the real dataset's shape, so a run on it goes
through exactly the code a run on the real data does: the folder builder, ArrayRecord files, the grain
pipeline (decoding and resizing large images), the models and the search.

Each class is a smooth random color layout (a 4x4 grid of colors, bilinearly upsampled) with a class
orientation of stripes; each image adds a random shift, contrast and pixel noise. Tiny models separate
the classes within a few hundred steps, so retrieval metrics of a runlocal run are far from chance.
Content is a pure function of the arguments and the seed; the folder is written once (atomically).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Sequence

import numpy as np
from PIL import Image

from irgen_jax.errors import UserError

_MARKER = "irgen-synthetic.json"


def _class_prototype(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  grid = rng.uniform(0.15, 0.85, size=(4, 4, 3)).astype(np.float32)
  layout = np.asarray(Image.fromarray((grid * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                      np.float32) / 255.0
  angle = rng.uniform(0, np.pi)
  period = rng.uniform(0.1, 0.3) * min(h, w)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
  return 0.75 * layout + 0.25 * stripes[..., None]


def _image(rng: np.random.Generator, prototype: np.ndarray) -> np.ndarray:
  h, w, _ = prototype.shape
  dy, dx = rng.integers(-h // 10, h // 10 + 1), rng.integers(-w // 10, w // 10 + 1)
  x = np.roll(prototype, (dy, dx), axis=(0, 1))
  x = 0.5 + rng.uniform(0.7, 1.2) * (x - 0.5) + rng.normal(0, 0.08, size=x.shape)
  return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def generate(parent: str, *, num_classes: int, image_shape: Sequence[int], num_database: int,
             num_queries: int, seed: int = 0) -> str:
  """Writes (once) and returns the ROOT of a synthetic folder dataset under ``parent``.

  Database and query images are spread over the classes round-robin; every class has at least one
  database image. ``image_shape`` is ``(H, W, 3)``.
  """
  h, w, c = (int(v) for v in image_shape)
  if c != 3 or h < 8 or w < 8:
    raise UserError(f"synthetic image_shape={tuple(image_shape)}: expected (H>=8, W>=8, 3).")
  if num_classes < 1 or num_database < num_classes or num_queries < 1:
    raise UserError(f"synthetic data needs num_classes>=1 (got {num_classes}), num_database >= "
                     f"num_classes (got {num_database}) and num_queries>=1 (got {num_queries}).")
  spec = dict(num_classes=num_classes, image_shape=[h, w, c], num_database=num_database,
              num_queries=num_queries, seed=seed)
  key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
  root = os.path.join(os.path.expanduser(parent), f"synthetic-{key}")
  if os.path.exists(os.path.join(root, _MARKER)):
    return root
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
  rng = np.random.default_rng([seed, 0x5EED])
  prototypes = [_class_prototype(rng, h, w) for _ in range(num_classes)]
  for split, count in (("database", num_database), ("query", num_queries)):
    for i in range(count):
      label = i % num_classes
      folder = os.path.join(tmp, split, f"class_{label:04d}")
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(_image(rng, prototypes[label])).save(os.path.join(folder, f"{i:06d}.png"))
  with open(os.path.join(tmp, _MARKER), "w") as f:
    json.dump(spec, f)
  if os.path.exists(root):  # a half-written earlier attempt (no marker)
    shutil.rmtree(root)
  os.replace(tmp, root)
  return root
