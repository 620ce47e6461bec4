"""Stage trainers across devices and processes, config validation before any compute, non-finite losses.

- One train step of the tokenizer and of the retriever on 8 fake CPU devices equals the same step on one
  device (``helpers/parallel_step.py``, its own process: the device count is fixed at jax import).
- Two processes on localhost (4 fake devices each, ``jax.distributed`` through the launch environment
  ``irgen_jax.main`` reads) run the data, tokenizer and retriever stages and log the same losses, step
  by step, as one process with one device, and assign the same identifiers
  (``helpers/distributed_train.py``).
- Every bad config field the issue names stops the run with an error naming the field, before any stage
  starts.
- A non-finite loss in the real tokenizer trainer stops the run naming the step, with no checkpoint of
  that step (the loop's own tests cover kills and preemption on a toy model: test_loop.py).
"""

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from irgen_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(ROOT, "tests", "helpers")
TOLERANCE = 1e-5


def load_config(name="fashion_mnist.py", arg="runlocal"):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONFAULTHANDLER="1")


# --------------------------------------------------------------------------------------------------
# 8 devices against 1


@pytest.fixture(scope="module")
def parallel_step_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("parallel_step") / "report.json"
  proc = subprocess.run([sys.executable, os.path.join(HELPERS, "parallel_step.py"), str(out)],
                        capture_output=True, text=True, env=_env(), timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(out) as f:
    return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["tokenizer", "retriever", "rqvae"])
def test_train_step_on_8_devices_equals_1_device(parallel_step_report, stage):
  r = parallel_step_report[stage]
  assert parallel_step_report["devices"] == 8
  assert r["shardings_8"] == ["NamedSharding over 8 device(s)"], r["shardings_8"]
  assert r["shardings_1"] == ["SingleDeviceSharding over 1 device(s)"], r["shardings_1"]
  # The first step, and the one after it.
  assert max(r["loss_rel_diff"]) <= TOLERANCE, r
  assert max(r["params_rel_diff"]) <= TOLERANCE, r
  assert max(r["opt_rel_diff"]) <= TOLERANCE, r   # Adam's moments: the gradients themselves
  # The steps moved the parameters by far more than the tolerance ...
  assert r["params_update_rel"] > 100 * TOLERANCE, r
  # ... and the entries left out of params_rel_diff (attention key biases) have a gradient that is
  # rounding noise: their AdamW update is +-lr on one device as on eight, whatever the noise.
  assert r["key_bias_gradient_ratio"] < 1e-6, r
  if stage == "rqvae":
    assert max(r["codebook_rel_diff"]) <= TOLERANCE, r


# --------------------------------------------------------------------------------------------------
# Two processes against one


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _distributed(workdir, data_dir, num_processes, local_devices, timeout=600):
  port = _free_port()
  procs = []
  for pid in range(num_processes):
    log = open(os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}_{pid}.log"), "w")
    cmd = [sys.executable, os.path.join(HELPERS, "distributed_train.py"), str(workdir), str(data_dir),
           str(num_processes), str(pid), str(port), str(local_devices)]
    procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env()), log))
  deadline = time.monotonic() + timeout
  try:
    for proc, _ in procs:
      proc.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for proc, log in procs:  # a process whose peer died waits forever in a collective
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  for pid, (proc, log) in enumerate(procs):
    with open(log.name) as f:
      tail = f.read()[-3000:]
    assert proc.returncode == 0, f"process {pid}/{num_processes} exited {proc.returncode}:\n{tail}"


def _losses(workdir, stage):
  with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f)]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  data_dir = tmp_path / "tfds"
  one, two = tmp_path / "one_process", tmp_path / "two_processes"
  _distributed(one, data_dir, num_processes=1, local_devices=1)   # also prepares the data
  _distributed(two, data_dir, num_processes=2, local_devices=4)
  for stage in ("tokenizer", "retriever"):
    ref, got = _losses(one, stage), _losses(two, stage)
    assert [s for s, _ in got] == [s for s, _ in ref] and len(ref) >= 4, (ref, got)
    rel = [abs(a - b) / abs(b) for (_, a), (_, b) in zip(got, ref)]
    assert max(rel) <= TOLERANCE, (stage, ref, got)
    assert os.path.exists(two / stage / "done.json")
  # Refits and the final identifiers gather features from both processes: same identifiers.
  codes = [np.load(w / "tokenizer" / "identifiers.npz")["codes"] for w in (one, two)]
  np.testing.assert_array_equal(codes[1], codes[0])
  # Checkpoints hold each process's data-iterator state.
  ckpts = two / "tokenizer" / "checkpoints"
  last = max(int(n) for n in os.listdir(ckpts) if n.isdigit())
  assert sorted(os.listdir(ckpts / str(last) / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]


# --------------------------------------------------------------------------------------------------
# Validation


def _set(path, value):
  def mutate(c):
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return mutate


def _clip(section, path):
  def mutate(c):
    if section == "tokenizer":
      c.tokenizer.encoder.update(init="clip", clip_path=path)
    else:
      c.retriever.encoder_init = "clip"
      c.retriever.encoder.clip_path = path
  return mutate


def _retriever_only(c):
  c.stages = "retriever,evaluate"
  c.retriever.encoder_init = "tokenizer"


# (id, mutation, validate() keyword overrides, text the error must contain)
BAD_CONFIGS = [
    ("unknown_dataset", _set("data.name", "fashion_mnits"), {}, "config.data.name='fashion_mnits'"),
    ("batch_vs_devices", _set("tokenizer.batch_size", 36), {"num_devices": 8},
     "config.tokenizer.batch_size=36: expected a positive multiple of the device count (8)"),
    ("retriever_batch_vs_devices", _set("tokenizer.batch_size", 36), {"num_devices": 3},
     "config.retriever.batch_size=32: expected a positive multiple of the device count (3)"),
    ("batch_vs_processes", _set("tokenizer.batch_size", 32), {"num_processes": 3},
     "config.tokenizer.batch_size=32: expected divisible by the process count (3)"),
    ("negative_encoder_lr", _set("retriever.encoder_lr_mult", -0.1), {},
     "config.retriever.encoder_lr_mult=-0.1: expected >= 0 (0 freezes the encoder)"),
    ("M_zero", _set("ids.length", 0), {}, "config.ids.length=0"),
    ("M_too_long", _set("ids.length", 257), {}, "config.ids.length=257"),
    ("unknown_search_loop", _set("search.loop", "while"), {}, "config.search.loop='while'"),
    ("L_one", _set("ids.codebook_size", 1), {}, "config.ids.codebook_size=1"),
    ("L_too_big", _set("ids.codebook_size", 65537), {}, "config.ids.codebook_size=65537"),
    ("tokenizer_clip_missing", _clip("tokenizer", "/nonexistent/ViT-B-16.pt"), {},
     "config.tokenizer.encoder.clip_path='/nonexistent/ViT-B-16.pt'"),
    ("tokenizer_clip_unset", _clip("tokenizer", ""), {}, "config.tokenizer.encoder.clip_path=''"),
    ("retriever_clip_missing", _clip("retriever", "/nonexistent/clip"), {},
     "config.retriever.encoder.clip_path='/nonexistent/clip'"),
    ("retriever_from_missing_tokenizer", _retriever_only, {"workdir": True},
     "config.retriever.encoder_init='tokenizer'"),
    ("unknown_stage", _set("stages", "data,train"), {}, "config.stages='data,train'"),
    ("unknown_encoder_init", _set("retriever.encoder_init", "bert"), {},
     "config.retriever.encoder_init='bert'"),
    ("unknown_dtype", _set("compute_dtype", "float8"), {}, "config.compute_dtype='float8'"),
]


def _validate(c, workdir=None, **kw):
  """The checks before any compute: the config's own, then (with a workdir) the stages' inputs."""
  from irgen_jax import stages
  from irgen_jax.data import registry
  from irgen_jax.workdir import Workdir
  config_lib.validate(c, **dict(dict(num_devices=1, dataset_names=registry.names()), **kw))
  if workdir is not None:
    stages.check_inputs(c, Workdir(workdir), config_lib.stages(c))


@pytest.mark.parametrize("mutate,overrides,message", [b[1:] for b in BAD_CONFIGS],
                         ids=[b[0] for b in BAD_CONFIGS])
def test_validate_names_the_bad_field(tmp_path, mutate, overrides, message):
  c = load_config()
  _validate(c, workdir=str(tmp_path))
  mutate(c)
  kw = dict(dict(num_processes=1), **overrides)
  workdir = str(tmp_path / "workdir") if kw.pop("workdir", False) else None
  with pytest.raises(ValueError) as e:
    _validate(c, workdir=workdir, **kw)
  assert message in str(e.value), str(e.value)


def test_retriever_from_an_existing_tokenizer_passes(tmp_path):
  """Finished stages count by their done markers, whose outputs must be what the stage wrote."""
  from irgen_jax.workdir import Workdir
  c = load_config()
  _retriever_only(c)
  wd = Workdir(tmp_path)
  for f in ("tokenizer/params", "retriever/params"):
    os.makedirs(tmp_path / f)
    (tmp_path / f / "weights").write_bytes(b"w")
  for f in ("tokenizer/identifiers.npz", "tokenizer/database_features.npy", "tokenizer/stats.json"):
    (tmp_path / f).write_bytes(b"")
  from irgen_jax.decoding.index import Index
  Index.build([[0, 1, 2, 3]], 16).save(wd.path("index.irgx"))
  with pytest.raises(ValueError, match="retriever.encoder_init"):
    _validate(c, workdir=str(tmp_path))  # outputs without a done marker: not a finished stage
  wd.mark_done("tokenizer", {})
  _validate(c, workdir=str(tmp_path))
  (tmp_path / "tokenizer" / "params" / "weights").write_bytes(b"changed")
  with pytest.raises(ValueError, match="is not what the stage wrote"):
    _validate(c, workdir=str(tmp_path))


MAIN_RUN_CASES = ["unknown_dataset", "M_too_long", "tokenizer_clip_missing", "unknown_stage",
                  "retriever_from_missing_tokenizer"]


@pytest.mark.parametrize("case", MAIN_RUN_CASES)
def test_main_run_stops_before_any_stage(tmp_path, monkeypatch, case):
  """Through the entry point: the error comes before any stage starts or the workdir is created."""
  from irgen_jax import main, stages
  _, mutate, _, message = next(b for b in BAD_CONFIGS if b[0] == case)
  started = []
  for stage in list(stages._STAGES):
    monkeypatch.setitem(stages._STAGES, stage, lambda *a, stage=stage: started.append(stage))
  c = load_config()
  mutate(c)
  workdir = tmp_path / "workdir"
  if case == "retriever_from_missing_tokenizer":
    os.makedirs(workdir)  # a workdir without a finished tokenizer stage
  with pytest.raises(ValueError, match=re.escape(message)):
    main.run(c, str(workdir))
  assert not started
  assert not os.path.exists(workdir / "config.json")


# --------------------------------------------------------------------------------------------------
# Non-finite loss in the real tokenizer trainer


def _small_tokenizer_config(tmp_path):
  """The small synthetic config of the two-process test (64 images, 4 steps an epoch), tokenizer only."""
  sys.path.insert(0, HELPERS)
  try:
    import distributed_train
  finally:
    sys.path.remove(HELPERS)
  c = distributed_train.config(str(tmp_path / "tfds"))
  c.stages = "data,tokenizer"
  return c


@pytest.mark.slow
def test_tokenizer_nan_loss_stops_naming_the_step(tmp_path):
  """lr = 1e30 blows the parameters up after the first update: the loss of step 2 is not finite."""
  from irgen_jax import main
  c = _small_tokenizer_config(tmp_path)
  c.tokenizer.update(lr=1e30, warmup_steps=0, grad_clip=0.0)
  c.checkpoint.every_steps = 1   # a checkpoint after every finite step
  workdir = tmp_path / "workdir"
  with pytest.raises(FloatingPointError) as e:
    main.run(c, str(workdir))
  found = re.search(r"Non-finite loss \((nan|inf|-inf)\) at step (\d+); nothing from this step was "
                    r"saved", str(e.value))
  assert found, str(e.value)
  bad_step = int(found.group(2))
  ckpts = workdir / "tokenizer" / "checkpoints"
  saved = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
  assert saved and max(saved) == bad_step - 1, (saved, bad_step)
  assert not os.path.exists(workdir / "tokenizer" / "done.json")
  assert not os.path.exists(workdir / "tokenizer" / "params")


# --------------------------------------------------------------------------------------------------
# The first codebook fit after warm-up (tokenizer.first_refit_steps)


@pytest.mark.slow
def test_tokenizer_first_fit_after_first_refit_steps(tmp_path):
  """With ``first_refit_steps=3`` the codebooks are first fit at step 3 (then every epoch of 4 steps):
  before it the loss is the classifier's alone (the RQ terms weigh 0), from it on the full objective."""
  from irgen_jax import main
  c = _small_tokenizer_config(tmp_path)
  c.tokenizer.first_refit_steps = 3
  workdir = tmp_path / "workdir"
  main.run(c, str(workdir))
  with open(workdir / "tokenizer" / "refits.jsonl") as f:
    refit_steps = [json.loads(line)["step"] for line in f]
  assert refit_steps == [3, 7], refit_steps
  with open(workdir / "tokenizer" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  before = [r for r in rows if r["step"] <= 3]   # logged after the step: step s is step s-1's update
  after = [r for r in rows if r["step"] > 3]
  assert before and after, [r["step"] for r in rows]
  for r in before:
    assert r["loss"] == pytest.approx(r["ce_cls"], rel=1e-6), r
  for r in after:
    assert r["loss"] > r["ce_cls"] + 1e-3, r
