"""The paper's Table 6 protocol (fresh data) on the embedded Fashion-MNIST.

Train the tokenizer and the retriever on half of the database and index only that half, then insert the
other half without retraining and evaluate over the whole database:

  python -m irgen_jax.main --config=configs/fashion_mnist_fresh.py --workdir=workdirs/fashion_mnist_fresh
  python -m irgen_jax.insert --workdir=workdirs/fashion_mnist_fresh --held_out --evaluate

The first command's report covers the indexed half; the second replaces it by the report over all
60,000 database images (IRGen and the baselines, over the same half-trained tokenizer's features).
Compare with configs/fashion_mnist.py (trained on the whole database). The half is fixed and class-
stratified (``registry.indexed_split``), whatever the seed. Arguments are configs/fashion_mnist.py's
(``runlocal``, ``seed``) plus ``fraction`` (default 0.5).
"""

import importlib.util
import os

from irgen_jax import config_lib, sweeps


def _base():
  """configs/fashion_mnist.py, loaded by path (configs/ is a folder of files, not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist.py")
  spec = importlib.util.spec_from_file_location("_irgen_config_fashion_mnist", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, seed=0, fraction=0.5)
  c = _base().get_config(f"runlocal={arg.runlocal},seed={arg.seed}")
  c.data.indexed_fraction = arg.fraction
  return c


def get_sweeps(arg=None):
  """Sweeps of this config (``python launch/sweep.py --sweep=NAME``): ``seeds`` (3 seeds), ``ids_kind``
  (Table 3), ``ids_length`` (Table 4)."""
  return sweeps.standard(get_config(arg))
