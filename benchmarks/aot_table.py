"""The README's TPU table: the paper's configs x pod slices, compiled ahead of time on this CPU.

  .venv/bin/python benchmarks/aot_table.py --out=/tmp/aot            # runs irgen_jax.aot 12 times
  .venv/bin/python benchmarks/aot_table.py --out=/tmp/aot --collect  # only prints the table again

Each (config, topology) pair runs ``python -m irgen_jax.aot --config=... --topology=... --json=...`` in its
own process (libtpu keeps its state for the life of a process) and skips pairs whose JSON is already in
``--out``, so a second instance started with ``--reverse`` shares the work (a pair took 6-16 minutes on
2 cores). Prints a markdown table: per program, fits or not, per-chip memory, per-chip FLOPs per step
and the step time those FLOPs take at the chip's peak bf16 rate (an ideal lower bound, not a
measurement).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"In-shop": "inshop", "CUB-200": "cub200", "Cars-196": "cars196",
           "ImageNet (24-block decoder)": "imagenet2012"}
TOPOLOGIES = {"v4-8": "v4:2x2x1", "v5e-16": "v5e:4x4", "v5p-8": "v5p:2x2x1"}
PROGRAMS = ("tokenizer_train_step", "retriever_train_step", "beam_search")

_OUT = flags.DEFINE_string("out", None, "folder for the JSON reports")
_COLLECT = flags.DEFINE_bool("collect", False, "only build the table from the JSON already in --out")
_REVERSE = flags.DEFINE_bool("reverse", False, "take the pairs in reverse order: a second instance "
                             "started with it shares the work from the other end")
flags.mark_flag_as_required("out")


def _path(config: str, topology: str) -> str:
  return os.path.join(_OUT.value, f"{config}_{topology.replace(':', '_')}.json")


def _run(config: str, topology: str) -> None:
  path = _path(config, topology)
  if os.path.exists(path):
    return
  cmd = [sys.executable, "-m", "irgen_jax.aot", f"--config=configs/{config}.py",
         f"--topology={topology}", f"--json={path}"]
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  # Exit 1 means "a program does not fit": the JSON says which; anything else is a failure.
  if proc.returncode not in (0, 1) or not os.path.exists(path):
    sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  print(f"{config} {topology}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)


def _cell(p: dict) -> str:
  gib = p["per_chip_bytes"] / 2**30
  fits = "fits" if p["fits"] else "**does not fit**"
  if p.get("flops") is None:
    return f"{fits}, {gib:.1f} GiB"
  return (f"{fits}, {gib:.1f} GiB, {p['flops'] / 1e12:.2f} TFLOP, "
          f"≥{p['est_step_time_s'] * 1e3:.0f} ms")


def table() -> str:
  head = "| config | program | " + " | ".join(TOPOLOGIES) + " |"
  rows = [head, "| --- | --- | " + " | ".join("---" for _ in TOPOLOGIES) + " |"]
  for name, config in CONFIGS.items():
    reports = {}
    for slice_name, topology in TOPOLOGIES.items():
      if os.path.exists(_path(config, topology)):   # --collect may run before every pair is done
        with open(_path(config, topology)) as f:
          reports[slice_name] = json.load(f)["programs"]
    if not reports:
      continue
    for program in PROGRAMS:
      cells = [_cell(reports[s][program]) if program in reports.get(s, {}) else "not compiled"
               for s in TOPOLOGIES]
      rows.append(f"| {name} | {program} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  if not _COLLECT.value:
    pairs = [(c, t) for c in CONFIGS.values() for t in TOPOLOGIES.values()]
    for config, topology in reversed(pairs) if _REVERSE.value else pairs:
      _run(config, topology)
  print(table())


if __name__ == "__main__":
  app.run(main)
