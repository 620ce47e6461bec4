"""Fresh data: `python -m irgen_jax.insert` adds images to a finished workdir's index without retraining
(identifiers as the tokenizer stage assigns them, immediately searchable, crash-safe writes), and the
paper's Table 6 protocol (train on a fixed half, insert the held-out half, evaluate on everything) at
runlocal size."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from irgen_jax import files as files_lib
from irgen_jax import insert, search, stages
from irgen_jax.data import registry
from irgen_jax.decoding.index import Index
from irgen_jax.workdir import CONFIG, IndexedImages, Workdir, WorkdirError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy(fashion_runlocal_workdir, tmp_path, name="workdir") -> str:
  src, _ = fashion_runlocal_workdir
  dst = tmp_path / name
  shutil.copytree(src, dst)
  return str(dst)


def _folder(cat: IndexedImages, root) -> dict[str, int]:
  """ROOT/Ankle boot/a.png (= database image 0), ROOT/bag/b.png (= 1, class matched case-insensitively),
  ROOT/mystery/c.png (= 2, no such class), ROOT/d.png (= 3, no class), plus a non-image file."""
  layout = {"Ankle boot/a.png": 0, "bag/b.png": 1, "mystery/c.png": 2, "d.png": 3}
  for rel, j in layout.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(cat.image(j)[..., 0]).save(path)
  with open(os.path.join(root, "notes.txt"), "w") as f:
    f.write("not an image")
  return {os.path.join(root, rel): j for rel, j in layout.items()}


def test_insert_folder_is_searchable_at_once(fashion_runlocal_workdir, tmp_path):
  workdir = _copy(fashion_runlocal_workdir, tmp_path)
  before = IndexedImages.open(workdir)
  assert before.num_images == 512 and not before.batches
  twins = _folder(before, tmp_path / "new")
  info = insert.insert_folder(workdir, str(tmp_path / "new"))
  assert info["inserted"] == 4 and info["ids"] == [512, 516] and info["num_images"] == 516

  c = Workdir(workdir).load_config()
  index = Index.load(os.path.join(workdir, "index.irgx"), num_levels=c.ids.length,
                     num_tokens=c.ids.codebook_size)  # loads, i.e. passes its consistency checks
  assert index.num_images == 516 and index.check_consistency() is None
  cat = IndexedImages.open(workdir)
  # Files are listed in sorted order: ROOT's own files first, then the class folders.
  files = [b for b in cat.batches if b["source"] == "folder"][0]["files"]
  twin_of = {512 + i: twins[p] for i, p in enumerate(files)}
  # Semantic identifiers with the run's codebooks: a copy of a database image gets its identifier.
  codes = index.codes()
  for new, old in twin_of.items():
    np.testing.assert_array_equal(codes[new], codes[old])
  described = {cat.describe(j)["source"]: cat.describe(j) for j in twin_of}
  by_name = {os.path.relpath(s, tmp_path / "new"): d for s, d in described.items()}
  assert (by_name["Ankle boot/a.png"]["label"], by_name["Ankle boot/a.png"]["class_name"]) == (9, "Ankle boot")
  assert by_name["bag/b.png"]["label"] == 8
  assert (by_name["mystery/c.png"]["label"], by_name["mystery/c.png"]["class_name"]) == (-1, "mystery")
  assert (by_name["d.png"]["label"], by_name["d.png"]["class_name"]) == (-1, "")
  assert cat.features().shape[0] == 516
  # The evaluation of the old index is due again.
  assert not os.path.exists(os.path.join(workdir, "evaluate", "done.json"))

  # Searching with an inserted file finds it, right beside its twin (same identifier, same score):
  # with as many beams as identifiers the plain beam search scores every identifier. (The run's
  # class-first policy would score only the likeliest class's, which a runlocal model often gets
  # wrong: this check searches the run with the plain beam.)
  config_path = Workdir(workdir).path(CONFIG)
  saved = files_lib.read_json(config_path)
  saved["search"].update(class_first=False, hedge=dict(saved["search"]["hedge"], slots=0))
  files_lib.write_json(config_path, saved)
  query = [p for p in twins if p.endswith("a.png")][0]
  new_id = [j for j, old in twin_of.items() if old == twins[query]][0]
  out = search.search_images(workdir, [query], k=516, beam_size=index.num_identifiers,
                             html_path=str(tmp_path / "s.html"))
  hits = {h.id: h for h in out.results[0].hits}
  assert new_id in hits and twins[query] in hits
  assert hits[new_id].score == hits[twins[query]].score
  assert hits[new_id].source == query and hits[new_id].class_name == "Ankle boot"
  # ...and a default search (the run's beam size) returns the inserted image's identifier bucket
  # whenever it returns its twin.
  top = search.search_images(workdir, [query], k=10, html_path=None).results[0].hits
  ids = [h.id for h in top]
  if twins[query] in ids:
    assert new_id in ids


def test_crash_during_save_leaves_the_old_index(fashion_runlocal_workdir, tmp_path, monkeypatch):
  workdir = _copy(fashion_runlocal_workdir, tmp_path)
  cat = IndexedImages.open(workdir)
  _folder(cat, tmp_path / "new")
  index_path = os.path.join(workdir, "index.irgx")
  real_replace = os.replace

  def killed_at_commit(src, dst, *args, **kwargs):
    if os.fspath(dst) == index_path:
      raise KeyboardInterrupt("killed while renaming the new index into place")
    return real_replace(src, dst, *args, **kwargs)

  monkeypatch.setattr(os, "replace", killed_at_commit)
  with pytest.raises(KeyboardInterrupt):
    insert.insert_folder(workdir, str(tmp_path / "new"))
  monkeypatch.setattr(os, "replace", real_replace)
  # The new state's files were written; the index was not replaced: the old one loads, and the workdir
  # reads as it was (the orphaned files of the new size are ignored).
  assert os.path.exists(os.path.join(workdir, "inserted", "state-516.json"))
  with open(os.path.join(workdir, "index.irgx.0123.tmp"), "wb") as f:  # a kill's leftover
    f.write(b"IRGENIDX truncated")
  after = IndexedImages.open(workdir)
  assert after.num_images == 512 and not after.batches
  assert os.path.exists(os.path.join(workdir, "evaluate", "done.json"))

  # The next insert succeeds and removes the orphans.
  info = insert.insert_folder(workdir, str(tmp_path / "new"))
  assert info["num_images"] == 516
  assert sorted(os.listdir(os.path.join(workdir, "inserted"))) == [
      ".lock", "codes-516.npy", "features-516.npy", "state-516.json"]
  # An index whose inserted images are not described is refused (it would mislabel them).
  os.unlink(os.path.join(workdir, "inserted", "state-516.json"))
  with pytest.raises(WorkdirError, match="state-516.json"):
    IndexedImages.open(workdir)


def test_insert_errors(fashion_runlocal_workdir, tmp_path):
  workdir = _copy(fashion_runlocal_workdir, tmp_path)
  root = tmp_path / "bad"
  (root / "Bag").mkdir(parents=True)
  (root / "Bag" / "broken.png").write_bytes(b"\x89PNG truncated")
  with pytest.raises(ValueError, match="broken.png"):
    insert.insert_folder(workdir, str(root))
  assert IndexedImages.open(workdir).num_images == 512
  with pytest.raises(ValueError, match="indexed_fraction"):
    insert.insert_held_out(workdir)  # trained on the whole database: nothing is held out


def test_indexed_split_is_fixed_stratified_and_complete(fashion_runlocal_workdir):
  _, data_dir = fashion_runlocal_workdir
  kw = dict(data_dir=str(data_dir), max_database=512, max_queries=64)
  half = registry.load("fashion_mnist", indexed_fraction=0.5, **kw)
  both = registry.load("fashion_mnist", indexed_fraction=0.5, database_part="all", **kw)
  full = registry.load("fashion_mnist", **kw)
  assert (len(half.database), half.held_out, len(half.train)) == (256, 0, 256)
  assert (len(both.database), both.held_out, both.num_indexed, len(both.train)) == (512, 256, 256, 256)
  np.testing.assert_array_equal(both.labels("database")[:256], half.labels("database"))
  np.testing.assert_array_equal(both.labels("query"), full.labels("query"))
  # Every class is split in proportion.
  counts = np.bincount(full.labels("database"), minlength=10)
  np.testing.assert_array_equal(np.bincount(half.labels("database"), minlength=10),
                                np.maximum(1, np.round(counts * 0.5)))
  # The parts partition the database: same multiset of images.
  keep = registry.indexed_split(full.labels("database"), 0.5)
  np.testing.assert_array_equal(np.sort(np.flatnonzero(keep)).size, 256)
  rows = np.concatenate([np.flatnonzero(keep), np.flatnonzero(~keep)])
  for i in (0, 255, 256, 511):
    np.testing.assert_array_equal(both.database[i]["image"], full.database[int(rows[i])]["image"])
  # Every stage reads the dataset through registry.load_from_config, which honours the fraction.
  c = _fresh_config(data_dir, reuse_from="")
  assert c.data.indexed_fraction == 0.5 and len(registry.load_from_config(c.data).database) == 256


def _fresh_config(data_dir, reuse_from):
  path = os.path.join(REPO, "configs", "fashion_mnist_fresh.py")
  spec = importlib.util.spec_from_file_location("_fresh_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("runlocal")
  c.data.data_dir = str(data_dir)
  c.tokenizer.reuse_from = str(reuse_from)
  c.eval.update(beam_check_queries=0, baselines=("linear_scan",))
  return c


def test_held_out_protocol(fashion_runlocal_workdir, tmp_path):
  """Train on the indexed half, insert the held-out half, evaluate over all 512 images.

  To keep this fast the trained networks come from the shared runlocal workdir: its tokenizer stands
  in through tokenizer.reuse_from (this run computes its own features, identifiers and index over the
  indexed half) and its retriever is copied in; what the protocol adds does not depend on them.
  """
  source, data_dir = fashion_runlocal_workdir
  workdir = str(tmp_path / "fresh")
  c = _fresh_config(data_dir, source)
  assert c.data.indexed_fraction == 0.5
  c.stages = "data,tokenizer"
  stages.run(c, workdir)
  assert Workdir(workdir).load_database_features().shape[0] == 256
  with open(os.path.join(workdir, "tokenizer", "done.json")) as f:
    assert json.load(f)["reused_from"] == os.path.abspath(source)
  shutil.copytree(os.path.join(source, "retriever"), os.path.join(workdir, "retriever"))
  # The copied retriever was trained on the other run's identifiers, so its marker is not valid
  # here; the test lets it stand in (what the protocol adds does not depend on it).
  Workdir(workdir).mark_done("retriever", {"stand_in_from": str(source)})

  info = insert.insert_held_out(workdir)
  assert info["inserted"] == 256 and info["num_images"] == 512
  again = insert.insert_held_out(workdir)  # a re-run is a no-op that says so
  assert again["inserted"] == 0 and again["num_images"] == 512 and "already" in again["nothing"]
  cat = IndexedImages.open(workdir)
  assert cat.held_out_inserted and cat.index.check_consistency() is None
  np.testing.assert_array_equal(cat.labels(), cat.dataset.labels("database"))

  done = insert.evaluate(workdir)
  assert done["num_database"] == 512 and done["inserted"] == 256
  with open(os.path.join(workdir, "report", "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["num_database"] == 512 and metrics["num_queries"] == 64
  assert {"irgen", "linear_scan"} <= set(metrics["methods"])
  assert 0 <= metrics["methods"]["irgen"]["precision@1"] <= 1


def test_inserting_the_same_images_again_is_a_no_op(fashion_runlocal_workdir, tmp_path):
  """Images are recognized by content: a re-run inserts nothing and says so; a folder that adds one new
  file (and a copy of an inserted one under another name) inserts only the new one."""
  workdir = _copy(fashion_runlocal_workdir, tmp_path)
  _folder(IndexedImages.open(workdir), tmp_path / "new")
  first = insert.insert_folder(workdir, str(tmp_path / "new"))
  assert first["inserted"] == 4 and first["duplicates"] == 0
  index_bytes = open(os.path.join(workdir, "index.irgx"), "rb").read()
  again = insert.insert_folder(workdir, str(tmp_path / "new"))
  assert again["inserted"] == 0 and again["duplicates"] == 4 and "already in the index" in again["nothing"]
  assert open(os.path.join(workdir, "index.irgx"), "rb").read() == index_bytes
  # One new image, and a renamed copy of an inserted one.
  cat = IndexedImages.open(workdir)
  Image.fromarray(cat.image(7)[..., 0]).save(tmp_path / "new" / "e.png")
  shutil.copy(tmp_path / "new" / "d.png", tmp_path / "new" / "d_copy.png")
  third = insert.insert_folder(workdir, str(tmp_path / "new"))
  assert third["inserted"] == 1 and third["duplicates"] == 5 and third["num_images"] == 517
  assert IndexedImages.open(workdir).describe(516)["source"].endswith("e.png")
