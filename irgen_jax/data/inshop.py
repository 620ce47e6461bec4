"""TFDS builder for DeepFashion In-shop Clothes Retrieval from a manually downloaded folder.

The manual dir holds ``list_eval_partition.txt`` (also found under ``Eval/`` or ``Anno/``) and the
images it names (``img/WOMEN/Dresses/id_00000002/02_1_front.jpg``, relative to the manual dir or to
its ``Img/`` folder). The partition file is a count line, a header ``image_name item_id
evaluation_status``, then one line per image: ``<path> <item id> <train|query|gallery>``.

Splits ``train`` (25,882), ``query`` (14,218), ``gallery`` (12,612), each in the file's order.
Labels are the item ids mapped to contiguous ints in sorted id order over the whole file, so the
same item has the same label in every split (train items and query/gallery items are disjoint sets
in the official partition). Images are stored as their JPEG bytes (~1 GB for the low-resolution
``img/`` set, not the ~10 GB of decoded pixels) and decoded when read.

An unreadable or missing image is an error naming the file; ``skip_corrupt=True`` leaves it out and
counts it (log + the dataset's ``metadata.json``).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from irgen_jax import failpoints
from irgen_jax.data import images
from irgen_jax.errors import MissingFileError, UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "query", "gallery")
PARTITION_FILE = "list_eval_partition.txt"
DOWNLOAD_HINT = (
    "Download 'In-shop Clothes Retrieval Benchmark' of DeepFashion (https://mmlab.ie.cuhk.edu.hk/"
    "projects/DeepFashion/InShopRetrieval.html): unzip Img/img.zip and put "
    "Eval/list_eval_partition.txt beside the resulting img/ folder, then pass that folder as "
    "manual_dir.")


def find_layout(manual_dir: str) -> tuple[str, str]:
  """``(partition file, image base dir)`` in ``manual_dir``; an error naming what is missing."""
  if not manual_dir:
    raise MissingFileError(f"In-shop needs manual_dir (the downloaded folder). {DOWNLOAD_HINT}")
  tried = [os.path.join(manual_dir, sub, PARTITION_FILE) for sub in ("", "Eval", "Anno")]
  partition = next((p for p in tried if os.path.isfile(p)), None)
  if partition is None:
    raise MissingFileError(
        f"In-shop partition file not found; tried {', '.join(tried)}. {DOWNLOAD_HINT}")
  bases = [manual_dir, os.path.join(manual_dir, "Img")]
  base = next((b for b in bases if os.path.isdir(os.path.join(b, "img"))), None)
  if base is None:
    raise MissingFileError(
        f"In-shop images not found: no img/ folder under {' or '.join(bases)}. {DOWNLOAD_HINT}")
  return partition, base


def parse_partition(path: str) -> list[tuple[str, str, str]]:
  """``[(image_name, item_id, status)]`` in file order; malformed lines are an error naming the line."""
  with open(path, encoding="utf-8") as f:
    lines = [line.rstrip("\r\n") for line in f]
  if len(lines) < 2:
    raise UserError(f"{path}: expected a count line and a header line, found {len(lines)} lines.")
  try:
    count = int(lines[0].strip())
  except ValueError:
    raise UserError(f"{path}:1: expected the number of images, found {lines[0]!r}.") from None
  header = lines[1].split()
  if header != ["image_name", "item_id", "evaluation_status"]:
    raise UserError(f"{path}:2: expected header 'image_name item_id evaluation_status', "
                     f"found {lines[1]!r}.")
  entries = []
  for lineno, line in enumerate(lines[2:], start=3):
    if not line.strip():
      continue
    fields = line.split()
    if len(fields) != 3:
      raise UserError(f"{path}:{lineno}: expected 3 fields, found {len(fields)}: {line!r}.")
    if fields[2] not in SPLITS:
      raise UserError(f"{path}:{lineno}: status {fields[2]!r} is not one of {SPLITS}.")
    entries.append((fields[0], fields[1], fields[2]))
  if len(entries) != count:
    raise UserError(f"{path}: the count line says {count} images, the file lists {len(entries)}.")
  return entries


class IrgenInshop(tfds.core.GeneratorBasedBuilder):
  """DeepFashion In-shop (manual download): splits train, query, gallery."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Encoded JPEG bytes; labels = item ids in sorted order."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = DOWNLOAD_HINT

  def __init__(self, *, manual_dir: str | None = None, skip_corrupt: bool = False, **kwargs):
    # The folder is a constructor argument (not TFDS's DownloadConfig.manual_dir, whose checks raise
    # a bare AssertionError) so that a missing download is our error naming the path.
    self._manual = manual_dir or ""
    self._skip_corrupt = skip_corrupt
    super().__init__(**kwargs)

  def check_source(self) -> None:
    """Raises on a missing/incomplete download (naming the path) or a malformed partition file."""
    partition, _ = find_layout(self._manual)
    parse_partition(partition)

  def _info(self) -> tfds.core.DatasetInfo:
    # The class names are the item ids, known only from the partition file: _split_generators sets
    # them; a prepared dataset restores them from its label.labels.txt.
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded JPEG bytes
            "label": tfds.features.ClassLabel(),
        }),
        homepage="https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the folder comes in as manual_dir=...; nothing is downloaded
    partition, base = find_layout(self._manual)
    entries = parse_partition(partition)
    item_ids = sorted({item for _, item, _ in entries})
    self.info.features["label"].names = item_ids
    label_of = {item: i for i, item in enumerate(item_ids)}
    self.info.metadata["skipped"] = {}
    gens = {}
    for split in SPLITS:
      rows = [(os.path.join(base, name), label_of[item]) for name, item, s in entries if s == split]
      if not rows:
        raise UserError(f"{partition}: no image has status {split!r}.")
      gens[split] = self._generate_examples(split, rows)
    return gens

  def _generate_examples(self, split, rows):
    skipped = []
    for key, (path, label) in enumerate(rows):
      data = images.encode_or_skip(path, self._skip_corrupt, skipped)
      if data is None:
        continue
      failpoints.hit("data.example")  # a kill in the middle of a build
      yield key, {"image": data, "label": label}
    if skipped:
      log.warning("In-shop %s: skipped %d unreadable image(s): %s", split, len(skipped),
                  ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    if len(skipped) == len(rows):
      raise UserError(f"In-shop: every image of the {split} split is unreadable.")
    self.info.metadata["skipped"][split] = skipped
