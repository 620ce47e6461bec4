"""TFDS builder for the Fashion-MNIST files of the Debian package ``dataset-fashion-mnist`` (offline).

Splits: ``database`` = the 60,000 training images, ``query`` = the 10,000 test images, in the order
of the IDX files (shuffling is disabled so a record's position is its position in the file).
Features: ``image`` uint8 [28, 28, 1] (``tfds.features.Tensor``, raw bytes), ``label``
(``ClassLabel``, 10 classes).

TFDS already registers a download builder named ``fashion_mnist``; ours is ``irgen_fashion_mnist`` and
never touches the network. It builds with ``tensorflow-datasets`` alone (no TensorFlow).
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

from irgen_jax import failpoints
from irgen_jax.errors import MissingFileError, UserError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"
FILES = {
    "database": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "query": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot")
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


def check_source_dir(source_dir: str) -> None:
  """Raises ``FileNotFoundError`` naming the missing file and how to get it."""
  for names in FILES.values():
    for name in names:
      path = os.path.join(source_dir, name)
      if not os.path.isfile(path):
        raise MissingFileError(
            f"Fashion-MNIST file {path} not found. Install the Debian package "
            f"(`{INSTALL_HINT}`), or pass a manual_dir holding the four files "
            f"{', '.join(n for pair in FILES.values() for n in pair)}.")


def read_idx(path: str, magic: int) -> np.ndarray:
  """An IDX file (optionally gzipped) as a uint8 array; its header is checked against ``magic``."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 8:
    raise UserError(f"{path} is too short to be an IDX file.")
  found = int.from_bytes(data[:4], "big")
  if found != magic:
    raise UserError(f"{path}: IDX magic {found}, expected {magic} "
                     f"({'images' if magic == _IMAGES_MAGIC else 'labels'}).")
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(dims)):
    raise UserError(f"{path}: header says {dims} but holds {body.size} bytes.")
  return body.reshape(dims)


def read_split(source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """``(images uint8 [N, 28, 28, 1], labels int64 [N])`` of a split, straight from the IDX files."""
  image_file, label_file = FILES[split]
  imgs = read_idx(os.path.join(source_dir, image_file), _IMAGES_MAGIC)
  labels = read_idx(os.path.join(source_dir, label_file), _LABELS_MAGIC).astype(np.int64)
  if len(imgs) != len(labels):
    raise UserError(f"{source_dir}: {len(imgs)} {split} images but {len(labels)} labels.")
  return imgs[..., None], labels


class IrgenFashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from local IDX files (default: the Debian package's directory)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Database = train (60k), query = test (10k), IDX order."}

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    self._source_dir = source_dir or DEFAULT_DIR
    super().__init__(**kwargs)

  def check_source(self) -> None:
    """Raises ``FileNotFoundError`` naming the missing IDX file and the package that provides it."""
    check_source_dir(self._source_dir)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        disable_shuffling=True,  # keep IDX order: record position = position in the file
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    check_source_dir(self._source_dir)
    return {split: self._generate_examples(split) for split in FILES}

  def _generate_examples(self, split):
    imgs, labels = read_split(self._source_dir, split)
    for i in range(len(labels)):
      failpoints.hit("data.example")  # a kill in the middle of a build
      yield i, {"image": imgs[i], "label": int(labels[i])}
