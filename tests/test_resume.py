"""Crash safety of the main job: what a killed run leaves behind, and what its restart does with it
(every named kill point: test_kill_resume.py).

- The retriever starts from the tokenizer's encoder unless a checkpoint was committed: orbax creates
  ``retriever/checkpoints/`` before the first save, so a run killed in between must not resume over a
  randomly initialized encoder.
- A stage marked done whose output is gone runs again when the main job is re-run, as the error of the
  command that needed it advises.
"""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(workdir, data_dir, *flags, env=None, timeout=900):
  cmd = [sys.executable, "-m", "irgen_jax.main", "--config=configs/fashion_mnist.py:runlocal",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))


def load_params(path):
  return ocp.StandardCheckpointer().restore(os.path.abspath(path))


def test_retriever_starts_from_the_tokenizer_encoder_when_no_checkpoint_was_committed(
    fashion_runlocal_workdir, tmp_path):
  source, data_dir = fashion_runlocal_workdir
  workdir = tmp_path / "workdir"
  shutil.copytree(source, workdir)
  for name in ("retriever", "evaluate"):
    shutil.rmtree(workdir / name)
  # What a kill leaves between the loop's start and its first save: the directory, no checkpoint.
  os.makedirs(workdir / "retriever" / "checkpoints")
  # A frozen encoder makes the retriever's final encoder the one it started from.
  proc = run_main(workdir, data_dir, "--config.stages=retriever",
                  "--config.retriever.encoder_lr_mult=0.0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  tokenizer = load_params(workdir / "tokenizer" / "params")["encoder"]
  retriever = load_params(workdir / "retriever" / "params")["encoder"]
  assert jax.tree.structure(tokenizer) == jax.tree.structure(retriever)
  for a, b in zip(jax.tree.leaves(tokenizer), jax.tree.leaves(retriever)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_stage_whose_output_is_gone_runs_again(fashion_runlocal_workdir, tmp_path):
  source, data_dir = fashion_runlocal_workdir
  workdir = tmp_path / "workdir"
  shutil.copytree(source, workdir)
  before = load_params(workdir / "retriever" / "params")
  shutil.rmtree(workdir / "retriever" / "params")
  # The advice of `search` in this state: the main job with the workdir alone (its own config).
  proc = subprocess.run([sys.executable, "-m", "irgen_jax.main", f"--workdir={workdir}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Stage retriever: marked done, but its output" in proc.stderr
  assert "Stage tokenizer: already done" in proc.stderr
  after = load_params(workdir / "retriever" / "params")
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):  # resumed from its last checkpoint
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
