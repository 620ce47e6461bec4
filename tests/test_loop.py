"""The shared training loop: exact resume after SIGKILL, SIGTERM handling, non-finite losses."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "helpers", "toy_train.py")
STEPS = 12


def run(workdir, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, SCRIPT, str(workdir), str(STEPS), *flags],
                        capture_output=True, text=True, env=env, timeout=300)


def final(workdir):
  return np.load(os.path.join(workdir, "final.npy"))


def logged(workdir):
  """The metrics log without its timing field."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k != "steps_per_sec"} for line in f]


def committed_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = run(workdir)
  assert proc.returncode == 0, proc.stderr
  return final(workdir), logged(workdir)


@pytest.mark.parametrize("die_at", [7, 6], ids=["between_checkpoints", "during_async_save"])
def test_sigkill_then_restart_is_bit_identical(tmp_path, uninterrupted, die_at):
  killed = run(tmp_path, f"--die_at_step={die_at}")
  assert killed.returncode == -9, killed.stderr
  assert not os.path.exists(os.path.join(tmp_path, "final.npy"))
  assert max(committed_steps(tmp_path), default=0) <= die_at
  resumed = run(tmp_path)
  assert resumed.returncode == 0, resumed.stderr
  np.testing.assert_array_equal(final(tmp_path), uninterrupted[0])
  # The metrics log has one line per logged step, none duplicated by the replayed steps, each the
  # same average as the uninterrupted run's (a checkpoint between two logged steps carries the sums).
  assert [r["step"] for r in logged(tmp_path)] == list(range(2, STEPS + 1, 2))
  assert logged(tmp_path) == uninterrupted[1]


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path, uninterrupted):
  stopped = run(tmp_path, "--sigterm_at_step=4")
  assert stopped.returncode == 0, stopped.stderr
  assert not os.path.exists(os.path.join(tmp_path, "final.npy"))
  assert 5 in committed_steps(tmp_path)  # saved at the step boundary after the signal
  resumed = run(tmp_path)
  assert resumed.returncode == 0, resumed.stderr
  np.testing.assert_array_equal(final(tmp_path), uninterrupted[0])
  assert logged(tmp_path) == uninterrupted[1]


def test_nan_loss_stops_naming_the_step_and_saves_nothing_from_it(tmp_path):
  proc = run(tmp_path, "--nan_at_step=4")   # the 5th update produces a NaN loss
  assert proc.returncode != 0
  assert "Non-finite loss (nan) at step 5" in proc.stderr
  assert committed_steps(tmp_path) == [3]
