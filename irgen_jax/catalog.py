"""What a workdir's index holds: every image id → its source, label, pixels and tokenizer features.

Image ids ``0 .. N0-1`` are the database records the tokenizer stage indexed (the dataset's database, or
its indexed part when ``data.indexed_fraction`` < 1); the ids after them were added by
``python -m irgen_jax.insert``, batch after batch, without retraining. A batch is either

- ``held_out``: the dataset's held-out database records (``registry.load(..., database_part="all")``
  puts them after the indexed ones, in this order), or
- ``folder``: image files (their paths, labels in the dataset's label space where the class folder name is
  one of the dataset's class names, else -1, and the class folder name).

Files (``WORKDIR/inserted/``), for an index of N images of which N - N0 were inserted:

- ``state-<N>.json``: the batches (``{"source", "start", "count", ...}``) describing ids N0..N-1;
- ``features-<N>.npy`` float32 [N - N0, D] (the tokenizer's f_cls) and ``codes-<N>.npy`` int32
  [N - N0, M] (their identifiers), in id order.

Commit protocol (``commit_insert``): the files of the new state are written under the new N (each to a
temporary name, fsynced, renamed), and only then is ``WORKDIR/index.irgx`` replaced, atomically
(``Index.save``): the index file is the commit point. A kill before the rename leaves the old index,
which still names its own, untouched state files; a kill after it leaves a complete new state. Files of
other N (an abandoned attempt, superseded states) are ignored and removed by the next insert.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from typing import Any

import ml_collections
import numpy as np

from irgen_jax.index import Index

log = logging.getLogger(__name__)

INDEX_FILE = "index.irgx"  # = trainers.tokenizer.INDEX_FILE (not imported: that pulls in the trainers)
INSERTED_DIR = "inserted"
FORMAT = "irgen_jax.inserted"
_STATE_RE = re.compile(r"^(state|features|codes)-(\d+)\.(json|npy)$")


class CatalogError(ValueError):
  """A workdir whose index and inserted-image files do not fit together, or that lacks a stage."""


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was started with (``WORKDIR/config.json``, written by the main job)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: {workdir} is not the workdir of a run of "
                            "`python -m irgen_jax.main` (or its first stage never started).")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_dataset(c: ml_collections.ConfigDict, *, database_part: str = "all"):
  """The config's dataset; ``database_part="all"`` includes the held-out records (after the indexed)."""
  from irgen_jax.trainers import common
  return common.load_dataset(c.data, database_part=database_part)


def index_path(workdir: str) -> str:
  return os.path.join(workdir, INDEX_FILE)


def load_index(c: ml_collections.ConfigDict, workdir: str) -> Index:
  path = index_path(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No index at {path}: run the tokenizer stage first.")
  return Index.load(path, num_levels=c.ids.length, num_tokens=c.ids.codebook_size)


def num_base_images(workdir: str) -> int:
  """N0: the images the tokenizer stage indexed (rows of ``tokenizer/database_features.npy``)."""
  path = os.path.join(workdir, "tokenizer", "database_features.npy")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {path}: run the tokenizer stage first.")
  return int(np.load(path, mmap_mode="r").shape[0])


def _state_file(workdir: str, kind: str, n: int) -> str:
  return os.path.join(workdir, INSERTED_DIR, f"{kind}-{n}.{'json' if kind == 'state' else 'npy'}")


@dataclasses.dataclass
class Catalog:
  """The images of a workdir's index (see the module docstring). Open with ``Catalog.open``.

  ``dataset`` is the config's dataset with ``database_part="all"`` (None when it could not be opened and
  ``require_data`` was False: then labels and pixels of dataset records are unknown).
  """
  workdir: str
  config: ml_collections.ConfigDict
  index: Index
  num_base: int
  batches: list[dict[str, Any]]
  dataset: Any = None

  @classmethod
  def open(cls, workdir: str, config: ml_collections.ConfigDict | None = None, *,
           require_data: bool = True, dataset: Any = None) -> Catalog:
    c = load_config(workdir) if config is None else config
    index = load_index(c, workdir)
    n0 = num_base_images(workdir)
    n = index.num_images
    batches: list[dict[str, Any]] = []
    if n != n0:
      path = _state_file(workdir, "state", n)
      if n < n0 or not os.path.exists(path):
        raise CatalogError(
            f"{index_path(workdir)} holds {n} images but the tokenizer stage indexed {n0} and there is "
            f"no {path} describing the {n - n0} inserted ones: the index does not belong to this "
            "workdir's tokenizer outputs (re-run the tokenizer stage to rebuild it).")
      with open(path) as f:
        state = json.load(f)
      if state.get("format") != FORMAT or state.get("num_base") != n0 or state.get("num_images") != n:
        raise CatalogError(f"{path} does not describe an index of {n} images over {n0} indexed ones.")
      batches = state["batches"]
    if dataset is None:
      try:
        dataset = load_dataset(c)
      except Exception as e:  # pylint: disable=broad-except
        if require_data:
          raise
        log.warning("Dataset %r could not be opened (%s): labels and thumbnails of its images are "
                    "unknown.", c.data.name, e)
        dataset = None
    if dataset is not None and dataset.num_indexed != n0:
      raise CatalogError(
          f"The tokenizer stage of {workdir} indexed {n0} images but the config's dataset has "
          f"{dataset.num_indexed} indexed database records: the data changed since the run.")
    return cls(workdir=workdir, config=c, index=index, num_base=n0, batches=batches, dataset=dataset)

  # ------------------------------------------------------------------ what an id is

  @property
  def num_images(self) -> int:
    return self.index.num_images

  @property
  def held_out_inserted(self) -> bool:
    return any(b["source"] == "held_out" for b in self.batches)

  def _batch_of(self, j: int) -> dict[str, Any] | None:
    if not 0 <= j < self.num_images:
      raise IndexError(f"Image id {j} is outside the index's {self.num_images} images.")
    for b in self.batches:
      if b["start"] <= j < b["start"] + b["count"]:
        return b
    return None  # a base image

  def dataset_row(self, j: int) -> int | None:
    """The row of ``dataset.database`` of image ``j`` (None for images inserted from files)."""
    b = self._batch_of(j)
    if b is None:
      return j
    if b["source"] == "held_out":
      return self.num_base + (j - b["start"])
    return None

  def class_names(self) -> list[str] | None:
    return None if self.dataset is None else self.dataset.class_names

  def labels(self) -> np.ndarray:
    """int64 [N]: every image's label in the dataset's label space, -1 where unknown."""
    out = np.full(self.num_images, -1, np.int64)
    if self.dataset is not None:
      db = self.dataset.labels("database")
      out[:self.num_base] = db[:self.num_base]
    for b in self.batches:
      sl = slice(b["start"], b["start"] + b["count"])
      if b["source"] == "held_out" and self.dataset is not None:
        out[sl] = db[self.num_base:self.num_base + b["count"]]
      elif b["source"] == "folder":
        out[sl] = b["labels"]
    return out

  def describe(self, j: int) -> dict[str, Any]:
    """``{"id", "label", "class_name", "source"}`` of image ``j`` (label -1 / class_name "" if unknown);
    source is a file path for images inserted from files, else ``database[<row>]``."""
    j = int(j)
    b = self._batch_of(j)
    if b is not None and b["source"] == "folder":
      i = j - b["start"]
      return {"id": j, "label": int(b["labels"][i]), "class_name": b["class_names"][i],
              "source": b["files"][i]}
    row = self.dataset_row(j)
    label, name = -1, ""
    if self.dataset is not None:
      label = int(self.dataset.labels("database")[row])
      names = self.dataset.class_names
      name = names[label] if names and 0 <= label < len(names) else str(label)
    return {"id": j, "label": label, "class_name": name, "source": f"database[{row}]"}

  def image(self, j: int) -> np.ndarray | None:
    """uint8 [H, W, C] pixels of image ``j``; None when they cannot be read (data or file gone)."""
    b = self._batch_of(int(j))
    if b is not None and b["source"] == "folder":
      from irgen_jax.data import images
      path = b["files"][int(j) - b["start"]]
      try:
        return images.decode(images.encode_file(path))
      except images.UnreadableImageError as e:
        log.warning("%s", e)
        return None
    if self.dataset is None:
      return None
    return self.dataset.database[self.dataset_row(int(j))]["image"]

  def source(self) -> "CatalogSource":
    """Every image of the index as a random-access source of records (``data.records`` protocol)."""
    return CatalogSource(self)

  # ------------------------------------------------------------------ features and codes

  def inserted_features(self) -> np.ndarray | None:
    if not self.batches:
      return None
    return np.load(_state_file(self.workdir, "features", self.num_images))

  def inserted_codes(self) -> np.ndarray | None:
    if not self.batches:
      return None
    return np.load(_state_file(self.workdir, "codes", self.num_images))

  def features(self) -> np.ndarray:
    """float32 [N, D]: the tokenizer's f_cls of every image, by id."""
    base = np.load(os.path.join(self.workdir, "tokenizer", "database_features.npy"))
    extra = self.inserted_features()
    return base if extra is None else np.concatenate([base, extra])


class CatalogSource:
  """Records ``{'image', 'label', 'index'}`` of a catalog's images, by image id."""

  def __init__(self, catalog: Catalog):
    self.catalog = catalog
    self.labels = catalog.labels()

  def __len__(self) -> int:
    return self.catalog.num_images

  def __getitem__(self, j) -> dict[str, Any]:
    j = int(j)
    image = self.catalog.image(j)
    if image is None:
      raise FileNotFoundError(f"The pixels of image {j} ({self.catalog.describe(j)['source']}) cannot "
                              "be read.")
    return {"image": image, "label": int(self.labels[j]), "index": j}


# ---------------------------------------------------------------------------------------------------
# Writing


def _fsync_dir(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _write_atomic(path: str, write) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


@contextlib.contextmanager
def insert_lock(workdir: str):
  """An exclusive lock on the workdir's inserted images (one insert at a time)."""
  import fcntl
  directory = os.path.join(workdir, INSERTED_DIR)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, ".lock"), "w") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      raise RuntimeError(f"Another insert into {workdir} is running (lock {f.name}).") from None
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def commit_insert(catalog: Catalog, batch: dict[str, Any], features: np.ndarray, codes: np.ndarray
                  ) -> Catalog:
  """Appends ``codes`` [n, M] (with their ``features`` [n, D]) as one batch; returns the new catalog.

  ``batch``: ``{"source": "held_out"}`` or ``{"source": "folder", "root", "files", "labels",
  "class_names"}`` (per-image lists); ``start`` and ``count`` are filled in. Crash-safe (module docstring).
  """
  workdir = catalog.workdir
  n_old, n = catalog.num_images, len(codes)
  if n == 0:
    return catalog
  if features.shape[0] != n:
    raise ValueError(f"{features.shape[0]} feature rows for {n} codes.")
  new_index = catalog.index.insert(codes)
  n_new = new_index.num_images
  old_feats, old_codes = catalog.inserted_features(), catalog.inserted_codes()
  all_feats = features if old_feats is None else np.concatenate([old_feats, features])
  all_codes = codes if old_codes is None else np.concatenate([old_codes, codes])
  batches = catalog.batches + [dict(batch, start=n_old, count=n)]
  state = {"format": FORMAT, "version": 1, "num_base": catalog.num_base, "num_images": n_new,
           "batches": batches}
  directory = os.path.join(workdir, INSERTED_DIR)
  os.makedirs(directory, exist_ok=True)
  _write_atomic(_state_file(workdir, "features", n_new),
                lambda f: np.save(f, np.asarray(all_feats, np.float32)))
  _write_atomic(_state_file(workdir, "codes", n_new), lambda f: np.save(f, np.asarray(all_codes, np.int32)))
  _write_atomic(_state_file(workdir, "state", n_new), lambda f: f.write(json.dumps(state, indent=1).encode()))
  _fsync_dir(directory)
  new_index.save(index_path(workdir))  # the commit point
  _cleanup(workdir, keep=n_new)
  _invalidate_evaluation(workdir)
  return dataclasses.replace(catalog, index=new_index, batches=batches)


def _cleanup(workdir: str, keep: int) -> None:
  directory = os.path.join(workdir, INSERTED_DIR)
  for name in os.listdir(directory):
    m = _STATE_RE.match(name)
    if (m and int(m.group(2)) != keep) or ".tmp" in name:
      with contextlib.suppress(OSError):
        os.unlink(os.path.join(directory, name))


def _invalidate_evaluation(workdir: str) -> None:
  """The index changed: the evaluate stage's results describe the old one, so it is due again."""
  done = os.path.join(workdir, "evaluate", "done.json")
  if os.path.exists(done):
    os.replace(done, done + ".before-insert")
    log.info("The index changed: %s moved aside; re-run the evaluate stage to evaluate the new index.",
             done)
