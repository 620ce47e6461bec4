"""IRGen on your own folder of images (the ``folder`` dataset), sized for small images on a CPU.

  python -m irgen_jax.main --config=configs/folder.py:data_dir=/data/my_images --workdir=workdirs/mine

ROOT (``data_dir=``) holds ``ROOT/database/<class>/<image>`` (searched) and ``ROOT/query/<class>/<image>``
(queries; positives = database images of the same class); any format PIL reads, any size and mode (see
irgen_jax/data/folder.py). The prepared copy goes to the TFDS data dir (``--config.data.data_dir``,
default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``) and is rebuilt when the folder changes.

Sizes: images resized to ``resize`` (shorter side) and center-cropped to ``image_size`` (32) pixels, a
small ViT trained from scratch (4 blocks, width 128, a 4x4 grid of patches: no CLIP checkpoint needed), a
3-block decoder over the frozen stage-1 encoder, M=4 identifiers of L=256 tokens: the Fashion-MNIST
default's recipe (lr 2e-3 in both stages, the retriever's encoder frozen, the search class first with a
hedge) with the first codebook fit after a quarter of the steps and about four fits in all, and random
crops of 60-100% of the area, which small folders need
(measured on 8,000 Fashion-MNIST test images: README, "Your own folder of images"). Both stages train
for about ``steps`` steps whatever the folder's size (epochs = steps x batch / images), in batches of
``batch_size`` capped at the largest power of two <= the number of database images, so a folder of a
few dozen images runs too. For photos and a GPU/TPU, override (e.g.
``image_size=224,steps=20000`` and ``--config.tokenizer.encoder.*``) or start from a paper config.
Arguments: ``data_dir`` (required), ``image_size``, ``resize`` (0 = image_size x 8/7), ``batch_size``,
``steps``, ``seed``, ``runlocal`` (tiny models, at most 20 steps: a smoke test).
"""

import os

from irgen_jax import config_lib, sweeps

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                     ".pbm")  # = irgen_jax.data.images.IMAGE_EXTENSIONS (kept import-light here)


def _count_images(directory: str) -> int:
  n = 0
  for _, dirnames, filenames in os.walk(directory):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    n += sum(1 for f in filenames
             if not f.startswith(".") and os.path.splitext(f)[1].lower() in _IMAGE_EXTENSIONS)
  return n


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data_dir="", image_size=32, resize=0, batch_size=256, steps=600,
                             seed=0, runlocal=False)
  if not arg.data_dir:
    raise config_lib.ConfigError(
        "configs/folder.py needs the folder: --config=configs/folder.py:data_dir=ROOT "
        "(ROOT/database/<class>/<image>, ROOT/query/<class>/<image>).")
  root = os.path.abspath(os.path.expanduser(arg.data_dir))
  c = config_lib.base_config()
  c.seed = arg.seed
  c.compute_dtype = "float32"
  resize = arg.resize or round(arg.image_size * 8 / 7)
  # Random crops of 60-100% of the area: on 8,000 Fashion-MNIST test images the class head reached 80%
  # on the queries with them, 61% without (it overfits a small folder; on the 60,000 images of the
  # Fashion-MNIST default, crops made it underfit instead).
  c.data.update(name="folder", manual_dir=root, image_size=arg.image_size, resize_size=resize,
                crop_scale=(0.6, 1.0))

  # The batch must fit the database (an epoch is whole batches); the step budget sets the epochs.
  num_database = _count_images(os.path.join(root, "database"))  # 0 if missing: the data stage says so
  batch = arg.batch_size
  if num_database:
    batch = min(batch, 1 << (num_database.bit_length() - 1))
  steps = min(arg.steps, 20) if arg.runlocal else arg.steps
  epochs = max(1.0, steps * batch / max(num_database, 1))
  warmup = max(1, steps // 10)

  # A 4x4 grid of patches (16 tokens, as Fashion-MNIST's 28 / 7): 64 tokens cost ~4x for little gain.
  encoder = dict(variant="", width=128, depth=4, num_heads=4, patch_size=max(2, arg.image_size // 4),
                 act="gelu", init="random")
  c.tokenizer.encoder.update(encoder)
  # The first codebook fit after a quarter of the steps and about four fits in all, whatever the
  # folder's size. Fit at the end of the 10% warm-up and then every epoch (every 5 to 31 steps on the
  # folders of benchmarks/folder_datasets.py), the classifier's CE rose from 1.6 to 3-7 and took
  # hundreds of steps to recover (report/tokenizer_curves.png); on 4,000 MNIST digits the head ended at
  # 45% of the queries. README, "Your own folder of images".
  first_fit = max(warmup, steps // 4)
  c.tokenizer.update(batch_size=batch, num_epochs=epochs, lr=2e-3, encoder_lr_mult=1.0,
                     warmup_steps=warmup, first_refit_steps=first_fit,
                     refit_every_epochs=max(1, round(0.2 * epochs)), grad_clip=1.0, lambda1=1.0,
                     lambda2=0.1, kmeans_iters=10, refit_max_images=20000)
  c.retriever.encoder.update(encoder)
  # The retriever keeps the stage-1 encoder frozen: trained on these images for their classes (at
  # 0.1x it ended below its own tokenizer's classifier), and no backward pass through it. lr 2e-3 as
  # the Fashion-MNIST default's.
  c.retriever.update(encoder_init="tokenizer", batch_size=batch, num_epochs=epochs, lr=2e-3,
                     encoder_lr_mult=0.0, warmup_steps=warmup, grad_clip=1.0)
  c.retriever.decoder.update(depth=3, width=128, num_heads=4)
  # Class first at every level, one place (the 10th) for the runner-up class at posterior >= 0.15
  # (decoding/hedge.py). Chosen by a sweep of 0.1-0.25 over the three folders of
  # benchmarks/folder_datasets.py, 3 seeds each (benchmarks/list_policies.py over the same trained
  # runs; the table: README, "Your own folder of images"): P@10 above the scan and R@10 within 5 points
  # of it on 6 of the 9 runs, against 5 at the Fashion default's 0.2 and 4 at 0.1. No threshold keeps
  # fashion_test's recall within 5 on every seed: its retriever decides the class right on 79% of the
  # queries, and one hedged place reaches only the runner-up class.
  c.search.update(beam_size=30, query_batch_size=256, class_first=True, class_levels=-1)
  c.search.hedge.update(slots=1, at=10, threshold=0.15, beam_size=10)
  c.eval.update(ks=(1, 2, 4, 8, 10, 20, 30), ivf_nlist=100)
  c.checkpoint.every_steps = 200
  c.log_every_steps = 20

  if arg.runlocal:
    tiny = dict(width=32, depth=1, num_heads=2)
    c.tokenizer.encoder.update(tiny)
    c.retriever.encoder.update(tiny)
    c.retriever.decoder.update(depth=1, width=32, num_heads=2)
    c.ids.codebook_size = 16
    c.search.update(beam_size=8, query_batch_size=32)
    c.eval.update(gallery_queries=4)
    c.checkpoint.every_steps = 4
    c.log_every_steps = 2
  return c


def get_sweeps(arg=None):
  """Sweeps of this config (``python launch/sweep.py --sweep=NAME``): ``seeds`` (3 seeds), ``ids_kind``
  (Table 3), ``ids_length`` (Table 4)."""
  return sweeps.standard(get_config(arg))
