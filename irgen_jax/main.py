"""The main job: images to a retrieval report, one stage after another (``irgen_jax.stages``).

  python -m irgen_jax.main --config=configs/fashion_mnist.py --workdir=workdirs/fashion_mnist
  python -m irgen_jax.main --config=configs/inshop.py:runlocal --workdir=/tmp/inshop \
      --config.stages=tokenizer,retriever
  python -m irgen_jax.main --workdir=workdirs/fashion_mnist     # continue a run with its own config

A stage that finished writes ``WORKDIR/<stage>/done.json`` and is skipped on re-runs while what it
wrote is intact; an interrupted stage resumes from its latest checkpoint. SIGTERM (preemption) saves
and exits with status 0. A mistake in the input (config value, flag, data) is one line, exit status 2.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from irgen_jax import cli, parallel, stages
from irgen_jax.errors import UserError
from irgen_jax.trainers import loop
from irgen_jax.workdir import CONFIG, Workdir

_CONFIG = _WORKDIR = None  # the command's flags, defined when it runs (importing this module defines none)


def _define_flags():
  global _CONFIG, _WORKDIR
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "A config file from configs/ (default: the workdir's config.json, to continue "
      "a run).", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (created if missing).")
  flags.mark_flags_as_required(["workdir"])


def run(config, workdir: str) -> None:
  """Runs the config's stages in ``workdir`` (the body of the command, callable from tests)."""
  stages.run(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --config=... and "
                    "--workdir=...).")
  config = _CONFIG.value
  if config is None:
    if not os.path.exists(os.path.join(_WORKDIR.value, CONFIG)):
      raise UserError(f"--config is needed: {_WORKDIR.value} holds no {CONFIG} of an earlier run to "
                      "continue.")
    config = Workdir(_WORKDIR.value).load_config()
  parallel.maybe_initialize_distributed()
  try:
    run(config, _WORKDIR.value)
  except loop.Preempted as e:
    logging.warning("%s Re-run the same command to continue.", e)
    sys.exit(0)


if __name__ == "__main__":
  _define_flags()
  cli.run(main, config_flag="config")
