"""A run that takes another run's trained retriever (``retriever.reuse_from``; with
``tokenizer.reuse_from``, the points of a sweep over search or eval settings, ``sweeps.evaluate_only``).

- Reusing both trained stages of the shared runlocal job, with only an eval setting changed, trains
  nothing and reports the same IRGen figures as that job: the same retriever, the same identifiers.
- A run whose training settings differ is refused before any stage runs, naming the field.
- A run whose identifiers differ from those the retriever learned is refused, counting the images.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from irgen_jax import config_lib
from irgen_jax.errors import ConfigError
from irgen_jax.workdir import Workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(workdir, data_dir, *flags):
  cmd = [sys.executable, "-m", "irgen_jax.main", "--config=configs/fashion_mnist.py:runlocal",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _metrics(workdir):
  with open(os.path.join(workdir, "report", "metrics.json")) as f:
    return json.load(f)["methods"]


def test_an_evaluate_only_run_trains_nothing_and_reports_the_same_figures(fashion_runlocal_workdir,
                                                                          tmp_path):
  source, data_dir = fashion_runlocal_workdir
  workdir = tmp_path / "gallery=2"
  proc = run_main(workdir, data_dir, f"--config.tokenizer.reuse_from={source}",
                  f"--config.retriever.reuse_from={source}", "--config.eval.gallery_queries=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "reusing the trained retriever" in proc.stderr
  done = json.load(open(workdir / "retriever" / "done.json"))
  assert done["reused_from"] == str(source) and done["steps"] == 0
  assert not (workdir / "retriever" / "checkpoints").exists()   # no training loop ran
  ckptr = ocp.StandardCheckpointer()
  theirs = ckptr.restore(os.path.abspath(source / "retriever" / "params"))
  ours = ckptr.restore(os.path.abspath(workdir / "retriever" / "params"))
  assert jax.tree.structure(theirs) == jax.tree.structure(ours)
  for a, b in zip(jax.tree.leaves(theirs), jax.tree.leaves(ours)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(Workdir(workdir).load_identifiers()["codes"],
                                Workdir(source).load_identifiers()["codes"])
  # Nothing trained here, so no training curves (the source's report has them).
  assert not list((workdir / "report").glob("*_curves.png"))
  assert (source / "report" / "tokenizer_curves.png").exists()
  # The search is the same, so is every figure computed from its lists.
  mine, reference = _metrics(workdir)["irgen"], _metrics(source)["irgen"]
  keys = [k for k in reference if k.startswith(("precision@", "recall@", "map@", "mrr@"))]
  assert keys and {k: mine[k] for k in keys} == {k: reference[k] for k in keys}


def test_a_retriever_trained_otherwise_is_refused_before_any_stage(fashion_runlocal_workdir, tmp_path):
  source, data_dir = fashion_runlocal_workdir
  workdir = tmp_path / "other_lr"
  proc = run_main(workdir, data_dir, f"--config.retriever.reuse_from={source}",
                  "--config.retriever.lr=0.5")
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert "config.retriever.reuse_from=" in last and "retriever.lr=0.001 (here 0.5)" in last, last
  assert "search." in last  # what may differ
  assert not (workdir / "tokenizer").exists()  # nothing ran


def test_a_retriever_of_other_identifiers_is_refused(fashion_runlocal_workdir, tmp_path):
  from irgen_jax.trainers import train_retriever
  source, _ = fashion_runlocal_workdir
  workdir = tmp_path / "workdir"
  shutil.copytree(source / "tokenizer", workdir / "tokenizer")
  path = workdir / "tokenizer" / "identifiers.npz"
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["codes"][[3, 7]] = (arrays["codes"][[3, 7]] + 1) % 16
  np.savez(path, **arrays)
  c = config_lib.override(Workdir(source).load_config(), {"retriever.reuse_from": str(source)})
  with pytest.raises(ConfigError, match=r"learned other identifiers than this run's \(2 of 512 database"):
    train_retriever.reuse(c, Workdir(workdir))
  assert not (workdir / "retriever").exists()
