"""Stage 1: train the semantic tokenizer, then give every database image its identifier.

Alternating optimization (paper section 3.1): the network trains by gradient with the codebooks fixed;
every ``refit_every_epochs`` epochs the codebooks are refit by k-means on the residuals of f_cls of the
whole database, computed with the eval transform and the model in eval mode (the reference recomputed
them with training augmentation, a bug we do not copy). The first fit happens before step 0.

Outputs under ``WORKDIR/tokenizer/``: ``params/`` (final parameters), ``database_features.npy``
(f_cls of every database image, float32 [N, D]), ``identifiers.npz`` (``codes`` int32 [N, M] and, for
semantic identifiers, ``codebooks`` [M, L, D]), ``stats.json``, and the index ``WORKDIR/index.irgx``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from irgen_jax import identifiers, inference, parallel
from irgen_jax.index import Index
from irgen_jax.models import rq
from irgen_jax.models.tokenizer import SemanticTokenizer, tokenizer_loss
from irgen_jax.trainers import checkpointing, common, loop, optim

log = logging.getLogger(__name__)

INDEX_FILE = "index.irgx"


def build_model(c: ml_collections.ConfigDict, num_classes: int) -> SemanticTokenizer:
  t = c.tokenizer
  enc = common.encoder(t.encoder, image_size=c.data.image_size, dtype=common.compute_dtype(c),
                       from_clip=t.encoder.init == "clip")
  return SemanticTokenizer(encoder=enc, num_classes=num_classes, num_levels=c.ids.length,
                           proj_dim=t.proj_dim or None, shared_rq_head=t.shared_head)


def feature_dim(model: SemanticTokenizer) -> int:
  return model.proj_dim or model.encoder.width


def make_optimizer(c: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  t = c.tokenizer
  return optim.make_optimizer(
      lr=t.lr, total_steps=total_steps, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
      b1=t.b1, b2=t.b2, grad_clip=t.grad_clip, lr_multipliers=optim.stage_multipliers(t))


def init_fn(model: SemanticTokenizer, tx, c: ml_collections.ConfigDict):
  """``() -> state``: params, optimizer state, step, rng and zero codebooks (fit before step 0)."""
  s = c.data.image_size
  m, l, d = c.ids.length, c.ids.codebook_size, feature_dim(model)

  def init():
    codebooks = jnp.zeros((m, l, d), jnp.float32)
    params = model.init(common.init_key(c.seed, 1), jnp.zeros((1, s, s, 3), jnp.float32),
                        codebooks)["params"]
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(common.init_key(c.seed, 2)), "codebooks": codebooks}
  return init


def make_train_step(model: SemanticTokenizer, tx, c: ml_collections.ConfigDict):
  lambda1, lambda2 = float(c.tokenizer.lambda1), float(c.tokenizer.lambda2)
  frozen = optim.frozen_groups(optim.stage_multipliers(c.tokenizer))

  def train_step(state, batch):
    def loss_fn(params):
      out = model.apply({"params": optim.stop_frozen(params, frozen)}, batch["image"],
                        state["codebooks"], train=True)
      return tokenizer_loss(out, batch["label"], lambda1=lambda1, lambda2=lambda2)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return dict(state, params=params, opt=opt, step=state["step"] + 1), metrics

  return jax.jit(train_step, donate_argnums=(0,))


def features_fn(model: SemanticTokenizer):
  """Jitted ``(params, images) -> f_cls float32 [B, D]`` (eval mode)."""
  @jax.jit
  def features(params, images):
    return model.apply({"params": params}, images, train=False, method="features")
  return features


def database_features(model, params, source, c, mesh, description="") -> np.ndarray:
  fn = functools.partial(features_fn(model), params)
  feats, _ = inference.map_split(fn, source, mesh=mesh, batch_size=c.search.query_batch_size * 4,
                                 image_size=c.data.image_size, resize_size=c.data.resize_size,
                                 description=description)
  return feats


def _save_npy(path: str, array: np.ndarray) -> None:
  with open(path + ".tmp", "wb") as f:
    np.save(f, array)
  os.replace(path + ".tmp", path)


def run(c: ml_collections.ConfigDict, workdir: str, mesh) -> dict[str, Any]:
  from irgen_jax.data import pipeline

  t = c.tokenizer
  ds = common.load_dataset(c.data)
  stage = common.stage_dir(workdir, "tokenizer")
  model = build_model(c, ds.num_classes)
  steps_per_epoch = pipeline.steps_per_epoch(len(ds.train), t.batch_size)
  total = common.epochs_to_steps(t.num_epochs, steps_per_epoch)
  refit_every = max(1, int(t.refit_every_epochs * steps_per_epoch))
  tx = make_optimizer(c, total)
  state = parallel.create_replicated(init_fn(model, tx, c), mesh)

  def starting_state(state):
    if t.encoder.init != "clip":
      return state
    params = common.graft_clip(jax.device_get(state["params"]), t.encoder.clip_path, at="encoder")
    # AdamW's state is zeros whatever the params, so only the params change.
    return dict(state, params=parallel.replicate(params, mesh))
  log.info("Tokenizer: %d train images, %d steps/epoch, %d steps, refit every %d steps.",
           len(ds.train), steps_per_epoch, total, refit_every)

  refit_log = os.path.join(stage, "refits.jsonl")
  refit_source = ds.database
  if 0 < t.get("refit_max_images", 0) < len(ds.database):
    # A fixed sample: k-means on 20k points places 256 centroids about as well as on 60k, and the
    # refit's feature pass is most of its cost on small machines.
    rows = np.sort(np.random.default_rng(c.seed).choice(len(ds.database), t.refit_max_images,
                                                        replace=False))
    refit_source = inference.Subset(ds.database, rows)
    log.info("Codebook refits use %d of the %d database images.", len(rows), len(ds.database))

  def refit(step: int, state):
    if step % refit_every:
      return state
    feats = database_features(model, state["params"], refit_source, c, mesh)
    codebooks = rq.fit_residual_codebooks(feats, c.ids.length, c.ids.codebook_size,
                                          iters=t.kmeans_iters, init=t.kmeans_init,
                                          seed=c.seed * 100003 + step)
    stats = rq.rq_statistics(feats, codebooks)
    log.info("Step %d: codebooks refit; %d unique identifiers, relative error %.4f.", step,
             stats["num_identifiers"], stats[f"relative_error_l{c.ids.length}"])
    if jax.process_index() == 0:
      with open(refit_log, "a") as f:
        f.write(json.dumps({"step": step, **stats}) + "\n")
    return dict(state, codebooks=parallel.replicate(codebooks, mesh))

  it = pipeline.train_iterator(ds.train, global_batch_size=t.batch_size,
                               image_size=c.data.image_size, seed=c.seed, crop_scale=c.data.crop_scale,
                               flip=c.data.flip, num_workers=c.data.num_workers)
  state = loop.train(stage_dir=stage, state=state, train_step=make_train_step(model, tx, c),
                     data_iterator=it, mesh=mesh, total_steps=total,
                     checkpoint_every=c.checkpoint.every_steps, keep_checkpoints=c.checkpoint.keep,
                     log_every=c.log_every_steps, before_step=refit, starting_state=starting_state,
                     description="tokenizer")
  return finalize(c, workdir, mesh, model, state["params"], ds)


def finalize(c, workdir: str, mesh, model, params, ds) -> dict[str, Any]:
  """Final features → identifiers of the config's kind → index; every file written atomically."""
  stage = common.stage_dir(workdir, "tokenizer")
  feats = database_features(model, params, ds.database, c, mesh, description="database features")
  t0 = time.perf_counter()
  codes, extra = identifiers.assign(
      c.ids.kind, feats, length=c.ids.length, codebook_size=c.ids.codebook_size, seed=c.seed,
      kmeans_iters=c.tokenizer.kmeans_iters, kmeans_init=c.tokenizer.kmeans_init,
      hkm_clusters=c.ids.hkm_clusters)
  stats = {"kind": c.ids.kind, **rq.identifier_stats(codes)}
  if "codebooks" in extra:
    stats.update(rq.rq_statistics(feats, extra["codebooks"], codes=codes))
  index = Index.build(codes, c.ids.codebook_size)
  # The index's build cost, as the baselines' (their training included, the encoder's not):
  # identifiers from the database features, then the valid-identifier table.
  stats.update(index_build_s=time.perf_counter() - t0)
  stats.update(index_bytes=index.nbytes, index_bytes_per_image=index.bytes_per_image)
  # orbax's save is collective: every process calls it, process 0 writes, all wait for the commit.
  checkpointing.save_params(os.path.join(stage, "params"), jax.device_get(params))
  if jax.process_index() == 0:
    _save_npy(os.path.join(stage, "database_features.npy"), feats)
    with open(os.path.join(stage, "identifiers.npz.tmp"), "wb") as f:
      np.savez(f, codes=codes, **extra)
    os.replace(os.path.join(stage, "identifiers.npz.tmp"), os.path.join(stage, "identifiers.npz"))
    index.save(os.path.join(workdir, INDEX_FILE))
    with open(os.path.join(stage, "stats.json"), "w") as f:
      json.dump(stats, f, indent=1)
  parallel.sync("tokenizer files written")  # later stages read them on every process
  log.info("Identifiers: %s", stats)
  return stats


def load_params(c, workdir: str, num_classes: int):
  """The trained tokenizer ``(model, params)`` from ``WORKDIR/tokenizer/params``."""
  model = build_model(c, num_classes)
  s = c.data.image_size
  template = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, s, s, 3)),
                         jnp.zeros((c.ids.length, c.ids.codebook_size, feature_dim(model))))
  )["params"]
  params = checkpointing.load_params(os.path.join(workdir, "tokenizer", "params"), template)
  return model, params


def load_identifiers(workdir: str) -> dict[str, np.ndarray]:
  path = os.path.join(workdir, "tokenizer", "identifiers.npz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No identifiers at {path}: run the tokenizer stage first.")
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def aot_program(c: ml_collections.ConfigDict, mesh) -> dict[str, Any]:
  """The train step as ``(jitted, abstract args)`` for ahead-of-time compilation (shapes only)."""
  from irgen_jax.data import registry
  num_classes = (c.data.synthetic.num_classes if c.data.name == "synthetic"
                 else registry.NUM_CLASSES.get(c.data.name))
  if not num_classes:
    raise ValueError(f"config.data.name={c.data.name!r}: its class count is not known without the "
                     "data; ahead-of-time compilation supports the catalogue datasets.")
  model = build_model(c, num_classes)
  tx = make_optimizer(c, total_steps=1000)
  state = jax.eval_shape(init_fn(model, tx, c))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                      sharding=parallel.replicated(mesh)), state)
  s, b = c.data.image_size, c.tokenizer.batch_size
  sharded = parallel.batch_sharded(mesh)
  batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32, sharding=sharded),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharded)}
  return {"tokenizer_train_step": (make_train_step(model, tx, c), (state, batch))}
