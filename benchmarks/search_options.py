"""The search program of one finished run compiled with XLA's defaults and with XLA:CPU options, side by
side: queries per second of each (interleaved repeats, best of each) and how far their lists agree.

  .venv/bin/python benchmarks/search_options.py --workdir=W [--data_dir=D] [--queries=1024] \
      [--option xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT ...] [--json PATH]

What it measures is ``search.xla_cpu_options`` (``decoding/program.py: cpu_compiler_options``): the run's
own program (``SearchProgram``: encoder, class posterior, class-first search, hedge, at the evaluate
stage's beams and list length) over the first ``--queries`` queries, compiled twice, once per option
set, each run ``--repeats`` times in turn. The options change float rounding, not the algorithm, so
the lists should agree but for near-ties: printed are the share of queries whose top ``--k`` lists are
equal and P@k of each (same-class positives).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from irgen_jax import files, inference, parallel  # noqa: E402
from irgen_jax.decoding.program import SearchProgram  # noqa: E402
from irgen_jax.evaluators import metrics  # noqa: E402
from irgen_jax.workdir import open_trained_retriever  # noqa: E402

DEFAULT_OPTION = "xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def parse_option(text: str) -> tuple[str, object]:
  key, sep, value = text.partition("=")
  if not sep or not key.startswith("xla_cpu_"):
    raise argparse.ArgumentTypeError(f"--option {text!r}: expected xla_cpu_NAME=VALUE")
  for cast in (int, float):
    try:
      return key, cast(value)
    except ValueError:
      pass
  return key, {"true": True, "false": False}.get(value.lower(), value)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a finished run (retriever trained, index built)")
  p.add_argument("--data_dir", default=None, help="the run's data.data_dir, if it moved")
  p.add_argument("--option", type=parse_option, action="append", default=None,
                 help=f"an XLA:CPU option NAME=VALUE, repeatable (default {DEFAULT_OPTION})")
  p.add_argument("--queries", type=int, default=1024, help="the first N queries of the run")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--k", type=int, default=10, help="the list length compared")
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)
  if a.queries < 1 or a.repeats < 1 or a.k < 1:
    p.error(f"--queries {a.queries}, --repeats {a.repeats}, --k {a.k}: expected each >= 1")
  options = dict(a.option or [parse_option(DEFAULT_OPTION)])

  run = open_trained_retriever(a.workdir, data_dir=a.data_dir)
  c, indexed, model, params = run.config, run.indexed, run.model, run.params
  mesh = parallel.make_mesh()
  labels = indexed.labels()
  rows = np.arange(min(a.queries, len(indexed.dataset.query)))
  source = inference.Subset(indexed.dataset.query, rows)
  q_labels = indexed.dataset.labels("query")[rows]
  programs = {}
  for name, opts in (("xla_defaults", {}), ("options", options)):
    pc = c.copy_and_resolve_references()
    pc.search.xla_cpu_options = opts
    programs[name] = SearchProgram(pc, model, params, indexed.index, mesh=mesh, labels=labels)
  found = {name: prog.run(source, warm_up=True)[0] for name, prog in programs.items()}
  times = {name: [] for name in programs}
  for _ in range(a.repeats):
    for name, prog in programs.items():
      t = time.perf_counter()
      prog.run(source)
      times[name].append(time.perf_counter() - t)
  out = {"workdir": a.workdir, "queries": len(rows), "options": options,
         "platform": mesh.devices.flat[0].platform}
  for name in programs:
    ids = np.asarray(found[name].image_ids)
    out[name] = {"qps": len(rows) / min(times[name]), "seconds": times[name],
                 f"precision@{a.k}": float(metrics.precision_at(
                     metrics.relevance(ids[:, :a.k], q_labels, labels), a.k).mean())}
  ids_d, ids_o = (np.asarray(found[n].image_ids)[:, :a.k] for n in programs)
  out["speedup"] = out["options"]["qps"] / out["xla_defaults"]["qps"]
  out[f"equal_lists@{a.k}"] = float((ids_d == ids_o).all(1).mean())
  for name in programs:
    print(f"{name:<14} {out[name]['qps']:9.1f} queries/s   P@{a.k} {100 * out[name][f'precision@{a.k}']:.2f}")
  print(f"options {options}: speedup {out['speedup']:.3f}x; equal top-{a.k} lists on "
        f"{100 * out[f'equal_lists@{a.k}']:.1f}% of {len(rows)} queries ({out['platform']})")
  if a.json:
    files.write_json(a.json, out)
  return out


if __name__ == "__main__":
  main()
