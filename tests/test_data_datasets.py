"""Builders and registry: Fashion-MNIST from the Debian package, In-shop and folder datasets from tiny
generated trees (mixed sizes, modes and formats, a corrupt file, an empty class), errors on missing
data.

Builds are shared through session fixtures under pytest's tmp_path_factory; nothing touches the network.
"""

from __future__ import annotations

import logging
import os
import re
import time

import numpy as np
import pytest
from PIL import Image

from irgen_jax.data import fashion_mnist, folder, images, records, registry
from irgen_jax.data import inshop as inshop_lib

FM_DIR = fashion_mnist.DEFAULT_DIR


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST


@pytest.fixture(scope="session")
def fm(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds_fm"))
  start = time.perf_counter()
  info = registry.prepare("fashion_mnist", data_dir=data_dir)
  print(f"\nFashion-MNIST prepared in {time.perf_counter() - start:.1f} s")
  return data_dir, info


def test_fashion_mnist_builds_full_splits(fm):
  data_dir, info = fm
  assert info["splits"] == {"database": 60000, "query": 10000}
  ds = registry.load("fashion_mnist", data_dir=data_dir)
  assert (len(ds.database), len(ds.query), len(ds.train)) == (60000, 10000, 60000)
  assert ds.num_classes == 10 and ds.class_names == list(fashion_mnist.CLASS_NAMES)
  for split, role in (("database", "database"), ("query", "query")):
    idx_images, idx_labels = fashion_mnist.read_split(FM_DIR, split)
    np.testing.assert_array_equal(ds.labels(role), idx_labels)
    for i in (0, 1234, len(idx_labels) - 1):
      rec = ds.source(role)[i]
      assert rec["image"].dtype == np.uint8 and rec["image"].shape == (28, 28, 1)
      np.testing.assert_array_equal(rec["image"], idx_images[i])
      assert rec["label"] == idx_labels[i] and rec["index"] == i
  np.testing.assert_array_equal(ds.train_to_database, np.arange(60000))
  # The label caches sit beside the ArrayRecord files.
  assert os.path.isfile(os.path.join(ds.prepared_dir, "irgen-labels-database.npy"))


def _file_stats(directory):
  """{name: (inode, mtime_ns, size)} of every file under ``directory``."""
  out = {}
  for dirpath, _, files in os.walk(directory):
    for name in files:
      st = os.stat(os.path.join(dirpath, name))
      out[os.path.relpath(os.path.join(dirpath, name), directory)] = (st.st_ino, st.st_mtime_ns,
                                                                        st.st_size)
  return out


def test_prepare_is_idempotent(fm, monkeypatch):
  data_dir, info = fm
  before = _file_stats(info["dir"])
  assert any(".array_record" in name for name in before)
  assert any(name.startswith("irgen-labels-") for name in before)

  def no_rebuild(*args, **kwargs):
    raise AssertionError("prepare re-ran the builder on a prepared dataset")

  monkeypatch.setattr(fashion_mnist.IrgenFashionMnist, "_split_generators", no_rebuild)
  monkeypatch.setattr(fashion_mnist.IrgenFashionMnist, "_generate_examples", no_rebuild)
  again = registry.prepare("fashion_mnist", data_dir=data_dir)
  assert again == info
  # The second prepare reused the build: no file was rewritten, replaced, added or removed.
  assert _file_stats(info["dir"]) == before


def test_fast_reader_matches_tfds_data_source(fm):
  import tensorflow_datasets as tfds
  data_dir, _ = fm
  ds = registry.load("fashion_mnist", data_dir=data_dir)
  reference = tfds.data_source("irgen_fashion_mnist", split="query", data_dir=data_dir, download=False)
  for i in (0, 77, 9999):
    ref = reference[i]
    np.testing.assert_array_equal(ds.query[i]["image"], ref["image"])
    assert ds.query[i]["label"] == ref["label"]


def test_max_database_and_max_queries(fm):
  data_dir, _ = fm
  ds = registry.load("fashion_mnist", data_dir=data_dir, max_database=300, max_queries=40)
  assert (len(ds.database), len(ds.query), len(ds.train)) == (300, 40, 300)
  full = registry.load("fashion_mnist", data_dir=data_dir)
  np.testing.assert_array_equal(ds.labels("database"), full.labels("database")[:300])
  np.testing.assert_array_equal(ds.labels("query"), full.labels("query")[:40])
  np.testing.assert_array_equal(ds.query[39]["image"], full.query[39]["image"])
  with pytest.raises(ValueError, match="max_database"):
    registry.load("fashion_mnist", data_dir=data_dir, max_database=-1)


def test_labels_are_read_only(fm):
  data_dir, _ = fm
  labels = registry.load("fashion_mnist", data_dir=data_dir, max_database=10).labels("database")
  with pytest.raises(ValueError):
    labels[0] = 3


def test_missing_fashion_mnist_names_path_and_package(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    registry.load("fashion_mnist", data_dir=str(tmp_path / "dd"), manual_dir=str(tmp_path / "none"))
  msg = str(e.value)
  assert str(tmp_path / "none" / "train-images-idx3-ubyte.gz") in msg
  assert "apt-get install -y dataset-fashion-mnist" in msg


def test_bad_idx_file_is_named(tmp_path):
  import gzip
  for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
    with gzip.open(tmp_path / name, "wb") as f:
      f.write((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(3))
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: IDX magic 2049, expected 2051"):
    fashion_mnist.read_split(str(tmp_path), "database")


# --------------------------------------------------------------------------------------------------
# Generated image trees


def _write(path, mode, size, fmt, seed):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
  pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
  if mode == "RGBA":
    pixels[..., 3] = 255
    pixels[0, 0, 3] = 0  # one transparent pixel: it must come out white
  Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(path, format=fmt)


def _make_folder_tree(root):
  """database: cat (L png, RGB jpeg), dog (RGBA png, L jpeg in a sub-folder, a corrupt .jpg, a .txt),
  empty/ (empty); query: cat (RGB jpeg), dog (RGBA png), empty/ (empty)."""
  _write(f"{root}/database/cat/a.png", "L", (20, 30), "PNG", 1)
  _write(f"{root}/database/cat/b.jpg", "RGB", (40, 25), "JPEG", 2)
  _write(f"{root}/database/dog/c.png", "RGBA", (16, 16), "PNG", 3)
  _write(f"{root}/database/dog/sub/d.jpeg", "L", (33, 17), "JPEG", 4)
  with open(f"{root}/database/dog/broken.jpg", "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 this is not a JPEG")
  with open(f"{root}/database/dog/notes.txt", "w") as f:
    f.write("not an image")
  os.makedirs(f"{root}/database/empty")
  os.makedirs(f"{root}/query/empty")
  _write(f"{root}/query/cat/q1.jpg", "RGB", (50, 50), "JPEG", 5)
  _write(f"{root}/query/dog/q2.png", "RGBA", (10, 60), "PNG", 6)


@pytest.fixture(scope="session")
def folder_tree(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("folder") / "my_photos")
  _make_folder_tree(root)
  return root


@pytest.fixture(scope="session")
def folder_ds(folder_tree, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds_folder"))
  info = registry.prepare("folder", data_dir=data_dir, manual_dir=folder_tree, skip_corrupt=True)
  return data_dir, info


def test_folder_corrupt_file_is_an_error_naming_it(folder_tree, tmp_path):
  with pytest.raises(images.UnreadableImageError) as e:
    registry.prepare("folder", data_dir=str(tmp_path), manual_dir=folder_tree)
  assert os.path.join(folder_tree, "database", "dog", "broken.jpg") in str(e.value)
  assert "skip_corrupt=True" in str(e.value)


def test_folder_skip_corrupt_counts_it(folder_ds, folder_tree, caplog, tmp_path):
  data_dir, info = folder_ds
  broken = os.path.join(folder_tree, "database", "dog", "broken.jpg")
  assert info["skipped"] == {"database": [broken], "query": []}
  assert info["splits"] == {"database": 4, "query": 2}
  # The count is also in the log of a build.
  with caplog.at_level(logging.WARNING, logger="irgen_jax.data.folder"):
    registry.prepare("folder", data_dir=str(tmp_path), manual_dir=folder_tree, skip_corrupt=True)
  assert any("skipped 1 unreadable image(s) in database" in r.getMessage() for r in caplog.records)


def test_folder_records_classes_and_modes(folder_ds, folder_tree):
  data_dir, _ = folder_ds
  ds = registry.load("folder", data_dir=data_dir, manual_dir=folder_tree)
  # Classes: the sorted union of class folders, the empty one included (it keeps its label).
  assert ds.class_names == ["cat", "dog", "empty"] and ds.num_classes == 3
  np.testing.assert_array_equal(ds.labels("database"), [0, 0, 1, 1])
  np.testing.assert_array_equal(ds.labels("query"), [0, 1])
  shapes = [ds.database[i]["image"].shape for i in range(4)]
  assert shapes == [(30, 20, 3), (25, 40, 3), (16, 16, 3), (17, 33, 3)]  # sorted path order
  for role in ("database", "query"):
    for rec in ds.source(role):
      assert rec["image"].dtype == np.uint8 and rec["image"].shape[-1] == 3
  gray = ds.database[0]["image"]
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])  # L → RGB replicates
  original = np.asarray(Image.open(os.path.join(folder_tree, "database", "cat", "a.png")))
  np.testing.assert_array_equal(gray[..., 0], original)      # PNG is stored losslessly
  rgba = ds.database[2]["image"]
  np.testing.assert_array_equal(rgba[0, 0], [255, 255, 255])  # transparent pixel over white
  assert ds.train is ds.database


def test_folder_change_triggers_rebuild(tmp_path):
  root = str(tmp_path / "root")
  _write(f"{root}/database/a/1.png", "RGB", (8, 8), "PNG", 0)
  _write(f"{root}/query/a/2.png", "RGB", (8, 8), "PNG", 1)
  data_dir = str(tmp_path / "dd")
  assert len(registry.load("folder", data_dir=data_dir, manual_dir=root).database) == 1
  _write(f"{root}/database/a/3.png", "RGB", (9, 7), "PNG", 2)
  assert len(registry.load("folder", data_dir=data_dir, manual_dir=root).database) == 2


def test_folder_layout_errors(tmp_path):
  root = str(tmp_path / "r")
  with pytest.raises(FileNotFoundError, match=f"{root} does not exist"):
    folder.scan(root)
  _write(f"{root}/database/a/1.png", "RGB", (8, 8), "PNG", 0)
  with pytest.raises(FileNotFoundError, match=os.path.join(root, "query") + " is missing"):
    folder.scan(root)
  os.makedirs(f"{root}/query/a")
  with pytest.raises(ValueError, match=os.path.join(root, "query") + " has no image files"):
    folder.scan(root)
  _write(f"{root}/query/stray.png", "RGB", (8, 8), "PNG", 1)
  with pytest.raises(ValueError, match="stray.png is not inside a class folder"):
    folder.scan(root)


def test_folder_query_class_missing_from_database_fails_validation(tmp_path):
  root = str(tmp_path / "r")
  _write(f"{root}/database/a/1.png", "RGB", (8, 8), "PNG", 0)
  os.makedirs(f"{root}/database/b")  # empty database class ...
  _write(f"{root}/query/a/2.png", "RGB", (8, 8), "PNG", 1)
  _write(f"{root}/query/b/3.png", "RGB", (8, 8), "PNG", 2)  # ... with a query
  with pytest.raises(ValueError, match=r"1 queries belong to 1 class\(es\) with no database image"):
    registry.load("folder", data_dir=str(tmp_path / "dd"), manual_dir=root)


def test_folder_reader_matches_tfds_data_source(folder_ds, folder_tree):
  data_dir, _ = folder_ds
  builder = folder.IrgenFolder(root=folder_tree, data_dir=data_dir)
  reference = builder.as_data_source(split="query")
  ds = registry.load("folder", data_dir=data_dir, manual_dir=folder_tree)
  for i in range(2):
    assert ds.query[i]["label"] == reference[i]["label"]
    np.testing.assert_array_equal(ds.query[i]["image"], images.decode(reference[i]["image"]))


# In-shop: ids 2 (train only), 3 and 5 (query + gallery); one grayscale and one RGBA photo.
_INSHOP = [
    ("id_00000002", "train", "L"), ("id_00000002", "train", "RGB"),
    ("id_00000005", "query", "RGB"), ("id_00000005", "gallery", "RGB"),
    ("id_00000005", "gallery", "RGBA"), ("id_00000003", "query", "RGB"),
    ("id_00000003", "gallery", "RGB"),
]


def _make_inshop(root, corrupt=False, rows=_INSHOP):
  lines = []
  for k, (item, split, mode) in enumerate(rows):
    fmt = "PNG" if mode == "RGBA" else "JPEG"
    rel = f"img/WOMEN/Dresses/{item}/{k:02d}_1_front.{'png' if fmt == 'PNG' else 'jpg'}"
    _write(os.path.join(root, rel), mode, (24 + k, 32), fmt, k)
    lines.append(f"{rel} {item} {split}")
  if corrupt:
    rel = "img/WOMEN/Dresses/id_00000003/99_1_front.jpg"
    with open(os.path.join(root, rel), "wb") as f:
      f.write(b"\xff\xd8 truncated")
    lines.append(f"{rel} id_00000003 gallery")
  os.makedirs(os.path.join(root, "Eval"))
  with open(os.path.join(root, "Eval", "list_eval_partition.txt"), "w") as f:
    f.write(f"{len(lines)}\nimage_name item_id evaluation_status\n" + "\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def inshop(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("inshop") / "In-shop")
  _make_inshop(root, corrupt=True)
  data_dir = str(tmp_path_factory.mktemp("tfds_inshop"))
  info = registry.prepare("inshop", data_dir=data_dir, manual_dir=root, skip_corrupt=True)
  return root, data_dir, info


def test_inshop_splits_labels_and_roles(inshop):
  root, data_dir, info = inshop
  assert info["splits"] == {"train": 2, "query": 2, "gallery": 3}
  broken = os.path.join(root, "img/WOMEN/Dresses/id_00000003/99_1_front.jpg")
  assert info["skipped"]["gallery"] == [broken]
  ds = registry.load("inshop", data_dir=data_dir, manual_dir=root)
  assert ds.class_names == ["id_00000002", "id_00000003", "id_00000005"]  # sorted item ids
  np.testing.assert_array_equal(ds.labels("database"), [2, 2, 1])           # gallery
  np.testing.assert_array_equal(ds.labels("query"), [2, 1])
  np.testing.assert_array_equal(ds.labels("train"), [0, 0, 2, 2, 1])        # train split + gallery
  np.testing.assert_array_equal(ds.train_to_database, [-1, -1, 0, 1, 2])
  assert [r["index"] for r in ds.train] == [0, 1, 2, 3, 4]
  assert [r["image"].shape for r in ds.train] == [(32, 24, 3), (32, 25, 3), (32, 27, 3), (32, 28, 3),
                                                 (32, 30, 3)]
  np.testing.assert_array_equal(ds.train[3]["image"], ds.database[1]["image"])


def test_inshop_corrupt_file_is_an_error_naming_it(tmp_path):
  root = str(tmp_path / "In-shop")
  _make_inshop(root, corrupt=True)
  with pytest.raises(images.UnreadableImageError, match="99_1_front.jpg"):
    registry.prepare("inshop", data_dir=str(tmp_path / "dd"), manual_dir=root)


def test_inshop_missing_download_names_paths(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    registry.load("inshop", data_dir=str(tmp_path / "dd"), manual_dir=str(tmp_path / "nothing"))
  assert str(tmp_path / "nothing" / "Eval" / "list_eval_partition.txt") in str(e.value)
  assert "In-shop Clothes Retrieval Benchmark" in str(e.value)
  assert not os.path.exists(tmp_path / "dd" / "irgen_inshop" / "1.0.0")


def _array_record_files(directory):
  return [f for _, _, files in os.walk(directory) for f in files if ".array_record" in f]


def test_inshop_split_without_images_is_an_error_naming_the_file(tmp_path):
  root = str(tmp_path / "In-shop")
  _make_inshop(root, rows=[r for r in _INSHOP if r[1] != "gallery"])  # no gallery line at all
  partition = os.path.join(root, "Eval", "list_eval_partition.txt")
  with pytest.raises(ValueError, match=re.escape(f"{partition}: no image has status 'gallery'")):
    registry.prepare("inshop", data_dir=str(tmp_path / "dd"), manual_dir=root)
  assert not _array_record_files(tmp_path / "dd")  # nothing half-built is left to be reused


def test_inshop_split_whose_images_are_all_skipped_is_an_error(tmp_path):
  root = str(tmp_path / "In-shop")
  rows = [r for r in _INSHOP if r[1] != "gallery"]
  _make_inshop(root, corrupt=True, rows=rows)  # the gallery: one line, a corrupt file
  with pytest.raises(ValueError, match="every image of the gallery split is unreadable"):
    registry.prepare("inshop", data_dir=str(tmp_path / "dd"), manual_dir=root, skip_corrupt=True)
  assert not _array_record_files(tmp_path / "dd")


@pytest.mark.parametrize("how", ["not listed", "all skipped"])
def test_inshop_query_item_without_gallery_images_fails_validation(tmp_path, how):
  # id_00000003 has a query but no gallery image: none in the partition file, or only a corrupt one
  # that skip_corrupt leaves out. Preparing succeeds (the item keeps its label); loading refuses.
  root = str(tmp_path / "In-shop")
  rows = [r for r in _INSHOP if r[:2] != ("id_00000003", "gallery")]
  _make_inshop(root, corrupt=how == "all skipped", rows=rows)
  data_dir = str(tmp_path / "dd")
  info = registry.prepare("inshop", data_dir=data_dir, manual_dir=root, skip_corrupt=True)
  assert info["splits"] == {"train": 2, "query": 2, "gallery": 2}
  assert len(info["skipped"]["gallery"]) == (how == "all skipped")
  with pytest.raises(ValueError, match=r"1 queries belong to 1 class\(es\) with no database image"):
    registry.load("inshop", data_dir=data_dir, manual_dir=root)


def test_inshop_malformed_partition(tmp_path):
  path = tmp_path / "list_eval_partition.txt"
  header = "image_name item_id evaluation_status\n"
  path.write_text(f"3\n{header}img/a.jpg id_1 train\nimg/b.jpg id_1 query\n")
  with pytest.raises(ValueError, match="the count line says 3 images, the file lists 2"):
    inshop_lib.parse_partition(str(path))
  path.write_text("1\nimage_name item_id evaluation_status\nimg/a.jpg id_1 validation\n")
  with pytest.raises(ValueError, match=r":3: status 'validation'"):
    inshop_lib.parse_partition(str(path))


def test_encode_file_formats_and_orientation(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(tmp_path / "a.bmp")
  stored = images.encode_file(str(tmp_path / "a.bmp"))
  assert stored[:8] == b"\x89PNG\r\n\x1a\n"  # BMP is re-encoded losslessly as PNG
  np.testing.assert_array_equal(images.decode(stored), rgb)
  Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.tiff")
  assert images.decode(images.encode_file(str(tmp_path / "c.tiff"))).shape == (6, 10, 3)
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90° clockwise to display"
  Image.fromarray(rgb).save(tmp_path / "r.jpg", exif=exif)
  assert images.decode(images.encode_file(str(tmp_path / "r.jpg"))).shape == (10, 6, 3)
  with pytest.raises(images.UnreadableImageError, match="missing.png"):
    images.encode_file(str(tmp_path / "missing.png"))


# --------------------------------------------------------------------------------------------------
# Registry


@pytest.mark.parametrize("name,builder", [("cub200", "caltech_birds2011"), ("cars196", "cars196"),
                                          ("imagenet2012", "imagenet2012"),
                                          ("places365", "places365_small")])
def test_catalogue_dataset_not_prepared_names_dir_and_command(tmp_path, name, builder):
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(FileNotFoundError) as e:
    registry.load(name, data_dir=data_dir)
  msg = str(e.value)
  assert f"{data_dir}/{builder}/" in msg
  assert f"tfds build {builder} --data_dir={data_dir} --file_format=array_record" in msg
  if name == "cars196":
    assert "dead" in msg and "folder dataset" in msg
  assert not os.path.exists(os.path.join(data_dir, builder))  # nothing was downloaded or created


def test_unknown_dataset_name():
  assert registry.names() == ["cars196", "cub200", "fashion_mnist", "folder", "imagenet2012", "inshop",
                              "places365", "synthetic"]
  with pytest.raises(ValueError, match="Unknown dataset 'mnist'.*fashion_mnist"):
    registry.load("mnist", data_dir="")


def test_imagenet_query_sample_is_fixed():
  a = registry.query_sample(50000, 5000)
  assert len(a) == 5000 and len(np.unique(a)) == 5000 and np.all(np.diff(a) > 0)
  np.testing.assert_array_equal(a, registry.query_sample(50000, 5000))
  assert not np.array_equal(a, registry.query_sample(50000, 5000, seed=1))
  np.testing.assert_array_equal(registry.query_sample(10, 5000), np.arange(10))


def test_validate_labels_errors():
  ok = dict(num_classes=3, database=np.array([0, 1, 2]), query=np.array([1]), train=np.array([0, 1]))
  registry.validate_labels(**ok)
  with pytest.raises(ValueError, match="the query split is empty"):
    registry.validate_labels(**{**ok, "query": np.array([], np.int64)})
  with pytest.raises(ValueError, match="database record 1 has label 7, outside \\[0, 3\\)"):
    registry.validate_labels(**{**ok, "database": np.array([0, 7, 2])})
  with pytest.raises(ValueError, match="train record 0 has label -1"):
    registry.validate_labels(**{**ok, "train": np.array([-1])})
  with pytest.raises(ValueError, match=r"2 queries belong to 1 class\(es\) with no database image"):
    registry.validate_labels(**{**ok, "database": np.array([0, 0, 2]), "query": np.array([1, 1, 2])})


def test_array_source_rejects_bad_arrays():
  with pytest.raises(ValueError, match="uint8"):
    records.ArraySource(np.zeros((2, 4, 4, 1), np.float32), np.zeros(2))
  with pytest.raises(ValueError, match="2 images but 3 labels"):
    records.ArraySource(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3))
