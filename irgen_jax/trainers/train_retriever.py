"""Stage 2: train the encoder-decoder to emit the identifier of a same-class database image.

Pairs (x1, x2): x1 is a training image (augmented), x2 a database image of its class drawn anew every
epoch (``data.pairs.PairSampler``): uniformly from the class (the paper), or, with
``retriever.targets="neighbors"``, from x1's ``num_neighbors`` nearest same-class database images in the
tokenizer's feature space, which gives the decoder a within-class order to learn. The loss is
label-smoothed cross-entropy over the M tokens of x2's identifier (teacher forcing); with
``retriever.soft_targets`` each token's target is instead its expectation over the class's images that
share x2's prefix (``data.soft_targets``: the same objective in expectation, without the draw's noise).
The encoder starts from the stage-1 encoder, from CLIP, or from scratch; it trains at
``encoder_lr_mult`` x the decoder's learning rate, or stays frozen at 0 (then its backward pass is not
computed).

With ``retriever.reuse_from`` the stage trains nothing: it takes that run's trained retriever, whose
config may differ from this run's only in what the evaluate stage reads and whose identifiers must be
this run's (``reuse``).

Outputs: ``WORKDIR/retriever/params/`` (final parameters), metrics and checkpoints beside them.
Failpoints: the loop's (``retriever.loop_started``, ``retriever.step``, ``retriever.checkpoint``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from irgen_jax import features, parallel
from irgen_jax.data import pairs, pipeline, registry, soft_targets
from irgen_jax.models import build
from irgen_jax.models import retriever as retriever_model
from irgen_jax.trainers import loop, optim
from irgen_jax.trainers.losses import sequence_loss, soft_sequence_loss
from irgen_jax.errors import ConfigError
from irgen_jax.workdir import RETRIEVER_PARAMS, Workdir

log = logging.getLogger(__name__)


def make_optimizer(c: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  r = c.retriever
  return optim.make_optimizer(
      lr=r.lr, total_steps=total_steps, warmup_steps=r.warmup_steps, weight_decay=r.weight_decay,
      b1=r.b1, b2=r.b2, grad_clip=r.grad_clip, lr_multipliers=optim.stage_multipliers(r))


def init_fn(model, tx, c: ml_collections.ConfigDict):
  s, m = c.data.image_size, c.ids.length

  def init():
    params = model.init(loop.init_key(c.seed, 3), jnp.zeros((1, s, s, 3), jnp.float32),
                        jnp.zeros((1, m), jnp.int32))["params"]
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(loop.init_key(c.seed, 4))}
  return init


def make_train_step(model, tx, c: ml_collections.ConfigDict):
  """``train_step(state, batch, codes_table, soft_tables=None)``: ``codes_table`` int32 [N, M] the
  database identifiers; ``soft_tables`` (``data.soft_targets.Tables``) with ``retriever.soft_targets``."""
  smoothing = float(c.retriever.label_smoothing)
  frozen = optim.frozen_groups(optim.stage_multipliers(c.retriever))
  num_tokens = int(c.ids.codebook_size)

  def train_step(state, batch, codes_table, soft_tables=None):
    codes = codes_table[batch["target_index"]]
    soft = None if soft_tables is None else \
        soft_targets.distributions(soft_tables, batch["target_index"], num_tokens)

    def loss_fn(params):
      logits = model.apply({"params": optim.stop_frozen(params, frozen)}, batch["image"], codes,
                           train=True)
      if soft is None:
        return sequence_loss(logits, codes, smoothing)
      return soft_sequence_loss(logits, codes, soft, smoothing)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return dict(state, params=params, opt=opt, step=state["step"] + 1), metrics

  return jax.jit(train_step, donate_argnums=(0,))


def neighbor_candidates(train_features: np.ndarray, train_labels: np.ndarray,
                        database_features: np.ndarray, database_labels: np.ndarray,
                        k: int) -> np.ndarray:
  """int64 [N_train, k]: each train image's k nearest same-class database images (L2 on f_cls),
  nearest first, -1 padded where the class has fewer than k images."""
  import faiss  # only this option needs it
  out = np.full((len(train_labels), k), -1, np.int64)
  for label in np.unique(train_labels):
    db_rows = np.flatnonzero(database_labels == label)
    if not len(db_rows):
      continue
    tr_rows = np.flatnonzero(train_labels == label)
    index = faiss.IndexFlatL2(database_features.shape[1])
    index.add(np.ascontiguousarray(database_features[db_rows], np.float32))
    kk = min(k, len(db_rows))
    _, nn = index.search(np.ascontiguousarray(train_features[tr_rows], np.float32), kk)
    out[tr_rows[:, None], np.arange(kk)[None]] = db_rows[nn]
  return out


def _pair_sampler(c, ds, workdir: Workdir, mesh):
  candidates = None
  if c.retriever.targets == "neighbors":
    db_feats = workdir.load_database_features()
    if ds.train is ds.database:
      train_feats = db_feats
    else:
      tok_model, tok_params = workdir.load_tokenizer(c, ds.num_classes)
      train_feats = features.of_source(tok_model, tok_params, ds.train, c, mesh,
                                       description="train features")
    candidates = neighbor_candidates(train_feats, ds.labels("train"), db_feats,
                                     ds.labels("database"), c.retriever.num_neighbors)
  return pairs.PairSampler(ds.labels("train"), ds.labels("database"), seed=c.seed,
                           candidates=candidates)


def initial_params(c, workdir: Workdir, state_params, num_classes: int):
  """The encoder's starting weights, per ``retriever.encoder_init``; the decoder stays random."""
  params = jax.device_get(state_params)
  if c.retriever.encoder_init == "tokenizer":
    _, tok_params = workdir.load_tokenizer(c, num_classes)
    return dict(params, encoder=jax.device_get(tok_params["encoder"]))
  if c.retriever.encoder_init == "clip":
    return build.graft_clip(params, c.retriever.encoder.clip_path, at="encoder")
  return params


def stage(c: ml_collections.ConfigDict, workdir: Workdir, mesh) -> dict[str, Any]:
  """The retriever stage: train (``run``), or take another run's trained retriever (``reuse``)."""
  if c.retriever.get("reuse_from", ""):
    return reuse(c, workdir)
  return run(c, workdir, mesh)


def reuse(c: ml_collections.ConfigDict, workdir: Workdir) -> dict[str, Any]:
  """The retriever stage without training: ``retriever.reuse_from``'s trained retriever, copied into
  this workdir. It stands in for this run's own only when that run's retriever stage is done and the
  two runs trained alike (their configs differ only in ``config_lib.RETRIEVER_REUSE_MAY_DIFFER``),
  both checked by ``stages.check_inputs`` before any stage runs, and when the identifiers it learned
  are this run's, image for image (checked here, once this run's tokenizer stage wrote them)."""
  source = Workdir(c.retriever.reuse_from)
  field = f"config.retriever.reuse_from={source.root!r}"
  theirs, ours = source.load_identifiers()["codes"], workdir.load_identifiers()["codes"]
  if theirs.shape != ours.shape or not np.array_equal(theirs, ours):
    differ = (f"{int(np.any(theirs != ours, axis=1).sum())} of {len(ours)} database images have other "
              "identifiers" if theirs.shape == ours.shape else f"shape {theirs.shape}, here {ours.shape}")
    raise ConfigError(f"{field}: its retriever learned other identifiers than this run's ({differ}).")
  model, params = source.load_retriever(c)
  workdir.save_params(RETRIEVER_PARAMS, params)  # collective, atomic
  log.info("Retriever: reusing the trained retriever of %s (no training).", source.root)
  counts = retriever_model.param_counts(model, (c.data.image_size, c.data.image_size, 3))
  return {"steps": 0, "param_counts": counts, "reused_from": source.root}


def run(c: ml_collections.ConfigDict, workdir: Workdir, mesh) -> dict[str, Any]:
  r = c.retriever
  ds = registry.load_from_config(c.data)
  stage = workdir.stage_dir("retriever")
  codes = workdir.load_identifiers()["codes"]
  if codes.shape != (len(ds.database), c.ids.length):
    raise ValueError(f"The identifiers in {workdir.root}/tokenizer have shape {codes.shape}; the "
                     f"database has {len(ds.database)} images and ids.length={c.ids.length}. Was the "
                     "tokenizer stage run with another config?")
  model = build.retriever(c)
  sampler = _pair_sampler(c, ds, workdir, mesh)
  steps_per_epoch = pipeline.steps_per_epoch(len(sampler.eligible), r.batch_size)
  total = loop.epochs_to_steps(r.num_epochs, steps_per_epoch)
  tx = make_optimizer(c, total)
  state = parallel.create_replicated(init_fn(model, tx, c), mesh)

  def starting_state(state):
    # AdamW's state is zeros whatever the params: only the params change.
    return dict(state, params=parallel.replicate(
        initial_params(c, workdir, state["params"], ds.num_classes), mesh))
  log.info("Retriever: %d training pairs per epoch, %d steps/epoch, %d steps.",
           len(sampler.eligible), steps_per_epoch, total)
  codes_table = parallel.replicate(jnp.asarray(codes, jnp.int32), mesh)
  soft_tables = None
  if r.get("soft_targets", False):
    soft_tables = parallel.replicate(
        jax.tree.map(jnp.asarray, soft_targets.tables(codes, ds.labels("database"))), mesh)
  step = functools.partial(make_train_step(model, tx, c), codes_table=codes_table,
                           soft_tables=soft_tables)
  it = pipeline.train_iterator(ds.train, global_batch_size=r.batch_size,
                               image_size=c.data.image_size, seed=c.seed + 1,
                               crop_scale=c.data.crop_scale, flip=c.data.flip, pairs=sampler,
                               num_workers=c.data.num_workers)
  state = loop.train(stage_dir=stage, state=state, train_step=step, data_iterator=it, mesh=mesh,
                     total_steps=total, checkpoint_every=c.checkpoint.every_steps,
                     keep_checkpoints=c.checkpoint.keep, log_every=c.log_every_steps,
                     starting_state=starting_state, description="retriever")
  # orbax's save is collective: every process calls it, process 0 writes, all wait for the commit.
  workdir.save_params(RETRIEVER_PARAMS, state["params"])
  counts = retriever_model.param_counts(model, (c.data.image_size, c.data.image_size, 3))
  return {"steps": total, "param_counts": counts}


def aot_program(c: ml_collections.ConfigDict, mesh) -> dict[str, Any]:
  """The train step as ``(jitted, abstract args)`` for ahead-of-time compilation (shapes only)."""
  model = build.retriever(c)
  tx = make_optimizer(c, total_steps=1000)
  rep, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                       jax.eval_shape(init_fn(model, tx, c)))
  s, b = c.data.image_size, c.retriever.batch_size
  batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32, sharding=sharded),
           "target_index": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharded)}
  num_db, m = registry.database_size(c.data), c.ids.length
  table = jax.ShapeDtypeStruct((num_db, m), jnp.int32, sharding=rep)
  args = (state, batch, table)
  if c.retriever.get("soft_targets", False):
    # Entries per level: at most one per database image.
    ints = jax.ShapeDtypeStruct((m, num_db), jnp.int32, sharding=rep)
    floats = jax.ShapeDtypeStruct((m, num_db), jnp.float32, sharding=rep)
    args += (soft_targets.Tables(start=ints, length=ints, token=ints, share=floats),)
  return {"retriever_train_step": (make_train_step(model, tx, c), args)}
