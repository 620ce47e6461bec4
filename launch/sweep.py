"""The paper's ablations as sweeps: expand into runs, run them, collect their metrics into one table.

  python launch/sweep.py --sweep=ids_kind --config=configs/fashion_mnist.py --workdir=workdirs/kind
  python launch/sweep.py --sweep=ids_length --config=configs/fashion_mnist.py:runlocal \
      --workdir=/tmp/len --print                       # the commands, one per run, nothing run
  python launch/sweep.py --sweep=ids_kind --workdir=workdirs/kind --collect   # the table only

Sweeps (run names are the sub-directories of --workdir):

- ``ids_kind`` (Table 3): identifiers from the semantic tokenizer (ours), random codes, hierarchical k-means
  over the tokenizer's features with 100, 200 and 500 clusters per level. Every run but the first takes
  the first run's trained tokenizer (``--config.tokenizer.reuse_from``): the kinds then differ only in
  their identifiers (the tokenizer's training does not depend on the kind). HKM with k clusters needs
  k tokens per level, so those runs use ``ids.codebook_size = max(L, k)``.
- ``ids_length`` (Table 4): identifier length M in {2, 4, 6, 8}; each run trains its own tokenizer.

Runs go one after another, each ``python -m irgen_jax.main`` in a subprocess (a finished run is skipped;
an interrupted one resumes, as the main job does); the data stage is shared through the data dir. Other
``--config.*`` flags pass through to every run. Then the table (``--workdir/<sweep>.md``) is written:
rows = settings, columns = precision@K, recall@K and MAP of IRGen from each run's report/metrics.json.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from typing import Any, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HKM_CLUSTERS = (100, 200, 500)
LENGTHS = (2, 4, 6, 8)
SWEEPS = ("ids_kind", "ids_length")
TITLES = {"ids_kind": "Identifier kind (Table 3 layout)", "ids_length": "Identifier length M (Table 4 layout)"}


@dataclasses.dataclass
class Run:
  name: str                    # sub-directory of the sweep's workdir
  title: str                   # the table's row label
  overrides: dict[str, Any]    # config field -> value
  reuse_tokenizer_of: str = ""  # another run's name


def runs(sweep: str, codebook_size: int = 256) -> list[Run]:
  """The runs of ``sweep``; ``codebook_size`` is the config's L (HKM runs raise it to k when k > L)."""
  if sweep == "ids_kind":
    out = [Run("semantic", "Ours (semantic)", {"ids.kind": "semantic"}),
           Run("random", "Random", {"ids.kind": "random"}, reuse_tokenizer_of="semantic")]
    for k in HKM_CLUSTERS:
      overrides = {"ids.kind": "hkm", "ids.hkm_clusters": k}
      if k > codebook_size:
        overrides["ids.codebook_size"] = k
      out.append(Run(f"hkm_{k}", f"HKM_{k}", overrides, reuse_tokenizer_of="semantic"))
    return out
  if sweep == "ids_length":
    return [Run(f"M{m}", f"M = {m}", {"ids.length": m}) for m in LENGTHS]
  raise ValueError(f"Unknown sweep {sweep!r}; expected one of {', '.join(SWEEPS)}.")


# ---------------------------------------------------------------------------------------------------
# Configs and commands


def load_config(config_arg: str):
  """``configs/X.py[:args]`` → the ConfigDict (as ``--config`` of the main job would load it)."""
  path, _, arg = config_arg.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--config={config_arg}: {path} does not exist.")
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  spec = importlib.util.spec_from_file_location("_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def config_field(config, passthrough: Sequence[str], field: str) -> Any:
  """``field`` of the config after the pass-through ``--config.a.b=v`` flags."""
  for flag in passthrough:
    key, _, value = flag[len("--config."):].partition("=")
    if key == field:
      return _parse_value(value)
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def _value_text(v: Any) -> str:
  return str(v)


def command(run: Run, *, config_arg: str, root: str, passthrough: Sequence[str],
            python: str = "python") -> list[str]:
  """The main job's command line of ``run`` (argv)."""
  argv = [python, "-m", "irgen_jax.main", f"--config={config_arg}",
          f"--workdir={os.path.join(root, run.name)}", *passthrough]
  argv += [f"--config.{k}={_value_text(v)}" for k, v in run.overrides.items()]
  if run.reuse_tokenizer_of:
    argv.append(f"--config.tokenizer.reuse_from={os.path.join(root, run.reuse_tokenizer_of)}")
  return argv


def expand(sweep: str, *, config_arg: str, root: str, passthrough: Sequence[str] = (),
           python: str = "python") -> list[tuple[Run, list[str]]]:
  config = load_config(config_arg)
  size = int(config_field(config, passthrough, "ids.codebook_size"))
  return [(r, command(r, config_arg=config_arg, root=root, passthrough=passthrough, python=python))
          for r in runs(sweep, codebook_size=size)]


def run_all(sweep: str, *, config_arg: str, root: str, passthrough: Sequence[str] = ()) -> None:
  """Runs every run of the sweep in order (finished ones are skipped); stops at the first failure."""
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  for run, argv in expand(sweep, config_arg=config_arg, root=root, passthrough=passthrough,
                          python=sys.executable):
    workdir = os.path.join(root, run.name)
    if os.path.exists(os.path.join(workdir, "evaluate", "done.json")):
      print(f"[sweep] {run.name}: already finished ({workdir}).", flush=True)
      continue
    print(f"[sweep] {run.name}: {shlex.join(argv)}", flush=True)
    proc = subprocess.run(argv, env=env, check=False)
    if proc.returncode != 0:
      raise SystemExit(f"[sweep] {run.name} failed with status {proc.returncode}; re-run the same "
                       "command to resume it (finished runs are skipped).")


# ---------------------------------------------------------------------------------------------------
# Collecting


def _pct(v: Any) -> str:
  return "–" if v is None else f"{100 * float(v):.1f}"


def collect(sweep: str, root: str, *, method: str = "irgen") -> str:
  """The sweep's table (markdown) from ``root/<run>/report/metrics.json``; missing runs show "–"."""
  found: dict[str, dict[str, Any]] = {}
  for r in runs(sweep):
    path = os.path.join(root, r.name, "report", "metrics.json")
    if os.path.exists(path):
      with open(path) as f:
        found[r.name] = json.load(f)
  ks: list[int] = sorted({int(k) for m in found.values() for k in m.get("ks", [])})
  map_keys = sorted({k for m in found.values() for k in m.get("methods", {}).get(method, {})
                     if k.startswith("map@")}, key=lambda k: int(k.split("@")[1]))
  datasets = sorted({str(m.get("dataset")) for m in found.values()})
  columns = ([(f"precision@{k}", f"P@{k}") for k in ks] + [(f"recall@{k}", f"R@{k}") for k in ks]
             + [(k, k.replace("map", "MAP")) for k in map_keys])
  lines = [f"# {TITLES[sweep]}", "",
           f"{method} on {', '.join(datasets) or '(no finished run)'}; metrics in % from each run's "
           f"report/metrics.json under {root}. P@K: precision@K, R@K: recall@K (at least one positive "
           "in the top K).", "",
           "| Setting | " + " | ".join(t for _, t in columns) + " | Database | Queries |",
           "|:--|" + "--:|" * (len(columns) + 2)]
  missing = []
  for r in runs(sweep):
    m = found.get(r.name)
    if m is None:
      missing.append(r.name)
      lines.append(f"| {r.title} | " + " | ".join("–" for _ in columns) + " | – | – |")
      continue
    values = m.get("methods", {}).get(method, {})
    lines.append(f"| {r.title} | " + " | ".join(_pct(values.get(key)) for key, _ in columns)
                 + f" | {m.get('num_database', '–')} | {m.get('num_queries', '–')} |")
  if missing:
    lines += ["", "Not finished (no report/metrics.json): " + ", ".join(missing) + "."]
  return "\n".join(lines) + "\n"


def write_table(sweep: str, root: str, **kw) -> str:
  table = collect(sweep, root, **kw)
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, f"{sweep}.md")
  with open(path + ".tmp", "w") as f:
    f.write(table)
  os.replace(path + ".tmp", path)
  return path


# ---------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="Other --config.FIELD=VALUE flags pass through to every run.")
  parser.add_argument("--sweep", required=True, choices=SWEEPS)
  parser.add_argument("--config", help="configs/X.py[:args], as for irgen_jax.main (not needed with "
                      "--collect alone)")
  parser.add_argument("--workdir", required=True, help="the sweep's root; one sub-directory per run")
  parser.add_argument("--print", action="store_true", help="print the commands, run nothing")
  parser.add_argument("--collect", action="store_true", help="only collect the finished runs' table")
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)}")
  if args.collect and not args.print:
    path = write_table(args.sweep, args.workdir)
    with open(path) as f:
      print(f.read(), end="")
    print(f"\n(written to {path})")
    return 0
  if not args.config:
    parser.error("--config is required to expand the sweep")
  if args.print:
    expanded = expand(args.sweep, config_arg=args.config, root=args.workdir, passthrough=rest)
    print(f"# {TITLES[args.sweep]}: {len(expanded)} runs under {args.workdir}, in this order"
          + (" (runs with tokenizer.reuse_from need that run's tokenizer stage finished first)"
             if any(r.reuse_tokenizer_of for r, _ in expanded) else ""))
    for _, cmd in expanded:
      print(shlex.join(cmd))
    print(f"python launch/sweep.py --sweep={args.sweep} --workdir={shlex.quote(args.workdir)} --collect")
    return 0
  run_all(args.sweep, config_arg=args.config, root=args.workdir, passthrough=rest)
  path = write_table(args.sweep, args.workdir)
  with open(path) as f:
    print(f.read(), end="")
  print(f"\n(written to {path})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
