"""The main job's stages, run in order in one workdir; each is skipped when done and valid.

  data       prepare the dataset's array_record files (idempotent)
  tokenizer  train the semantic tokenizer, assign every database image its identifier, build the index
             (or, with ``tokenizer.reuse_from``, take another run's trained tokenizer)
  retriever  train the encoder-decoder on same-class pairs
  evaluate   beam search over the queries, baselines on the same features, the report

A stage is done when its marker is valid (``Workdir.done_problem``: its outputs are what it wrote, its
inputs what it read); an invalid one runs again, resuming from its last checkpoint. ``run`` is the
body of ``python -m irgen_jax.main``; ``insert --evaluate`` runs the evaluate stage through it too.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Any, Sequence

import jax
import ml_collections

from irgen_jax import config_lib, parallel
from irgen_jax.data import registry
from irgen_jax.errors import ConfigError
from irgen_jax.workdir import CONFIG, IDENTIFIERS, RETRIEVER_PARAMS, TOKENIZER_PARAMS, Workdir

log = logging.getLogger(__name__)

ORDER = config_lib.STAGES


def run(config: ml_collections.ConfigDict, workdir: str | Workdir,
        stages: Sequence[str] | None = None) -> None:
  """Runs ``stages`` (default: the config's) in ``workdir``, validating everything first."""
  wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
  names = list(stages) if stages is not None else config_lib.stages(config)
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count(),
                      dataset_names=registry.names())
  check_inputs(config, wd, names)
  os.makedirs(wd.root, exist_ok=True)
  wd.record_config(config)
  mesh = parallel.make_mesh()
  log.info("%d process(es), %d device(s): %s", jax.process_count(), jax.device_count(),
           jax.devices()[0].platform)
  for stage in [s for s in ORDER if s in names]:
    problem = wd.done_problem(stage)
    if problem is None:
      log.info("Stage %s: already done (%s).", stage, wd.done_marker(stage))
      continue
    if os.path.exists(wd.done_marker(stage)):
      log.warning("Stage %s: marked done, but %s; running it again.", stage, problem)
    log.info("Stage %s: starting.", stage)
    t0 = time.perf_counter()
    info = _stage_fn(stage)(config, wd, mesh) or {}
    wall = time.perf_counter() - t0
    parallel.sync(f"stage {stage} outputs written")
    wd.mark_done(stage, {"wall_s": wall, **info})
    parallel.sync(f"stage {stage} done")  # nobody starts the next stage before its inputs exist
    log.info("Stage %s: done in %.1f s.", stage, wall)


def check_inputs(c: ml_collections.ConfigDict, wd: Workdir, names: Sequence[str]) -> None:
  """Each stage to run starts from files of earlier stages: in this run or done in ``wd``."""
  run_now = set(names)

  def need(stage: str, what: str, field: str, value: Any, advice: str = "") -> None:
    if stage in run_now or wd.is_done(stage):
      return
    raise ConfigError(
        f"config.{field}={value!r}: expected {what} from a finished {stage} stage in {wd.root}, "
        f"whose {stage} stage is not done ({wd.done_problem(stage)}); run the {stage} stage "
        f"first{advice}.")

  if "retriever" in run_now:
    if c.retriever.encoder_init == "tokenizer":
      need("tokenizer", f"the trained tokenizer's encoder ({TOKENIZER_PARAMS})",
           "retriever.encoder_init", c.retriever.encoder_init,
           " or set retriever.encoder_init to 'clip' or 'random'")
    need("tokenizer", f"the identifiers the retriever learns ({IDENTIFIERS})", "stages", c.stages)
  if "evaluate" in run_now:
    need("retriever", f"the trained retriever ({RETRIEVER_PARAMS})", "stages", c.stages)
    need("tokenizer", "the identifiers and features of the database", "stages", c.stages)
  for stage in ("tokenizer", "retriever"):
    reuse = c[stage].get("reuse_from", "")
    if reuse and stage in run_now and not wd.is_done(stage):
      other = Workdir(reuse)
      if not other.is_done(stage):
        raise ConfigError(f"config.{stage}.reuse_from={reuse!r}: expected the workdir of a run whose "
                          f"{stage} stage finished ({other.done_problem(stage)}).")
      if stage == "retriever":
        config_lib.check_retriever_reuse(c, other.root, other.path(CONFIG))


# ---------------------------------------------------------------------------------------------------
# The stages


def _data(config, wd: Workdir, mesh):
  del wd, mesh
  # Process 0 builds first; then the others find the files when data_dir is shared (a bucket) or
  # build their own copy when it is a host's disk. Never two writers in one folder.
  info = registry.prepare_from_config(config.data) if jax.process_index() == 0 else None
  parallel.sync("data prepared by process 0")
  return info if info is not None else registry.prepare_from_config(config.data)


# The stages' functions ``(config, workdir, mesh) -> info``; named by module so that running one stage
# imports only its own code (``insert --evaluate`` never loads the trainers, nor optax).
_STAGES = {"data": _data, "tokenizer": "irgen_jax.trainers.train_tokenizer:stage",
           "retriever": "irgen_jax.trainers.train_retriever:stage", "evaluate": "irgen_jax.evaluate:run"}


def _stage_fn(stage: str):
  fn = _STAGES[stage]
  if isinstance(fn, str):
    module, _, name = fn.partition(":")
    fn = getattr(importlib.import_module(module), name)
  return fn
