"""Add database images to a finished run's index without retraining anything (fresh data).

  python -m irgen_jax.insert --workdir=DIR --folder=ROOT           # new images from files
  python -m irgen_jax.insert --workdir=DIR --held_out [--evaluate] # the paper's Table 6 protocol

Every new image goes through the run's trained tokenizer (eval transform, f_cls), gets an identifier of the
run's kind exactly as the tokenizer stage assigns them (``identifiers.for_new_images``: semantic codes from
the run's codebooks, fresh random codes, or the HKM identifier of the nearest indexed image), and is
inserted into ``WORKDIR/index.irgx`` (``Index.insert``); it is searchable at once
(``python -m irgen_jax.search``), and the evaluate stage is due again.

``--folder=ROOT``: image files directly in ROOT or in ``ROOT/<class>/`` sub-folders (nested folders of a
class are read too). A class folder whose name is one of the dataset's class names (or its label number,
or the name with other characters than letters and digits as ``_``, case-insensitive) gives its images
that label, so they count as positives in evaluations; other images keep their folder name, label -1.
The files are not copied: the index refers to them by path. Every file is read before any compute; an
unreadable one is an error naming it (``--skip_corrupt`` leaves such files out).

Re-running is safe: images are recognized by content (the SHA-256 of the file), so a file already in
the index, or a second copy of one in the same folder, is skipped and counted; an insert with nothing
new is a no-op that says so. ``--held_out`` inserts the dataset's held-out database records once (a run
with ``data.indexed_fraction`` < 1 trains on and indexes only its fixed indexed part).

The insert protocol (this module owns it). The files describing the new index of N images
(``inserted/{state,features,codes}-<N>``, see ``workdir.IndexedImages``) are written first, each
atomically, and only then is the index file replaced, atomically: the index file is the commit point.
A kill before the rename leaves the old index, which still names its own, untouched state files; a
kill after it leaves a complete new state. Files of other N (an abandoned attempt, superseded states)
are removed by the next insert. One insert at a time (a lock). Failpoints: ``insert.before_commit``,
``insert.after_commit``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import time
from typing import Any, Sequence

import numpy as np

from irgen_jax import cli, failpoints, features, files, identifiers, parallel, stages
from irgen_jax.data import images as images_lib
from irgen_jax.errors import UserError
from irgen_jax.workdir import INDEX, INSERTED, INSERTED_FORMAT, IndexedImages, Workdir

log = logging.getLogger(__name__)

_STATE_RE = re.compile(r"^(state|features|codes)-(\d+)\.(json|npy)$")


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
    raise UserError(f"--folder={root}: no such folder.")
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
    raise UserError(f"--folder={root} holds no image files (extensions "
                    f"{', '.join(sorted(images_lib.IMAGE_EXTENSIONS))}).")
  return out


# ---------------------------------------------------------------------------------------------------
# The protocol


@contextlib.contextmanager
def insert_lock(wd: Workdir):
  """An exclusive lock on the workdir's inserted images (one insert at a time)."""
  import fcntl
  directory = wd.path(INSERTED)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, ".lock"), "w") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      raise UserError(f"Another insert into {wd.root} is running (lock {f.name}).") from None
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def commit(indexed: IndexedImages, batch: dict[str, Any], feats: np.ndarray, codes: np.ndarray
           ) -> IndexedImages:
  """Appends ``codes`` [n, M] (with their ``feats`` [n, D]) as one batch; returns the new state.

  ``batch``: ``{"source": "held_out"}`` or ``{"source": "folder", "root", "files", "sha256", "labels",
  "class_names"}`` (per-image lists); ``start`` and ``count`` are filled in. Crash-safe (module
  docstring).
  """
  wd = indexed.workdir
  n_old, n = indexed.num_images, len(codes)
  if n == 0:
    return indexed
  if feats.shape[0] != n:
    raise ValueError(f"{feats.shape[0]} feature rows for {n} codes.")
  new_index = indexed.index.insert(codes)
  n_new = new_index.num_images
  old_feats, old_codes = indexed.inserted_features(), indexed.inserted_codes()
  all_feats = feats if old_feats is None else np.concatenate([old_feats, feats])
  all_codes = codes if old_codes is None else np.concatenate([old_codes, codes])
  batches = indexed.batches + [dict(batch, start=n_old, count=n)]
  state = {"format": INSERTED_FORMAT, "version": 1, "num_base": indexed.num_base,
           "num_images": n_new, "batches": batches}
  files.write_npy(wd.inserted_file("features", n_new), np.asarray(all_feats, np.float32))
  files.write_npy(wd.inserted_file("codes", n_new), np.asarray(all_codes, np.int32))
  files.write_json(wd.inserted_file("state", n_new), state)
  failpoints.hit("insert.before_commit")
  new_index.save(wd.path(INDEX))  # the commit point
  failpoints.hit("insert.after_commit")
  _finish(wd, n_new)
  return dataclasses.replace(indexed, index=new_index, batches=batches)


def _finish(wd: Workdir, num_images: int) -> None:
  """What follows a commit (and what a re-run after a kill there completes): the files of other
  index sizes go, and the evaluate stage's marker when the report describes another index."""
  directory = wd.path(INSERTED)
  files.remove_temporaries(directory)
  for name in os.listdir(directory):
    m = _STATE_RE.match(name)
    if m and int(m.group(2)) != num_images:
      with contextlib.suppress(OSError):
        os.unlink(os.path.join(directory, name))
  if os.path.exists(wd.done_marker("evaluate")) and not wd.is_done("evaluate"):
    os.unlink(wd.done_marker("evaluate"))
    log.info("The index changed: the evaluate stage is due again.")


def _insert(wd: Workdir, c, indexed: IndexedImages, source, batch: dict[str, Any], mesh=None
            ) -> dict[str, Any]:
  t0 = time.perf_counter()
  mesh = mesh or parallel.make_mesh()
  model, params = wd.load_tokenizer(c, indexed.dataset.num_classes)
  feats = features.of_source(model, params, source, c, mesh, description="new image features")
  stored = wd.load_identifiers()
  if c.ids.kind == "rqvae":  # codes of the pixels, by the run's RQ-VAE
    rq_model, rq_params = wd.load_rqvae(c)
    codes = identifiers.rqvae_codes(rq_model, rq_params, stored["rqvae_codebook"], source, c, mesh,
                                    description="new image identifiers")
  else:
    codes = identifiers.for_new_images(
        c.ids.kind, feats, length=c.ids.length, codebook_size=c.ids.codebook_size, seed=c.seed,
        num_indexed=indexed.num_images, codebooks=stored.get("codebooks"),
        indexed_features=indexed.features() if c.ids.kind == "hkm" else None,
        indexed_codes=indexed.index.codes() if c.ids.kind == "hkm" else None)
  before = indexed.num_images
  new = commit(indexed, batch, feats, codes)
  seen = {tuple(r) for r in indexed.index.identifiers().tolist()} if before else set()
  fresh_ids = len({tuple(r) for r in codes.tolist()} - seen)
  info = {"inserted": len(codes), "ids": [before, new.num_images], "num_images": new.num_images,
          "new_identifiers": fresh_ids, "seconds": time.perf_counter() - t0}
  log.info("Inserted %d images into %s (ids %d..%d; %d new identifiers, the rest joined existing "
           "ones) in %.1f s.", len(codes), wd.path(INDEX), before, new.num_images - 1, fresh_ids,
           info["seconds"])
  return info


def _nothing(indexed: IndexedImages, why: str) -> dict[str, Any]:
  log.info("Nothing to insert: %s", why)
  _finish(indexed.workdir, indexed.num_images)
  return {"inserted": 0, "ids": [indexed.num_images, indexed.num_images],
          "num_images": indexed.num_images, "new_identifiers": 0, "seconds": 0.0, "nothing": why}


def insert_folder(workdir: str, root: str, *, skip_corrupt: bool = False, mesh=None) -> dict[str, Any]:
  """Inserts the image files under ``root`` that the index does not hold yet (module docstring)."""
  listed = list_folder(root)
  skipped: list[str] = []
  kept = [(p, cls) for p, cls in listed
          if images_lib.encode_or_skip(p, skip_corrupt, skipped, option="--skip_corrupt") is not None]
  if skipped:
    log.warning("Skipped %d unreadable file(s): %s", len(skipped), ", ".join(skipped[:10]))
  if not kept:
    raise UserError(f"Every image file under {root} is unreadable.")
  wd = Workdir(workdir)
  c = wd.load_config()
  wd.require("tokenizer", what="trained tokenizer and index")
  with insert_lock(wd):
    indexed = IndexedImages.open(wd, c)
    known = indexed.inserted_hashes()
    new, duplicates = [], 0
    for path, cls in kept:
      digest = files.sha256_file(path)
      if digest in known:
        duplicates += 1
        continue
      known.add(digest)
      new.append((path, cls, digest))
    if duplicates:
      log.info("%d of the %d image files under %s are already in the index (same content): "
               "skipped.", duplicates, len(kept), root)
    if not new:
      info = _nothing(indexed, f"all {len(kept)} image files under {root} are already in the "
                               "index (same content).")
      return dict(info, skipped=skipped, duplicates=duplicates)
    labels = [label_for(cls, indexed.dataset.class_names) for _, cls, _ in new]
    unknown = sorted({cls for (_, cls, _), lab in zip(new, labels) if lab < 0})
    if unknown:
      log.info("Class folder(s) that are no class of %s (label -1, never a positive in evaluations): "
               "%s", c.data.name, ", ".join(u or "(ROOT itself)" for u in unknown))
    batch = {"source": "folder", "root": os.path.abspath(root), "files": [p for p, _, _ in new],
             "sha256": [h for _, _, h in new], "labels": labels,
             "class_names": [cls for _, cls, _ in new]}
    info = _insert(wd, c, indexed, _Files([p for p, _, _ in new], labels), batch, mesh)
  return dict(info, skipped=skipped, duplicates=duplicates)


class _Rows:
  """Rows ``rows`` of a random-access source, re-indexed 0..n-1."""

  def __init__(self, source, rows):
    self.source, self.rows = source, np.asarray(rows, np.int64)

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    return dict(self.source[int(self.rows[int(i)])], index=int(i))


def insert_held_out(workdir: str, *, mesh=None) -> dict[str, Any]:
  """Inserts the dataset's held-out database records (``data.indexed_fraction`` < 1), once."""
  wd = Workdir(workdir)
  c = wd.load_config()
  wd.require("tokenizer", what="trained tokenizer and index")
  with insert_lock(wd):
    indexed = IndexedImages.open(wd, c)
    ds = indexed.dataset
    if not ds.held_out:
      raise UserError(f"{workdir}: data.indexed_fraction={c.data.get('indexed_fraction', 1.0)}, so no "
                      "database record is held out; train with --config.data.indexed_fraction=0.5 "
                      "(e.g. configs/fashion_mnist_fresh.py) to hold half of them out.")
    if indexed.held_out_inserted:
      return _nothing(indexed, f"the {ds.held_out} held-out records are already in the index.")
    source = _Rows(ds.database, np.arange(ds.num_indexed, len(ds.database)))
    return _insert(wd, c, indexed, source, {"source": "held_out"}, mesh)


def evaluate(workdir: str) -> dict[str, Any]:
  """Runs the evaluate stage of ``workdir`` again (over the index as it is now); its done marker."""
  wd = Workdir(workdir)
  c = wd.load_config()
  stages.run(c, wd, ["evaluate"])
  return files.read_json(wd.done_marker("evaluate"))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if bool(_FOLDER.value) == bool(_HELD_OUT.value):
    raise UserError("give exactly one of --folder=ROOT and --held_out.")
  if _FOLDER.value:
    info = insert_folder(_WORKDIR.value, _FOLDER.value, skip_corrupt=_SKIP_CORRUPT.value)
  else:
    info = insert_held_out(_WORKDIR.value)
  if info.get("nothing"):
    print(f"Nothing to insert: {info['nothing']} The index holds {info['num_images']} images.")
  else:
    extra = f"; {info['duplicates']} already in the index were skipped" if info.get("duplicates") else ""
    print(f"Inserted {info['inserted']} images (ids {info['ids'][0]}..{info['ids'][1] - 1}){extra}; "
          f"the index holds {info['num_images']}.")
  if _EVALUATE.value:
    evaluate(_WORKDIR.value)
    print(f"Report: {Workdir(_WORKDIR.value).path('report', 'results.md')}")
  elif not info.get("nothing"):
    print("The evaluate stage is due again: pass --evaluate, or re-run the main job "
          f"(python -m irgen_jax.main --workdir={_WORKDIR.value}).")


if __name__ == "__main__":
  from absl import flags
  _WORKDIR = flags.DEFINE_string("workdir", None, "A run's directory (its tokenizer stage finished).")
  _FOLDER = flags.DEFINE_string("folder", "", "Insert the images under this folder.")
  _HELD_OUT = flags.DEFINE_bool("held_out", False, "Insert the dataset's held-out database records.")
  _SKIP_CORRUPT = flags.DEFINE_bool("skip_corrupt", False, "Leave unreadable files out.")
  _EVALUATE = flags.DEFINE_bool("evaluate", False, "Run the evaluate stage afterwards.")
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
