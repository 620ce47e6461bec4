"""Config sweeps: run every point of a sweep, on one machine or many, and report them with their seeds.

  python launch/sweep.py --config=configs/fashion_mnist.py --sweep=seeds --workdir=workdirs/seeds
  python launch/sweep.py --config=configs/fashion_mnist.py --sweep=ids_kind --seeds=3 --workdir=ROOT
  python launch/sweep.py --config=configs/fashion_mnist.py:runlocal --workdir=ROOT \
      --grid=tokenizer.lambda2=0,0.1,1 --seeds=3            # an ad hoc sweep of any field
  ... --grid="data.crop_scale=(0.5,1.0),(1.0,1.0)"          # tuple values: commas inside brackets
  ... --parallel=2    # two points at once, each on its share of the host (its CPUs, or one GPU)
  ... --cpus_per_point=1   # every point on one CPU, alone or not (equal threads: equal bytes)
  ... --print         # one command per point, for any scheduler (a TPU slice or a GPU node each)
  ... --collect       # only the report, from whatever has finished

Sweeps are declared in the config file beside ``get_config``: ``get_sweeps(arg) -> {name: points}``, built
with ``irgen_jax.sweeps`` (every config has ``seeds``, ``ids_kind`` and ``ids_length``); ``--grid`` and
``--seeds`` multiply the declared sweep (or the config alone) by more fields. Other ``--config.FIELD=VALUE``
flags pass through to every point. Every point is checked before any runs (an unknown field or a bad
value is one line naming it, exit 2).

Each point is one ``python -m irgen_jax.main`` in ``ROOT/<point>/`` (its name: its overrides); a finished
point is skipped, an interrupted one resumes (the main job's resume), and a point that reuses another's
trained stage (``sweeps.Reuse``: every identifier kind reuses one tokenizer) starts once that one has
finished. Each point's log is ``ROOT/logs/<point>.log``. Then the report (``evaluators.sweep_report``):
``ROOT/<sweep>.md``, ``.json`` and ``.png``; ``ROOT/<sweep>.plan.json`` lists the points (``--collect``
reads it).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from irgen_jax import cli, config_lib, files, sweeps  # noqa: E402
from irgen_jax.errors import UserError  # noqa: E402


@dataclasses.dataclass
class Run:
  name: str                     # ROOT/<name> is its workdir
  overrides: dict[str, Any]     # config field -> value, as passed to the main job
  setting: dict[str, Any]       # the overrides that define its setting (no seed, no reuse path)
  seed: int
  workdir: str
  needs: list[str]              # runs that must finish first (their trained stage is reused)


def parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def value_text(v: Any) -> str:
  """A value as ``--config.FIELD=`` text that config_flags parses back to it."""
  if isinstance(v, (list, tuple)):
    return "(" + ",".join(value_text(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  return repr(v) if isinstance(v, float) else str(v)


def point_names(points: Sequence[dict[str, Any]]) -> list[str]:
  """Readable directory names from the points' overrides: ``field=value`` joined by ``__``, each field
  by its last component where that is unambiguous in the sweep (``kind=hkm__hkm_clusters=100__seed=0``)."""
  fields = {k for p in points for k, v in p.items() if not isinstance(v, sweeps.Reuse)}
  last = [f.rsplit(".", 1)[-1] for f in fields]
  short = {f: (f.rsplit(".", 1)[-1] if last.count(f.rsplit(".", 1)[-1]) == 1 else f) for f in fields}
  out = []
  for p in points:
    name = "__".join(f"{short[k]}={value_text(v)}" for k, v in p.items()
                     if not isinstance(v, sweeps.Reuse)) or "default"
    out.append("".join(c if c.isalnum() or c in "._=,()-+" else "_" for c in name))
  return out


def split_values(text: str) -> list[str]:
  """``V1,V2,...`` split at the commas outside brackets: ``(0.5,1.0),(1.0,1.0)`` is two tuples."""
  out, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    depth += (ch in "([{") - (ch in ")]}")
    if ch == "," and depth == 0:
      out.append(text[start:i])
      start = i + 1
  return out + [text[start:]]


def _grid(spec: str) -> list[dict[str, Any]]:
  field, sep, vals = spec.partition("=")
  if not sep or not field or not vals:
    raise UserError(f"--grid={spec}: expected FIELD=V1,V2,...")
  return sweeps.values(field, [parse_value(v) for v in split_values(vals)])


def sweep_points(config_arg: str, name: str, grids: Sequence[str], num_seeds: int) -> list[dict[str, Any]]:
  """The points: the declared sweep ``name`` (or the config alone) times the grids times the seeds."""
  module, arg = config_lib.load_module(config_arg)
  points: list[dict[str, Any]] = [{}]
  if name:
    declared = (module.get_sweeps(arg) if hasattr(module, "get_sweeps")
                else sweeps.standard(module.get_config(arg)))
    if name not in declared:
      raise UserError(f"--sweep={name}: {config_arg} declares no such sweep; it has "
                      f"{', '.join(sorted(declared))}.")
    points = [dict(p) for p in declared[name]]
  for spec in grids:
    points = sweeps.product(points, _grid(spec))
  if num_seeds:
    if any(sweeps.SEED_FIELD in p for p in points):
      raise UserError(f"--seeds={num_seeds}: the sweep sets the seed itself.")
    points = sweeps.product(points, sweeps.seeds(num_seeds))
  return points


def expand(config_arg: str, points: Sequence[dict[str, Any]], root: str,
           passthrough: Sequence[str] = ()) -> list[Run]:
  """The runs of ``points`` under ``root``, each validated as the main job will validate it."""
  from irgen_jax.data import registry  # the config check names the datasets
  base = config_lib.load(config_arg)
  common = {}
  for flag in passthrough:
    field, sep, text = flag[len("--config."):].partition("=")
    if not sep:
      raise UserError(f"{flag}: expected --config.FIELD=VALUE.")
    common[field] = parse_value(text)
  base = config_lib.override(base, common)
  names = point_names(points)
  if len(set(names)) != len(names):
    raise UserError(f"the sweep has equal points: {sorted(n for n in names if names.count(n) > 1)[:3]}.")
  plain = [{k: v for k, v in p.items() if not isinstance(v, sweeps.Reuse)} for p in points]
  runs = []
  for p, name in zip(points, names):
    overrides, needs = {}, []
    for k, v in p.items():
      if isinstance(v, sweeps.Reuse):
        target = v.target(p)
        if target not in plain:
          raise UserError(f"point {name}: {k} reuses the point {sweeps.setting(target)}, which the "
                          "sweep does not have.")
        needs.append(names[plain.index(target)])
        v = os.path.join(root, needs[-1])
      overrides[k] = v
    c = config_lib.override(base, overrides)  # unknown fields and bad values fail here, named
    config_lib.validate(c, num_devices=1, dataset_names=registry.names())
    runs.append(Run(name=name, overrides=overrides, setting=sweeps.setting(p),
                    seed=int(p.get(sweeps.SEED_FIELD, c.seed)), workdir=os.path.join(root, name),
                    needs=needs))
  return runs


def command(run: Run, config_arg: str, passthrough: Sequence[str], python: str = "python") -> list[str]:
  return [python, "-m", "irgen_jax.main", f"--config={config_arg}", f"--workdir={run.workdir}",
          *passthrough, *[f"--config.{k}={value_text(v)}" for k, v in run.overrides.items()]]


def ordered(runs: Sequence[Run]) -> list[Run]:
  """Runs with every run after the ones it needs."""
  done, out, pending = set(), [], list(runs)
  while pending:
    ready = [r for r in pending if all(n in done for n in r.needs)]
    if not ready:
      raise UserError(f"the points {[r.name for r in pending]} need each other.")
    for r in ready:
      out.append(r)
      done.add(r.name)
      pending.remove(r)
  return out


def finished(run: Run) -> bool:
  from irgen_jax.workdir import Workdir  # jax and friends: only once something is checked
  return Workdir(run.workdir).is_done("evaluate")


# ------------------------------------------------------------------------------------------ running


def slots(parallel: int, gpus: str = "", cpus_per_point: int = 0) -> list[dict[str, Any]]:
  """What each of ``parallel`` concurrent runs gets: one GPU each where the host has them (or ``gpus``),
  else ``cpus_per_point`` of this process's CPUs (default: an equal share), by affinity, so that XLA
  and OpenMP size their thread pools to it.

  On a CPU the results of a run depend on its thread count in the last digits (XLA splits the sums of
  its matmuls by thread), so a point gets the same number of CPUs whether it runs alone or beside
  others when ``cpus_per_point`` is given: ``--parallel=1 --cpus_per_point=1`` and ``--parallel=2`` on
  two cores give the same bytes.
  """
  ids = [g for g in gpus.split(",") if g] if gpus else _visible_gpus()
  if ids:
    if parallel > len(ids):
      raise UserError(f"--parallel={parallel}: the host has {len(ids)} GPU(s) ({','.join(ids)}).")
    return [{"env": {"CUDA_VISIBLE_DEVICES": g}, "cpus": None} for g in ids[:parallel]]
  cpus = sorted(os.sched_getaffinity(0))
  share = cpus_per_point or len(cpus) // parallel
  if share < 1 or share * parallel > len(cpus):
    raise UserError(f"--parallel={parallel} with {share} CPU(s) per point: this process may use "
                    f"{len(cpus)} CPU(s).")
  if parallel == 1 and share == len(cpus):
    return [{"env": {}, "cpus": None}]
  return [{"env": {"OMP_NUM_THREADS": str(share)}, "cpus": set(cpus[i * share:(i + 1) * share])}
          for i in range(parallel)]


def _visible_gpus() -> list[str]:
  if not shutil.which("nvidia-smi"):
    return []
  proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
  return [str(i) for i, line in enumerate(proc.stdout.splitlines()) if line.startswith("GPU ")]


def run_all(runs: Sequence[Run], *, config_arg: str, root: str, passthrough: Sequence[str],
            parallel: int = 1, gpus: str = "", cpus_per_point: int = 0) -> list[str]:
  """Runs every unfinished run, ``parallel`` at once; returns the names of the runs that failed."""
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  free = slots(parallel, gpus, cpus_per_point)
  os.makedirs(os.path.join(root, "logs"), exist_ok=True)
  pending = [r for r in ordered(runs) if not finished(r)]
  for r in runs:
    if r not in pending:
      print(f"[sweep] {r.name}: already finished.", flush=True)
  active: dict[str, tuple[subprocess.Popen, dict[str, Any], Any]] = {}
  failed: list[str] = []
  done_names = {r.name for r in runs if r not in pending}
  while pending or active:
    for r in list(pending):
      if not free:
        break
      if any(n in failed for n in r.needs):
        print(f"[sweep] {r.name}: skipped ({', '.join(r.needs)} failed).", flush=True)
        failed.append(r.name)
        pending.remove(r)
        continue
      if not all(n in done_names for n in r.needs):
        continue
      slot = free.pop(0)
      argv = command(r, config_arg, passthrough, python=sys.executable)
      log = open(os.path.join(root, "logs", f"{r.name}.log"), "a")
      print(f"[sweep] {r.name}: {shlex.join(argv)}", flush=True)
      cpus = slot["cpus"]
      proc = subprocess.Popen(argv, cwd=REPO, env={**env, **slot["env"]}, stdout=log,
                              stderr=subprocess.STDOUT,
                              preexec_fn=(lambda c=cpus: os.sched_setaffinity(0, c)) if cpus else None)
      active[r.name] = (proc, slot, log)
      pending.remove(r)
    if not active:
      if pending:  # waiting on runs that can never finish
        failed += [r.name for r in pending]
        break
      continue
    time.sleep(0.5)
    for name, (proc, slot, log) in list(active.items()):
      if proc.poll() is None:
        continue
      log.close()
      free.append(slot)
      del active[name]
      if proc.returncode == 0:
        done_names.add(name)
        print(f"[sweep] {name}: finished.", flush=True)
      else:
        failed.append(name)
        print(f"[sweep] {name}: exited {proc.returncode} (log: {log.name}); re-run the sweep to "
              "resume it.", flush=True)
  return failed


# ------------------------------------------------------------------------------------------ report


def plan_path(root: str, sweep: str) -> str:
  return os.path.join(root, f"{sweep}.plan.json")


def write_plan(root: str, sweep: str, config_arg: str, runs: Sequence[Run],
               passthrough: Sequence[str]) -> None:
  files.write_json(plan_path(root, sweep), {
      "sweep": sweep, "config": config_arg, "passthrough": list(passthrough),
      "runs": [dataclasses.asdict(r) for r in runs]}, default=str)


def collect(root: str, sweep: str) -> dict[str, str]:
  """The report of ``ROOT/<sweep>.plan.json``'s runs, from whatever has finished; returns its paths."""
  from irgen_jax.evaluators import sweep_report
  path = plan_path(root, sweep)
  if not os.path.exists(path):
    raise UserError(f"{path} does not exist: run (or --print) the sweep first.")
  plan = files.read_json(path)
  runs, metrics = [], {}
  for r in plan["runs"]:
    run = Run(**r)
    mpath = os.path.join(run.workdir, "report", "metrics.json")
    status = "finished" if finished(run) else "not finished"
    if status == "finished":
      metrics[run.name] = files.read_json(mpath)
    runs.append({"name": run.name, "overrides": run.overrides, "setting": run.setting,
                 "seed": run.seed, "workdir": run.workdir, "metrics": mpath if status == "finished"
                 else None, "status": status})
  rep = sweep_report.report(sweep=sweep, config=plan["config"], root=root, runs=runs, metrics=metrics)
  return sweep_report.write(root, rep)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="Other --config.FIELD=VALUE flags pass through to every point.")
  parser.add_argument("--config", help="configs/X.py[:args], as for irgen_jax.main (not needed with "
                      "--collect once the sweep was planned)")
  parser.add_argument("--sweep", default="", help="a sweep the config declares (get_sweeps)")
  parser.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                      help="also sweep FIELD over these values (repeatable: their product)")
  parser.add_argument("--seeds", type=int, default=0, help="also sweep the seed over 0..N-1")
  parser.add_argument("--name", default="", help="the sweep's name (default: --sweep, or 'grid')")
  parser.add_argument("--workdir", required=True, help="the sweep's root; one sub-directory per point")
  parser.add_argument("--parallel", type=int, default=1, help="points run at once")
  parser.add_argument("--gpus", default="", help="GPU ids to give the parallel points (default: all)")
  parser.add_argument("--cpus_per_point", type=int, default=0,
                      help="CPUs each point runs on (CPU hosts; default: an equal share)")
  parser.add_argument("--print", action="store_true", help="print one command per point, run nothing")
  parser.add_argument("--collect", action="store_true", help="only write the report")
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)}")
  name = args.name or args.sweep or "grid"
  root = os.path.abspath(args.workdir)
  try:
    if args.collect and not args.print and not (args.config and (args.sweep or args.grid)):
      return _print_report(collect(root, name))
    if not args.config:
      parser.error("--config is required to expand the sweep")
    if not (args.sweep or args.grid or args.seeds):
      parser.error("give --sweep=NAME, --grid=FIELD=V1,V2 or --seeds=N")
    if args.parallel < 1:
      raise UserError(f"--parallel={args.parallel}: expected >= 1.")
    runs = expand(args.config, sweep_points(args.config, args.sweep, args.grid, args.seeds), root,
                  passthrough=rest)
    os.makedirs(root, exist_ok=True)
    write_plan(root, name, args.config, runs, rest)
    if args.print:
      print(f"# sweep {name}: {len(runs)} points under {root}, in an order that runs every point "
            "after the ones whose trained stage it reuses")
      for r in ordered(runs):
        print(shlex.join(command(r, args.config, rest)) + (f"  # after {', '.join(r.needs)}"
                                                           if r.needs else ""))
      print(f"python launch/sweep.py --workdir={shlex.quote(root)} --name={name} --collect")
      return 0
    if args.collect:
      return _print_report(collect(root, name))
    failed = run_all(runs, config_arg=args.config, root=root, passthrough=rest,
                     parallel=args.parallel, gpus=args.gpus, cpus_per_point=args.cpus_per_point)
    _print_report(collect(root, name))
    if failed:
      print(f"[sweep] {len(failed)} point(s) did not finish: {', '.join(failed)}.", file=sys.stderr)
      return 1
    return 0
  except UserError as e:
    cli.fail(str(e))


def _print_report(paths: dict[str, str]) -> int:
  with open(paths["md"]) as f:
    print(f.read(), end="")
  print(f"\n(written: {', '.join(paths.values())})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
