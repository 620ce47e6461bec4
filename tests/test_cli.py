"""Every input mistake a user can make at a command gets one line, ``error: ...``, naming the value and
what was expected, and exit status 2: no traceback (those are for bugs)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNLOCAL = "--config=configs/fashion_mnist.py:runlocal"


def run(*argv, timeout=300):
  return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def assert_one_line_error(proc, *needles):
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


# (id, argv, text the line must contain); {w} is a fresh workdir, {r} the shared finished one.
MAIN_MISTAKES = [
    ("unknown_field", [RUNLOCAL, "--config.nonexistent=3"], ["--config.nonexistent=3", "not a field"]),
    ("field_typo", [RUNLOCAL, "--config.tokenizer.bach_size=3"], ["bach_size", "did you mean batch_size"]),
    ("missing_config_file", ["--config=configs/nope.py"], ["configs/nope.py", "no config file"]),
    ("config_argument", ["--config=configs/fashion_mnist.py:bogus"], ["'bogus'", "runlocal, seed"]),
    ("value_type", [RUNLOCAL, "--config.seed=abc"], ["--config.seed=abc", "expected an int"]),
    ("bool_value", [RUNLOCAL, "--config.search.widen_to_list=maybe"],
     ["--config.search.widen_to_list=maybe", "expected a bool"]),
    ("validation", [RUNLOCAL, "--config.tokenizer.batch_size=-3"],
     ["config.tokenizer.batch_size=-3", "positive multiple"]),
    ("override_without_config", ["--config.seed=1"], ["--config.seed=1", "--config=FILE"]),
    ("nothing_to_continue", [], ["--config is needed", "config.json"]),
    ("folder_config_without_folder", ["--config=configs/folder.py"], ["data_dir=ROOT"]),
]


@pytest.mark.parametrize("argv,needles", [m[1:] for m in MAIN_MISTAKES], ids=[m[0] for m in MAIN_MISTAKES])
def test_main_job_mistakes(tmp_path, argv, needles):
  proc = run("irgen_jax.main", f"--workdir={tmp_path / 'w'}", *argv)
  assert_one_line_error(proc, *needles)
  assert not os.path.exists(tmp_path / "w" / "config.json")  # nothing started


def test_search_mistakes(fashion_runlocal_workdir, tmp_path):
  workdir, _ = fashion_runlocal_workdir
  image = tmp_path / "q.png"
  from PIL import Image
  import numpy as np
  Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
  assert_one_line_error(run("irgen_jax.search", f"--workdir={workdir}", "--k=0", str(image)),
                        "--k=0", ">= 1")
  assert_one_line_error(run("irgen_jax.search", f"--workdir={workdir}"), "image files")
  assert_one_line_error(run("irgen_jax.search", f"--workdir={tmp_path}", str(image)),
                        "config.json", str(tmp_path))
  # A workdir whose retriever is gone: the advice names the command that brings it back.
  broken = tmp_path / "broken"
  shutil.copytree(workdir, broken)
  shutil.rmtree(broken / "retriever" / "params")
  line = assert_one_line_error(run("irgen_jax.search", f"--workdir={broken}", str(image)),
                               "retriever", "is missing")
  assert f"python -m irgen_jax.main --workdir={broken}" in line
  # A corrupted index file.
  shutil.copytree(workdir / "retriever", broken / "retriever", dirs_exist_ok=True)
  data = bytearray((broken / "index.irgx").read_bytes())
  data[len(data) // 2] ^= 0xFF
  (broken / "index.irgx").write_bytes(bytes(data))
  assert_one_line_error(run("irgen_jax.search", f"--workdir={broken}", str(image)), "checksum")


def test_insert_mistakes(fashion_runlocal_workdir, tmp_path):
  workdir, _ = fashion_runlocal_workdir
  assert_one_line_error(run("irgen_jax.insert", f"--workdir={workdir}"), "--folder=ROOT", "--held_out")
  assert_one_line_error(run("irgen_jax.insert", f"--workdir={workdir}", f"--folder={tmp_path / 'no'}"),
                        str(tmp_path / "no"), "no such folder")
  bad = tmp_path / "bad" / "Bag"
  bad.mkdir(parents=True)
  (bad / "broken.png").write_bytes(b"\x89PNG truncated")
  # The hint is this command's own flag.
  assert_one_line_error(run("irgen_jax.insert", f"--workdir={workdir}", f"--folder={bad.parent}"),
                        "broken.png", "--skip_corrupt")
  assert_one_line_error(run("irgen_jax.insert", f"--workdir={workdir}", "--held_out"),
                        "indexed_fraction")


def test_aot_mistakes():
  assert_one_line_error(run("irgen_jax.aot", RUNLOCAL, "--topology=v5e:banana"), "v5e:banana",
                        "v5e:AxB")
  assert_one_line_error(run("irgen_jax.aot", RUNLOCAL, "--topology=v5e:2x2", "--config.nope=1"),
                        "--config.nope=1")
