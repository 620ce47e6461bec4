"""Config sweeps (``irgen_jax.sweeps``, ``launch/sweep.py``, ``evaluators.sweep_report``), and
configs/folder.py.

- The combinators, and the sweeps every config declares: the paper's identifier-kind and -length
  ablations as commands (``--print``), with the kinds reusing one trained tokenizer.
- The report from fake runs: per setting mean and standard deviation over seeds, counts, the IRGen −
  linear scan difference per seed.
- A declared sweep of 2 values at runlocal size, run for real (``beam_size``: the second point reuses
  the first's trained stages): sequentially, then with ``--parallel=2`` in a second root killed while
  the first point trains and restarted; both reports equal, and equal to the runs' own metrics.json;
  a third start finds every point finished. (Seeds are aggregated by the
  report test above: real seeds would double the cost of the slowest test.) An unknown field fails
  before any run starts.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from irgen_jax import sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNLOCAL = "configs/fashion_mnist.py:runlocal"


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


sweep = _load("launch/sweep.py", "_sweep_under_test")


def _flags(argv):
  return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def _printed(capsys, *argv):
  assert sweep.main([*argv, "--print"]) == 0
  return [_flags(shlex.split(line.split("  #")[0])) for line in capsys.readouterr().out.splitlines()
          if line.startswith("python -m")]


# --------------------------------------------------------------------------------------------------
# Combinators and declared sweeps


def test_combinators():
  a, b = sweeps.values("x", [1, 2]), sweeps.values("y", ["p", "q"])
  assert sweeps.product(a, b) == [{"x": 1, "y": "p"}, {"x": 1, "y": "q"}, {"x": 2, "y": "p"},
                                  {"x": 2, "y": "q"}]
  assert sweeps.zipped(a, b) == [{"x": 1, "y": "p"}, {"x": 2, "y": "q"}]
  assert sweeps.chain(a, sweeps.point({"z": 0})) == [{"x": 1}, {"x": 2}, {"z": 0}]
  assert sweeps.seeds(3) == [{"seed": 0}, {"seed": 1}, {"seed": 2}]
  with pytest.raises(ValueError, match="two parts"):
    sweeps.product(a, a)
  with pytest.raises(ValueError, match="different lengths"):
    sweeps.zipped(a, sweeps.values("y", [1, 2, 3]))
  r = sweeps.reuse(set={"k": "base"}, drop=("extra",))
  assert r.target({"k": "other", "extra": 5, "seed": 1, "from": r}) == {"k": "base", "seed": 1}
  # An evaluate-only sweep: the first value trains, the others reuse its trained stages, seed by seed.
  points = sweeps.product(sweeps.evaluate_only("search.beam_size", [8, 16, 32]), sweeps.seeds(2))
  assert [{k: v for k, v in p.items() if not k.endswith("reuse_from")} for p in points] == [
      {"search.beam_size": b, "seed": s} for b in (8, 16, 32) for s in (0, 1)]
  for p in points:
    reused = [p[k].target(p) for k in ("tokenizer.reuse_from", "retriever.reuse_from") if k in p]
    assert reused == ([] if p["search.beam_size"] == 8 else
                      [{"search.beam_size": 8, "seed": p["seed"]}] * 2), p
  with pytest.raises(ValueError, match="only the evaluate stage reads"):
    sweeps.evaluate_only("retriever.lr", [1e-3, 1e-4])


def test_print_kind_sweep(tmp_path, capsys):
  root = str(tmp_path / "kind")
  flags = _printed(capsys, f"--config={RUNLOCAL}", "--sweep=ids_kind", f"--workdir={root}",
                   "--config.data.data_dir=/data/tfds")
  assert len(flags) == 6
  assert all(f["config"] == RUNLOCAL and f["config.data.data_dir"] == "/data/tfds" for f in flags)
  assert [f["config.ids.kind"] for f in flags] == ["semantic", "random", "hkm", "hkm", "hkm", "rqvae"]
  assert [f.get("config.ids.hkm_clusters") for f in flags] == [None, None, "100", "200", "500", None]
  # runlocal has L=16 tokens per level: HKM with k clusters needs k.
  assert [f.get("config.ids.codebook_size") for f in flags] == [None, None, "100", "200", "500", None]
  # RQ-VAE identifiers: runlocal's 2x2 map at depth 2.
  assert [f.get("config.ids.length") for f in flags] == [None] * 5 + ["8"]
  # Every kind but ours reuses the semantic point's trained tokenizer.
  assert "config.tokenizer.reuse_from" not in flags[0]
  assert all(f["config.tokenizer.reuse_from"] == flags[0]["workdir"] for f in flags[1:])
  assert flags[0]["workdir"] == os.path.join(root, "kind=semantic")
  assert os.path.exists(os.path.join(root, "ids_kind.plan.json"))


def test_print_beam_sweep_trains_once(tmp_path, capsys):
  flags = _printed(capsys, f"--config={RUNLOCAL}", "--sweep=beam_size", f"--workdir={tmp_path}")
  assert [f["config.search.beam_size"] for f in flags] == ["8", "16"]
  assert not any(k.endswith("reuse_from") for k in flags[0])
  assert flags[1]["config.tokenizer.reuse_from"] == flags[1]["config.retriever.reuse_from"] == \
      flags[0]["workdir"]


def test_print_kind_sweep_with_seeds_reuses_the_same_seed(tmp_path, capsys):
  flags = _printed(capsys, f"--config={RUNLOCAL}", "--sweep=ids_kind", "--seeds=2",
                   f"--workdir={tmp_path}")
  assert len(flags) == 12
  semantic = {f["config.seed"]: f["workdir"] for f in flags if f["config.ids.kind"] == "semantic"}
  for f in flags:
    if f["config.ids.kind"] != "semantic":
      assert f["config.tokenizer.reuse_from"] == semantic[f["config.seed"]]


def test_grid_values_may_be_tuples(tmp_path, capsys):
  assert sweep.split_values("(0.5,1.0),(1.0,1.0)") == ["(0.5,1.0)", "(1.0,1.0)"]
  assert sweep.split_values("1,2,[3,4]") == ["1", "2", "[3,4]"]
  flags = _printed(capsys, f"--config={RUNLOCAL}", "--grid=data.crop_scale=(0.5,1.0),(1.0,1.0)",
                   f"--workdir={tmp_path}")
  assert [f["config.data.crop_scale"] for f in flags] == ["(0.5,1.0)", "(1.0,1.0)"]


def test_print_length_sweep_and_paper_sized_hkm(tmp_path, capsys):
  flags = _printed(capsys, "--config=configs/fashion_mnist.py", "--sweep=ids_length",
                   f"--workdir={tmp_path}")
  assert [f["config.ids.length"] for f in flags] == ["2", "4", "6", "8"]
  assert [f["workdir"] for f in flags] == [str(tmp_path / f"length={m}") for m in (2, 4, 6, 8)]
  assert not any("config.tokenizer.reuse_from" in f for f in flags)
  # At the paper's L=256 only HKM_500 needs more tokens per level.
  hkm = {p.get("ids.hkm_clusters"): p for p in sweeps.ids_kind(256)}
  assert "ids.codebook_size" not in hkm[200] and hkm[500]["ids.codebook_size"] == 500


@pytest.mark.parametrize("argv,message", [
    (["--sweep=ids_size"], "declares no such sweep"),
    (["--grid=tokenizer.lambda_2=0,1"],
     "'tokenizer.lambda_2' is not a field of tokenizer; did you mean lambda2"),
    (["--grid=tokenizer.lambda2=0,fast"], "tokenizer.lambda2='fast'"),
    (["--sweep=seeds", "--seeds=2"], "sets the seed itself"),
])
def test_bad_sweeps_fail_before_any_run(tmp_path, argv, message):
  proc = subprocess.run([sys.executable, "launch/sweep.py", f"--config={RUNLOCAL}",
                         f"--workdir={tmp_path / 'root'}", *argv], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
  assert not os.path.exists(tmp_path / "root" / "logs")  # nothing ran


# --------------------------------------------------------------------------------------------------
# The report


def _fake_run(root, name, p10, scan_p10):
  path = os.path.join(root, name, "report", "metrics.json")
  os.makedirs(os.path.dirname(path))
  irgen = {"precision@1": p10, "precision@10": p10, "recall@10": 0.9, "map@100": 0.25, "qps": 100.0}
  with open(path, "w") as f:
    json.dump({"dataset": "fashion_mnist", "ks": [1, 10],
               "methods": {"irgen": irgen, "linear_scan": dict(irgen, **{"precision@10": scan_p10})}}, f)
  return path


def test_report_aggregates_seeds(tmp_path):
  from irgen_jax.evaluators import sweep_report
  values = {("a", 0): (0.80, 0.75), ("a", 1): (0.82, 0.76), ("a", 2): (0.84, 0.74), ("b", 0): (0.5, 0.7)}
  runs, metrics = [], {}
  for (setting, seed), (p10, scan) in values.items():
    name = f"x={setting}__seed={seed}"
    with open(_fake_run(str(tmp_path), name, p10, scan)) as f:
      metrics[name] = json.load(f)
    runs.append({"name": name, "setting": {"x": setting}, "seed": seed, "status": "finished"})
  runs.append({"name": "x=b__seed=1", "setting": {"x": "b"}, "seed": 1, "status": "not finished"})
  rep = sweep_report.report(sweep="t", config="c.py", root=str(tmp_path), runs=runs, metrics=metrics)
  a, b = rep["settings"]
  assert (a["label"], a["num_seeds"], b["num_seeds"]) == ("x=a", 3, 1)
  p10 = a["methods"]["irgen"]["precision@10"]
  assert p10["mean"] == pytest.approx(0.82) and p10["std"] == pytest.approx(np.std([.8, .82, .84], ddof=1))
  assert b["methods"]["irgen"]["precision@10"]["std"] is None  # one seed: no spread
  diff = a["irgen_minus_linear_scan"]["precision@10"]
  assert diff["values"] == pytest.approx([0.05, 0.06, 0.10]) and diff["mean"] == pytest.approx(0.07)
  md = sweep_report.markdown(rep)
  assert "| x=a | 3 | 82.0 ± 2.0 | 82.0 ± 2.0 |" in md
  assert "+5.0, +6.0, +10.0" in md
  assert "| x=b__seed=1 | 1 | not finished | irgen |" in md
  paths = sweep_report.write(str(tmp_path), rep)
  assert json.load(open(paths["json"]))["settings"][0]["num_seeds"] == 3
  assert open(paths["png"], "rb").read(4) == b"\x89PNG"


# --------------------------------------------------------------------------------------------------
# A real sweep at runlocal size

# Small and quick: one epoch per stage, no exact-scoring check, one baseline (the difference needs it).
CHEAP = ["--config.tokenizer.num_epochs=1.0", "--config.retriever.num_epochs=1.0",
         "--config.eval.beam_check_queries=0", "--config.eval.baselines=('linear_scan',)"]


def _sweep_cmd(root, data_dir, *extra):
  return [sys.executable, "launch/sweep.py", f"--config={RUNLOCAL}", "--sweep=beam_size",
          f"--workdir={root}", f"--config.data.data_dir={data_dir}", *CHEAP, *extra]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu")  # with the session's compilation cache (conftest)


def _settings_without_paths(root):
  with open(os.path.join(root, "beam_size.json")) as f:
    rep = json.load(f)
  for s in rep["settings"]:
    for m in s["methods"].values():
      for k in [k for k in m if k.startswith(("qps", "search_s", "encode_s", "build_s"))]:
        del m[k]
  return rep["settings"]


@pytest.mark.slow
def test_declared_sweep_sequential_and_parallel_with_a_kill(fashion_runlocal_workdir, tmp_path):
  _, data_dir = fashion_runlocal_workdir
  seq = tmp_path / "sequential"
  # One CPU per point, as each of the two parallel points below gets: equal threads, equal bytes.
  proc = subprocess.run(_sweep_cmd(seq, data_dir, "--cpus_per_point=1"), cwd=REPO,
                        capture_output=True, text=True, timeout=1800, env=_env())
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  settings = _settings_without_paths(seq)
  assert [(s["label"], s["num_seeds"]) for s in settings] == [("search.beam_size=8", 1),
                                                             ("search.beam_size=16", 1)]
  # The report's numbers are the runs' own.
  for s in settings:
    (name,) = s["runs"]
    with open(seq / name / "report" / "metrics.json") as f:
      mine = json.load(f)["methods"]
    for method in ("irgen", "linear_scan"):
      for key in ("precision@1", "precision@10", "recall@10", "map@100"):
        got = s["methods"][method][key]
        assert got["values"] == [mine[method][key]] and got["n"] == 1
        assert got["mean"] == pytest.approx(mine[method][key]) and got["std"] is None
        if method == "irgen":
          assert math.isfinite(s["irgen_minus_linear_scan"][key]["mean"])

  # In parallel, killed (the whole process group) once a point has trained its tokenizer, then
  # restarted: each point resumes where it was. (The second point waits for the first, whose trained
  # stages it reuses.)
  par = tmp_path / "parallel"
  runner = subprocess.Popen(_sweep_cmd(par, data_dir, "--parallel=2"), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
  deadline = time.monotonic() + 1200
  while time.monotonic() < deadline and runner.poll() is None:
    if par.exists() and any((par / d / "tokenizer" / "done.json").exists() for d in os.listdir(par)):
      break
    time.sleep(0.5)
  os.killpg(runner.pid, signal.SIGKILL)
  runner.wait()
  done = [d for d in os.listdir(par) if (par / d / "evaluate" / "done.json").exists()]
  assert len(done) < 2, done  # killed before the end
  proc = subprocess.run(_sweep_cmd(par, data_dir, "--parallel=2"), cwd=REPO, capture_output=True,
                        text=True, timeout=1800, env=_env())
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert proc.stdout.count("already finished") == len(done)
  assert _settings_without_paths(par) == settings
  # Started once more, it runs nothing and writes the same report.
  proc = subprocess.run(_sweep_cmd(par, data_dir, "--parallel=2"), cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=_env())
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert proc.stdout.count("already finished") == 2
  assert _settings_without_paths(par) == settings


# --------------------------------------------------------------------------------------------------
# configs/folder.py


def test_folder_config_fits_a_tiny_folder(tmp_path):
  from irgen_jax import config_lib
  from irgen_jax.data import registry, synthetic
  root = synthetic.generate(str(tmp_path), num_classes=3, image_shape=(20, 24, 3), num_database=21,
                            num_queries=6)
  folder = _load("configs/folder.py", "_folder_config")
  c = folder.get_config(f"data_dir={root}")
  assert c.data.name == "folder" and c.data.manual_dir == root
  assert (c.data.image_size, c.data.resize_size) == (32, 37)
  assert c.tokenizer.batch_size == c.retriever.batch_size == 16  # capped: 21 database images
  assert c.tokenizer.num_epochs == pytest.approx(600 * 16 / 21)
  # The Fashion-MNIST default's recipe with crops: a 4x4 grid of patches, the retriever's encoder
  # frozen; the first codebook fit after a quarter of the steps (not at the end of the 60-step warm-up)
  # and a refit every fifth of the epochs, so about four fits whatever the folder's size.
  assert c.tokenizer.encoder.patch_size == 8 and tuple(c.data.crop_scale) == (0.6, 1.0)
  assert c.tokenizer.warmup_steps == 60 and c.tokenizer.first_refit_steps == 150
  assert c.tokenizer.refit_every_epochs == round(0.2 * 600 * 16 / 21)
  assert c.retriever.encoder_lr_mult == 0.0 and c.retriever.lr == c.tokenizer.lr == 2e-3
  config_lib.validate(c, num_devices=1, dataset_names=registry.names())
  small = folder.get_config(f"data_dir={root},runlocal,image_size=16")
  assert small.tokenizer.num_epochs == pytest.approx(20 * 16 / 21) and small.ids.codebook_size == 16
  assert small.tokenizer.encoder.patch_size == 4
  with pytest.raises(ValueError, match="data_dir"):
    folder.get_config("")
