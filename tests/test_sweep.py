"""launch/sweep.py (the paper's identifier ablations as runs, and their table) and configs/folder.py."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


sweep = _load("launch/sweep.py", "_sweep_under_test")


def _flags(argv):
  return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def test_print_kind_sweep(tmp_path):
  root = str(tmp_path / "kind")
  proc = subprocess.run(
      [sys.executable, "launch/sweep.py", "--sweep=ids_kind", "--config=configs/fashion_mnist.py:runlocal",
       f"--workdir={root}", "--print", "--config.data.data_dir=/data/tfds"],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if l and not l.startswith("#")]
  runs = [shlex.split(l) for l in lines[:-1]]
  assert lines[-1] == f"python launch/sweep.py --sweep=ids_kind --workdir={root} --collect"
  assert len(runs) == 5
  flags = [_flags(r) for r in runs]
  assert all(r[:3] == ["python", "-m", "irgen_jax.main"] for r in runs)
  assert all(f["config"] == "configs/fashion_mnist.py:runlocal" for f in flags)
  assert all(f["config.data.data_dir"] == "/data/tfds" for f in flags)
  assert [f["workdir"] for f in flags] == [os.path.join(root, n)
                                          for n in ("semantic", "random", "hkm_100", "hkm_200", "hkm_500")]
  assert [f["config.ids.kind"] for f in flags] == ["semantic", "random", "hkm", "hkm", "hkm"]
  assert [f.get("config.ids.hkm_clusters") for f in flags] == [None, None, "100", "200", "500"]
  # runlocal has L=16 tokens per level: HKM with k clusters needs k.
  assert [f.get("config.ids.codebook_size") for f in flags] == [None, None, "100", "200", "500"]
  # Every run but the first reuses the first run's tokenizer.
  assert "config.tokenizer.reuse_from" not in flags[0]
  assert all(f["config.tokenizer.reuse_from"] == os.path.join(root, "semantic") for f in flags[1:])


def test_print_length_sweep_and_paper_sized_hkm(tmp_path, capsys):
  assert sweep.main(["--sweep=ids_length", "--config=configs/fashion_mnist.py",
                     f"--workdir={tmp_path}", "--print"]) == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("python -m")]
  flags = [_flags(shlex.split(l)) for l in lines]
  assert [f["config.ids.length"] for f in flags] == ["2", "4", "6", "8"]
  assert [f["workdir"] for f in flags] == [str(tmp_path / f"M{m}") for m in (2, 4, 6, 8)]
  assert not any("config.tokenizer.reuse_from" in f for f in flags)
  # At the paper's L=256 only HKM_500 needs more tokens per level.
  hkm = {r.name: r.overrides for r in sweep.runs("ids_kind", codebook_size=256)}
  assert "ids.codebook_size" not in hkm["hkm_200"] and hkm["hkm_500"]["ids.codebook_size"] == 500
  with pytest.raises(SystemExit):
    sweep.main(["--sweep=ids_size", f"--workdir={tmp_path}", "--print"])


def _fake_metrics(path, p1, dataset="fashion_mnist"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  irgen = {"precision@1": p1, "precision@10": p1 / 2, "recall@1": p1, "recall@10": 0.9,
           "map@100": 0.25, "mrr@10": 0.5, "qps": 100.0}
  with open(path, "w") as f:
    json.dump({"dataset": dataset, "num_database": 512, "num_queries": 64, "ks": [1, 10],
               "methods": {"irgen": irgen, "linear_scan": dict(irgen, **{"precision@1": 0.99})}}, f)


def test_collect_builds_the_table(tmp_path, capsys):
  for name, p1 in (("semantic", 0.8), ("random", 0.3), ("hkm_100", 0.5), ("hkm_200", 0.55)):
    _fake_metrics(tmp_path / name / "report" / "metrics.json", p1)
  assert sweep.main(["--sweep=ids_kind", f"--workdir={tmp_path}", "--collect"]) == 0
  table = (tmp_path / "ids_kind.md").read_text()
  assert capsys.readouterr().out.startswith(table)
  rows = [l for l in table.splitlines() if l.startswith("|")]
  assert rows[0] == "| Setting | P@1 | P@10 | R@1 | R@10 | MAP@100 | Database | Queries |"
  assert rows[2] == "| Ours (semantic) | 80.0 | 40.0 | 80.0 | 90.0 | 25.0 | 512 | 64 |"
  assert rows[3].startswith("| Random | 30.0 | 15.0 |")
  assert [r.split("|")[1].strip() for r in rows[2:]] == [
      "Ours (semantic)", "Random", "HKM_100", "HKM_200", "HKM_500"]
  assert rows[-1] == "| HKM_500 | – | – | – | – | – | – | – |"
  assert "Not finished (no report/metrics.json): hkm_500." in table
  assert "Identifier kind (Table 3 layout)" in table

  _fake_metrics(tmp_path / "len" / "M4" / "report" / "metrics.json", 0.7)
  table = sweep.collect("ids_length", str(tmp_path / "len"))
  assert "Identifier length M (Table 4 layout)" in table
  assert "| M = 4 | 70.0 |" in table and "| M = 2 | – |" in table


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
  assert c.tokenizer.num_epochs == pytest.approx(1000 * 16 / 21)
  config_lib.validate(c, num_devices=1, dataset_names=registry.names())
  small = folder.get_config(f"data_dir={root},runlocal,image_size=16")
  assert small.tokenizer.num_epochs == pytest.approx(20 * 16 / 21) and small.ids.codebook_size == 16
  assert small.tokenizer.encoder.patch_size == 2
  with pytest.raises(ValueError, match="data_dir"):
    folder.get_config("")
