"""Add database images to a finished run's index without retraining anything (fresh data).

  python -m irgen_jax.insert --workdir=DIR --folder=ROOT           # new images from files
  python -m irgen_jax.insert --workdir=DIR --held_out [--evaluate] # the paper's Table 6 protocol

Every new image goes through the run's trained tokenizer (eval transform, f_cls), gets an identifier of the
run's kind as the tokenizer stage assigns them, and is inserted into ``WORKDIR/index.irgx``
(``Index.insert``); it is searchable at once (``python -m irgen_jax.search``) and the next evaluate stage
evaluates over it. Identifiers by ``ids.kind``:

- ``semantic``: residual quantization with the run's codebooks (``tokenizer/identifiers.npz``), the same
  function the stage applied to the database (``rq.encode``): an image equal to a database image gets
  that image's identifier.
- ``random``: fresh uniformly random codes (seeded by the run's seed and the index size).
- ``hkm``: the run kept no k-means centroids, so a new image takes the identifier of its nearest indexed
  image in the tokenizer's feature space (it joins that image's cluster at every level).

``--folder=ROOT``: image files directly in ROOT or in ``ROOT/<class>/`` sub-folders (nested folders of a
class are read too). A class folder whose name is one of the dataset's class names (or its label number,
or the name with other characters than letters and digits as ``_``, case-insensitive) gives its images
that label, so they count as positives in evaluations; other images keep their folder name, label -1.
The files are not copied: the index refers to them by path. Every file is read before any compute; an
unreadable one is an error naming it (``--skip_corrupt`` leaves such files out).

``--held_out``: the dataset's held-out database records (a run with ``data.indexed_fraction`` < 1 trains on
and indexes only its fixed indexed part; ``registry.indexed_split``). Once inserted, the evaluate stage
evaluates IRGen and the baselines (over the same tokenizer's features) on the whole database; it runs
with ``--evaluate``, or with the next ``python -m irgen_jax.main ... --config.stages=evaluate``.

Writes are crash-safe: the index file is replaced atomically, last, after the files that describe the new
images (``catalog.commit_insert``), so a kill leaves either the old index with its description or the new
one with its own. The evaluate stage's ``done.json`` is moved aside (the report describes the old index).
``insert_folder`` and ``insert_held_out`` are the command as functions.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any, Sequence

import numpy as np

from irgen_jax import catalog as catalog_lib
from irgen_jax.data import images as images_lib

log = logging.getLogger(__name__)


class _Rows:
  """Rows ``rows`` of a random-access source, re-indexed 0..n-1."""

  def __init__(self, source, rows):
    self.source, self.rows = source, np.asarray(rows, np.int64)

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    return dict(self.source[int(self.rows[int(i)])], index=int(i))


class _Files:
  """Image files as records ``{'image', 'label', 'index'}`` (decoded when read)."""

  def __init__(self, paths: Sequence[str], labels: Sequence[int]):
    self.paths, self.labels = list(paths), np.asarray(labels, np.int64)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    i = int(i)
    return {"image": images_lib.decode(images_lib.encode_file(self.paths[i])),
            "label": int(self.labels[i]), "index": i}


# ---------------------------------------------------------------------------------------------------
# Folders


def _normalize(name: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def label_for(folder_name: str, class_names: Sequence[str] | None) -> int:
  """The dataset label a class folder name stands for, or -1."""
  if not folder_name or not class_names:
    return -1
  names = list(class_names)
  if folder_name in names:
    return names.index(folder_name)
  normalized = [_normalize(n) for n in names]
  if _normalize(folder_name) in normalized:
    return normalized.index(_normalize(folder_name))
  if folder_name.isdigit() and int(folder_name) < len(names):
    return int(folder_name)
  return -1


def list_folder(root: str) -> list[tuple[str, str]]:
  """``[(path, class folder name or "")]`` of the image files under ROOT, in sorted order."""
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"Folder {root} does not exist.")
  out, ignored = [], 0
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    rel = os.path.relpath(dirpath, root)
    cls = "" if rel == "." else rel.split(os.sep)[0]
    for name in sorted(filenames):
      if name.startswith("."):
        continue
      if not images_lib.is_image_file(name):
        ignored += 1
        continue
      out.append((os.path.join(dirpath, name), cls))
  if ignored:
    log.info("%s: ignored %d non-image file(s).", root, ignored)
  if not out:
    raise ValueError(f"Folder {root} holds no image files (extensions "
                     f"{sorted(images_lib.IMAGE_EXTENSIONS)}).")
  return out


# ---------------------------------------------------------------------------------------------------
# Identifiers


def new_identifiers(c, workdir: str, features: np.ndarray, catalog: catalog_lib.Catalog) -> np.ndarray:
  """int32 [n, M] identifiers of new images with tokenizer ``features`` [n, D] (module docstring)."""
  kind = c.ids.kind
  features = np.asarray(features, np.float32)
  if kind == "semantic":
    from irgen_jax.models import rq
    from irgen_jax.trainers import tokenizer as tokenizer_trainer
    stored = tokenizer_trainer.load_identifiers(workdir)
    if "codebooks" not in stored:
      raise ValueError(f"{workdir}/tokenizer/identifiers.npz has no codebooks (ids.kind=semantic).")
    return np.asarray(rq.encode(features, stored["codebooks"]), np.int32)
  if kind == "random":
    rng = np.random.default_rng([int(c.seed), 0xC0DE, catalog.num_images])
    return rng.integers(0, c.ids.codebook_size, size=(len(features), c.ids.length), dtype=np.int32)
  if kind == "hkm":
    import faiss
    known = np.ascontiguousarray(catalog.features(), np.float32)
    flat = faiss.IndexFlatL2(known.shape[1])
    flat.add(known)
    _, nearest = flat.search(np.ascontiguousarray(features), 1)
    return catalog.index.codes()[nearest[:, 0]].astype(np.int32)
  raise ValueError(f"ids.kind={kind!r}: expected 'semantic', 'random' or 'hkm'.")


# ---------------------------------------------------------------------------------------------------
# Inserting


def _insert(workdir: str, c, cat: catalog_lib.Catalog, source, batch: dict[str, Any], mesh=None
            ) -> dict[str, Any]:
  from irgen_jax import parallel
  from irgen_jax.trainers import tokenizer as tokenizer_trainer
  t0 = time.perf_counter()
  mesh = mesh or parallel.make_mesh()
  model, params = tokenizer_trainer.load_params(c, workdir, cat.dataset.num_classes)
  feats = tokenizer_trainer.database_features(model, params, source, c, mesh,
                                              description="new image features")
  codes = new_identifiers(c, workdir, feats, cat)
  before = cat.num_images
  new = catalog_lib.commit_insert(cat, batch, feats, codes)
  seen = {tuple(r) for r in cat.index.identifiers().tolist()} if before else set()
  fresh_ids = len({tuple(r) for r in codes.tolist()} - seen)
  info = {"inserted": len(codes), "ids": [before, new.num_images], "num_images": new.num_images,
          "new_identifiers": fresh_ids, "seconds": time.perf_counter() - t0}
  log.info("Inserted %d images into %s (ids %d..%d; %d new identifiers, the rest joined existing "
           "ones) in %.1f s.", len(codes), catalog_lib.index_path(workdir), before,
           new.num_images - 1, fresh_ids, info["seconds"])
  return info


def insert_folder(workdir: str, root: str, *, skip_corrupt: bool = False, mesh=None) -> dict[str, Any]:
  """Inserts the image files under ``root`` (module docstring); returns a summary dict."""
  files = list_folder(root)
  skipped: list[str] = []
  kept = [(p, cls) for p, cls in files if images_lib.encode_or_skip(p, skip_corrupt, skipped) is not None]
  if skipped:
    log.warning("Skipped %d unreadable file(s): %s", len(skipped), ", ".join(skipped[:10]))
  if not kept:
    raise ValueError(f"Every image file under {root} is unreadable.")
  c = catalog_lib.load_config(workdir)
  with catalog_lib.insert_lock(workdir):
    cat = catalog_lib.Catalog.open(workdir, c)
    labels = [label_for(cls, cat.dataset.class_names) for _, cls in kept]
    unknown = sorted({cls for (_, cls), lab in zip(kept, labels) if lab < 0})
    if unknown:
      log.info("Class folder(s) that are no class of %s (label -1, never a positive in evaluations): "
               "%s", c.data.name, ", ".join(u or "(ROOT itself)" for u in unknown))
    batch = {"source": "folder", "root": os.path.abspath(root), "files": [p for p, _ in kept],
             "labels": labels, "class_names": [cls for _, cls in kept]}
    info = _insert(workdir, c, cat, _Files([p for p, _ in kept], labels), batch, mesh)
  return dict(info, skipped=skipped)


def insert_held_out(workdir: str, *, mesh=None) -> dict[str, Any]:
  """Inserts the dataset's held-out database records (``data.indexed_fraction`` < 1)."""
  c = catalog_lib.load_config(workdir)
  with catalog_lib.insert_lock(workdir):
    cat = catalog_lib.Catalog.open(workdir, c)
    ds = cat.dataset
    if not ds.held_out:
      raise ValueError(f"{workdir}: data.indexed_fraction={c.data.get('indexed_fraction', 1.0)}, so no "
                       "database record is held out; train with --config.data.indexed_fraction=0.5 "
                       "(e.g. configs/fashion_mnist_fresh.py) to hold half of them out.")
    if cat.held_out_inserted:
      raise ValueError(f"{workdir}: the held-out records are already in the index.")
    source = _Rows(ds.database, np.arange(ds.num_indexed, len(ds.database)))
    return _insert(workdir, c, cat, source, {"source": "held_out"}, mesh)


def evaluate(workdir: str) -> dict[str, Any]:
  """Runs the evaluate stage of ``workdir`` again (over the index as it is now)."""
  from irgen_jax import main as main_lib
  c = catalog_lib.load_config(workdir)
  c.stages = "evaluate"
  done = main_lib.stage_done_path(workdir, "evaluate")
  if os.path.exists(done):
    os.replace(done, done + ".old")
  main_lib.run(c, workdir)
  with open(done) as f:
    return json.load(f)


def main(argv: Sequence[str]) -> None:
  from absl import app
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if bool(_FOLDER.value) == bool(_HELD_OUT.value):
    raise app.UsageError("Give exactly one of --folder=ROOT and --held_out.")
  try:
    if _FOLDER.value:
      info = insert_folder(_WORKDIR.value, _FOLDER.value, skip_corrupt=_SKIP_CORRUPT.value)
    else:
      info = insert_held_out(_WORKDIR.value)
  except (images_lib.UnreadableImageError, FileNotFoundError, ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"Inserted {info['inserted']} images (ids {info['ids'][0]}..{info['ids'][1] - 1}); the index "
        f"holds {info['num_images']}.")
  if _EVALUATE.value:
    evaluate(_WORKDIR.value)
    print(f"Report: {os.path.join(_WORKDIR.value, 'report', 'results.md')}")
  else:
    print("The evaluate stage is due again: pass --evaluate, or re-run the main job "
          "(e.g. with --config.stages=evaluate).")


if __name__ == "__main__":
  from absl import app, flags
  _WORKDIR = flags.DEFINE_string("workdir", None, "A run's directory (its tokenizer stage finished).")
  _FOLDER = flags.DEFINE_string("folder", "", "Insert the images under this folder.")
  _HELD_OUT = flags.DEFINE_bool("held_out", False, "Insert the dataset's held-out database records.")
  _SKIP_CORRUPT = flags.DEFINE_bool("skip_corrupt", False, "Leave unreadable files out.")
  _EVALUATE = flags.DEFINE_bool("evaluate", False, "Run the evaluate stage afterwards.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
