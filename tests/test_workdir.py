"""The workdir's done markers: a stage is done while what it wrote is intact and what it built on has not
changed; atomic writes; fingerprints."""

import json
import os

import numpy as np
import pytest

from irgen_jax import files
from irgen_jax.decoding.index import Index
from irgen_jax.errors import MissingFileError
from irgen_jax.workdir import (DATABASE_FEATURES, IDENTIFIERS, INDEX, REPORT_METRICS, RETRIEVER_PARAMS,
                               RQVAE_PARAMS, RQVAE_RECONSTRUCTIONS, TOKENIZER_PARAMS, TOKENIZER_STATS,
                               Workdir)


def _write(wd, rel, data=b"x"):
  path = wd.path(rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


@pytest.fixture
def finished(tmp_path):
  """A workdir with fake outputs of the tokenizer, retriever and evaluate stages, all marked done."""
  wd = Workdir(tmp_path)
  for rel in (f"{TOKENIZER_PARAMS}/weights", DATABASE_FEATURES, IDENTIFIERS, TOKENIZER_STATS,
              f"{RETRIEVER_PARAMS}/weights", REPORT_METRICS):
    _write(wd, rel, rel.encode())
  Index.build(np.array([[0, 1], [2, 3]]), 4).save(wd.path(INDEX))
  for stage in ("tokenizer", "retriever", "evaluate"):
    wd.mark_done(stage, {"wall_s": 1.0})
  return wd


def test_marked_stages_are_done(finished):
  for stage in ("tokenizer", "retriever", "evaluate"):
    assert finished.done_problem(stage) is None, stage
  assert finished.done_problem("data") == "it has not finished"


def test_a_missing_or_replaced_output_undoes_the_stage(finished):
  os.unlink(finished.path(RETRIEVER_PARAMS, "weights"))
  assert "retriever/params is not what the stage wrote" in finished.done_problem("retriever")
  os.rmdir(finished.path(RETRIEVER_PARAMS))
  assert "retriever/params is missing" in finished.done_problem("retriever")
  # ... and whatever builds on it.
  assert "the retriever stage it builds on is not done" in finished.done_problem("evaluate")
  _write(finished, TOKENIZER_STATS, b"other stats")
  assert "stats.json is not what the stage wrote" in finished.done_problem("tokenizer")


def test_the_outputs_a_config_adds_are_checked_and_only_they(finished):
  """A run's extra outputs (the RQ-VAE's) must exist to be marked, and count as outputs; files that no
  stage declared (a leftover RQ-VAE of an earlier run) are not fingerprinted."""
  extra = [RQVAE_PARAMS, RQVAE_RECONSTRUCTIONS]
  with pytest.raises(RuntimeError, match="without writing .*tokenizer/rqvae/params"):
    finished.mark_done("tokenizer", {"extra_outputs": extra})
  _write(finished, f"{RQVAE_PARAMS}/weights")
  _write(finished, RQVAE_RECONSTRUCTIONS, b"png")
  finished.mark_done("tokenizer", {"wall_s": 1.0})  # a semantic run beside leftover RQ-VAE files
  assert set(files.read_json(finished.done_marker("tokenizer"))["outputs"]).isdisjoint(extra)
  os.unlink(finished.path(RQVAE_RECONSTRUCTIONS))
  assert finished.done_problem("tokenizer") is None
  _write(finished, RQVAE_RECONSTRUCTIONS, b"png")
  finished.mark_done("tokenizer", {"wall_s": 1.0, "extra_outputs": extra})
  assert finished.done_problem("tokenizer") is None
  _write(finished, RQVAE_RECONSTRUCTIONS, b"another png")
  assert "reconstructions.png is not what the stage wrote" in finished.done_problem("tokenizer")
  os.unlink(finished.path(RQVAE_RECONSTRUCTIONS))
  assert "reconstructions.png is missing" in finished.done_problem("tokenizer")


def test_a_corrupted_index_undoes_the_tokenizer(finished):
  data = bytearray(open(finished.path(INDEX), "rb").read())
  data[-40] ^= 1  # in the tables, just before the trailing SHA-256
  _write(finished, INDEX, bytes(data))
  assert "checksum" in finished.done_problem("tokenizer")


def test_an_upstream_rerun_and_an_insert_make_later_stages_due(finished):
  finished.mark_done("tokenizer", {"wall_s": 2.0})  # the tokenizer ran again
  assert finished.done_problem("tokenizer") is None
  assert finished.done_problem("retriever") == "the tokenizer stage ran again since it ran"
  finished.mark_done("retriever", {"wall_s": 1.0})
  assert finished.done_problem("retriever") is None
  assert finished.done_problem("evaluate") == "the tokenizer stage ran again since it ran"
  finished.mark_done("evaluate", {"wall_s": 1.0})
  # An insert replaces the index: the tokenizer stays done, the evaluation is due.
  Index.load(finished.path(INDEX), num_levels=2, num_tokens=4).insert([[1, 1]]).save(finished.path(INDEX))
  assert finished.done_problem("tokenizer") is None
  assert finished.done_problem("evaluate") == "the index changed since it ran (images were inserted)"


def test_require_names_the_stage_and_the_command(finished):
  os.unlink(finished.path(RETRIEVER_PARAMS, "weights"))
  with pytest.raises(MissingFileError) as e:
    finished.require("retriever", what="trained retriever")
  assert "the retriever stage is not done" in str(e.value)
  assert f"python -m irgen_jax.main --workdir={finished.root}" in str(e.value)


def test_a_marker_of_missing_outputs_is_refused(tmp_path):
  with pytest.raises(RuntimeError, match="without writing"):
    Workdir(tmp_path).mark_done("retriever", {})


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path):
  path = tmp_path / "f.json"
  files.write_json(path, {"a": 1})

  def half(f):
    f.write(b'{"a": ')
    raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    files.write_atomic(path, half)
  assert json.loads(path.read_text()) == {"a": 1}
  assert os.listdir(tmp_path) == ["f.json"]  # no temporary left behind


def test_fingerprints_see_content_and_size(tmp_path):
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "a").write_bytes(b"1")
  before = files.fingerprint(tmp_path / "d")
  (tmp_path / "d" / "a").write_bytes(b"2")
  assert files.fingerprint(tmp_path / "d") != before
  assert files.fingerprint(tmp_path / "nothing") is None
