"""RQ-VAE identifiers (``ids.kind="rqvae"``): train an RQ-VAE on the database's pixels, code every image.

Part of the tokenizer stage: the semantic tokenizer is still trained (or reused) for what the other
stages need from it (the retriever's encoder, the baselines' features); only the identifiers come
from here. The RQ-VAE trains with the same loop as the other models (``trainers.loop``: checkpoints,
resume, preemption, sharding, logs) under ``tokenizer/rqvae/``, on the database images with the
config's training transform; its codebook is an EMA in the train state (``models.rqvae``). Then every
database image is coded with the eval transform, and a grid of originals over their reconstructions
is written for the report.

Outputs (``irgen_jax.workdir``): ``tokenizer/rqvae/params/``, ``tokenizer/rqvae/reconstructions.png``;
the codes and the codebook go to ``tokenizer/identifiers.npz`` with the stage's other files.
Failpoints: the loop's (``rqvae.loop_started``, ``rqvae.step``, ``rqvae.checkpoint``).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from irgen_jax import files, identifiers, inference, parallel
from irgen_jax.data import pipeline
from irgen_jax.evaluators import plots
from irgen_jax.models import build, rq
from irgen_jax.models import rqvae as rqvae_lib
from irgen_jax.trainers import loop, optim
from irgen_jax.workdir import RQVAE, RQVAE_PARAMS, RQVAE_RECONSTRUCTIONS, Workdir

log = logging.getLogger(__name__)

GRID_IMAGES = 16
MSE_IMAGES = 2048


def make_optimizer(c: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  v = c.ids.rqvae
  return optim.make_optimizer(lr=v.lr, total_steps=total_steps, warmup_steps=v.warmup_steps,
                              weight_decay=v.weight_decay, b1=0.9, b2=0.99, grad_clip=v.grad_clip)


def init_fn(model: rqvae_lib.RQVAE, tx, c: ml_collections.ConfigDict):
  """``() -> state``: params, optimizer state, step, rng, and a zero codebook whose codes are all dead
  (the first step seeds them from its batch: ``rqvae.init_ema``)."""
  s, size = c.data.image_size, c.ids.codebook_size

  def init():
    codebook = jnp.zeros((size, model.latent_dim), jnp.float32)
    params = model.init(loop.init_key(c.seed, 5), jnp.zeros((1, s, s, 3), jnp.float32),
                        codebook)["params"]
    ema = rqvae_lib.init_ema(size, model.latent_dim)
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(loop.init_key(c.seed, 6)), "codebook": codebook,
            "ema_count": ema.count, "ema_total": ema.total, "ema_weight": ema.weight}
  return init


def make_train_step(model: rqvae_lib.RQVAE, tx, c: ml_collections.ConfigDict):
  v = c.ids.rqvae
  beta, decay, restart_below = float(v.beta), float(v.ema_decay), float(v.restart_below)

  def train_step(state, batch):
    images = batch["image"]

    def loss_fn(params):
      out = model.apply({"params": params}, images, state["codebook"])
      total, metrics = rqvae_lib.loss(out, images, beta=beta)
      return total, (metrics, out)

    (total, (metrics, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    codebook, ema, restarted = rqvae_lib.ema_update(
        rqvae_lib.EMA(state["ema_count"], state["ema_total"], state["ema_weight"]), out["inputs"],
        out["codes"].reshape(out["inputs"].shape[:2]), key, decay=decay, restart_below=restart_below)
    perplexity, unused = rq.usage_from_counts(
        rq.code_counts(out["codes"].reshape(-1, 1), codebook.shape[0]))
    metrics = dict(metrics, loss=total, grad_norm=optax.tree.norm(grads), restarted_codes=restarted,
                   batch_perplexity=perplexity[0], batch_unused_codes=unused[0])
    return dict(state, params=params, opt=opt, step=state["step"] + 1, codebook=codebook,
                ema_count=ema.count, ema_total=ema.total, ema_weight=ema.weight), metrics

  return jax.jit(train_step, donate_argnums=(0,))


def train(c: ml_collections.ConfigDict, wd: Workdir, mesh, database) -> tuple[np.ndarray, dict]:
  """Trains (or resumes) the RQ-VAE on ``database`` and codes it: ``(codes int32 [N, H·W·D],
  {"rqvae_codebook": float32 [L, C], "reconstruction_mse": over a sample})``; writes its params and the
  reconstruction grid."""
  v = c.ids.rqvae
  model = build.rqvae(c)
  steps_per_epoch = pipeline.steps_per_epoch(len(database), v.batch_size)
  total = loop.epochs_to_steps(v.num_epochs, steps_per_epoch)
  tx = make_optimizer(c, total)
  state = parallel.create_replicated(init_fn(model, tx, c), mesh)
  log.info("RQ-VAE: a %dx%dx%d code map (%d tokens) of %d codes, %d database images, %d steps.",
           v.latent_size, v.latent_size, v.depth, c.ids.length, c.ids.codebook_size, len(database),
           total)
  it = pipeline.train_iterator(database, global_batch_size=v.batch_size, image_size=c.data.image_size,
                               seed=c.seed + 17, crop_scale=c.data.crop_scale, flip=c.data.flip,
                               num_workers=c.data.num_workers)
  state = loop.train(stage_dir=wd.path(RQVAE), state=state, train_step=make_train_step(model, tx, c),
                     data_iterator=it, mesh=mesh, total_steps=total,
                     checkpoint_every=c.checkpoint.every_steps, keep_checkpoints=c.checkpoint.keep,
                     log_every=c.log_every_steps, description="rqvae")
  params, codebook = state["params"], state["codebook"]
  codes = identifiers.rqvae_codes(model, params, codebook, database, c, mesh,
                                  description="RQ-VAE identifiers")
  wd.save_params(RQVAE_PARAMS, params)
  mse, grid = reconstructions(c, model, params, codebook, database, mesh)
  log.info("RQ-VAE: reconstruction MSE %.4f (normalized pixels) on %d database images.", mse,
           min(MSE_IMAGES, len(database)))
  if jax.process_index() == 0:
    files.write_atomic(wd.path(RQVAE_RECONSTRUCTIONS), grid)
  return codes, {"rqvae_codebook": np.asarray(jax.device_get(codebook)), "reconstruction_mse": mse}


def reconstructions(c, model, params, codebook, database, mesh) -> tuple[float, bytes]:
  """The reconstruction MSE over ``MSE_IMAGES`` database images (evenly spaced; a sample: the decoder
  costs as much as the encoder), and a PNG of ``GRID_IMAGES`` of them over their reconstructions."""
  rows = np.linspace(0, len(database) - 1, min(MSE_IMAGES, len(database))).astype(np.int64)

  @jax.jit
  def recon(x):
    out = model.apply({"params": params}, x, codebook)["reconstruction"]
    return out, jnp.mean((out - x) ** 2, axis=(1, 2, 3))
  kw = dict(mesh=mesh, image_size=c.data.image_size, resize_size=c.data.resize_size)
  errors, _ = inference.map_split(lambda x: recon(x)[1], inference.Subset(database, rows),
                                  batch_size=c.search.query_batch_size * 4, **kw)
  shown = rows[np.linspace(0, len(rows) - 1, min(GRID_IMAGES, len(rows))).astype(np.int64)]
  (images, decoded), _ = inference.map_split(lambda x: (x, recon(x)[0]),
                                             inference.Subset(database, shown),
                                             batch_size=len(shown), **kw)
  to_uint8 = pipeline.Normalizer().to_uint8
  grid = plots.image_grid_png([list(to_uint8(images)), list(to_uint8(decoded))],
                              row_titles=["original", "RQ-VAE"])
  return float(np.mean(errors, dtype=np.float64)), grid


def statistics(codes: np.ndarray, c: ml_collections.ConfigDict) -> dict[str, Any]:
  """Code use of the shared codebook over every position (``codebook_perplexity``,
  ``codebook_unused_codes``: what says whether it collapsed), and per identifier position m
  (``perplexity_l{m}``, ``unused_codes_l{m}``; a background position uses few codes by nature)."""
  size = c.ids.codebook_size
  per_position = np.stack([np.bincount(codes[:, m], minlength=size) for m in range(codes.shape[1])])
  perplexity, unused = rq.usage_from_counts(per_position)  # [M, L] counts: no [N, M, L] one-hot
  pooled_perplexity, pooled_unused = rq.usage_from_counts(per_position.sum(0)[None])
  out = {"codebook_perplexity": float(pooled_perplexity[0]),
         "codebook_unused_codes": int(pooled_unused[0])}
  for m in range(codes.shape[1]):
    out[f"perplexity_l{m + 1}"] = float(perplexity[m])
    out[f"unused_codes_l{m + 1}"] = int(unused[m])
  return out


def aot_program(c: ml_collections.ConfigDict, mesh) -> dict[str, Any]:
  """The RQ-VAE's train step as ``(jitted, abstract args)`` for ahead-of-time compilation."""
  model = build.rqvae(c)
  tx = make_optimizer(c, total_steps=1000)
  state = jax.eval_shape(init_fn(model, tx, c))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                      sharding=parallel.replicated(mesh)), state)
  s, b = c.data.image_size, c.ids.rqvae.batch_size
  batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32,
                                         sharding=parallel.batch_sharded(mesh))}
  return {"rqvae_train_step": (make_train_step(model, tx, c), (state, batch))}
