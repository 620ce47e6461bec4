"""The main job: images to a retrieval report, one stage after another.

  python -m irgen_jax.main --config=configs/fashion_mnist.py --workdir=workdirs/fashion_mnist
  python -m irgen_jax.main --config=configs/inshop.py:runlocal --workdir=/tmp/inshop \
      --config.stages=tokenizer,retriever

Stages (``config.stages``, run in this order):
  data       prepare the dataset's array_record files (idempotent)
  tokenizer  train the semantic tokenizer, assign every database image its identifier, build the index
  retriever  train the encoder-decoder on same-class pairs
  evaluate   beam search over the queries, baselines on the same features, the report

A stage that finished writes ``WORKDIR/<stage>/done.json`` and is skipped on re-runs; an interrupted
stage resumes from its latest checkpoint. SIGTERM (preemption) saves and exits with status 0.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = _WORKDIR = None  # the command's flags, defined when it runs (importing this module defines none)


def _define_flags():
  global _CONFIG, _WORKDIR
  _CONFIG = config_flags.DEFINE_config_file("config", None, "A config file from configs/.",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (created if missing).")
  flags.mark_flags_as_required(["config", "workdir"])


def stage_done_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "done.json")


def is_done(workdir: str, stage: str) -> bool:
  return os.path.exists(stage_done_path(workdir, stage))


def mark_done(workdir: str, stage: str, info: dict) -> None:
  import jax
  if jax.process_index() != 0:
    return
  path = stage_done_path(workdir, stage)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(info, f, indent=1)
  os.replace(path + ".tmp", path)


def _record_config(config, workdir: str) -> None:
  """Writes config.json; on a re-run warns about fields that changed since the first run."""
  import jax
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    changed = sorted(k for k in _flatten(current).keys() | _flatten(previous).keys()
                     if k != "stages" and _flatten(current).get(k) != _flatten(previous).get(k))
    if changed:
      logging.warning("The config differs from the one %s was started with, in: %s. Finished stages "
                      "are not redone; delete WORKDIR/<stage>/done.json to redo one.", workdir,
                      ", ".join(changed))
    return
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      json.dump(current, f, indent=1)
    os.replace(path + ".tmp", path)


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def run(config, workdir: str) -> None:
  """Runs the config's stages in ``workdir`` (the body of the command, callable from tests)."""
  import jax

  from irgen_jax import config_lib, parallel
  from irgen_jax.data import registry

  config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count(),
                      dataset_names=registry.names(), workdir=workdir)
  reuse = config.tokenizer.get("reuse_from", "")
  if reuse and "tokenizer" in config_lib.stages(config) and not is_done(workdir, "tokenizer") \
      and not os.path.isdir(os.path.join(reuse, "tokenizer", "params")):
    raise ValueError(f"config.tokenizer.reuse_from={reuse!r}: expected the workdir of a run whose "
                     "tokenizer stage finished (it has tokenizer/params).")
  os.makedirs(workdir, exist_ok=True)
  _record_config(config, workdir)
  mesh = parallel.make_mesh()
  logging.info("%d process(es), %d device(s): %s", jax.process_count(), jax.device_count(),
               jax.devices()[0].platform)

  for stage in config_lib.stages(config):
    if is_done(workdir, stage):
      logging.info("Stage %s: already done (%s).", stage, stage_done_path(workdir, stage))
      continue
    logging.info("Stage %s: starting.", stage)
    t0 = time.perf_counter()
    info = _STAGES[stage](config, workdir, mesh) or {}
    wall = time.perf_counter() - t0
    mark_done(workdir, stage, {"wall_s": wall, **info})
    parallel.sync(f"stage {stage} done")  # nobody starts the next stage before its inputs exist
    logging.info("Stage %s: done in %.1f s.", stage, wall)


def _data(config, workdir, mesh):
  del workdir, mesh
  import jax

  from irgen_jax import parallel
  from irgen_jax.trainers import common
  # Process 0 builds first; then the others find the files when data_dir is shared (a bucket) or
  # build their own copy when it is a host's disk. Never two writers in one folder.
  info = common.prepare_dataset(config.data) if jax.process_index() == 0 else None
  parallel.sync("data prepared by process 0")
  return info if info is not None else common.prepare_dataset(config.data)


def _tokenizer(config, workdir, mesh):
  from irgen_jax.trainers import tokenizer
  if config.tokenizer.get("reuse_from", ""):
    return _reuse_tokenizer(config, workdir, mesh)
  return tokenizer.run(config, workdir, mesh)


# What another run's tokenizer must share with this run to stand in for its own: the architecture (an
# error otherwise) and, to mean the same thing, the data (a warning otherwise). The identifiers' own
# settings (ids.kind, codebook_size, hkm_clusters) may differ: that is the point of reusing it.
_REUSE_ARCHITECTURE = ("tokenizer.encoder.", "tokenizer.proj_dim", "tokenizer.shared_head",
                       "data.image_size", "ids.length")
_REUSE_DATA = ("data.name", "data.resize_size", "data.max_database", "data.indexed_fraction",
               "data.manual_dir", "data.synthetic.")


def _reuse_tokenizer(config, workdir, mesh):
  """The tokenizer stage without training: ``tokenizer.reuse_from``'s trained tokenizer, then this
  run's identifiers, index and files exactly as the stage writes them (``tokenizer.finalize``)."""
  from irgen_jax.trainers import common, tokenizer
  source = config.tokenizer.reuse_from
  with open(os.path.join(source, "config.json")) as f:
    theirs = _flatten(json.load(f))
  ours = _flatten(json.loads(config.to_json_best_effort()))
  from irgen_jax import config_lib
  # A field the other run's config.json lacks (written before the field existed) had its default.
  theirs = {**_flatten(json.loads(config_lib.base_config().to_json_best_effort())), **theirs}

  def differing(prefixes):
    return [f"{k}={theirs.get(k)!r} (here {ours[k]!r})" for k in sorted(ours)
            if k.startswith(prefixes) and theirs.get(k) != ours[k]]
  if differing(_REUSE_ARCHITECTURE):
    raise ValueError(f"config.tokenizer.reuse_from={source!r}: its tokenizer has another architecture: "
                     + ", ".join(differing(_REUSE_ARCHITECTURE)) + ".")
  if differing(_REUSE_DATA):
    logging.warning("config.tokenizer.reuse_from=%s was trained on other data: %s.", source,
                    ", ".join(differing(_REUSE_DATA)))
  ds = common.load_dataset(config.data)
  model, params = tokenizer.load_params(config, source, ds.num_classes)
  logging.info("Tokenizer: reusing the trained tokenizer of %s (no training).", source)
  stats = tokenizer.finalize(config, workdir, mesh, model, params, ds)
  return {**stats, "reused_from": os.path.abspath(source)}


def _retriever(config, workdir, mesh):
  from irgen_jax.trainers import retriever
  return retriever.run(config, workdir, mesh)


def _evaluate(config, workdir, mesh):
  from irgen_jax import evaluate
  return evaluate.run(config, workdir, mesh)


_STAGES = {"data": _data, "tokenizer": _tokenizer, "retriever": _retriever, "evaluate": _evaluate}


class _QuietLibraries(std_logging.Filter):
  """Keeps the libraries' INFO chatter (orbax logs every save step by step) out of the run's log."""
  _NOISY = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/jax/_src/")

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(p in record.pathname
                                                            for p in self._NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from irgen_jax import parallel
  parallel.maybe_initialize_distributed()
  from irgen_jax.trainers import loop
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except loop.Preempted as e:
    logging.warning("%s Re-run the same command to continue.", e)
    sys.exit(0)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
