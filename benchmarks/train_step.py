"""Train-step benchmark: examples/s and achieved FLOP/s of one tokenizer and one retriever train step of
a config, against a plain float32 matmul measured side by side in the same process.

  .venv/bin/python benchmarks/train_step.py --config=configs/fashion_mnist.py:runlocal
  .venv/bin/python benchmarks/train_step.py --config=configs/fashion_mnist.py --json=out.json
  .venv/bin/python benchmarks/train_step.py --config=configs/inshop.py --config.tokenizer.batch_size=64

What is timed: the jitted train step of each stage exactly as its trainer builds it
(``make_train_step``: forward, backward, AdamW update, state donated), on the config's global batch
(``tokenizer.batch_size``, ``retriever.batch_size``) already placed on the ``data`` mesh over every
device, with the config's model, compute dtype and optimizer. Not timed: the input pipeline, logging,
checkpoints, codebook refits. Every program is compiled and run twice before timing; then the programs
run in turn, ``--repeats`` times each (interleaved, so load drift on a shared machine hits all alike).
The step time is the best run (other processes only ever add time); the median is printed beside it.

FLOPs per step are XLA's own count (``jitted.lower(...).compile().cost_analysis()['flops']``, per
device, times the device count). Achieved FLOP/s = FLOPs per step / step time; ``of_matmul`` = that /
the FLOP/s of a float32 ``[R, K] @ [K, N]`` matmul with its rows split over the same mesh
(``--matmul_size``, R = K = N per device), a ceiling this machine actually reaches, timed in the same
interleaved runs as the steps. The matmul timed alone just before is reported too
(``alone_gflops_per_s``): how far the two differ shows how noisy the machine was during the run.

Encoders the config initializes from CLIP are built with the same architecture and random weights
when the CLIP checkpoint is not there (the step costs the same).

Prints a table, then one JSON line (also written to ``--json``):
  {"config", "devices", "platform", "jax", "matmul": {"gflops_per_s", "alone_gflops_per_s", ...},
   "tokenizer": {"batch", "step_s", "step_s_median", "examples_per_s", "gflop_per_step",
                 "gflops_per_s", "of_matmul", "params", "compile_s"}, "retriever": {...}}
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<dataset>.py[:args]",
                                          lock_config=False)
_JSON = flags.DEFINE_string("json", None, "also write the JSON line to this path")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed runs of each program")
_MATMUL = flags.DEFINE_integer("matmul_size", 1024, "R = K = N of the reference matmul")
_STAGES = flags.DEFINE_list("stages", ["tokenizer", "retriever"], "train steps to measure")
flags.mark_flags_as_required(["config"])


def block(tree):
  import jax
  return jax.block_until_ready(tree)


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
  """Wall times of each function over ``repeats`` interleaved runs (after two warm-up runs each)."""
  for f in fns.values():
    block(f())
    block(f())
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t = time.perf_counter()
      block(f())
      times[k].append(time.perf_counter() - t)
  return times


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def without_missing_clip(c):
  """The config with CLIP-initialized encoders built at random when the checkpoint is absent."""
  notes = []
  if c.tokenizer.encoder.init == "clip" and not os.path.exists(c.tokenizer.encoder.clip_path):
    c.tokenizer.encoder.init = "random"
    notes.append("tokenizer encoder: CLIP architecture, random weights (no clip_path)")
  if c.retriever.encoder_init == "clip" and not os.path.exists(c.retriever.encoder.clip_path):
    c.retriever.encoder_init = "random"
    notes.append("retriever encoder: CLIP architecture, random weights (no clip_path)")
  return notes


def dataset_sizes(c) -> tuple[int, int]:
  """(classes, database images) of the config's dataset, without reading it."""
  from irgen_jax.data import registry
  return registry.num_classes(c.data), registry.database_size(c.data)


def programs(c, mesh, rng) -> dict[str, dict[str, Any]]:
  """Per stage: a ``run()`` closure (one donated train step), the jitted step and its arguments."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from irgen_jax import parallel
  from irgen_jax.models import build
  from irgen_jax.trainers import train_retriever as retriever
  from irgen_jax.trainers import train_tokenizer as tokenizer

  num_classes, num_database = dataset_sizes(c)
  s = c.data.image_size
  out = {}
  for stage in _STAGES.value:
    b = c[stage].batch_size
    images = rng.normal(size=(b, s, s, 3)).astype(np.float32)
    if stage == "tokenizer":
      model = build.tokenizer(c, num_classes)
      tx = tokenizer.make_optimizer(c, total_steps=10_000)
      state = parallel.create_replicated(tokenizer.init_fn(model, tx, c), mesh)
      codebooks = rng.normal(scale=0.1, size=state["codebooks"].shape).astype(np.float32)
      state = dict(state, codebooks=parallel.replicate(codebooks, mesh))
      batch = {"image": images, "label": rng.integers(0, num_classes, b).astype(np.int32)}
      step, extra = tokenizer.make_train_step(model, tx, c), ()
    elif stage == "retriever":
      model = build.retriever(c)
      tx = retriever.make_optimizer(c, total_steps=10_000)
      state = parallel.create_replicated(retriever.init_fn(model, tx, c), mesh)
      codes = rng.integers(0, c.ids.codebook_size, (num_database, c.ids.length)).astype(np.int32)
      batch = {"image": images, "target_index": rng.integers(0, num_database, b).astype(np.int32)}
      step, extra = retriever.make_train_step(model, tx, c), (parallel.replicate(jnp.asarray(codes), mesh),)
    else:
      raise app.UsageError(f"--stages: unknown stage {stage!r}; expected tokenizer and/or retriever.")
    batch = parallel.global_batch_from_local(batch, mesh)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, *extra).compile()
    compile_s = time.perf_counter() - t0
    cell = {"state": state}

    def run(cell=cell, compiled=compiled, batch=batch, extra=extra):
      cell["state"], metrics = compiled(cell["state"], batch, *extra)
      return metrics["loss"]

    out[stage] = {"run": run, "batch": b, "params": params, "compile_s": compile_s,
                  "flops": xla_flops(compiled) * mesh.devices.size}
  return out


def matmul_program(mesh, n: int):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from irgen_jax import parallel
  d = mesh.devices.size
  rows = n * d  # n rows per device: the same work per device at any device count
  rng = np.random.default_rng(1)
  a = parallel.global_batch_from_local(rng.normal(size=(rows, n)).astype(np.float32), mesh)
  w = parallel.replicate(jnp.asarray(rng.normal(size=(n, n)).astype(np.float32)), mesh)
  compiled = jax.jit(lambda a, w: a @ w).lower(a, w).compile()
  return (lambda: compiled(a, w)), 2.0 * rows * n * n, xla_flops(compiled) * d


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax
  import numpy as np

  from irgen_jax import parallel

  c = _CONFIG.value
  notes = without_missing_clip(c)
  mesh = parallel.make_mesh()
  n_dev = mesh.devices.size
  for stage in _STAGES.value:
    parallel.check_batch_size(c[stage].batch_size, mesh, field=f"{stage}.batch_size")
  rng = np.random.default_rng(0)
  progs = programs(c, mesh, rng)
  mm_run, mm_flops, mm_xla_flops = matmul_program(mesh, _MATMUL.value)
  alone = min(interleaved_times({"matmul": mm_run}, _REPEATS.value)["matmul"])
  times = interleaved_times({"matmul": mm_run, **{k: v["run"] for k, v in progs.items()}},
                            _REPEATS.value)
  mm_s = min(times["matmul"])
  mm_rate = mm_flops / mm_s
  config_arg = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
  result = {"config": config_arg, "devices": n_dev, "platform": jax.devices()[0].platform,
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
            "compute_dtype": c.compute_dtype, "repeats": _REPEATS.value, "notes": notes,
            "matmul": {"size": _MATMUL.value, "rows": _MATMUL.value * n_dev, "step_s": mm_s,
                       "step_s_median": statistics.median(times["matmul"]),
                       "gflop": mm_flops / 1e9, "xla_gflop": mm_xla_flops / 1e9,
                       "gflops_per_s": mm_rate / 1e9,
                       "alone_gflops_per_s": mm_flops / alone / 1e9}}
  for stage, p in progs.items():
    best, median = min(times[stage]), statistics.median(times[stage])
    rate = p["flops"] / best
    result[stage] = {"batch": p["batch"], "step_s": best, "step_s_median": median,
                     "examples_per_s": p["batch"] / best, "gflop_per_step": p["flops"] / 1e9,
                     "gflops_per_s": rate / 1e9, "of_matmul": rate / mm_rate,
                     "params": p["params"], "compile_s": p["compile_s"]}

  print(f"\n{config_arg}: {n_dev} x {result['device_kind']} ({result['platform']}), jax "
        f"{jax.__version__}, compute {c.compute_dtype}, best of {_REPEATS.value} interleaved runs")
  for note in notes:
    print(f"  note: {note}")
  header = (f"{'program':<12}{'batch':>7}{'params':>13}{'step ms':>10}{'median':>9}{'examples/s':>12}"
            f"{'GFLOP/step':>12}{'GFLOP/s':>10}{'of matmul':>11}{'compile s':>11}")
  print(header)
  print("-" * len(header))
  for stage in progs:
    r = result[stage]
    print(f"{stage:<12}{r['batch']:>7}{r['params']:>13,}{r['step_s'] * 1e3:>10.2f}"
          f"{r['step_s_median'] * 1e3:>9.2f}{r['examples_per_s']:>12.1f}{r['gflop_per_step']:>12.3f}"
          f"{r['gflops_per_s']:>10.2f}{r['of_matmul']:>11.3f}{r['compile_s']:>11.1f}")
  m = result["matmul"]
  print(f"{'matmul f32':<12}{m['rows']:>7}{'':>13}{m['step_s'] * 1e3:>10.2f}{m['step_s_median'] * 1e3:>9.2f}"
        f"{'':>12}{m['gflop']:>12.3f}{m['gflops_per_s']:>10.2f}{1.0:>11.3f}")
  print(f"  (matmul: [{m['rows']}, {m['size']}] @ [{m['size']}, {m['size']}], XLA counts "
        f"{m['xla_gflop']:.3f} GFLOP; timed alone before the interleaved runs: "
        f"{m['alone_gflops_per_s']:.2f} GFLOP/s)")
  line = json.dumps(result)
  print(line)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  app.run(main)
