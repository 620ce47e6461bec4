"""TFDS builder for a user's own folder of images (the ``folder`` source).

Layout::

  ROOT/database/<class>/<file>     the images searched (nested sub-folders of a class are read too)
  ROOT/query/<class>/<file>        the queries; positives = database images of the same class

Any format PIL reads (``images.IMAGE_EXTENSIONS``), any size (the pipeline resizes), any mode: gray,
palette or RGBA images become RGB when read (transparency over white). Hidden files are ignored, other
non-image files are ignored and counted in the log; an image file directly under ``database/`` or
``query/`` (outside a class folder) is an error.

Classes: the sorted union of the class folder names of both splits, so a class has the same label in
both. An *empty class folder* is a class with no image in that split: it keeps its label (labels stay
stable when images are added later) and is logged. An empty ``database/<c>`` beside a non-empty
``query/<c>`` makes the dataset fail validation (those queries have no positive), an empty
``query/<c>`` only means no query of that class. A whole split without images is an error.

An unreadable image is an error naming the file; ``skip_corrupt=True`` leaves it out and counts it
(log + the dataset's ``metadata.json``). The prepared data lives under a config named after ROOT and a
fingerprint of its listing (paths, sizes, modification times), so editing the folder triggers a rebuild
instead of silently serving stale data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from irgen_jax import failpoints
from irgen_jax.data import images
from irgen_jax.errors import MissingFileError, UserError

log = logging.getLogger(__name__)

SPLITS = ("database", "query")


@dataclasses.dataclass
class FolderListing:
  """What is under ROOT: ``files[split]`` = ``[(path, label)]`` in sorted path order."""
  root: str
  class_names: list[str]
  files: dict[str, list[tuple[str, int]]]
  empty_classes: dict[str, list[str]]
  ignored: int
  fingerprint: str


def scan(root: str) -> FolderListing:
  """Lists ROOT (no image is opened); raises on a missing layout, stray files or an empty split."""
  root = os.path.abspath(os.path.expanduser(root))
  if not root or not os.path.isdir(root):
    raise MissingFileError(f"Folder dataset root {root} does not exist. Expected "
                            "ROOT/database/<class>/<image> and ROOT/query/<class>/<image>; pass ROOT "
                            "as manual_dir.")
  class_dirs = {}
  for split in SPLITS:
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      raise MissingFileError(f"Folder dataset: {split_dir} is missing. Expected ROOT/database/<class>/"
                              "<image> and ROOT/query/<class>/<image>.")
    entries = sorted(e for e in os.listdir(split_dir) if not e.startswith("."))
    stray = [e for e in entries
             if not os.path.isdir(os.path.join(split_dir, e)) and images.is_image_file(e)]
    if stray:
      raise UserError(f"Folder dataset: image {os.path.join(split_dir, stray[0])} is not inside a "
                       f"class folder ({split}/<class>/<image>).")
    class_dirs[split] = [e for e in entries if os.path.isdir(os.path.join(split_dir, e))]
  class_names = sorted(set(class_dirs["database"]) | set(class_dirs["query"]))
  label_of = {c: i for i, c in enumerate(class_names)}
  digest = hashlib.sha1()
  files, empty, ignored = {}, {}, 0
  for split in SPLITS:
    files[split], empty[split] = [], []
    for cls in class_dirs[split]:
      digest.update(f"class\0{split}\0{cls}\n".encode())
      found = []
      for dirpath, dirnames, filenames in os.walk(os.path.join(root, split, cls)):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
          if name.startswith("."):
            continue
          if not images.is_image_file(name):
            ignored += 1
            continue
          path = os.path.join(dirpath, name)
          st = os.stat(path)
          digest.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
          found.append((path, label_of[cls]))
      if not found:
        empty[split].append(cls)
      files[split].extend(found)
    if not files[split]:
      raise UserError(f"Folder dataset: {os.path.join(root, split)} has no image files "
                       f"(extensions {sorted(images.IMAGE_EXTENSIONS)}).")
  return FolderListing(root=root, class_names=class_names, files=files, empty_classes=empty,
                       ignored=ignored, fingerprint=digest.hexdigest())


def config_name(listing: FolderListing) -> str:
  """``<root basename>-<fingerprint>``: one prepared copy per folder state."""
  slug = re.sub(r"[^a-z0-9_]+", "_", os.path.basename(listing.root.rstrip("/")).lower()).strip("_")
  return f"{slug or 'root'}-{listing.fingerprint[:12]}"


class IrgenFolder(tfds.core.GeneratorBasedBuilder):
  """A folder of class sub-folders, split into ``database`` and ``query`` (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Encoded image bytes; labels = sorted class folder names."}

  def __init__(self, *, root: str, skip_corrupt: bool = False, listing: FolderListing | None = None,
               **kwargs):
    self.listing = listing or scan(root)
    self._skip_corrupt = skip_corrupt
    super().__init__(config=tfds.core.BuilderConfig(name=config_name(self.listing)), **kwargs)

  def check_source(self) -> None:
    """Nothing left to check: the constructor's ``scan`` already validated the layout."""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded image bytes
            "label": tfds.features.ClassLabel(names=self.listing.class_names),
        }),
        description=f"Images under {self.listing.root}.",
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    listing = self.listing
    for split in SPLITS:
      if listing.empty_classes[split]:
        log.warning("Folder dataset %s: empty class folder(s) in %s: %s (the classes keep their "
                    "labels).", listing.root, split, ", ".join(listing.empty_classes[split]))
    if listing.ignored:
      log.info("Folder dataset %s: ignored %d non-image file(s).", listing.root, listing.ignored)
    self.info.metadata["root"] = self.listing.root
    self.info.metadata["empty_classes"] = self.listing.empty_classes
    self.info.metadata["skipped"] = {}
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    skipped = []
    for key, (path, label) in enumerate(self.listing.files[split]):
      data = images.encode_or_skip(path, self._skip_corrupt, skipped)
      if data is None:
        continue
      failpoints.hit("data.example")  # a kill in the middle of a build
      yield key, {"image": data, "label": label}
    if skipped:
      log.warning("Folder dataset %s: skipped %d unreadable image(s) in %s: %s", self.listing.root,
                  len(skipped), split, ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    if len(skipped) == len(self.listing.files[split]):
      raise UserError(f"Folder dataset: every image of {self.listing.root}/{split} is unreadable.")
    self.info.metadata["skipped"][split] = skipped
