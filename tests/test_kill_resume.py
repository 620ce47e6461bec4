"""Kills at every named point of the main job and of an insert, each followed by a restart that must end
with the same bytes as an uninterrupted run (``launch/kill_and_resume.py``, the same harness users run
on any config). The reference is the session's shared runlocal Fashion-MNIST workdir."""

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


harness_lib = _load("launch/kill_and_resume.py", "_kill_and_resume_under_test")


@pytest.fixture(scope="module")
def harness(fashion_runlocal_workdir, tmp_path_factory):
  reference, data_dir = fashion_runlocal_workdir
  return harness_lib.Harness("configs/fashion_mnist.py:runlocal", str(tmp_path_factory.mktemp("kill")),
                             reference=str(reference), data_dir=str(data_dir))


@pytest.mark.slow
@pytest.mark.parametrize("point", harness_lib.POINTS, ids=[p.spec for p in harness_lib.POINTS])
def test_killed_and_restarted_run_ends_with_the_same_bytes(harness, point):
  assert harness.run_point(point) == []


def test_comparison_sees_a_changed_artifact(fashion_runlocal_workdir, tmp_path):
  """The comparison can fail: a copy with one changed parameter, log line or index byte differs."""
  import shutil

  import numpy as np
  import orbax.checkpoint as ocp
  reference, _ = fashion_runlocal_workdir
  copy = tmp_path / "copy"
  shutil.copytree(reference, copy)
  assert harness_lib.compare_runs(str(reference), str(copy)) == []
  params = ocp.StandardCheckpointer().restore(str(copy / "retriever" / "params"))
  params["decoder"]["head"]["bias"] = np.asarray(params["decoder"]["head"]["bias"]) + 1e-6
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(str(copy / "retriever" / "params"), params, force=True)
  ckptr.wait_until_finished()
  with open(copy / "tokenizer" / "metrics.jsonl", "a") as f:
    f.write('{"step": 999, "loss": 1.0}\n')
  problems = harness_lib.compare_runs(str(reference), str(copy))
  assert any(p.startswith("retriever/params differs at") for p in problems), problems
  assert "tokenizer/metrics.jsonl differs (steps_per_sec aside)" in problems, problems
