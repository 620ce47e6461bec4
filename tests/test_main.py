"""The main job end to end: images to a retrieval report, as a user runs it (``python -m irgen_jax.main``).

- Fashion-MNIST ``:runlocal`` (the session fixture ``fashion_runlocal_workdir``, one run shared with
  other tests): the report's files, every stage's done marker, IRGen's and the baselines' metrics, and a
  re-run in the same workdir that skips every finished stage.
- The ``:runlocal`` variants of the other configs (generated stand-in data): all four stages, as a user
  runs them, once for every distinct variant. Variants that differ only in their stand-in data's shape
  and the report's Ks (``SHAPE_ONLY``) run the same code with the same program shapes, so one of them
  stands for the others (today all five: 20 classes, 32x32 inputs, the tiny models of
  ``config_lib.runlocal_sizes``, crops, no gradient clipping). A variant given a setting of its own
  forms its own group and runs end to end by itself. A cold runlocal run here took 29 s, a warm one 18 s.
"""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest

from irgen_jax import config_lib
from irgen_jax.decoding import program
from irgen_jax.decoding.index import Index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("data", "tokenizer", "retriever", "evaluate")
BASELINES = ("linear_scan", "faiss_ivfpq", "scann")
REPORT_FILES = ("metrics.json", "results.md", "precision_at_k.png", "pr_curve.png", "mrr.png",
                "gallery.html", "tokenizer_curves.png", "retriever_curves.png")
# Configs whose :runlocal variant runs here. The first of each group of variants (variant_groups) runs
# end to end: imagenet2012's stand-in images are not square and outnumber data.max_database.
OTHER_CONFIGS = ("imagenet2012", "inshop", "cub200", "cars196", "places365")
# Fields in which two runlocal variants may differ and still run the same code: the generated images'
# shape and number, and which Ks the report lists.
SHAPE_ONLY = ("data.synthetic.", "eval.ks")


def load_config(name, arg="runlocal"):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def run_main(config, workdir, *flags, env=None, timeout=900):
  cmd = [sys.executable, "-m", "irgen_jax.main", f"--config=configs/{config}", f"--workdir={workdir}",
         *flags]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))
  wall = time.perf_counter() - t0
  assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
  return proc, wall


def check_metrics(workdir, ks):
  """IRGen and every baseline report finite metrics in [0, 1] at every K; returns metrics.json."""
  with open(os.path.join(workdir, "report", "metrics.json")) as f:
    metrics = json.load(f)
  methods = metrics["methods"]
  assert "irgen" in methods, sorted(methods)
  for b in BASELINES:
    assert any(name == b or name.startswith(b) for name in methods), (b, sorted(methods))
  for name, m in methods.items():
    keys = [f"precision@{k}" for k in ks] + [f"recall@{k}" for k in ks]
    keys += [k for k in m if k.startswith(("map@", "mrr@"))]
    for key in keys:
      v = m[key]
      assert isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0, (name, key, v)
  return metrics


def check_done(workdir):
  for stage in STAGES:
    path = os.path.join(workdir, stage, "done.json")
    assert os.path.exists(path), path
    with open(path) as f:
      assert json.load(f)["wall_s"] >= 0


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST :runlocal


def test_fashion_runlocal_writes_the_report(fashion_runlocal_workdir):
  workdir, _ = fashion_runlocal_workdir
  check_done(workdir)
  for name in REPORT_FILES:
    path = os.path.join(workdir, "report", name)
    assert os.path.getsize(path) > 0, path
  for path in ("config.json", "index.irgx", "tokenizer/identifiers.npz", "tokenizer/stats.json",
               "tokenizer/metrics.jsonl", "retriever/metrics.jsonl"):
    assert os.path.exists(os.path.join(workdir, path)), path
  for stage in ("tokenizer", "retriever"):
    assert os.path.isdir(os.path.join(workdir, stage, "params")), stage
    assert os.listdir(os.path.join(workdir, stage, "tb")), stage   # TensorBoard events


def test_fashion_runlocal_metrics(fashion_runlocal_workdir):
  workdir, _ = fashion_runlocal_workdir
  c = load_config("fashion_mnist")
  metrics = check_metrics(workdir, c.eval.ks)
  irgen = metrics["methods"]["irgen"]
  # Every IRGen column from one list at least as long as the longest a metric reads (MAP@100).
  assert irgen["num_retrieved"] == 100 and irgen["mean_listed"] == 100
  diagnostics = metrics["diagnostics"]
  beam = diagnostics["beam"]
  # The beams widened to the list's 100 from the first level whose prefixes hold too few images (the
  # trained index's: runlocal's 512 images under its first tokens), and the check twice as wide.
  index = Index.load(os.path.join(workdir, "index.irgx"), num_levels=None, num_tokens=None)
  beams = list(program.evaluation_beams(c, index.num_images, program.index_nodes(index)))
  assert beam["beams"] == beams and beams[-1] == 100 and set(beams) <= {c.search.beam_size, 100}
  assert beam["check_beams"] == [2 * b for b in beams]
  assert beam["queries"] == c.eval.beam_check_queries and 0.0 <= beam["certified"] <= 1.0
  for k in c.eval.ks:
    assert 0.0 <= beam[f"overlap@{k}"] <= 1.0 and -1.0 <= beam[f"precision_change@{k}"] <= 1.0
  tok = diagnostics["tokenizer"]
  assert 0.0 <= tok["head_accuracy"] <= 1.0 and len(tok["levels"]) == c.ids.length
  assert all(0.0 < lv["purity"] <= 1.0 for lv in tok["levels"])
  assert [lv["purity"] for lv in tok["levels"]] == sorted(lv["purity"] for lv in tok["levels"])
  ret = diagnostics["retriever"]
  assert ret["pairs"] == c.eval.beam_check_queries and len(ret["token_accuracy"]) == c.ids.length
  assert 0.0 <= ret["class_accuracy"] <= ret["class_accuracy_top2"] <= 1.0
  with open(os.path.join(workdir, "report", "results.md")) as f:
    md = f.read()
  assert "## Diagnostics: where precision is lost" in md and "## Time" in md
  assert f"the retriever's class (its first-token distribution summed per class) on **" \
         f"{100 * ret['class_accuracy']:.1f}%**" in md
  # The Fashion default's list policy, named with the columns it produced.
  assert c.search.class_first and c.search.hedge.slots == 1
  info = metrics["method_info"]["irgen"]["settings"]
  assert info["class_first"] and info["hedge_slots"] == 1 and info["class_levels"] == 4   # every level
  assert "irgen searches class first" in md and "place 10 holds that class's best images" in md
  assert "within the prefixes to 4 tokens (search.class_levels) of the class" in md
  assert 0.0 <= ret["hedged"] <= 1.0
  assert f"beams per level {beams}" in md and "Listed fewer than" not in md
  lists = diagnostics["lists"]   # runlocal's tiny model lists many non-positives
  assert lists["k"] == 10 and 0.0 < lists["wrong_places"] <= 1.0 and len(lists["images"]) == 3
  assert [m["lists"] for m in lists["images"]] == sorted((m["lists"] for m in lists["images"]), reverse=True)
  assert f"**Lists**: {100 * lists['wrong_places']:.1f}% of IRGen's top-10 places hold non-positives" in md
  with open(os.path.join(workdir, "tokenizer", "stats.json")) as f:
    stats = json.load(f)
  assert 1 <= stats["num_identifiers"] <= c.data.max_database
  # Each trained stage's curves, named by the timing and shown under Time.
  for stage in ("tokenizer", "retriever"):
    assert metrics["timing"][stage]["curves"] == f"{stage}_curves.png"
    assert f"![The {stage}'s training curves]({stage}_curves.png)" in md


def test_fashion_rerun_skips_finished_stages(fashion_runlocal_workdir, tmp_path):
  source, data_dir = fashion_runlocal_workdir
  workdir = tmp_path / "workdir"
  shutil.copytree(source, workdir)
  markers = {s: os.path.getmtime(workdir / s / "done.json") for s in STAGES}
  proc, wall = run_main("fashion_mnist.py:runlocal", workdir, f"--config.data.data_dir={data_dir}")
  for stage in STAGES:
    assert f"Stage {stage}: already done" in proc.stderr, proc.stderr[-3000:]
    assert f"Stage {stage}: starting" not in proc.stderr
    assert os.path.getmtime(workdir / stage / "done.json") == markers[stage]
  # Only the interpreter, imports and the config check: no stage's work (~1 min together here).
  assert wall < 60, wall


# --------------------------------------------------------------------------------------------------
# Every other config's :runlocal variant


@pytest.fixture(scope="module")
def synthetic_data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds_synthetic")


def group_key(c):
  """What a runlocal variant runs: every field outside SHAPE_ONLY."""
  return json.dumps({k: v for k, v in config_lib.flatten(c.to_dict()).items()
                     if not k.startswith(SHAPE_ONLY)}, sort_keys=True, default=repr)


def variant_groups(names=OTHER_CONFIGS):
  """The runlocal variants grouped by group_key, in ``names``' order."""
  groups = {}
  for name in names:
    groups.setdefault(group_key(load_config(name)), []).append(name)
  return list(groups.values())


VARIANT_GROUPS = variant_groups()  # decides, at collection, which variants run end to end


def test_variant_groups_split_on_any_other_setting():
  """The grouping that decides which variants run end to end tells variants apart by any setting
  outside SHAPE_ONLY, and by nothing inside it."""
  assert sorted(sum(VARIANT_GROUPS, [])) == sorted(OTHER_CONFIGS)
  assert variant_groups(("fashion_mnist", "imagenet2012")) == [["fashion_mnist"], ["imagenet2012"]]
  c = load_config("imagenet2012")
  other = c.copy_and_resolve_references()
  other.data.synthetic.image_shape, other.eval.ks = (64, 48, 3), (1, 5)
  assert group_key(other) == group_key(c)
  other.retriever.grad_clip = 1.0
  assert group_key(other) != group_key(c)


@pytest.mark.slow
@pytest.mark.parametrize("name", [g[0] for g in VARIANT_GROUPS], ids=["+".join(g) for g in VARIANT_GROUPS])
def test_runlocal_config_end_to_end(name, tmp_path, synthetic_data_dir):
  c = load_config(name)
  assert c.data.name == "synthetic", "runlocal variants run on generated stand-in data"
  workdir = tmp_path / "workdir"
  _, wall = run_main(f"{name}.py:runlocal", workdir, f"--config.data.data_dir={synthetic_data_dir}")
  print(f"{name}:runlocal end to end in {wall:.1f} s")
  check_done(workdir)
  for f in ("metrics.json", "results.md"):
    assert os.path.exists(workdir / "report" / f)
  check_metrics(workdir, c.eval.ks)
