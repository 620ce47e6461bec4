"""IRGen on ImageNet-1k at the paper's million scale (Table 5): train = database (1.28M images),
5,000 fixed validation images = queries, 24-block decoder. Manual download (see the registry's error).

`:runlocal` uses generated stand-in data.
"""

from irgen_jax import config_lib, sweeps


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, seed=0)
  c = config_lib.base_config()
  c.seed = arg.seed
  c.data.name = "imagenet2012"
  c.retriever.decoder.depth = 24
  c.tokenizer.num_epochs = 20.0
  c.retriever.num_epochs = 20.0
  c.eval.update(ks=(1, 10, 20, 30, 100), ivf_nlist=4096)
  c.checkpoint.every_steps = 2000
  if arg.runlocal:
    config_lib.runlocal_sizes(c)
    c.data.update(name="synthetic", image_size=32, resize_size=36,
                  synthetic=dict(num_classes=20, image_shape=(188, 250, 3), num_database=512,
                                 num_queries=32))
    c.eval.update(ks=(1, 10, 20, 30))
  return c


def get_sweeps(arg=None):
  """Sweeps of this config (``python launch/sweep.py --sweep=NAME``): ``seeds`` (3 seeds), ``ids_kind``
  (Table 3), ``ids_length`` (Table 4)."""
  return sweeps.standard(get_config(arg))
