"""Stage 1: train the semantic tokenizer, then give every database image its identifier.

Alternating optimization (paper section 3.1): the network trains by gradient with the codebooks fixed;
every ``refit_every_epochs`` epochs the codebooks are refit by k-means on the residuals of f_cls of the
whole database, computed with the eval transform and the model in eval mode (``irgen_jax.features``).

The first fit comes after ``tokenizer.first_refit_steps`` steps (0: before step 0, as the reference).
Until then there are no codebooks and the loss is the classifier's alone (the RQ terms are weighted
0): k-means on the features of a random network gives codebooks that mean nothing and that the
features leave behind within the first epoch (their mean square grows ~30x on Fashion-MNIST), so the
prefix and residual terms would pull toward stale codewords. After it, the paper's objective (eq. 3).
Each refit's identifier statistics (perplexity, unused codes, errors, prefix purity per level) go to
``tokenizer/refits.jsonl`` and TensorBoard (``tb/refits``); a collapsing codebook is a warning naming
its level.

Outputs (``irgen_jax.workdir``): ``tokenizer/params/``, ``tokenizer/database_features.npy`` (f_cls of
every database image, float32 [N, D]), ``tokenizer/identifiers.npz`` (``codes`` int32 [N, M] and, for
semantic identifiers, ``codebooks`` [M, L, D]), ``tokenizer/stats.json``, ``tokenizer/refits.jsonl``
and the index ``index.irgx``. With ``ids.kind="rqvae"`` the identifiers are an RQ-VAE's codes of the
pixels (``trainers.train_rqvae``, under ``tokenizer/rqvae/``; ``rqvae_codebook`` [L, C] in the npz), and
this tokenizer quantizes to the RQ-VAE's depth (``config_lib.tokenizer_levels``).

Failpoints: ``tokenizer.refit`` inside every refit (features computed, codebooks not yet in the state),
``tokenizer.outputs`` between the files ``finalize`` writes; and the loop's (``trainers.loop``).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from irgen_jax import config_lib, failpoints, features, files, identifiers, inference, parallel
from irgen_jax.data import pipeline, registry
from irgen_jax.decoding.index import Index
from irgen_jax.models import build, rq
from irgen_jax.models.tokenizer import SemanticTokenizer
from irgen_jax.trainers import loop, optim, train_rqvae
from irgen_jax.trainers.losses import tokenizer_loss
from irgen_jax.errors import ConfigError
from irgen_jax.workdir import (CONFIG, DATABASE_FEATURES, IDENTIFIERS, INDEX, RQVAE_PARAMS,
                               RQVAE_RECONSTRUCTIONS, TOKENIZER_PARAMS, TOKENIZER_STATS, Workdir)

log = logging.getLogger(__name__)

LOGGED_LEVELS = 4


def loggable_stats(stats: dict[str, Any], levels: int = LOGGED_LEVELS) -> str:
  """``stats`` for the log, with the per-level figures (``..._l{m}``) of the first ``levels`` levels
  only: a 64-token identifier has ~200 of them, all in ``tokenizer/stats.json``."""
  level = {k: int(m.group(1)) for k in stats if (m := re.search(r"_l(\d+)$", k))}
  shown = {k: v for k, v in stats.items() if level.get(k, 0) <= levels}
  last = max(level.values(), default=0)
  return f"{shown}" + (f" (levels {levels + 1}-{last}: {TOKENIZER_STATS})" if last > levels else "")


def make_optimizer(c: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  t = c.tokenizer
  return optim.make_optimizer(
      lr=t.lr, total_steps=total_steps, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
      b1=t.b1, b2=t.b2, grad_clip=t.grad_clip, lr_multipliers=optim.stage_multipliers(t))


def init_fn(model: SemanticTokenizer, tx, c: ml_collections.ConfigDict):
  """``() -> state``: params, optimizer state, step, rng and zero codebooks (fit before step 0)."""
  s = c.data.image_size
  m, l, d = config_lib.tokenizer_levels(c), c.ids.codebook_size, build.feature_dim(model)

  def init():
    codebooks = jnp.zeros((m, l, d), jnp.float32)
    params = model.init(loop.init_key(c.seed, 1), jnp.zeros((1, s, s, 3), jnp.float32),
                        codebooks)["params"]
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(loop.init_key(c.seed, 2)), "codebooks": codebooks}
  return init


def first_fit_step(c: ml_collections.ConfigDict, total_steps: int) -> int:
  """The step before which the codebooks are first fit (``tokenizer.first_refit_steps``, at most the
  last step)."""
  return min(int(c.tokenizer.get("first_refit_steps", 0)), total_steps - 1)


def make_train_step(model: SemanticTokenizer, tx, c: ml_collections.ConfigDict, first_fit: int = 0):
  """The jitted step; before step ``first_fit`` (no codebooks fit yet) the RQ terms of the loss weigh 0."""
  lambda1, lambda2 = float(c.tokenizer.lambda1), float(c.tokenizer.lambda2)
  frozen = optim.frozen_groups(optim.stage_multipliers(c.tokenizer))

  def train_step(state, batch):
    def loss_fn(params):
      out = model.apply({"params": optim.stop_frozen(params, frozen)}, batch["image"],
                        state["codebooks"], train=True)
      on = (state["step"] >= first_fit).astype(jnp.float32)
      return tokenizer_loss(out, batch["label"], lambda1=lambda1 * on, lambda2=lambda2 * on)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return dict(state, params=params, opt=opt, step=state["step"] + 1), metrics

  return jax.jit(train_step, donate_argnums=(0,))


def stage(config, wd: Workdir, mesh) -> dict[str, Any]:
  """The tokenizer stage: train (``run``), or take another run's trained tokenizer (``reuse``)."""
  if config.tokenizer.get("reuse_from", ""):
    return reuse(config, wd, mesh)
  return run(config, wd, mesh)


# What another run's tokenizer must share with this run to stand in for its own: the architecture (an
# error otherwise) and, to mean the same thing, the data (a warning otherwise). The identifiers' own
# settings (ids.kind, length, codebook_size, hkm_clusters, rqvae) may differ: that is the point of
# reusing it; only per-level heads (tokenizer.shared_head=False) fix its number of levels.
_REUSE_ARCHITECTURE = ("tokenizer.encoder.", "tokenizer.proj_dim", "tokenizer.shared_head",
                       "data.image_size")
_REUSE_DATA = ("data.name", "data.resize_size", "data.max_database", "data.indexed_fraction",
               "data.manual_dir", "data.synthetic.")


def reuse(config, wd: Workdir, mesh) -> dict[str, Any]:
  """The tokenizer stage without training: ``tokenizer.reuse_from``'s trained tokenizer, then this
  run's identifiers, index and files exactly as the stage writes them (``finalize``)."""
  source = Workdir(config.tokenizer.reuse_from)
  diffs = config_lib.differences(config, source.path(CONFIG))

  def differing(prefixes):
    return [text for k, text in diffs.items() if k.startswith(prefixes)]
  problems = differing(_REUSE_ARCHITECTURE)
  levels = config_lib.tokenizer_levels(source.load_config()), config_lib.tokenizer_levels(config)
  if not config.tokenizer.shared_head and levels[0] != levels[1]:
    problems.append(f"{levels[0]} quantizer levels, each with its own head (here {levels[1]})")
  if problems:
    raise ConfigError(f"config.tokenizer.reuse_from={source.root!r}: its tokenizer has another "
                      "architecture: " + ", ".join(problems) + ".")
  if differing(_REUSE_DATA):
    log.warning("config.tokenizer.reuse_from=%s was trained on other data: %s.", source.root,
                ", ".join(differing(_REUSE_DATA)))
  ds = registry.load_from_config(config.data)
  model, params = source.load_tokenizer(config, ds.num_classes)
  log.info("Tokenizer: reusing the trained tokenizer of %s (no training).", source.root)
  stats = finalize(config, wd, mesh, model, params, ds)
  return {**stats, "reused_from": source.root}


def run(c: ml_collections.ConfigDict, workdir: Workdir, mesh) -> dict[str, Any]:
  t = c.tokenizer
  ds = registry.load_from_config(c.data)
  stage = workdir.stage_dir("tokenizer")
  model = build.tokenizer(c, ds.num_classes)
  steps_per_epoch = pipeline.steps_per_epoch(len(ds.train), t.batch_size)
  total = loop.epochs_to_steps(t.num_epochs, steps_per_epoch)
  refit_every = max(1, int(t.refit_every_epochs * steps_per_epoch))
  tx = make_optimizer(c, total)
  state = parallel.create_replicated(init_fn(model, tx, c), mesh)

  def starting_state(state):
    if t.encoder.init != "clip":
      return state
    params = build.graft_clip(jax.device_get(state["params"]), t.encoder.clip_path, at="encoder")
    # AdamW's state is zeros whatever the params, so only the params change.
    return dict(state, params=parallel.replicate(params, mesh))
  first_fit = first_fit_step(c, total)
  log.info("Tokenizer: %d train images, %d steps/epoch, %d steps, codebooks fit at step %d and every "
           "%d steps after.", len(ds.train), steps_per_epoch, total, first_fit, refit_every)

  refit_source, refit_labels = ds.database, ds.labels("database")
  if 0 < t.get("refit_max_images", 0) < len(ds.database):
    # A fixed sample: k-means on 20k points places 256 centroids about as well as on 60k, and the
    # refit's feature pass is most of its cost on small machines.
    rows = np.sort(np.random.default_rng(c.seed).choice(len(ds.database), t.refit_max_images,
                                                        replace=False))
    refit_source, refit_labels = inference.Subset(ds.database, rows), refit_labels[rows]
    log.info("Codebook refits use %d of the %d database images.", len(rows), len(ds.database))
  writer: list[loop.MetricWriter] = []
  levels = config_lib.tokenizer_levels(c)

  def refit(step: int, state):
    if not writer:
      # The first step this process runs is where it resumed: the refit of that step is redone, so
      # its line goes (the log stays one line per refit, as in an uninterrupted run).
      writer.append(loop.MetricWriter(stage, resume_step=step, name="refits", redo_resume_step=True))
    if step < first_fit or (step - first_fit) % refit_every:
      return state
    feats = features.of_source(model, state["params"], refit_source, c, mesh)
    codebooks = rq.fit_residual_codebooks(feats, levels, c.ids.codebook_size,
                                          iters=t.kmeans_iters, init=t.kmeans_init,
                                          seed=c.seed * 100003 + step)
    failpoints.hit("tokenizer.refit")
    codes = rq.encode(feats, codebooks)
    stats = rq.rq_statistics(feats, codebooks, codes=codes)
    stats.update(identifiers.purity_stats(codes, refit_labels))
    log.info("Step %d: codebooks refit; %d unique identifiers, relative error %.4f, level-1 purity "
             "%.3f.", step, stats["num_identifiers"], stats[f"relative_error_l{levels}"],
             stats["purity_l1"])
    writer[0].write(step, stats)
    return dict(state, codebooks=parallel.replicate(codebooks, mesh))

  it = pipeline.train_iterator(ds.train, global_batch_size=t.batch_size,
                               image_size=c.data.image_size, seed=c.seed, crop_scale=c.data.crop_scale,
                               flip=c.data.flip, num_workers=c.data.num_workers)
  state = loop.train(stage_dir=stage, state=state, train_step=make_train_step(model, tx, c, first_fit),
                     data_iterator=it, mesh=mesh, total_steps=total,
                     checkpoint_every=c.checkpoint.every_steps, keep_checkpoints=c.checkpoint.keep,
                     log_every=c.log_every_steps, before_step=refit, starting_state=starting_state,
                     description="tokenizer")
  if writer:
    writer[0].close()
  return finalize(c, workdir, mesh, model, state["params"], ds)


def finalize(c, workdir: Workdir, mesh, model, params, ds) -> dict[str, Any]:
  """Final features → identifiers of the config's kind → index; every file written atomically."""
  feats = features.of_source(model, params, ds.database, c, mesh, description="database features")
  t0 = time.perf_counter()
  if c.ids.kind == "rqvae":  # codes of the pixels: the features serve the retriever and the baselines
    codes, extra = train_rqvae.train(c, workdir, mesh, ds.database)
    kind_stats = {"reconstruction_mse": extra.pop("reconstruction_mse"),
                  "rqvae_s": time.perf_counter() - t0, **train_rqvae.statistics(codes, c)}
  else:
    codes, extra = identifiers.assign(
        c.ids.kind, feats, length=c.ids.length, codebook_size=c.ids.codebook_size, seed=c.seed,
        kmeans_iters=c.tokenizer.kmeans_iters, kmeans_init=c.tokenizer.kmeans_init,
        hkm_clusters=c.ids.hkm_clusters)
    kind_stats = rq.rq_statistics(feats, extra["codebooks"], codes=codes) if "codebooks" in extra else {}
  stats = {"kind": c.ids.kind, **rq.identifier_stats(codes), **kind_stats}
  stats.update(identifiers.purity_stats(codes, ds.labels("database")))
  for warning in identifiers.collapse_warnings(stats, c.ids.length, c.ids.codebook_size):
    log.warning("Identifiers: %s.", warning)
  if jax.process_index() == 0:
    loop.write_events(workdir.path("tokenizer", "tb", "identifiers"), 0,
                      {k: v for k, v in stats.items() if isinstance(v, (int, float))})
  index = Index.build(codes, c.ids.codebook_size)
  # The index's build cost, as the baselines' (their training included, the encoder's not):
  # identifiers from the database features, then the valid-identifier table.
  stats.update(index_build_s=time.perf_counter() - t0)
  stats.update(index_bytes=index.nbytes, index_bytes_per_image=index.bytes_per_image)
  # orbax's save is collective: every process calls it, process 0 writes, all wait for the commit.
  workdir.save_params(TOKENIZER_PARAMS, params)
  if jax.process_index() == 0:
    files.write_npy(workdir.path(DATABASE_FEATURES), feats)
    failpoints.hit("tokenizer.outputs")
    files.write_npz(workdir.path(IDENTIFIERS), codes=codes, **extra)
    index.save(workdir.path(INDEX))
    files.write_json(workdir.path(TOKENIZER_STATS), stats)
  parallel.sync("tokenizer files written")  # later stages read them on every process
  log.info("Identifiers: %s", loggable_stats(stats))
  if c.ids.kind == "rqvae":  # its files count among the stage's outputs (the done marker checks them)
    return {**stats, "extra_outputs": [RQVAE_PARAMS, RQVAE_RECONSTRUCTIONS]}
  return stats


def aot_program(c: ml_collections.ConfigDict, mesh) -> dict[str, Any]:
  """The train step as ``(jitted, abstract args)`` for ahead-of-time compilation (shapes only)."""
  model = build.tokenizer(c, registry.num_classes(c.data))
  tx = make_optimizer(c, total_steps=1000)
  state = jax.eval_shape(init_fn(model, tx, c))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                      sharding=parallel.replicated(mesh)), state)
  s, b = c.data.image_size, c.tokenizer.batch_size
  sharded = parallel.batch_sharded(mesh)
  batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32, sharding=sharded),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharded)}
  programs = {"tokenizer_train_step": (make_train_step(model, tx, c), (state, batch))}
  if c.ids.kind == "rqvae":  # the RQ-VAE trains inside this stage
    programs.update(train_rqvae.aot_program(c, mesh))
  return programs
