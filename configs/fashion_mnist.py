"""IRGen on the embedded Fashion-MNIST (Debian package dataset-fashion-mnist): the README's default.

  python -m irgen_jax.main --config=configs/fashion_mnist.py --workdir=workdirs/fashion_mnist
  python -m irgen_jax.main --config=configs/fashion_mnist.py:runlocal --workdir=/tmp/fm

database = the 60,000 training images, queries = the 10,000 test images, positives = same class.
Sizes are chosen so the whole job runs on a 2-core CPU (12.5 to 25 minutes measured, by machine and
load; README): a small ViT trained from scratch on 28x28 inputs (no CLIP: Fashion-MNIST is far from
CLIP's images and a 2-core CPU cannot run ViT-B), a 3-block decoder over the frozen stage-1 encoder.
"""

from irgen_jax import config_lib, sweeps


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, seed=0)
  c = config_lib.base_config()
  c.seed = arg.seed
  c.compute_dtype = "float32"
  # No random crops (flips only): a model this small underfits Fashion-MNIST in four epochs, and crops
  # made it worse (measured: 80% vs 89% train accuracy, 81% vs 88% query accuracy of the class head,
  # together with lr 1e-3 -> 2e-3).
  c.data.update(name="fashion_mnist", image_size=28, resize_size=28, crop_scale=(1.0, 1.0))

  encoder = dict(variant="", width=128, depth=4, num_heads=4, patch_size=7, act="gelu",
                 init="random")
  c.tokenizer.encoder.update(encoder)
  c.tokenizer.update(batch_size=256, num_epochs=4.0, lr=2e-3, encoder_lr_mult=1.0,
                     warmup_steps=200, grad_clip=1.0, lambda1=1.0, lambda2=0.1,
                     refit_max_images=20000, first_refit_steps=200)
  # The first codebook fit at the end of warm-up, not on the random network's features: those codebooks
  # are left behind within the epoch and pulled the features toward stale codewords (the RQ loss rose
  # to ~540 by step 150). Measured, seed 0: P@10 87.6 vs the scan's 85.4 (before: 85.9 vs 84.0).
  c.retriever.encoder.update(encoder)
  # The retriever keeps the stage-1 encoder frozen: it was trained on these very images for their
  # classes, and freezing skips its backward pass (the retriever step costs half: 15 vs 30 GFLOP).
  # lr 2e-3 (was 1e-3), over each of 3 seeds' same trained tokenizer: P@10 +0.27, -0.01, +0.56, P@1
  # +0.46, +0.07, +0.31, MAP@100 +0.27, +0.27, +0.21, R@10 -0.12, -0.25, -0.08 points (README).
  c.retriever.update(encoder_init="tokenizer", batch_size=256, num_epochs=3.0, lr=2e-3,
                     encoder_lr_mult=0.0, warmup_steps=200, grad_clip=1.0)
  c.retriever.decoder.update(depth=3, width=128, num_heads=4)
  # RQ-VAE identifiers (the ids_kind sweep's last row): a 4x4 map of the 28x28 images (resized to 32),
  # depth 4: 64 tokens of one shared codebook of 256; one epoch (468 steps). Its latents are
  # layer-normalized (the base default): without that, one epoch collapsed after ~350 steps, twice.
  c.ids.rqvae.update(latent_size=4, depth=4, latent_dim=64, channels=(32, 64, 128), batch_size=128,
                     num_epochs=1.0, warmup_steps=100)
  # IRGen's list class first, within the likeliest class's prefixes at every level down to the
  # identifier (class_levels=-1), with one place (the 10th) for the runner-up class where the
  # retriever gives it >= 0.2 (decoding/hedge.py). The same 3 trained seeds, P@10 - scan / R@10 - scan:
  # every level +2.48 / -4.31, +2.46 / -4.40, +2.46 / -4.14; two levels +2.32 / -4.37, +2.19 / -4.37,
  # +1.49 / -3.94 (seed 2's lists held other classes' images under the class's two-token prefixes).
  # README, "Class first, and a hedge".
  c.search.update(beam_size=30, query_batch_size=256, class_first=True, class_levels=-1)
  c.search.hedge.update(slots=1, at=10, threshold=0.2, beam_size=10)
  # On CPUs, YNNPACK takes only the matmuls and XLA fuses the rest itself: YNNPACK's own fusions of this
  # width-128 decoder's LayerNorms into the matmul after each ran at 25-70 GFLOP/s against ~190 for a
  # bare matmul. Search queries/s +18% side by side, every metric of the run the same
  # (benchmarks/search_options.py); no gain at the cpu and paper presets' widths (256, 768).
  c.search.xla_cpu_options = {
      "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
  c.eval.update(ks=(1, 2, 4, 8, 10, 20, 30), ivf_nlist=100)
  c.checkpoint.every_steps = 500

  if arg.runlocal:
    config_lib.runlocal_sizes(c)
    c.data.update(max_database=512, max_queries=64)
    c.tokenizer.encoder.patch_size = 7  # 28x28 inputs: runlocal_sizes' patch 8 does not divide them
    c.retriever.encoder.patch_size = 7
  return c


def get_sweeps(arg=None):
  """Sweeps of this config (``python launch/sweep.py --sweep=NAME``): the shared ones (``seeds``: 3
  seeds; ``ids_kind``: Table 3; ``ids_length``: Table 4) and ``beam_size`` (does a wider beam help?
  The wider beam's point reuses the other's trained stages: one training, two searches)."""
  c = get_config(arg)
  b = c.search.beam_size
  return {**sweeps.standard(c), "beam_size": sweeps.evaluate_only("search.beam_size", [b, 2 * b])}
