"""The dataset registry: a config's ``data.name`` → prepared TFDS splits → the roles the stages use.

Roles (``Dataset.database``, ``.query``, ``.train``), every record ``{'image': uint8 [H, W, C],
'label': int, 'index': int}`` with ``index`` = the record's position in its role (the database index is
the row of the identifier array):

=============  =====================  ==========================  =================================
name           TFDS builder           database / query            train (what the models train on)
=============  =====================  ==========================  =================================
fashion_mnist  irgen_fashion_mnist    train 60k / test 10k        = database
inshop         irgen_inshop (manual)  gallery / query             train split + gallery (the paper)
cub200         caltech_birds2011      train / test                = database
cars196        cars196 (manual)       train / test                = database
imagenet2012   imagenet2012 (manual)  train / 5,000 val (seeded)  = database
places365      places365_small        train / validation          = database
folder         irgen_folder (ROOT)    database/ / query/          = database
=============  =====================  ==========================  =================================

Fresh data (the paper's Table 6): ``indexed_fraction`` < 1 keeps a fixed, class-stratified part of the
database (``indexed_split``, seeded by ``INDEXED_SPLIT_SEED``, not the run's seed) as *the* database the
models train on and the tokenizer indexes; the rest is *held out* and inserted later without retraining
(``python -m irgen_jax.insert --held_out``). ``database_part="all"`` returns the indexed records followed
by the held-out ones (the order insertion gives them ids) and ``Dataset.held_out`` = their count; the
train role always holds the indexed part only. Queries are the same either way. Every stage passes
``config.data.indexed_fraction`` (``trainers.common.load_dataset``).

``train`` for In-shop: the paper trains on train + gallery. The tokenizer (a classifier over item ids)
uses all of it. The retriever's targets must be database (gallery) images of the source image's class,
and In-shop's train items never occur in the gallery, so the pair sampler (``pairs.py``) leaves the
train-split images out of stage 2: there they only shaped the tokenizer. ``Dataset.train_to_database``
maps each train record to its database index (-1 when it is not a database image).

Preparing (``prepare``, the ``data`` stage) writes ArrayRecord files under ``data_dir`` (default:
TFDS's, ``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``) and an ``irgen-labels-<split>.npy`` beside
each split so pair sampling and metrics get every label without decoding an image.

- ``fashion_mnist``, ``inshop``, ``folder`` are built here, offline, without TensorFlow; ``load`` builds
  them on first use. ``manual_dir``: fashion_mnist's IDX folder (default: the Debian package's
  ``/usr/share/datasets/fashion-mnist``), In-shop's download, the folder dataset's ROOT.
- Catalogue datasets (``cub200``, ``cars196``, ``imagenet2012``, ``places365``) need TensorFlow and
  network (or manual files) to prepare, once, in ArrayRecord format::

    pip install tensorflow-cpu==2.21.0
    tfds build caltech_birds2011 --data_dir=DATA_DIR --file_format=array_record

  ``load`` never downloads: an unprepared catalogue dataset is an error naming the data dir and the
  command. Reading them afterwards needs no TensorFlow.
- ``cars196``: TFDS's download URL (ai.stanford.edu/~jkrause/car196/) is dead. Manual route: get
  ``cars_train.tgz``, ``cars_test.tgz``, ``car_devkit.tgz`` and ``cars_test_annos_withlabels.mat`` (the
  original files: TFDS checks their sizes and SHA-256) into a folder DIR, then
  ``tfds build cars196 --manual_dir=DIR --data_dir=DATA_DIR --file_format=array_record``. Or arrange the
  images as ``ROOT/database/<class>/`` (train) and ``ROOT/query/<class>/`` (test) and use ``folder``.
- ``imagenet2012``: ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` in the manual dir
  (``--manual_dir``). Queries: a fixed sample of 5,000 validation images drawn with
  ``IMAGENET_QUERY_SEED`` (the paper samples 5,000 at random; the seed makes runs comparable).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np

from irgen_jax.data import records
from irgen_jax.errors import MissingFileError, UserError

log = logging.getLogger(__name__)

ROLES = ("database", "query", "train")
IMAGENET_QUERY_SEED = 0
INDEXED_SPLIT_SEED = 0
DATABASE_PARTS = ("indexed", "all")
TENSORFLOW_PIN = "tensorflow-cpu==2.21.0"


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """How a config name maps onto TFDS splits."""
  builder: str                 # TFDS builder name
  database: str                # split searched
  query: str                   # split of the queries
  train: tuple[str, ...]       # splits concatenated into the train role
  local: bool                  # built here (offline, no TensorFlow) vs a TFDS catalogue dataset
  manual: str = ""             # what manual_dir must hold ("" = nothing needed)
  query_sample: int = 0        # >0: a seeded fixed sample of this many query records


SOURCES: dict[str, SourceSpec] = {
    "fashion_mnist": SourceSpec("irgen_fashion_mnist", "database", "query", ("database",), local=True),
    "inshop": SourceSpec("irgen_inshop", "gallery", "query", ("train", "gallery"), local=True,
                         manual="the DeepFashion In-shop download (img/ + list_eval_partition.txt)"),
    "cub200": SourceSpec("caltech_birds2011", "train", "test", ("train",), local=False),
    "cars196": SourceSpec(
        "cars196", "train", "test", ("train",), local=False,
        manual="cars_train.tgz, cars_test.tgz, car_devkit.tgz, cars_test_annos_withlabels.mat"),
    "imagenet2012": SourceSpec("imagenet2012", "train", "validation", ("train",), local=False,
                               manual="ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar",
                               query_sample=5000),
    "places365": SourceSpec("places365_small", "train", "validation", ("train",), local=False),
    "folder": SourceSpec("irgen_folder", "database", "query", ("database",), local=True,
                         manual="ROOT with database/<class>/<image> and query/<class>/<image>"),
    # Generated stand-in images written as a folder dataset (synthetic.py); `runlocal` configs, tests.
    "synthetic": SourceSpec("irgen_folder", "database", "query", ("database",), local=True),
}


# Classes of each source, for shape-only work that must not open the data (ahead-of-time compilation).
# In-shop: the item ids of the train split and of the query/gallery splits together (3,997 + 3,985).
NUM_CLASSES = {"fashion_mnist": 10, "inshop": 7982, "cub200": 200, "cars196": 196,
               "imagenet2012": 1000, "places365": 365}
NUM_DATABASE = {"fashion_mnist": 60000, "inshop": 12612, "cub200": 5994, "cars196": 8144,
                "imagenet2012": 1281167, "places365": 1803460}


def database_size(d) -> int:
  """N, the database images of a config's ``data`` section, known without the data (shapes only:
  ahead-of-time compilation); capped by ``data.max_database``."""
  n = d.synthetic.num_database if d.name == "synthetic" else NUM_DATABASE.get(d.name)
  if not n:
    raise UserError(f"config.data.name={d.name!r}: its database size is not known without the data; "
                    "ahead-of-time compilation supports the catalogue datasets.")
  return min(n, d.max_database) if d.max_database > 0 else n


def num_classes(d) -> int:
  """The classes of a config's ``data`` section, known without the data (shapes only)."""
  n = d.synthetic.num_classes if d.name == "synthetic" else NUM_CLASSES.get(d.name)
  if not n:
    raise UserError(f"config.data.name={d.name!r}: its class count is not known without the data; "
                    "ahead-of-time compilation supports the catalogue datasets.")
  return n


def names() -> list[str]:
  """The dataset names a config may use (``data.name``)."""
  return sorted(SOURCES)


def spec(name: str) -> SourceSpec:
  if name not in SOURCES:
    raise UserError(f"Unknown dataset {name!r}; known: {sorted(SOURCES)}.")
  return SOURCES[name]


# --------------------------------------------------------------------------------------------------
# Preparing


def _default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _builder(name: str, data_dir: str | None, manual_dir: str | None, skip_corrupt: bool,
             synthetic: dict | None = None):
  """The TFDS builder of ``name`` (ours are imported here so they register only when used)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = data_dir or None  # "" = TFDS's default data dir
  s = spec(name)
  if name == "synthetic":
    from irgen_jax.data import synthetic as synth  # pylint: disable=g-import-not-at-top
    if not synthetic:
      raise UserError("Dataset 'synthetic' needs its shape: config.data.synthetic = dict("
                       "num_classes, image_shape, num_database, num_queries).")
    manual_dir = synth.generate(os.path.join(data_dir or _default_data_dir(), "irgen_synthetic"),
                                **dict(synthetic))
    name = "folder"
  if name == "fashion_mnist":
    from irgen_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
    return fashion_mnist.IrgenFashionMnist(data_dir=data_dir, source_dir=manual_dir or None)
  if name == "inshop":
    from irgen_jax.data import inshop  # pylint: disable=g-import-not-at-top
    return inshop.IrgenInshop(data_dir=data_dir, manual_dir=manual_dir, skip_corrupt=skip_corrupt)
  if name == "folder":
    from irgen_jax.data import folder  # pylint: disable=g-import-not-at-top
    if not manual_dir:
      raise MissingFileError("The folder dataset needs its ROOT as manual_dir "
                              "(ROOT/database/<class>/<image>, ROOT/query/<class>/<image>).")
    return folder.IrgenFolder(root=manual_dir, data_dir=data_dir, skip_corrupt=skip_corrupt)
  return tfds.builder(s.builder, data_dir=data_dir)


def _prepare_command(name: str, builder) -> str:
  s = spec(name)
  data_dir = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
  manual = " --manual_dir=MANUAL_DIR" if s.manual else ""
  return (f"pip install {TENSORFLOW_PIN} && tfds build {s.builder} --data_dir={data_dir} "
          f"--file_format=array_record{manual}")


def _not_prepared_error(name: str, builder) -> MissingFileError:
  s = spec(name)
  manual = f" MANUAL_DIR must hold {s.manual}." if s.manual else ""
  extra = (" TFDS's download URL for it is dead: get the original files elsewhere (TFDS checks their "
           "SHA-256), or arrange the images as a folder dataset (see irgen_jax/data/registry.py)."
           if name == "cars196" else "")
  return MissingFileError(
      f"Dataset {name!r} (TFDS {s.builder}) is not prepared under {builder.data_dir}. It needs "
      f"TensorFlow and a download to prepare, once: `{_prepare_command(name, builder)}`."
      f"{manual}{extra}")


def prepare(name: str, *, data_dir: str | None, manual_dir: str | None = None,
            skip_corrupt: bool = False, synthetic: dict | None = None) -> dict[str, Any]:
  """The ``data`` stage: builds the ArrayRecord files of ``name`` and its label caches; idempotent.

  Local sources build offline; catalogue ones are built with TFDS (TensorFlow required, downloads or
  manual files). Returns ``{'dir': prepared dir, 'splits': {split: records}, 'skipped': {split:
  [paths]}}``. Raises ``FileNotFoundError`` naming the missing path and how to provide it.
  ``synthetic``: the generated data's shape when ``name`` is ``"synthetic"`` (see ``synthetic.py``).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  s = spec(name)
  builder = _builder(name, data_dir, manual_dir, skip_corrupt, synthetic)
  if not builder.is_prepared():
    if s.local:
      builder.check_source()  # a missing download is our error naming the path, before TFDS starts
    else:
      try:
        import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
      except ImportError:
        raise _not_prepared_error(name, builder) from None
    tfds.disable_progress_bar()  # one progress line per 1k records floods logs of long builds
    log.info("Preparing %s under %s", name, builder.data_dir)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None))
  _check_array_record(name, builder)
  splits = sorted({s.database, s.query, *s.train})
  for split in splits:
    _split_labels(builder, split)
  metadata = builder.info.metadata or {}
  return {"dir": os.fspath(builder.data_dir),
          "splits": {split: builder.info.splits[split].num_examples for split in splits},
          "skipped": dict(metadata.get("skipped", {}))}


def _check_array_record(name: str, builder) -> None:
  fmt = builder.info.file_format
  if fmt is None or getattr(fmt, "value", fmt) != "array_record":
    raise UserError(
        f"Dataset {name!r} under {builder.data_dir} was prepared as {fmt}, which needs TensorFlow to "
        f"read; rebuild it as ArrayRecord: `{_prepare_command(name, builder)}`.")


def _reader(builder, split: str) -> records.SplitReader:
  info = builder.info.splits[split]
  return records.SplitReader([os.fspath(p) for p in info.filepaths], info.shard_lengths,
                             name=f"{builder.name}/{split}")


def _split_labels(builder, split: str) -> np.ndarray:
  decoder = records.ExampleDecoder.for_features(builder.info.features, builder.name)
  cache = os.path.join(os.fspath(builder.data_dir), f"irgen-labels-{split}.npy")
  return records.cached_labels(_reader(builder, split), decoder, cache)


# --------------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass
class Dataset:
  """A loaded dataset: the three roles as random-access sources, plus what the stages need to know.

  ``train_to_database``: int64 [len(train)], the database index of each train record, -1 where the
  train record is not a database image (In-shop's train split).
  """
  name: str
  database: Any
  query: Any
  train: Any
  num_classes: int
  class_names: list[str] | None
  train_to_database: np.ndarray
  prepared_dir: str = ""
  # The last `held_out` database records are the ones the models never trained on (indexed_fraction < 1
  # with database_part="all"); 0 otherwise.
  held_out: int = 0

  @property
  def num_indexed(self) -> int:
    """Database records the models trained on and the tokenizer stage indexed (the first ones)."""
    return len(self.database) - self.held_out

  def source(self, role: str):
    if role not in ROLES:
      raise ValueError(f"Unknown role {role!r}; expected one of {ROLES}.")
    return getattr(self, role)

  def labels(self, role: str) -> np.ndarray:
    """int64 [len(role)], without decoding any image (read-only view)."""
    labels = self.source(role).labels.view()
    labels.flags.writeable = False
    return labels


def query_sample(num_records: int, size: int, seed: int = IMAGENET_QUERY_SEED) -> np.ndarray:
  """The fixed query subset: ``size`` distinct rows of ``num_records``, sorted (int64)."""
  if size >= num_records:
    return np.arange(num_records, dtype=np.int64)
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_records, size=size, replace=False)).astype(np.int64)


def _check_fraction(fraction: float) -> None:
  if not 0 < float(fraction) <= 1:
    raise UserError(f"indexed_fraction={fraction!r}: expected a fraction in (0, 1].")


def indexed_split(labels: np.ndarray, fraction: float, seed: int = INDEXED_SPLIT_SEED) -> np.ndarray:
  """bool [N]: the indexed records, per class a seeded random ``round(fraction * n_c)`` of its
  ``n_c`` records (at least one), so both parts cover every class in proportion."""
  _check_fraction(fraction)
  labels = np.asarray(labels, np.int64)
  n = len(labels)
  if fraction >= 1 or n == 0:
    return np.ones(n, bool)
  priority = np.random.default_rng([seed, 0x1DE7]).random(n)
  order = np.lexsort((priority, labels))          # by class, random inside a class
  sorted_labels = labels[order]
  starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
  counts = np.diff(np.r_[starts, n])
  rank = np.arange(n) - np.repeat(starts, counts)
  keep_per_class = np.maximum(1, np.round(fraction * counts)).astype(np.int64)
  keep = np.zeros(n, bool)
  keep[order] = rank < np.repeat(keep_per_class, counts)
  return keep


def load(name: str, *, data_dir: str | None, manual_dir: str | None = None, max_database: int = 0,
         max_queries: int = 0, skip_corrupt: bool = False, synthetic: dict | None = None,
         indexed_fraction: float = 1.0, database_part: str = "indexed") -> Dataset:
  """Opens a prepared dataset (building local sources on first use) and validates it.

  ``max_database`` > 0 keeps the first N database records (and, for In-shop, the first N of its train
  split); ``max_queries`` > 0 the first N queries. With a truncated database, queries whose class has
  no image left in it are dropped first (they could never have a positive), then the first N kept.
  ``indexed_fraction`` < 1 splits the (truncated)
  database into the indexed part and the held-out rest (``indexed_split``); ``database_part`` says
  which records ``database`` holds: ``"indexed"`` or ``"all"`` (indexed, then held out; see the
  module docstring). The train role and the query filter above use the indexed part.
  ``skip_corrupt`` only matters when this call builds the data. Raises before any compute on missing
  data (naming the path and the command that provides it) and on ``validate`` failures.
  """
  s = spec(name)
  if max_database < 0 or max_queries < 0:
    raise UserError(f"max_database={max_database} and max_queries={max_queries} must be >= 0.")
  builder = _builder(name, data_dir, manual_dir, skip_corrupt, synthetic)
  if not builder.is_prepared():
    if not s.local:
      raise _not_prepared_error(name, builder)
    prepare(name, data_dir=data_dir, manual_dir=manual_dir, skip_corrupt=skip_corrupt,
            synthetic=synthetic)
    builder = _builder(name, data_dir, manual_dir, skip_corrupt, synthetic)
  _check_array_record(name, builder)
  decoder = records.ExampleDecoder.for_features(builder.info.features, builder.name)
  readers = {split: _reader(builder, split) for split in {s.database, s.query, *s.train}}
  labels = {split: _split_labels(builder, split) for split in readers}

  if database_part not in DATABASE_PARTS:
    raise ValueError(f"database_part={database_part!r}: expected one of {DATABASE_PARTS}.")
  fraction = float(indexed_fraction)
  _check_fraction(fraction)
  db_rows = np.arange(len(readers[s.database]), dtype=np.int64)
  if max_database:
    db_rows = db_rows[:max_database]
  held_rows = np.zeros(0, np.int64)
  if fraction < 1:
    keep = indexed_split(labels[s.database][db_rows], fraction)
    db_rows, held_rows = db_rows[keep], db_rows[~keep]
    log.info("%s: %d database records indexed (fraction %g), %d held out.", name, len(db_rows),
             fraction, len(held_rows))
  q_rows = np.arange(len(readers[s.query]), dtype=np.int64)
  if s.query_sample:
    q_rows = query_sample(len(q_rows), s.query_sample)
  if max_database or fraction < 1:
    present = np.isin(labels[s.query][q_rows], labels[s.database][db_rows])
    if not present.all():
      log.info("%s: %d queries have no database image of their class among the first %d; dropped.",
               name, int((~present).sum()), len(db_rows))
    q_rows = q_rows[present]
  if max_queries:
    q_rows = q_rows[:max_queries]

  def source(parts, role):
    role_labels = np.concatenate([labels[split][rows] for split, rows in parts])
    return records.RecordSource([(readers[split], rows) for split, rows in parts], decoder,
                                role_labels, name=f"{name}/{role}")

  train_parts, to_db = [], []
  for split in s.train:
    if split == s.database:
      rows = db_rows
      to_db.append(np.arange(len(rows), dtype=np.int64))
    else:
      rows = np.arange(len(readers[split]), dtype=np.int64)
      rows = rows[:max_database] if max_database else rows
      to_db.append(np.full(len(rows), -1, np.int64))
    train_parts.append((split, rows))
  indexed = source([(s.database, db_rows)], "database")
  held_out = len(held_rows) if database_part == "all" else 0
  database = indexed if not held_out else source([(s.database, np.concatenate([db_rows, held_rows]))],
                                                 "database")
  train = indexed if s.train == (s.database,) else source(train_parts, "train")
  label_feature = builder.info.features["label"]
  names = list(label_feature.names) if getattr(label_feature, "names", None) else None
  ds = Dataset(name=name, database=database, query=source([(s.query, q_rows)], "query"), train=train,
               num_classes=int(label_feature.num_classes), class_names=names,
               train_to_database=np.concatenate(to_db), prepared_dir=os.fspath(builder.data_dir),
               held_out=held_out)
  validate(ds)
  return ds


def load_from_config(d, *, database_part: str = "indexed") -> Dataset:
  """``load`` with a config's ``data`` section.

  ``database_part``: "indexed" (what the models train on and the tokenizer indexes: with
  ``data.indexed_fraction`` < 1 a fixed part of the database) or "all" (the held-out rest after it).
  """
  return load(d.name, data_dir=d.data_dir or None, manual_dir=d.manual_dir or None,
              max_database=d.max_database, max_queries=d.max_queries, skip_corrupt=d.skip_corrupt,
              synthetic=dict(d.synthetic) if d.name == "synthetic" else None,
              indexed_fraction=d.get("indexed_fraction", 1.0), database_part=database_part)


def prepare_from_config(d) -> dict[str, Any]:
  """``prepare`` with a config's ``data`` section (the ``data`` stage; idempotent)."""
  return prepare(d.name, data_dir=d.data_dir or None, manual_dir=d.manual_dir or None,
                 skip_corrupt=d.skip_corrupt,
                 synthetic=dict(d.synthetic) if d.name == "synthetic" else None)


def validate(ds: Dataset) -> None:
  """Raises ``ValueError`` before any compute: an empty role, a label outside ``[0, num_classes)``, or
  a query whose class has no database image (it could never be answered)."""
  validate_labels(num_classes=ds.num_classes, name=ds.name,
                  **{role: ds.labels(role) for role in ROLES})


def validate_labels(*, num_classes: int, database: np.ndarray, query: np.ndarray,
                    train: np.ndarray, name: str = "dataset") -> None:
  """``validate`` on bare label arrays (int [N_role] each)."""
  if num_classes <= 0:
    raise UserError(f"{name}: num_classes={num_classes} must be positive.")
  for role, labels in (("database", database), ("query", query), ("train", train)):
    labels = np.asarray(labels)
    if labels.size == 0:
      raise UserError(f"{name}: the {role} split is empty.")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
      i = int(np.argmax(bad))
      raise UserError(f"{name}: {role} record {i} has label {int(labels[i])}, outside "
                       f"[0, {num_classes}) ({int(bad.sum())} such records).")
  missing = ~np.isin(query, database)
  if missing.any():
    classes = np.unique(np.asarray(query)[missing])
    raise UserError(
        f"{name}: {int(missing.sum())} queries belong to {len(classes)} class(es) with no database "
        f"image (e.g. {classes[:5].tolist()}); such queries can never retrieve a positive. Add "
        "database images of those classes or remove the queries.")
