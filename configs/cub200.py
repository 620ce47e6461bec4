"""IRGen on CUB-200-2011 (TFDS caltech_birds2011: train split = database, test split = queries).

  python -m irgen_jax.main --config=configs/cub200.py \
      --config.tokenizer.encoder.clip_path=/ckpt/ViT-B-16.pt --workdir=workdirs/cub200

Preparing the TFDS data needs TensorFlow once (see README). `:runlocal` uses generated stand-in data.
"""

from irgen_jax import config_lib, sweeps


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, seed=0)
  c = config_lib.base_config()
  c.seed = arg.seed
  c.data.name = "cub200"
  c.eval.update(ks=(1, 2, 4, 8), ivf_nlist=100)
  if arg.runlocal:
    config_lib.runlocal_sizes(c)
    c.data.update(name="synthetic", image_size=32, resize_size=36,
                  synthetic=dict(num_classes=20, image_shape=(188, 250, 3), num_database=256,
                                 num_queries=32))
  return c


def get_sweeps(arg=None):
  """Sweeps of this config (``python launch/sweep.py --sweep=NAME``): ``seeds`` (3 seeds), ``ids_kind``
  (Table 3), ``ids_length`` (Table 4)."""
  return sweeps.standard(get_config(arg))
