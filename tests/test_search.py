"""`python -m irgen_jax.search`: top-K of image files over a finished runlocal workdir, text and HTML,
the eval transform, and errors naming unreadable files before any compute."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from irgen_jax import search
from irgen_jax.data import fashion_mnist, pipeline, records
from irgen_jax.workdir import IndexedImages, Workdir, open_trained_retriever

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir_and_images(fashion_runlocal_workdir, tmp_path_factory):
  """The shared runlocal workdir (read only here) and query files: database images 0..2 as PNG, one as
  RGBA with a transparent border and one as a gray JPEG (conversions to RGB)."""
  workdir, _ = fashion_runlocal_workdir
  cat = IndexedImages.open(str(workdir))
  out = tmp_path_factory.mktemp("queries")
  paths = []
  for j in range(3):
    img = cat.image(j)[..., 0]  # Fashion-MNIST records are gray [28, 28, 1]
    p = out / f"db{j}.png"
    Image.fromarray(img).save(p)
    paths.append(str(p))
  rgba = np.zeros((40, 30, 4), np.uint8)
  rgba[5:35, 5:25] = (90, 120, 200, 255)
  Image.fromarray(rgba, "RGBA").save(out / "rgba.png")
  Image.fromarray(cat.image(3)[..., 0]).save(out / "gray.jpg", quality=95)
  return str(workdir), cat, paths + [str(out / "rgba.png"), str(out / "gray.jpg")]


def test_search_returns_sorted_top_k_and_writes_html(workdir_and_images, tmp_path):
  workdir, cat, paths = workdir_and_images
  html_path = str(tmp_path / "page.html")
  out = search.search_images(workdir, paths, k=5, html_path=html_path)
  assert [r.path for r in out.results] == paths
  assert out.num_database == cat.num_images == 512
  names = set(fashion_mnist.CLASS_NAMES)
  for r in out.results:
    assert len(r.hits) == 5
    scores = [h.score for h in r.hits]
    assert all(np.isfinite(scores)) and scores == sorted(scores, reverse=True)
    assert [h.rank for h in r.hits] == [1, 2, 3, 4, 5]
    assert len({h.id for h in r.hits}) == 5 and all(0 <= h.id < 512 for h in r.hits)
    for h in r.hits:  # labels and class names come from the dataset
      assert h.label == int(cat.labels()[h.id]) and h.class_name in names
      assert h.source == f"database[{h.id}]"
  text = out.text()
  assert all(p in text for p in paths) and "rank" in text and out.results[0].hits[0].class_name in text
  page = open(html_path, encoding="utf-8").read()
  assert page.startswith("<!DOCTYPE html>") and page.count("<img") == len(paths) * 6  # query + 5 hits
  assert all(os.path.basename(p) in page for p in paths)


def test_search_uses_the_eval_transform(workdir_and_images):
  """An exported database image becomes exactly the tensor the evaluation feeds the model: the search
  reads files into an in-memory source and runs the evaluation's own input pipeline over it."""
  workdir, cat, paths = workdir_and_images
  c = Workdir(workdir).load_config()
  pixels = search.read_images(paths[:1])
  assert pixels[0].shape == (28, 28, 3) and pixels[0].dtype == np.uint8
  kw = dict(global_batch_size=1, image_size=c.data.image_size, resize_size=c.data.resize_size,
            process_index=0, process_count=1)
  mine = pipeline.eval_dataset(records.ArraySource(pixels, [-1]), **kw)[0]
  batch = pipeline.eval_dataset(cat.dataset.database, **kw)[0]
  np.testing.assert_array_equal(mine["image"][0], batch["image"][0])


def test_unreadable_files_are_named_before_any_compute(workdir_and_images, tmp_path, monkeypatch):
  workdir, _, paths = workdir_and_images
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"\xff\xd8 not really a jpeg")
  missing = str(tmp_path / "nowhere.png")
  def no_model(*a, **k):
    raise AssertionError("the model was loaded before the inputs were checked")
  monkeypatch.setattr(Workdir, "load_retriever", no_model)
  with pytest.raises(search.UnreadableQueryError) as e:
    search.search_images(workdir, [paths[0], str(bad), missing])
  assert e.value.paths == [str(bad), missing]
  assert str(bad) in str(e.value) and missing in str(e.value)


def test_command_line(workdir_and_images, tmp_path):
  workdir, _, paths = workdir_and_images
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  bad = tmp_path / "bad.png"
  bad.write_text("no image")
  proc = subprocess.run([sys.executable, "-m", "irgen_jax.search", f"--workdir={workdir}", paths[0],
                         str(bad)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert proc.returncode == 2 and str(bad) in proc.stderr and "Traceback" not in proc.stderr
  html_path = tmp_path / "cli.html"
  proc = subprocess.run([sys.executable, "-m", "irgen_jax.search", f"--workdir={workdir}", "--k=3",
                         f"--html={html_path}", paths[0]], capture_output=True, text=True, env=env,
                        cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert paths[0] in proc.stdout and "top 3" in proc.stdout and html_path.exists()


def test_the_search_program_compiles_with_the_configs_xla_cpu_options(fashion_runlocal_workdir):
  """``search.xla_cpu_options`` reach XLA on a CPU mesh (a bad value fails the compile), change no
  list, and are validated before compute."""
  import jax
  from irgen_jax import config_lib
  from irgen_jax.decoding.program import SearchProgram, cpu_compiler_options
  workdir, data_dir = fashion_runlocal_workdir
  run = open_trained_retriever(str(workdir), data_dir=str(data_dir))
  c, indexed, model, params = run.config, run.indexed, run.model, run.params
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  queries = indexed.dataset.query
  key = "xla_cpu_experimental_ynn_fusion_type"

  def found(value):
    c.search.xla_cpu_options = {key: value} if value else {}
    return SearchProgram(c, model, params, indexed.index, mesh=mesh, beam_size=4, top_k=8).run(queries)[0]
  plain = found(None)
  assert cpu_compiler_options(c, mesh) is None                       # none set: XLA's defaults
  tuned = found("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
  assert cpu_compiler_options(c, mesh) == {key: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
  np.testing.assert_array_equal(tuned.image_ids, plain.image_ids)
  np.testing.assert_allclose(tuned.scores, plain.scores, rtol=1e-4, atol=1e-4)
  with pytest.raises(Exception, match="not a valid enum value"):
    found("NOT_A_FUSION_TYPE")
  c.search.xla_cpu_options = {"xla_gpu_autotune_level": 0}
  with pytest.raises(config_lib.ConfigError, match="search.xla_cpu_options.xla_gpu_autotune_level=0"):
    config_lib.validate(c, num_devices=1)
