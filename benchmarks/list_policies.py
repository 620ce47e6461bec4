"""IRGen's list policies side by side on one finished run: the same trained retriever and index, searched
with each policy (``decoding/hedge.py``), measured with the evaluate stage's program and metrics.

  .venv/bin/python benchmarks/list_policies.py --workdir=W [--data_dir=D] [--policies=a,b,...]
                                               [--threshold=T ...] [--json=PATH]

Training fixes the model; how the list spends its places is a search-time choice, so every policy is
compared on one training (a seed sweep trains once per seed, this script then searches each). Policies:

  plain            the paper's beam (search.class_first=False, no hedge)
  class_first      within the likeliest class's first tokens (class_levels=1)
  class_firstD     within its prefixes to D tokens (class_levels=D, 2 <= D <= M), e.g. class_first4
  hedge            the plain beam hedged (search.hedge at each --threshold)
  class_first+hedge, class_firstD+hedge   both

The hedge's other settings (slots, at, beam_size) are the run's config's (slots 1 where it has none).
Printed per policy (IRGen, %) beside the run's linear scan (report/metrics.json): P@1/10/30, R@1/10/30,
MAP@map_at, the share of queries hedged, and the differences from the scan in points. Searches at the
run's beams (``program.evaluation_beams``) and list length, so ``class_first+hedge`` at the run's own
threshold reproduces the run's IRGen row.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from irgen_jax import files, parallel  # noqa: E402
from irgen_jax.decoding import hedge as hedge_lib  # noqa: E402
from irgen_jax.decoding.program import SearchProgram  # noqa: E402
from irgen_jax.evaluators import metrics  # noqa: E402
from irgen_jax.workdir import REPORT_METRICS, Workdir, open_trained_retriever  # noqa: E402

POLICIES = ("plain", "class_first", "class_first2", "hedge", "class_first+hedge", "class_first2+hedge")
KS = (1, 10, 30)
_POLICY = re.compile(r"(plain|hedge|class_first([2-9]|[1-9][0-9]+)?(\+hedge)?)")


def class_levels(name: str) -> int:
  """D of a policy name: class_firstD -> D, class_first -> 1, the others 0 (no class restriction)."""
  match = _POLICY.fullmatch(name)
  return 0 if not name.startswith("class_first") else int(match.group(2) or 1)


def policy_config(c, name: str, threshold: float):
  """(config, hedge) of policy ``name`` over the run's config ``c``."""
  c = c.copy_and_resolve_references()
  c.search.class_first = name.startswith("class_first")
  c.search.class_levels = max(1, class_levels(name))
  h = hedge_lib.Hedge.from_config(c.search)
  hedge = (hedge_lib.Hedge(max(h.slots, 1), h.at, threshold, h.beam_size) if name.endswith("hedge")
           else hedge_lib.Hedge())
  return c, hedge


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a finished run (retriever trained, index built)")
  p.add_argument("--data_dir", default=None, help="the run's data.data_dir, if it moved")
  p.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, from {POLICIES}")
  p.add_argument("--threshold", type=float, nargs="+", default=None,
                 help="hedge thresholds to try (default: the run's search.hedge.threshold)")
  p.add_argument("--json", default=None, help="write the figures here")
  a = p.parse_args(argv)
  names = [n for n in a.policies.split(",") if n]
  unknown = sorted(n for n in names if not _POLICY.fullmatch(n))
  if unknown or not names:
    p.error(f"--policies: unknown {unknown or names}; expected names like {POLICIES} (class_firstD: D "
            f"levels)")
  if a.threshold and not all(0 < t <= 1 for t in a.threshold):
    p.error(f"--threshold {a.threshold}: expected posteriors in (0, 1]")

  wd = Workdir(a.workdir)
  run = open_trained_retriever(wd, data_dir=a.data_dir)
  c, indexed, model, params = run.config, run.indexed, run.model, run.params
  too_deep = [n for n in names if class_levels(n) > c.ids.length]
  if too_deep:
    p.error(f"--policies: {too_deep} restrict more levels than the run's identifiers have "
            f"(ids.length={c.ids.length})")
  labels, queries = indexed.labels(), indexed.dataset.query
  q_labels = indexed.dataset.labels("query")
  mesh = parallel.make_mesh()
  thresholds = a.threshold or [float(c.search.hedge.threshold)]
  map_at = int(c.eval.map_at)

  def row(values):
    return {**{f"P@{k}": values[f"precision@{k}"] for k in KS},
            **{f"R@{k}": values[f"recall@{k}"] for k in KS}, f"MAP@{map_at}": values[f"map@{map_at}"]}

  scan = None
  if os.path.exists(wd.path(REPORT_METRICS)):
    scan = row(files.read_json(wd.path(REPORT_METRICS))["methods"]["linear_scan"])
  out = {"workdir": a.workdir, "linear_scan": scan, "policies": {}}
  columns = [f"P@{k}" for k in KS] + [f"R@{k}" for k in KS] + [f"MAP@{map_at}", "hedged"]
  print(f"{'policy':<28}" + "".join(f"{k:>9}" for k in columns) + "   P@10 - scan   R@10 - scan")
  for name in names:
    for threshold in (thresholds if name.endswith("hedge") else [None]):
      pc, hedge = policy_config(c, name, threshold or 0.0)
      program = SearchProgram(pc, model, params, indexed.index, mesh=mesh, labels=labels, hedge=hedge)
      found, seconds = program.run(queries, warm_up=True)
      values = row(metrics.evaluate(found.image_ids, q_labels, labels, KS, map_at=map_at))
      key = name if threshold is None else f"{name}@{threshold:g}"
      hedged = float(np.asarray(found.hedged).mean())
      out["policies"][key] = {**values, "hedged": hedged, "search_s": seconds}
      diff = "".join(f"   {100 * (values[k] - scan[k]):+11.2f}" for k in ("P@10", "R@10")) if scan else ""
      print(f"{key:<28}" + "".join(f"{100 * v:9.2f}" for v in values.values()) + f"{100 * hedged:9.1f}"
            + diff, flush=True)
  if scan:
    print(f"{'linear scan (the run)':<28}" + "".join(f"{100 * v:9.2f}" for v in scan.values()))
  if a.json:
    files.write_json(a.json, out)
  return out


if __name__ == "__main__":
  main()
