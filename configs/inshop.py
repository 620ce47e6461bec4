"""IRGen on DeepFashion In-shop Clothes Retrieval, the paper's settings (Tables 1-4).

  python -m irgen_jax.main --config=configs/inshop.py \
      --config.data.manual_dir=/data/inshop --config.tokenizer.encoder.clip_path=/ckpt/ViT-B-16.pt \
      --workdir=gs://bucket/irgen/inshop

Query split vs gallery (database); positives share the item id. Trained on train + gallery as the paper.
`:runlocal` runs the same code on generated stand-in data (20 classes, 128x128 RGB) on a CPU.
"""

from irgen_jax import config_lib, sweeps


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, seed=0)
  c = config_lib.base_config()
  c.seed = arg.seed
  c.data.name = "inshop"
  c.retriever.encoder_init = "clip"
  c.eval.update(ks=(1, 10, 20, 30), ivf_nlist=300)
  if arg.runlocal:
    config_lib.runlocal_sizes(c)
    c.data.update(name="synthetic", image_size=32, resize_size=36,
                  synthetic=dict(num_classes=20, image_shape=(128, 128, 3), num_database=256,
                                 num_queries=32))
    c.eval.update(ks=(1, 10, 20, 30))
  return c


def get_sweeps(arg=None):
  """Sweeps of this config (``python launch/sweep.py --sweep=NAME``): ``seeds`` (3 seeds), ``ids_kind``
  (Table 3), ``ids_length`` (Table 4)."""
  return sweeps.standard(get_config(arg))
