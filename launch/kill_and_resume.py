"""Crash safety, checked: kill a run at named points, restart it, compare what it wrote with an uninterrupted run.

  python launch/kill_and_resume.py --config=configs/fashion_mnist.py:runlocal --out=/tmp/kill
  python launch/kill_and_resume.py --config=configs/inshop.py:runlocal --out=/tmp/kill \
      --points=retriever.loop_started,insert.after_commit --config.data.data_dir=/tmp/tfds

First the main job runs uninterrupted in OUT/reference (``--reference=DIR`` reuses a finished run of the
same config instead), and an insert of a few images into a copy of it (OUT/reference_insert). Then, for
every kill point (``POINTS``; ``irgen_jax.failpoints`` names them), a run in OUT/<point>:

1. the stages before the point's stage are copied from the reference (each stage is deterministic: an
   uninterrupted run writes the same bytes), and the point's stage runs with
   ``IRGEN_FAILPOINT=<point>``, which must kill the process (SIGKILL, exit -9) at that point;
2. the same command again, without the failpoint, must finish;
3. every artifact the stage writes must be byte-identical to the reference's (``ARTIFACTS``): the
   identifiers and codebooks, the database features, ``index.irgx``, both stages' parameters (as
   arrays; the RQ-VAE's too with ``ids.kind="rqvae"``), ``tokenizer/stats.json`` and
   ``report/metrics.json`` without their timing fields, and the metric logs
   (``{tokenizer,retriever,tokenizer/rqvae}/metrics.jsonl`` without ``steps_per_sec``,
   ``tokenizer/refits.jsonl``). The stages after the point's start from identical files, so they are
   not run again (``--all_stages`` runs them and compares their artifacts too).

The data point kills the dataset build (in a fresh data dir) and compares the prepared records. The insert
points kill ``python -m irgen_jax.insert`` in a copy of the reference: the index left behind must load
and be either the one before or the one after the insert; the re-run must finish the insert (index and
``inserted/`` files equal to the uninterrupted insert's), and a third run must insert nothing.

Prints one line per point (passed, or what differed) and exits 0 when every point passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Point:
  spec: str     # IRGEN_FAILPOINT value: name[@n]
  stage: str    # where it fires: data, tokenizer, retriever, evaluate, insert
  about: str


POINTS = (
    Point("data.example@500", "data", "during the dataset build"),
    Point("tokenizer.step@3", "tokenizer", "the tokenizer's first epoch, before any checkpoint"),
    Point("tokenizer.refit@2", "tokenizer", "inside a codebook refit (after a checkpoint)"),
    Point("tokenizer.outputs", "tokenizer", "while identifiers and the index are written"),
    Point("retriever.loop_started", "retriever", "the retriever's loop started, no checkpoint yet"),
    Point("retriever.checkpoint@1", "retriever", "just after the retriever's first checkpoint"),
    Point("evaluate.searched", "evaluate", "during evaluate (IRGen searched, baselines not yet)"),
    Point("report.file@2", "evaluate", "while the report is written"),
    Point("insert.before_commit", "insert", "an insert, its files written, the index not yet"),
    Point("insert.after_commit", "insert", "an insert, the index replaced, cleanup not yet"),
)
STAGES = ("data", "tokenizer", "retriever", "evaluate")
# Directories and files of the workdir that a stage and the ones after it write.
_WRITTEN_FROM = {"tokenizer": ("tokenizer", "retriever", "evaluate", "report", "index.irgx"),
                 "retriever": ("retriever", "evaluate", "report"),
                 "evaluate": ("evaluate", "report")}
# What each stage writes, and how two copies are compared: bytes, arrays (npz, orbax parameters),
# JSON or JSON lines without timing fields.
ARTIFACTS = {
    "tokenizer": (("index.irgx", "bytes"), ("tokenizer/database_features.npy", "bytes"),
                  ("tokenizer/refits.jsonl", "bytes"), ("tokenizer/identifiers.npz", "npz"),
                  ("tokenizer/stats.json", "json"), ("tokenizer/metrics.jsonl", "jsonl"),
                  ("tokenizer/params", "params"), ("tokenizer/rqvae/params", "params"),
                  ("tokenizer/rqvae/metrics.jsonl", "jsonl")),
    "retriever": (("retriever/metrics.jsonl", "jsonl"), ("retriever/params", "params")),
    "evaluate": (("report/metrics.json", "json"),),
}
TIMING_KEYS = frozenset({"timing", "qps", "qps_with_encoder", "search_s", "encode_s", "build_s",
                         "index_build_s", "rqvae_s", "steps_per_sec", "wall_s", "seconds"})
INSERT_IMAGES = 6


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
  env = dict(os.environ)
  env.pop("IRGEN_FAILPOINT", None)
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  env.setdefault("JAX_PLATFORMS", "cpu")
  return {**env, **(extra or {})}


class Harness:
  """Runs the reference and the kill points of one config under ``out``."""

  def __init__(self, config: str, out: str, overrides: Sequence[str] = (), reference: str = "",
               data_dir: str = "", cache: bool = True, all_stages: bool = False):
    self.config, self.out, self.overrides = config, os.path.abspath(out), list(overrides)
    self.all_stages = all_stages
    os.makedirs(self.out, exist_ok=True)
    self.data_dir = data_dir or os.path.join(self.out, "tfds")
    self.reference = os.path.abspath(reference) if reference else os.path.join(self.out, "reference")
    self.env = {}
    if cache:  # compiles shared by every run (most of a small run's time); a cache already set is kept
      self.env = {"JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR")
                                               or os.path.join(self.out, "xla_cache"),
                  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

  def loaded_config(self):
    """The runs' config, pass-through overrides applied."""
    import ast  # pylint: disable=g-import-not-at-top

    from irgen_jax import config_lib  # pylint: disable=g-import-not-at-top
    overrides = {}
    for flag in self.overrides:
      field, _, text = flag[len("--config."):].partition("=")
      try:
        overrides[field] = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        overrides[field] = text
    return config_lib.override(config_lib.load(self.config), overrides)

  # ------------------------------------------------------------------------- commands

  def main_command(self, workdir: str, data_dir: str | None = None, stages: str = "") -> list[str]:
    cmd = [sys.executable, "-m", "irgen_jax.main", f"--config={self.config}", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir or self.data_dir}", *self.overrides]
    return cmd + ([f"--config.stages={stages}"] if stages else [])

  def insert_command(self, workdir: str) -> list[str]:
    return [sys.executable, "-m", "irgen_jax.insert", f"--workdir={workdir}",
            f"--folder={self.insert_folder()}"]

  def _run(self, cmd: list[str], failpoint: str = "", timeout: float = 1800) -> subprocess.CompletedProcess:
    extra = dict(self.env, **({"IRGEN_FAILPOINT": failpoint} if failpoint else {}))
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=_env(extra))

  def _must_finish(self, cmd: list[str], what: str) -> subprocess.CompletedProcess:
    proc = self._run(cmd)
    if proc.returncode != 0:
      raise RuntimeError(f"{what} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc

  # ------------------------------------------------------------------------- references

  def ensure_reference(self) -> str:
    if not os.path.exists(os.path.join(self.reference, "evaluate", "done.json")):
      self._must_finish(self.main_command(self.reference), "the uninterrupted run")
    return self.reference

  def insert_folder(self) -> str:
    """OUT/insert_images/<class>/q<i>.png: a few query images (new to the database), made once."""
    root = os.path.join(self.out, "insert_images")
    if not os.path.isdir(root):
      from PIL import Image  # pylint: disable=g-import-not-at-top

      from irgen_jax.workdir import IndexedImages  # pylint: disable=g-import-not-at-top
      ds = IndexedImages.open(self.ensure_reference()).dataset
      tmp = root + ".tmp"
      shutil.rmtree(tmp, ignore_errors=True)
      names = ds.class_names or [str(i) for i in range(ds.num_classes)]
      for i in range(min(INSERT_IMAGES, len(ds.query))):
        record = ds.query[i]
        folder = os.path.join(tmp, names[record["label"]])
        os.makedirs(folder, exist_ok=True)
        image = record["image"]
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
            os.path.join(folder, f"q{i}.png"))
      os.replace(tmp, root)
    return root

  def ensure_reference_insert(self) -> str:
    path = os.path.join(self.out, "reference_insert")
    if not os.path.exists(os.path.join(path, "inserted")):
      shutil.rmtree(path, ignore_errors=True)
      shutil.copytree(self.ensure_reference(), path)
      self._must_finish(self.insert_command(path), "the uninterrupted insert")
    return path

  # ------------------------------------------------------------------------- one point

  def run_point(self, point: Point) -> list[str]:
    """Kills, restarts and compares at ``point``; returns what differed (empty: passed)."""
    workdir = os.path.join(self.out, point.spec.replace("@", "_at_"))
    shutil.rmtree(workdir, ignore_errors=True)
    if point.stage == "insert":
      return self._insert_point(point, workdir)
    data_dir = os.path.join(workdir + "_tfds") if point.stage == "data" else None
    if point.stage == "data":
      shutil.rmtree(data_dir, ignore_errors=True)
      cmd = self.main_command(workdir, data_dir, stages="data")
    else:
      _copy_before(self.ensure_reference(), workdir, point.stage)
      later = STAGES[STAGES.index(point.stage):] if self.all_stages else (point.stage,)
      cmd = self.main_command(workdir, stages=",".join(later))
    killed = self._run(cmd, failpoint=point.spec)
    problems = []
    if killed.returncode != -9:
      problems.append(f"the failpoint did not kill the run (exit {killed.returncode}): "
                      + killed.stderr[-1500:])
      return problems
    resumed = self._run(cmd)
    if resumed.returncode != 0:
      return [f"the restart exited {resumed.returncode}: {resumed.stderr[-3000:]}"]
    if point.stage == "data":
      return compare_datasets(self.loaded_config(), self.data_dir, data_dir)
    return compare_runs(self.reference, workdir, stages=later)

  def _insert_point(self, point: Point, workdir: str) -> list[str]:
    from irgen_jax.decoding.index import Index  # pylint: disable=g-import-not-at-top
    expected = self.ensure_reference_insert()
    shutil.copytree(self.reference, workdir)
    killed = self._run(self.insert_command(workdir), failpoint=point.spec)
    if killed.returncode != -9:
      return [f"the failpoint did not kill the insert (exit {killed.returncode}): "
              + killed.stderr[-1500:]]
    problems = []
    left = os.path.join(workdir, "index.irgx")
    try:
      Index.load(left, num_levels=None, num_tokens=None)
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f"the index a killed insert left does not load: {e}")
    if not any(_same_bytes(left, os.path.join(d, "index.irgx")) for d in (self.reference, expected)):
      problems.append("the index a killed insert left is neither the one before nor the one after")
    resumed = self._run(self.insert_command(workdir))
    if resumed.returncode != 0:
      return problems + [f"the re-run insert exited {resumed.returncode}: {resumed.stderr[-3000:]}"]
    problems += compare_runs(expected, workdir, insert=True)
    again = self._run(self.insert_command(workdir))
    if again.returncode != 0 or "Nothing to insert" not in again.stdout:
      problems.append(f"a third insert was not a no-op (exit {again.returncode}): {again.stdout[-500:]}")
    problems += compare_runs(expected, workdir, insert=True)
    return problems

  def run(self, points: Sequence[Point]) -> dict[str, list[str]]:
    results = {}
    for point in points:
      t0 = time.perf_counter()
      results[point.spec] = self.run_point(point)
      status = "passed" if not results[point.spec] else "FAILED: " + "; ".join(results[point.spec])
      print(f"{point.spec:<24} {point.about:<56} {time.perf_counter() - t0:6.1f} s  {status}",
            flush=True)
    return results


def _copy_before(reference: str, workdir: str, stage: str) -> None:
  """The reference's workdir without what ``stage`` and the stages after it wrote."""
  drop = set(_WRITTEN_FROM[stage])
  shutil.copytree(reference, workdir, ignore=lambda d, names: [
      n for n in names if os.path.abspath(d) == os.path.abspath(reference) and n in drop])


# ------------------------------------------------------------------------- comparing


def _same_bytes(a: str, b: str) -> bool:
  if not (os.path.isfile(a) and os.path.isfile(b)):
    return False
  with open(a, "rb") as fa, open(b, "rb") as fb:
    return fa.read() == fb.read()


def _drop_timing(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _drop_timing(v) for k, v in x.items() if k not in TIMING_KEYS}
  if isinstance(x, list):
    return [_drop_timing(v) for v in x]
  return x


def _json_lines(path: str) -> list[Any]:
  with open(path) as f:
    return [_drop_timing(json.loads(line)) for line in f if line.strip()]


def _arrays_equal(a: Any, b: Any) -> bool:
  import numpy as np  # pylint: disable=g-import-not-at-top
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _params_problem(a: str, b: str) -> str | None:
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckptr = ocp.StandardCheckpointer()
  ta, tb = ckptr.restore(os.path.abspath(a)), ckptr.restore(os.path.abspath(b))
  if jax.tree.structure(ta) != jax.tree.structure(tb):
    return "another parameter tree"
  paths_a = jax.tree_util.tree_flatten_with_path(ta)[0]
  for (path, x), y in zip(paths_a, jax.tree.leaves(tb)):
    if not _arrays_equal(x, y):
      return f"differs at {jax.tree_util.keystr(path)}"
  return None


def _same(kind: str, a: str, b: str) -> str | None:
  """Why ``a`` and ``b`` (an artifact of ``kind``) differ, or None."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if kind == "bytes":
    return None if _same_bytes(a, b) else "differs"
  if kind == "npz":
    with np.load(a) as za, np.load(b) as zb:
      same = sorted(za.files) == sorted(zb.files) and all(_arrays_equal(za[k], zb[k]) for k in za.files)
    return None if same else "differs"
  if kind == "json":
    with open(a) as fa, open(b) as fb:
      same = _drop_timing(json.load(fa)) == _drop_timing(json.load(fb))
    return None if same else "differs (timing fields aside)"
  if kind == "jsonl":
    return None if _json_lines(a) == _json_lines(b) else "differs (steps_per_sec aside)"
  if kind == "params":
    return _params_problem(a, b)
  raise ValueError(kind)


def compare_runs(reference: str, workdir: str, *, stages: Sequence[str] = tuple(ARTIFACTS),
                 insert: bool = False) -> list[str]:
  """What differs between two workdirs of the same config: the ``ARTIFACTS`` of ``stages`` and, with
  ``insert``, the index and the ``inserted/`` files."""
  checks = [a for stage in stages for a in ARTIFACTS.get(stage, ())]
  if insert:
    checks = [("index.irgx", "bytes")] + [
        (os.path.join("inserted", n), "json" if n.endswith(".json") else "bytes")
        for n in sorted(os.listdir(os.path.join(reference, "inserted"))) if not n.startswith(".")]
  problems = []
  for rel, kind in checks:
    a, b = os.path.join(reference, rel), os.path.join(workdir, rel)
    if not os.path.exists(a):
      continue
    if not os.path.exists(b):
      problems.append(f"{rel} is missing")
      continue
    problem = _same(kind, a, b)
    if problem:
      problems.append(f"{rel} {problem}")
  return problems


def compare_datasets(config, reference_dir: str, data_dir: str) -> list[str]:
  """Two prepared copies of the config's dataset hold the same records, in the same order (the
  ArrayRecord files themselves are not byte-stable across builds: their chunking varies)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from irgen_jax import config_lib  # pylint: disable=g-import-not-at-top
  from irgen_jax.data import registry  # pylint: disable=g-import-not-at-top
  a, b = (registry.load_from_config(config_lib.override(config, {"data.data_dir": d}).data,
                                    database_part="all") for d in (reference_dir, data_dir))
  problems = []
  for role in registry.ROLES:
    sa, sb = a.source(role), b.source(role)
    if len(sa) != len(sb) or not np.array_equal(a.labels(role), b.labels(role)):
      problems.append(f"the {role} records differ ({len(sa)} vs {len(sb)}, or their labels)")
      continue
    bad = next((i for i in range(len(sa)) if not _arrays_equal(sa[i]["image"], sb[i]["image"])), None)
    if bad is not None:
      problems.append(f"{role} record {bad} differs")
  return problems


# ------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="Other --config.FIELD=VALUE flags pass through to every run.")
  parser.add_argument("--config", required=True, help="configs/X.py[:args], as for irgen_jax.main")
  parser.add_argument("--out", required=True, help="a directory for the runs")
  parser.add_argument("--points", default="", help="comma-separated failpoints (default: all)")
  parser.add_argument("--reference", default="", help="a finished run of the same config to compare with")
  parser.add_argument("--data_dir", default="", help="the TFDS data dir (default OUT/tfds)")
  parser.add_argument("--all_stages", action="store_true",
                      help="after a restart run the later stages too, and compare their artifacts")
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)}")
  known = {p.spec: p for p in POINTS}
  names = [s for s in args.points.split(",") if s]
  unknown = [s for s in names if s not in known]
  if unknown:
    parser.error(f"unknown points {unknown}; known: {', '.join(known)}")
  chosen = [known[s] for s in names] if names else list(POINTS)
  harness = Harness(args.config, args.out, rest, reference=args.reference, data_dir=args.data_dir,
                    all_stages=args.all_stages)
  results = harness.run(chosen)
  failed = [s for s, problems in results.items() if problems]
  print(f"{len(results) - len(failed)} of {len(results)} kill points passed.")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
