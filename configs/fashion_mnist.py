"""IRGen on the embedded Fashion-MNIST (Debian package dataset-fashion-mnist): the README's default.

  python -m irgen_jax.main --config=configs/fashion_mnist.py --workdir=workdirs/fashion_mnist
  python -m irgen_jax.main --config=configs/fashion_mnist.py:runlocal --workdir=/tmp/fm

database = the 60,000 training images, queries = the 10,000 test images, positives = same class.
Sizes are chosen so the whole job runs on a 2-core CPU in about 20 minutes.
"""

import ml_collections

from irgen_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, seed=0)
  c = ml_collections.ConfigDict()
  c.seed = arg.seed
  # Stages run in this order; a finished stage is skipped on re-runs.
  c.stages = "data,tokenizer,retriever,evaluate"
  c.compute_dtype = "float32"   # "bfloat16" on TPU/GPU

  c.data = dict(
      name="fashion_mnist",
      data_dir="",          # TFDS data dir; "" = ~/tensorflow_datasets (or $TFDS_DATA_DIR)
      manual_dir="",        # for datasets that are downloaded by hand
      image_size=28,        # model input (square)
      resize_size=28,       # eval: resize the shorter side, then center-crop image_size
      crop_scale=(0.7, 1.0),  # train: random resized crop area fraction
      flip=True,            # train: random horizontal flip
      num_workers=0,        # grain worker processes (0 = in-process)
      skip_corrupt=False,   # folder datasets: skip unreadable images instead of failing
      max_database=0,       # >0: use only the first N database images (smoke tests)
      max_queries=0,        # >0: use only the first N queries
  )

  # Identifiers: M tokens in [0, L). kind: "semantic" (the paper's tokenizer), "random",
  # "hkm" (hierarchical k-means over the tokenizer's features with hkm_clusters per level).
  c.ids = dict(kind="semantic", length=4, codebook_size=256, hkm_clusters=100)

  encoder = dict(variant="", width=128, depth=4, num_heads=4, patch_size=4, mlp_ratio=4.0,
                 act="gelu", init="random", clip_path="")
  c.tokenizer = dict(
      encoder=encoder,
      proj_dim=0,             # >0: FC projection of f_cls to this width before quantization
      shared_head=True,       # one classifier for every prefix reconstruction (the reference)
      lambda1=1.0,            # weight of the prefix-reconstruction classification losses
      lambda2=0.1,            # weight of the residual (commitment) terms
      batch_size=256,
      num_epochs=4.0,
      lr=1e-3, encoder_lr_mult=1.0, warmup_steps=200, weight_decay=0.05, b1=0.9, b2=0.96,
      grad_clip=1.0,
      refit_every_epochs=1,   # k-means refit of the codebooks between epochs
      kmeans_iters=20, kmeans_init="kmeans++",
  )

  c.retriever = dict(
      encoder_init="tokenizer",  # "tokenizer" | "clip" | "random"
      encoder=encoder,           # used when encoder_init is "clip" or "random"
      decoder=dict(depth=3, width=128, num_heads=4, mlp_ratio=4.0),
      batch_size=256,
      num_epochs=3.0,
      lr=1e-3, encoder_lr_mult=0.1, warmup_steps=200, weight_decay=0.05, b1=0.9, b2=0.96,
      grad_clip=1.0,
      label_smoothing=0.1,
      targets="class",           # "class": a uniformly random same-class image (the paper)
                                 # "neighbors": one of num_neighbors nearest same-class images
      num_neighbors=0,
  )

  c.search = dict(beam_size=30, query_batch_size=256)

  c.eval = dict(
      ks=(1, 2, 4, 8, 10, 20, 30),
      map_at=100,
      baselines=("linear_scan", "faiss_ivfpq", "scann"),
      ivf_nlist=100, pq_subspaces=4, pq_bits=8,
      extra_encoder="",          # e.g. a CLIP checkpoint path: baselines also over its features
      agreement_queries=500,     # queries on which beam results are compared with exhaustive scoring
      gallery_queries=12,
  )

  c.checkpoint = dict(every_steps=500, keep=2)
  c.log_every_steps = 50

  if arg.runlocal:
    c.data.max_database = 512
    c.data.max_queries = 64
    c.ids.codebook_size = 16
    c.tokenizer.encoder.update(width=32, depth=1, num_heads=2, patch_size=7)
    c.tokenizer.update(batch_size=64, num_epochs=2.0, warmup_steps=2, kmeans_iters=5)
    c.retriever.encoder.update(width=32, depth=1, num_heads=2, patch_size=7)
    c.retriever.decoder.update(depth=1, width=32, num_heads=2)
    c.retriever.update(batch_size=64, num_epochs=2.0, warmup_steps=2)
    c.search.beam_size = 8
    c.eval.update(ks=(1, 2, 4, 8), ivf_nlist=8, agreement_queries=16, gallery_queries=4)
    c.checkpoint.every_steps = 4
    c.log_every_steps = 2
  return c
