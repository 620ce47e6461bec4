"""Random access to prepared TFDS splits (ArrayRecord files) without TensorFlow, fast enough to stream.

Why not ``tfds.data_source`` directly: measured here on Fashion-MNIST records, its ``__getitem__`` costs
~390 µs per record: ~300 µs in ArrayRecord's ``read([i])`` (a list-of-indices read sets up parallel
machinery on every call) and ~150 µs in TFDS's generic example parser. ``reader.read(i, i + 1)`` takes
~14 µs and parsing the ``tf.train.Example`` proto ourselves ~10 µs, so a 28×28 record costs ~25 µs. The
files and their serialization are TFDS's own (``tfds build`` output works as is); only the reading is
ours. ``tests/test_data_datasets.py`` checks that it agrees with ``tfds.data_source``.

A *role* (``database``, ``query``, ``train``) is a view over one or more splits (In-shop's ``train``
is the ``train`` split followed by the ``gallery`` split), possibly a subset of their rows;
``RecordSource`` implements it with grain's random-access protocol (``__len__``, ``__getitem__``).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Sequence

import numpy as np

from irgen_jax.data import images

log = logging.getLogger(__name__)

# Records per batched read when scanning a whole split (labels): large reads are ~10 µs per record.
_SCAN_CHUNK = 4096


class SplitReader:
  """The raw (serialized) records of one split, stored as one or more ArrayRecord shards.

  Picklable (readers are reopened lazily), so it can travel to grain worker processes.
  """

  def __init__(self, paths: Sequence[str], lengths: Sequence[int], name: str = ""):
    if len(paths) != len(lengths):
      raise ValueError(f"{len(paths)} shard paths but {len(lengths)} shard lengths.")
    self.paths = [os.fspath(p) for p in paths]
    self.lengths = [int(n) for n in lengths]
    self.name = name
    self._starts = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
    self._readers: list[Any] = [None] * len(self.paths)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_readers"] = [None] * len(self.paths)
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _reader(self, shard: int):
    reader = self._readers[shard]
    if reader is None:
      with self._lock:
        reader = self._readers[shard]
        if reader is None:
          from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
          # No readahead: access is random. TFDS writes group_size:1, so one record = one chunk.
          reader = array_record_module.ArrayRecordReader(self.paths[shard], "readahead_buffer_size:0")
          self._readers[shard] = reader
    return reader

  def _locate(self, row: int) -> tuple[int, int]:
    if not 0 <= row < len(self):
      raise IndexError(f"Record {row} is out of range for split {self.name!r} of {len(self)} records.")
    shard = int(np.searchsorted(self._starts, row, side="right")) - 1
    return shard, row - int(self._starts[shard])

  def read(self, row: int) -> bytes:
    shard, pos = self._locate(int(row))
    return self._reader(shard).read(pos, pos + 1)[0]

  def scan(self, start: int = 0, stop: int | None = None):
    """Yields ``(row, raw)`` for rows in ``[start, stop)`` in order, with large sequential reads."""
    stop = len(self) if stop is None else stop
    row = start
    while row < stop:
      shard, pos = self._locate(row)
      n = min(_SCAN_CHUNK, stop - row, self.lengths[shard] - pos)
      for raw in self._reader(shard).read(pos, pos + n):
        yield row, raw
        row += 1


class ExampleDecoder:
  """Parses records: ``image`` (raw uint8 bytes of a fixed shape, or encoded image bytes) + ``label``.

  ``image_shape`` given: the image was stored as raw ``uint8`` bytes (``tfds.features.Tensor`` with
  BYTES encoding) and is returned as ``uint8 image_shape``. ``None``: encoded bytes (JPEG/PNG/...; a
  TFDS ``Image`` feature or a bytes ``Tensor``) decoded to ``uint8 [H, W, 3]``.
  """

  def __init__(self, image_shape: Sequence[int] | None):
    self.image_shape = None if image_shape is None else tuple(int(d) for d in image_shape)

  @staticmethod
  def _features(raw: bytes):
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
    return tf_example_pb2.Example.FromString(raw).features.feature

  def image(self, raw: bytes) -> np.ndarray:
    data = self._features(raw)["image"].bytes_list.value[0]
    if self.image_shape is None:
      return images.decode(data)
    return np.frombuffer(data, np.uint8).reshape(self.image_shape)

  def label(self, raw: bytes) -> int:
    return int(self._features(raw)["label"].int64_list.value[0])

  @classmethod
  def for_features(cls, features, dataset: str) -> "ExampleDecoder":
    """The decoder for a prepared dataset's TFDS ``FeaturesDict`` (ours or a catalogue one)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if "image" not in features or "label" not in features:
      raise ValueError(f"Dataset {dataset} has features {sorted(features.keys())}; "
                       "expected 'image' and 'label'.")
    feat = features["image"]
    serialized = feat.get_serialized_info()
    if isinstance(feat, tfds.features.Image) or (
        isinstance(feat, tfds.features.Tensor) and feat.np_dtype == np.object_):
      return cls(None)
    if (isinstance(feat, tfds.features.Tensor) and feat.np_dtype == np.uint8
        and serialized.shape == () and all(d is not None for d in feat.shape)):
      return cls(feat.shape)
    raise ValueError(f"Dataset {dataset}: unsupported image feature {feat!r} (expected an encoded "
                     "image, or uint8 Tensor with encoding=BYTES and a fixed shape).")


def read_labels(reader: SplitReader, decoder: ExampleDecoder) -> np.ndarray:
  """Every label of a split, ``int64 [len(reader)]``, in record order (reads every record once)."""
  out = np.empty(len(reader), np.int64)
  for row, raw in reader.scan():
    out[row] = decoder.label(raw)
  return out


def cached_labels(reader: SplitReader, decoder: ExampleDecoder, cache_path: str) -> np.ndarray:
  """``read_labels`` with an .npy cache at ``cache_path`` (written beside the prepared data).

  The cache is trusted only when its length matches the split; an unwritable location (a read-only
  shared data dir) just means the labels are re-read next time.
  """
  if os.path.exists(cache_path):
    labels = np.load(cache_path)
    if labels.shape == (len(reader),):
      return labels
    log.warning("Ignoring stale label cache %s (%s labels for %d records).",
                cache_path, labels.shape, len(reader))
  labels = read_labels(reader, decoder)
  tmp = f"{cache_path}.tmp{os.getpid()}.npy"
  try:
    np.save(tmp, labels)
    os.replace(tmp, cache_path)  # atomic: a concurrent reader never sees half a file
  except OSError as e:
    log.warning("Could not cache labels at %s (%s); they will be re-read next time.", cache_path, e)
  return labels


class RecordSource:
  """A role's records: ``{'image': uint8 [H, W, C], 'label': int, 'index': int}``.

  ``index`` is the record's position in this role (0..len-1). ``parts`` are ``(reader, rows)`` pairs
  concatenated in order; ``rows`` (int64) selects records of the reader's split. ``labels`` (int64
  [len]) are the records' labels (from the label cache: reading them never decodes an image).
  Implements grain's ``RandomAccessDataSource`` protocol and pickles (for grain worker processes).
  """

  def __init__(self, parts: Sequence[tuple[SplitReader, np.ndarray]], decoder: ExampleDecoder,
               labels: np.ndarray, name: str = ""):
    self.parts = [(reader, np.asarray(rows, np.int64)) for reader, rows in parts]
    self.decoder = decoder
    self.labels = np.asarray(labels, np.int64)
    self.name = name
    self._starts = np.concatenate([[0], np.cumsum([len(r) for _, r in self.parts])]).astype(np.int64)
    if len(self.labels) != len(self):
      raise ValueError(f"{name}: {len(self.labels)} labels for {len(self)} records.")

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index) -> dict[str, Any]:
    i = int(index)
    if not 0 <= i < len(self):
      raise IndexError(f"Index {i} out of range for {self.name or 'source'} of {len(self)} records.")
    part = int(np.searchsorted(self._starts, i, side="right")) - 1
    reader, rows = self.parts[part]
    image = self.decoder.image(reader.read(int(rows[i - self._starts[part]])))
    return {"image": image, "label": int(self.labels[i]), "index": i}

  def __repr__(self) -> str:
    return f"RecordSource({self.name!r}, {len(self)} records)"


class ArraySource:
  """In-memory records: ``images`` uint8 [N, H, W, C] (or a list of uint8 [H, W, C] images of any
  sizes, e.g. a user's query files), ``labels`` int [N].

  The same protocol and record as ``RecordSource``; for tests, benchmarks and users with arrays.
  """

  def __init__(self, images_: Any, labels: Any, name: str = ""):
    if isinstance(images_, (list, tuple)):
      bad = [i for i, im in enumerate(images_)
             if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3]
      if bad:
        raise ValueError(f"images[{bad[0]}] must be a uint8 [H, W, C] array.")
      images_ = list(images_)
    else:
      images_ = np.asarray(images_)
      if images_.dtype != np.uint8 or images_.ndim != 4:
        raise ValueError(f"images must be uint8 [N, H, W, C]; got {images_.dtype} {images_.shape}.")
    if len(images_) != len(labels):
      raise ValueError(f"{len(images_)} images but {len(labels)} labels.")
    self.images = images_
    self.labels = np.asarray(labels, np.int64)
    self.name = name

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index) -> dict[str, Any]:
    i = int(index)
    if not 0 <= i < len(self):
      raise IndexError(f"Index {i} out of range for {self.name or 'source'} of {len(self)} records.")
    return {"image": self.images[i], "label": int(self.labels[i]), "index": i}

  def __repr__(self) -> str:
    return f"ArraySource({self.name!r}, {len(self)} records)"
