"""The workdir of a run: every path the run writes, when a stage counts as done, and how it is read back.

  WORKDIR/
    config.json                  the config the run was started with
    index.irgx                   the valid-identifier index (tokenizer stage; replaced by inserts)
    <stage>/done.json            the stage's done marker (data, tokenizer, retriever, evaluate)
    tokenizer/params/            trained tokenizer (orbax)
    tokenizer/database_features.npy   f_cls of the indexed database images, float32 [N0, D]
    tokenizer/identifiers.npz    codes int32 [N0, M] (+ codebooks float32 [M, L, D] when semantic)
    tokenizer/stats.json, tokenizer/refits.jsonl
    tokenizer/rqvae/             ids.kind="rqvae": the RQ-VAE's params/, reconstructions.png, checkpoints
    retriever/params/            trained retriever (orbax)
    <stage>/checkpoints/, <stage>/metrics.jsonl, <stage>/tb/    training state, logs, TensorBoard
    report/                      metrics.json, results.md, plots, gallery.html (evaluate stage)
    inserted/                    images added by ``python -m irgen_jax.insert`` (see ``IndexedImages``)
    search/results.html          the search command's page

Done markers. A stage is done when its marker exists *and* what the stage wrote is still there as it
was written *and* what it built on has not changed: the marker holds a fingerprint (size and SHA-256,
``files.fingerprint``) of each of the stage's outputs (``STAGE_FILES``), the digest of the marker of
every stage it builds on, and the index's checksum when it read the index; ``done_problem`` checks
them. A stage whose output was deleted or replaced, whose upstream stage ran again, or whose index
changed (an insert), is due again. The index file as an output is checked by loading it (it carries
its own checksum), since inserts replace it legitimately. Upstream stages are tracked by their markers
rather than by the bytes of their outputs because orbax's files are not byte-stable across saves of
the same parameters (random file names inside a checkpoint).

The loaders (``load_config``, ``load_identifiers``, ``load_index``, ``load_tokenizer``,
``load_retriever``, ``IndexedImages.open``) are what every command uses to read a finished run; a
missing or invalid output is a ``MissingFileError`` that names the stage to run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from irgen_jax import config_lib, files
from irgen_jax.data import images, registry
from irgen_jax.decoding.index import Index, IndexFormatError
from irgen_jax.errors import MissingFileError, UserError
from irgen_jax.models import build

log = logging.getLogger(__name__)

CONFIG = "config.json"
INDEX = "index.irgx"
DONE = "done.json"
TOKENIZER_PARAMS = "tokenizer/params"
DATABASE_FEATURES = "tokenizer/database_features.npy"
IDENTIFIERS = "tokenizer/identifiers.npz"
TOKENIZER_STATS = "tokenizer/stats.json"
REFITS = "tokenizer/refits.jsonl"
RQVAE = "tokenizer/rqvae"                  # the RQ-VAE of ids.kind="rqvae": its checkpoints and logs
RQVAE_PARAMS = "tokenizer/rqvae/params"
RQVAE_RECONSTRUCTIONS = "tokenizer/rqvae/reconstructions.png"
RETRIEVER_PARAMS = "retriever/params"
REPORT = "report"
REPORT_METRICS = "report/metrics.json"
INSERTED = "inserted"
SEARCH_HTML = "search/results.html"
INSERTED_FORMAT = "irgen_jax.inserted"


@dataclasses.dataclass(frozen=True)
class StageFiles:
  """What a stage writes (workdir-relative paths) and what it builds on."""
  outputs: tuple[str, ...]
  upstream: tuple[str, ...] = ()   # stages whose outputs it reads
  reads_index: bool = False        # the index: the one input that changes outside a stage (inserts)


STAGE_FILES = {
    "data": StageFiles(outputs=()),  # the dataset lives under data.data_dir: see done_problem
    "tokenizer": StageFiles(outputs=(TOKENIZER_PARAMS, DATABASE_FEATURES, IDENTIFIERS,
                                     TOKENIZER_STATS, INDEX)),
    "retriever": StageFiles(outputs=(RETRIEVER_PARAMS,), upstream=("tokenizer",)),
    "evaluate": StageFiles(outputs=(REPORT,), upstream=("tokenizer", "retriever"), reads_index=True),
}


def _stage_files(stage: str) -> StageFiles:
  if stage not in STAGE_FILES:
    raise ValueError(f"Unknown stage {stage!r}; expected one of {', '.join(STAGE_FILES)}.")
  return STAGE_FILES[stage]


class Workdir:
  """The files of one run under ``root`` (module docstring). Cheap to construct; reads lazily."""

  def __init__(self, root: str | os.PathLike):
    self.root = os.path.abspath(os.fspath(root))

  def path(self, *relative: str) -> str:
    return os.path.join(self.root, *relative)

  def stage_dir(self, stage: str) -> str:
    path = self.path(stage)
    os.makedirs(path, exist_ok=True)
    return path

  def done_marker(self, stage: str) -> str:
    return self.path(stage, DONE)

  def inserted_file(self, kind: str, num_images: int) -> str:
    """``inserted/{state,features,codes}-<N>``: the description of an index of N images."""
    ext = "json" if kind == "state" else "npy"
    return self.path(INSERTED, f"{kind}-{num_images}.{ext}")

  # ---------------------------------------------------------------------------------- config

  def load_config(self) -> ml_collections.ConfigDict:
    """The config this workdir's run was started with (``config.json``, written by the main job)."""
    path = self.path(CONFIG)
    if not os.path.exists(path):
      raise MissingFileError(
          f"{path} does not exist: {self.root} is not the workdir of a run of `python -m "
          "irgen_jax.main` (or its first stage never started).")
    return ml_collections.ConfigDict(files.read_json(path))

  def record_config(self, config: ml_collections.ConfigDict) -> None:
    """Writes ``config.json`` on the first start; on a re-run warns about fields that changed."""
    path = self.path(CONFIG)
    current = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
      before, now = config_lib.flatten(files.read_json(path)), config_lib.flatten(current)
      changed = sorted(k for k in before.keys() | now.keys()
                       if k != "stages" and before.get(k) != now.get(k))
      if changed:
        log.warning("The config differs from the one %s was started with, in: %s. Finished stages "
                    "are not redone; delete WORKDIR/<stage>/done.json to redo one.", self.root,
                    ", ".join(changed))
      return
    if jax.process_index() == 0:
      files.write_json(path, current)

  # ---------------------------------------------------------------------------------- done markers

  def _fingerprint(self, relative: str) -> dict[str, Any] | None:
    if relative == INDEX:  # the index file ends with its own SHA-256: no need to hash it again
      return Index.file_fingerprint(self.path(INDEX))
    return files.fingerprint(self.path(relative))

  def _marker_digest(self, stage: str) -> str | None:
    path = self.done_marker(stage)
    return files.sha256_file(path) if os.path.exists(path) else None

  def mark_done(self, stage: str, info: dict[str, Any]) -> None:
    """Writes ``<stage>/done.json``: ``info``, the fingerprints of the stage's outputs (``STAGE_FILES``
    and those this run's config adds, ``info["extra_outputs"]``: the RQ-VAE's), the digests of the
    markers of the stages it builds on and, when it reads the index, the index's (process 0)."""
    if jax.process_index() != 0:
      return
    spec = _stage_files(stage)
    outputs = spec.outputs + tuple(info.get("extra_outputs", ()))
    missing = [p for p in outputs if not os.path.exists(self.path(p))]
    if missing:
      raise RuntimeError(f"Stage {stage} finished without writing {', '.join(missing)}.")
    marker = {**info, "outputs": {p: self._fingerprint(p) for p in outputs},
              "upstream": {u: self._marker_digest(u) for u in spec.upstream}}
    if spec.reads_index:
      marker["index"] = self._fingerprint(INDEX)
    files.write_json(self.done_marker(stage), marker, default=_json_default)

  def done_problem(self, stage: str) -> str | None:
    """None when ``stage`` is done and valid; otherwise why it is not (for the log and errors).

    Valid: the marker exists; every output is what the stage wrote (the index: a valid index file,
    since inserts replace it); every stage it builds on is done and has not run again since (its
    marker is the one this stage saw); the index it read is the index there now.
    """
    marker_path = self.done_marker(stage)
    if not os.path.exists(marker_path):
      return "it has not finished"
    try:
      marker = files.read_json(marker_path)
    except (OSError, ValueError) as e:
      return f"its marker {marker_path} is unreadable ({e})"
    if stage == "data":
      prepared = marker.get("dir")
      if prepared and not _exists(os.path.join(prepared, "dataset_info.json")):
        return f"the prepared dataset {prepared} is gone"
      return None
    spec = _stage_files(stage)
    recorded = marker.get("outputs")
    if recorded is None:
      return "its marker records no fingerprints (written by an older version)"
    for p in spec.outputs + tuple(p for p in recorded if p not in spec.outputs):
      if not os.path.exists(self.path(p)):
        return f"its output {self.path(p)} is missing"
      if p == INDEX:
        problem = _index_problem(self.path(p))
        if problem:
          return problem
      elif self._fingerprint(p) != recorded.get(p):
        return f"its output {self.path(p)} is not what the stage wrote"
    for u in spec.upstream:
      problem = self.done_problem(u)
      if problem:
        return f"the {u} stage it builds on is not done either: {problem}"
      if self._marker_digest(u) != marker.get("upstream", {}).get(u):
        return f"the {u} stage ran again since it ran"
    if spec.reads_index and self._fingerprint(INDEX) != marker.get("index"):
      return "the index changed since it ran (images were inserted)"
    return None

  def is_done(self, stage: str) -> bool:
    return self.done_problem(stage) is None

  def require(self, stage: str, *, what: str) -> None:
    """Raises ``MissingFileError`` naming ``what`` and the stage to run when it is not done."""
    problem = self.done_problem(stage)
    if problem:
      raise MissingFileError(
          f"{self.root} has no valid {what}: the {stage} stage is not done: {problem.rstrip('.')}. Run it: "
          f"python -m irgen_jax.main --workdir={self.root} (the run's own config; finished stages "
          "are skipped).")

  # ---------------------------------------------------------------------------------- parameters

  def save_params(self, relative: str, params: Any) -> None:
    """Writes a final parameter pytree (no optimizer state) for later stages, atomically (orbax
    writes a temporary directory and renames it). Collective: every process calls it."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(self.path(relative), jax.device_get(params), force=True)
    ckptr.wait_until_finished()

  def load_params(self, relative: str, template: Any) -> Any:
    path = self.path(relative)
    if not os.path.isdir(path):
      raise MissingFileError(f"No saved parameters at {path}.")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=getattr(x, "sharding", None)),
                            template)
    return ocp.StandardCheckpointer().restore(path, abstract)

  def load_tokenizer(self, c: ml_collections.ConfigDict, num_classes: int):
    """The trained tokenizer ``(model, params)``."""
    model = build.tokenizer(c, num_classes)
    return model, self.load_params(TOKENIZER_PARAMS, build.tokenizer_param_shapes(c, model))

  def load_rqvae(self, c: ml_collections.ConfigDict):
    """The trained RQ-VAE of an ``ids.kind="rqvae"`` run ``(model, params)``."""
    model = build.rqvae(c)
    return model, self.load_params(RQVAE_PARAMS, build.rqvae_param_shapes(c, model))

  def load_retriever(self, c: ml_collections.ConfigDict):
    """The trained retriever ``(model, params)``."""
    model = build.retriever(c)
    return model, self.load_params(RETRIEVER_PARAMS, build.retriever_param_shapes(c, model))

  # ---------------------------------------------------------------------------------- arrays

  def load_identifiers(self) -> dict[str, np.ndarray]:
    """``{"codes": int32 [N0, M], ("codebooks": float32 [M, L, D])}`` of the indexed images."""
    path = self.path(IDENTIFIERS)
    if not os.path.exists(path):
      raise MissingFileError(f"No identifiers at {path}: run the tokenizer stage first.")
    with np.load(path) as z:
      return {k: z[k] for k in z.files}

  def training_log(self, directory: str) -> list[dict[str, Any]]:
    """The logged training windows of ``directory`` (a stage's, or RQVAE): its ``metrics.jsonl``,
    ``{"step", metric: mean over the window}`` per line; none where nothing was trained here."""
    path = self.path(directory, "metrics.jsonl")
    return files.read_jsonl(path) if os.path.exists(path) else []

  def refit_steps(self) -> list[int]:
    """The steps before which the tokenizer's codebooks were fit (``REFITS``); none if not trained here."""
    path = self.path(REFITS)
    return [r["step"] for r in files.read_jsonl(path)] if os.path.exists(path) else []

  def load_database_features(self, mmap: bool = False) -> np.ndarray:
    path = self.path(DATABASE_FEATURES)
    if not os.path.exists(path):
      raise MissingFileError(f"No {path}: run the tokenizer stage first.")
    return np.load(path, mmap_mode="r" if mmap else None)

  def load_index(self, c: ml_collections.ConfigDict) -> Index:
    path = self.path(INDEX)
    if not os.path.exists(path):
      raise MissingFileError(f"No index at {path}: run the tokenizer stage first.")
    return Index.load(path, num_levels=c.ids.length, num_tokens=c.ids.codebook_size)


_VALID_INDEX_FILES: set[tuple] = set()


def _index_problem(path: str) -> str | None:
  """Why the index file at ``path`` does not load (None: it does); each version checked once."""
  key = files.stat_key(path)
  if key in _VALID_INDEX_FILES:
    return None
  try:
    Index.load(path, num_levels=None, num_tokens=None)
  except IndexFormatError as e:
    return str(e)
  _VALID_INDEX_FILES.add(key)
  return None


def _exists(path: str) -> bool:
  if "://" in path:
    from etils import epath  # remote data dirs (gs://); only the data stage's check needs it
    return epath.Path(path).exists()
  return os.path.exists(path)


def _json_default(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serializable")


# ---------------------------------------------------------------------------------------------------
# The images an index holds


class WorkdirError(UserError):
  """A workdir whose index and inserted-image files do not fit together."""


@dataclasses.dataclass
class IndexedImages:
  """What a workdir's index holds: every image id → its source, label, pixels and tokenizer features.

  Image ids ``0 .. N0-1`` are the database records the tokenizer stage indexed (the dataset's database,
  or its indexed part when ``data.indexed_fraction`` < 1); the ids after them were added by
  ``python -m irgen_jax.insert``, batch after batch, without retraining. A batch is either

  - ``held_out``: the dataset's held-out database records (``registry.load(..., database_part="all")``
    puts them after the indexed ones, in this order), or
  - ``folder``: image files (their paths, SHA-256 of their bytes, labels in the dataset's label space
    where the class folder name is one of the dataset's class names, else -1, and the folder name).

  Files (``WORKDIR/inserted/``), for an index of N images of which N - N0 were inserted:
  ``state-<N>.json`` (the batches, ``{"source", "start", "count", ...}``), ``features-<N>.npy`` float32
  [N - N0, D] (f_cls) and ``codes-<N>.npy`` int32 [N - N0, M] (identifiers), in id order. The index
  file names its own N, so it always finds its state; ``irgen_jax.insert`` writes them.

  ``dataset`` is the config's dataset with ``database_part="all"`` (None when it could not be opened and
  ``require_data`` was False: then labels and pixels of dataset records are unknown).
  """
  workdir: Workdir
  config: ml_collections.ConfigDict
  index: Index
  num_base: int
  batches: list[dict[str, Any]]
  dataset: Any = None

  @classmethod
  def open(cls, workdir: Workdir | str, config: ml_collections.ConfigDict | None = None, *,
           require_data: bool = True, dataset: Any = None) -> IndexedImages:
    wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    c = wd.load_config() if config is None else config
    index = wd.load_index(c)
    n0 = int(wd.load_database_features(mmap=True).shape[0])
    n = index.num_images
    batches: list[dict[str, Any]] = []
    if n != n0:
      path = wd.inserted_file("state", n)
      if n < n0 or not os.path.exists(path):
        raise WorkdirError(
            f"{wd.path(INDEX)} holds {n} images but the tokenizer stage indexed {n0} and there is "
            f"no {path} describing the {n - n0} inserted ones: the index does not belong to this "
            "workdir's tokenizer outputs (re-run the tokenizer stage to rebuild it).")
      state = files.read_json(path)
      if state.get("format") != INSERTED_FORMAT or state.get("num_base") != n0 \
          or state.get("num_images") != n:
        raise WorkdirError(f"{path} does not describe an index of {n} images over {n0} indexed ones.")
      batches = state["batches"]
    if dataset is None:
      try:
        dataset = registry.load_from_config(c.data, database_part="all")
      except Exception as e:  # pylint: disable=broad-except
        if require_data:
          raise
        log.warning("Dataset %r could not be opened (%s): labels and thumbnails of its images are "
                    "unknown.", c.data.name, e)
        dataset = None
    if dataset is not None and dataset.num_indexed != n0:
      raise WorkdirError(
          f"The tokenizer stage of {wd.root} indexed {n0} images but the config's dataset has "
          f"{dataset.num_indexed} indexed database records: the data changed since the run.")
    return cls(workdir=wd, config=c, index=index, num_base=n0, batches=batches, dataset=dataset)

  # ------------------------------------------------------------------ what an id is

  @property
  def num_images(self) -> int:
    return self.index.num_images

  @property
  def held_out_inserted(self) -> bool:
    return any(b["source"] == "held_out" for b in self.batches)

  def inserted_hashes(self) -> set[str]:
    """SHA-256 of every image file inserted so far (a re-run of an insert is decided by content)."""
    return {h for b in self.batches if b["source"] == "folder" for h in b.get("sha256", ())}

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
      path = b["files"][int(j) - b["start"]]
      try:
        return images.decode(images.encode_file(path))
      except images.UnreadableImageError as e:
        log.warning("%s", e)
        return None
    if self.dataset is None:
      return None
    return self.dataset.database[self.dataset_row(int(j))]["image"]

  def image_or_placeholder(self, j: int) -> np.ndarray:
    img = self.image(j)
    return np.full((32, 32, 3), 200, np.uint8) if img is None else img

  def source(self) -> IndexedSource:
    """Every image of the index as a random-access source of records (``data.records`` protocol)."""
    return IndexedSource(self)

  # ------------------------------------------------------------------ features and codes

  def inserted_features(self) -> np.ndarray | None:
    if not self.batches:
      return None
    return np.load(self.workdir.inserted_file("features", self.num_images))

  def inserted_codes(self) -> np.ndarray | None:
    if not self.batches:
      return None
    return np.load(self.workdir.inserted_file("codes", self.num_images))

  def features(self) -> np.ndarray:
    """float32 [N, D]: the tokenizer's f_cls of every image, by id."""
    base = self.workdir.load_database_features()
    extra = self.inserted_features()
    return base if extra is None else np.concatenate([base, extra])


class IndexedSource:
  """Records ``{'image', 'label', 'index'}`` of the indexed images, by image id."""

  def __init__(self, images: IndexedImages):
    self.images = images
    self.labels = images.labels()

  def __len__(self) -> int:
    return self.images.num_images

  def __getitem__(self, j) -> dict[str, Any]:
    j = int(j)
    image = self.images.image(j)
    if image is None:
      raise FileNotFoundError(f"The pixels of image {j} ({self.images.describe(j)['source']}) cannot "
                              "be read.")
    return {"image": image, "label": int(self.labels[j]), "index": j}


@dataclasses.dataclass(frozen=True)
class TrainedRetriever:
  """What searching a finished run needs: its config, indexed database and trained retriever."""
  config: ml_collections.ConfigDict
  indexed: IndexedImages
  model: Any
  params: Any


def open_trained_retriever(workdir: Workdir | str, *, data_dir: str = "",
                           require_data: bool = True) -> TrainedRetriever:
  """A finished run's config (``data_dir``, if given, overrides where its prepared data lives),
  its indexed images and its trained retriever. Raises ``MissingFileError`` when the retriever stage
  is not done. ``require_data=False``: only the index and its labels, no prepared dataset."""
  wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
  c = wd.load_config()
  if data_dir:
    c.data.data_dir = str(data_dir)
  wd.require("retriever", what="trained retriever")
  indexed = IndexedImages.open(wd, c, require_data=require_data)
  model, params = wd.load_retriever(c)
  return TrainedRetriever(c, indexed, model, params)
