"""One stage's training curves of several finished runs overlaid, with a table of what they show.

  .venv/bin/python benchmarks/training_curves.py --run before=W1 --run after=W2 [--stage=tokenizer]
                                                  [--out=curves.png] [--json=PATH]

Each run's ``<stage>/metrics.jsonl`` (every ``log_every_steps`` steps, the mean over those steps) in the
panels of the report's own curves (``evaluators/plots.py``), the tokenizer's codebook refits
(``tokenizer/refits.jsonl``) as dotted lines. Printed per run and panel: the first logged value, the
largest after the first codebook fit (where the RQ terms switch on, a fit's jump shows), and the last.
The same figure as each run's ``report/<stage>_curves.png``, but several runs on one set of axes: e.g.
the first codebook fit before step 0 against one at the end of warm-up (``tokenizer.first_refit_steps``).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from irgen_jax import files  # noqa: E402
from irgen_jax.evaluators import plots  # noqa: E402
from irgen_jax.workdir import Workdir  # noqa: E402

PANELS = {"tokenizer": plots.TOKENIZER_PANELS, "retriever": plots.RETRIEVER_PANELS}


def read_run(workdir: str, stage: str) -> tuple[list[dict], list[int]]:
  """The stage's logged windows and (the tokenizer's) refit steps of one finished run."""
  wd = Workdir(workdir)
  rows = wd.training_log(stage)
  if not rows:
    raise ValueError(f"--run {workdir}: no {stage} training log ({wd.path(stage, 'metrics.jsonl')}); "
                     f"expected the workdir of a run that trained the {stage} (a reused stage logs none)")
  return rows, wd.refit_steps() if stage == "tokenizer" else []


def summary(rows: list[dict], refits: list[int], key: str) -> dict[str, float] | None:
  points = [(r["step"], r[key]) for r in rows if key in r]
  if not points:
    return None
  first_fit = refits[0] if refits else 0
  after = [v for step, v in points if step > first_fit]
  return {"first": points[0][1], "max_after_first_fit": max(after) if after else float("nan"),
          "last": points[-1][1]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", action="append", required=True, metavar="NAME=WORKDIR",
                 help="a finished run, named as its line in the figure (repeat)")
  p.add_argument("--stage", default="tokenizer", choices=sorted(PANELS))
  p.add_argument("--out", default="training_curves.png")
  p.add_argument("--json", default="")
  a = p.parse_args(argv)
  runs, refits = {}, {}
  for spec in a.run:
    name, sep, workdir = spec.partition("=")
    if not sep or not name or not workdir:
      p.error(f"--run {spec!r}: expected NAME=WORKDIR")
    try:
      runs[name], refits[name] = read_run(workdir, a.stage)
    except ValueError as e:
      p.error(str(e))  # exit 2, before any figure is drawn
  with open(a.out, "wb") as f:
    f.write(plots.training_curves_png(runs, panels=PANELS[a.stage], refits=refits,
                                      title=f"The {a.stage}'s training"))
  table = {name: {"refits": refits[name],
                  **{key: summary(runs[name], refits[name], key) for key, _, _ in PANELS[a.stage]}}
           for name in runs}
  print(f"{a.stage}: first logged value / largest after the first codebook fit / last")
  for name, t in table.items():
    print(f"  {name} (refits at {t['refits']}):")
    for key, title, _ in PANELS[a.stage]:
      s = t[key]
      if s:
        print(f"    {key:>10}  {s['first']:9.3f} / {s['max_after_first_fit']:9.3f} / {s['last']:9.3f}"
              f"   {title}")
  print(f"figure: {a.out}")
  if a.json:
    files.write_json(a.json, table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
