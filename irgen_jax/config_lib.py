"""Helpers shared by the files in configs/: argument parsing in the big_vision style.

A config file is ``get_config(arg=None)``; ``arg`` is what follows the colon on the command line,
``--config=configs/fashion_mnist.py:runlocal,seed=3``: comma-separated flags (``runlocal``) and
``key=value`` pairs whose types follow the defaults.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import sys

import ml_collections

from irgen_jax.errors import ConfigError


def load_module(config_arg: str):
  """``configs/X.py[:ARG]`` -> (the config file as a module, ARG or None).

  Raises ``ConfigError`` when the file does not exist or has no ``get_config``.
  """
  path, _, arg = config_arg.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"no config file {path!r} (expected a file such as configs/fashion_mnist.py).")
  name = "_irgen_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses in a config file look their module up
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config(arg) function.")
  return module, arg or None


def load(config_arg: str) -> ml_collections.ConfigDict:
  """``configs/X.py[:ARG]`` -> the file's ``get_config(ARG)``, as ``--config=`` of a command loads it.

  Raises ``ConfigError`` when the file does not exist or rejects the argument.
  """
  module, arg = load_module(config_arg)
  return module.get_config(arg)


def field_problem(c: ml_collections.ConfigDict, field: str) -> str | None:
  """Why ``field`` ("a.b.c") names no field of ``c``, with the closest names; None when it does (the
  one check behind ``--config.FIELD`` flags, sweep grids and ``override``)."""
  node, walked = c, []
  for part in field.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      where = ".".join(walked) or "the config"
      close = difflib.get_close_matches(part, keys, n=3)
      hint = f"; did you mean {', '.join(close)}?" if close else (
          f"; its fields: {', '.join(sorted(keys))}" if keys else f" ({where} is not a section)")
      return f"{'.'.join(walked + [part])!r} is not a field of {where}{hint}"
    node = node[part]
    walked.append(part)
  return None


def override(c: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """A copy of ``c`` with ``{"a.b": value}`` overrides applied; ``ConfigError`` naming a field that
  does not exist or a value of another type than the field's."""
  out = ml_collections.ConfigDict(c.to_dict())
  for field, value in overrides.items():
    problem = field_problem(out, field)
    if problem:
      raise ConfigError(f"{field}: {problem}")
    node, parts = out, field.split(".")
    for part in parts[:-1]:
      node = node[part]
    old = node[parts[-1]]
    if isinstance(old, (list, tuple)) and isinstance(value, (list, tuple)):
      value = type(old)(value)
    try:
      node[parts[-1]] = value
    except TypeError as e:
      raise ConfigError(f"{field}={value!r}: expected a value like {old!r} ({e}).") from None
  return out


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"a,b=2,c=x"`` into a ConfigDict over ``defaults``; a bare name sets a bool to True.

  Unknown names are an error naming the name and the known ones, so typos never pass silently.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}.")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ConfigError(f"config argument {key!r} needs a value ({key}=...).")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"config argument {key}={value!r}: expected true or false.")
      out[key] = value.lower() in ("true", "1")
    elif isinstance(default, (int, float)):
      try:
        out[key] = type(default)(value)
      except ValueError:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise ConfigError(f"config argument {key}={value!r}: expected {kind}.") from None
    else:
      out[key] = value
  return out


def flatten(d, prefix: str = "") -> dict:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for comparing configs field by field)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def differences(c: ml_collections.ConfigDict, other_config: str) -> dict[str, str]:
  """Every field in which ``c`` differs from another run's ``config.json`` (``other_config``), in
  order, as ``{field: "field=theirs (here ours)"}``. A field that config.json lacks (a run started
  before the field existed) had its default."""
  base = flatten(json.loads(base_config().to_json_best_effort()))
  with open(other_config) as f:
    theirs = {**base, **flatten(json.load(f))}
  ours = flatten(json.loads(c.to_json_best_effort()))
  return {k: f"{k}={theirs.get(k)!r} (here {ours[k]!r})" for k in sorted(ours)
          if theirs.get(k) != ours[k]}


# What a run may change and still take another run's trained retriever (retriever.reuse_from): what
# only the evaluate stage reads (the search, the metrics), where files live, how often to log and
# checkpoint, and the reuse fields themselves. Anything else would make the retriever another run's.
RETRIEVER_REUSE_MAY_DIFFER = ("search.", "eval.", "stages", "tokenizer.reuse_from",
                              "retriever.reuse_from", "data.data_dir", "data.num_workers",
                              "checkpoint.", "log_every_steps")


def check_retriever_reuse(c: ml_collections.ConfigDict, source_root: str, source_config: str) -> None:
  """Raises ``ConfigError`` naming every field (its value there and here) in which ``c`` differs from
  the run in ``source_root`` (its config.json: ``source_config``) outside ``RETRIEVER_REUSE_MAY_DIFFER``:
  that run's retriever would not be this run's."""
  mismatch = [text for k, text in differences(c, source_config).items()
              if not k.startswith(RETRIEVER_REUSE_MAY_DIFFER)]
  if mismatch:
    raise ConfigError(f"config.retriever.reuse_from={source_root!r}: its retriever was trained with "
                      f"other settings: {', '.join(mismatch)}; a run may reuse it when they differ "
                      f"only in {', '.join(RETRIEVER_REUSE_MAY_DIFFER)}.")


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with the paper's settings (ViT-B/16 from CLIP, M=4, L=256, 12-block
  decoder, 224² inputs); dataset configs override what differs. Field meanings are documented here."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Stages run in this order; a finished stage is skipped on re-runs: data, tokenizer (also assigns
  # the identifiers and builds the index), retriever, evaluate (also writes the report).
  c.stages = "data,tokenizer,retriever,evaluate"
  c.compute_dtype = "bfloat16"   # activations; parameters and optimizer state stay float32

  c.data = dict(
      name="",              # a name from irgen_jax.data.registry
      data_dir="",          # TFDS data dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
      manual_dir="",        # datasets downloaded by hand (In-shop, ImageNet, folder datasets)
      image_size=224,       # model input (square)
      resize_size=256,      # eval: resize the shorter side, then center-crop image_size
      crop_scale=(0.35, 1.0),  # train: random resized crop, range of the area fraction
      flip=True,            # train: random horizontal flip
      num_workers=0,        # grain worker processes per host (0 = in-process)
      skip_corrupt=False,   # folder datasets: skip unreadable images (counted in the log)
      max_database=0,       # >0: only the first N database images (smoke tests)
      max_queries=0,        # >0: only the first N queries
      # <1: the models train on, and the tokenizer stage indexes, only this fixed class-stratified
      # fraction of the database; `python -m irgen_jax.insert --held_out` inserts the rest without
      # retraining (the paper's Table 6 protocol; registry.indexed_split).
      indexed_fraction=1.0,
      # name="synthetic": generated class-structured stand-in images (runlocal variants, tests).
      synthetic=dict(num_classes=0, image_shape=(0, 0, 3), num_database=0, num_queries=0),
  )

  # Identifiers: M tokens in [0, L). kind: "semantic" (the paper's tokenizer), "random" (random codes),
  # "hkm" (hierarchical k-means over the tokenizer's features, hkm_clusters per level), "rqvae" (an
  # RQ-VAE trained on the database's pixels: length = latent_size² · depth; models/rqvae.py).
  c.ids = dict(
      kind="semantic", length=4, codebook_size=256, hkm_clusters=100,
      # The paper's setting: an 8x8 map, depth 4, one shared codebook of ids.codebook_size codes.
      # channels: conv widths, one per stride-2 downsampling (the image is resized to
      # latent_size * 2^len(channels)). beta: the commitment weight; the codebook is an EMA (ema_decay)
      # whose codes assigned fewer than restart_below vectors per step restart at batch vectors.
      # normalize_latents: layer-normalize the latents before quantization (what keeps it from
      # collapsing: models/rqvae.py's _normalize).
      rqvae=dict(latent_size=8, depth=4, latent_dim=64, channels=(64, 128, 128, 256, 256),
                 normalize_latents=True, beta=0.25, ema_decay=0.99, restart_below=1.0,
                 batch_size=128, num_epochs=10.0, lr=1e-3, warmup_steps=200, weight_decay=0.0,
                 grad_clip=1.0),
  )

  encoder = dict(
      variant="B/16",       # from irgen_jax.models.vit's table; "" = the free sizes below
      width=768, depth=12, num_heads=12, patch_size=16, mlp_ratio=4.0, act="quick_gelu",
      init="clip",          # "clip" (weights from clip_path) | "random"
      clip_path="",         # a Hugging Face CLIP directory or an OpenAI CLIP .pt file
      remat=False,          # rematerialize blocks (less memory, ~30% more compute)
  )
  c.tokenizer = dict(
      encoder=encoder,
      proj_dim=0,           # >0: FC projection of f_cls to this width before quantization
      shared_head=True,     # one classifier for every prefix reconstruction (as the reference)
      lambda1=1.0,          # weight of the prefix-reconstruction classification losses (eq. 3)
      lambda2=1.0,          # weight of the residual (commitment) terms (eq. 3)
      batch_size=128, num_epochs=200.0,
      # encoder_lr_mult: the encoder's learning rate relative to lr (0 freezes it: no backward pass)
      lr=5e-4, encoder_lr_mult=0.01, warmup_steps=2000, weight_decay=0.05, b1=0.9, b2=0.96,
      grad_clip=0.0,
      refit_every_epochs=1,  # k-means refit of the codebooks between epochs (alternating optimization)
      first_refit_steps=0,  # the first fit after this many steps (0: before step 0, as the reference);
                            # before it the loss is the classifier's alone (no codebooks yet)
      refit_max_images=0,   # >0: refit on a fixed random sample of this many database images
                            # (0 = the whole database, as the paper; the final identifiers always
                            # use the whole database)
      kmeans_iters=20, kmeans_init="kmeans++",
      # A finished run's workdir: take its trained tokenizer instead of training one; this run only
      # recomputes the features and assigns identifiers of its own ids.kind (sweeps over identifiers).
      reuse_from="",
  )
  c.retriever = dict(
      encoder_init="clip",  # "tokenizer" (the stage-1 encoder) | "clip" | "random"
      encoder=encoder,      # architecture (and clip_path) when encoder_init is "clip" or "random"
      decoder=dict(depth=12, width=768, num_heads=12, mlp_ratio=4.0, remat=False),
      batch_size=512, num_epochs=200.0,
      lr=8e-5, encoder_lr_mult=0.01, warmup_steps=2000, weight_decay=0.05, b1=0.9, b2=0.96,
      grad_clip=0.0,
      label_smoothing=0.1,
      targets="class",      # "class": a uniformly random same-class database image (the paper)
                            # "neighbors": one of the num_neighbors nearest same-class images in the
                            # tokenizer's feature space (a within-class order for the decoder to learn)
      num_neighbors=0,
      # With targets="class": each token's target is its expectation over the class's database images
      # that share the drawn target's prefix (data/soft_targets.py): the paper's loss in expectation,
      # without the noise of one drawn identifier.
      soft_targets=False,
      # A finished run's workdir: take its trained retriever instead of training one. That run's config
      # must equal this one but for what only the evaluate stage reads (RETRIEVER_REUSE_MAY_DIFFER),
      # and its identifiers this run's (a sweep over search or eval settings trains once).
      reuse_from="",
  )
  # widen_to_list: the evaluate stage widens the last two levels' beams to the longest list a metric
  # reads (max(eval.ks), eval.map_at), so every IRGen column comes from a list at least that long.
  # loop: the search's identifier steps unrolled, or scanned (lax.scan) for long identifiers; "auto"
  # scans a run of >= 8 levels (decoding.beam_search.beam_search).
  # hedge: where the retriever's runner-up class has posterior >= threshold, the last `slots` of the
  # first `at` places list that class's images (a second search of `beam_size` beams restricted to its
  # first tokens): recall at K >= at for a little precision (decoding/hedge.py); slots=0: off.
  # class_first: the search restricted to the first tokens of the retriever's likeliest class (its
  # first-token distribution summed per class), so the list does not start in a class of less total
  # mass whose mass sits on fewer first tokens (decoding/hedge.py).
  # class_levels: how many levels (1..ids.length) both restrictions hold: 2 = also every two-token
  # prefix's class (the majority label under it), which skips the other classes' images that share a
  # first token; -1 = every level, down to the identifier itself, whatever ids.length is (so a sweep
  # over the identifier's length keeps that meaning).
  # xla_cpu_options: XLA:CPU options (DebugOptions fields, "xla_cpu_..." -> value) the search program
  # compiles with where it runs on CPUs (ignored elsewhere): a per-model tuning knob, e.g. the Fashion
  # default's (configs/fashion_mnist.py). They change float rounding, not the algorithm.
  c.search = dict(beam_size=30, query_batch_size=64, widen_to_list=True, loop="auto",
                  class_first=False, class_levels=1,
                  hedge=dict(slots=0, at=10, threshold=0.2, beam_size=10), xla_cpu_options={})
  c.eval = dict(
      ks=(1, 2, 4, 8),
      map_at=100,
      baselines=("linear_scan", "faiss_ivfpq", "scann"),
      ivf_nlist=100, ivf_nprobe=16, pq_subspaces=4, pq_bits=8,
      extra_encoder="",     # a CLIP checkpoint: baselines also over its features (paper's CLIP rows)
      # Queries searched again with twice the beams (is the beam wide enough?) and scored on
      # held-out pairs (the retriever's per-level token accuracy); 0 = neither.
      beam_check_queries=500,
      gallery_queries=12,
  )
  c.checkpoint = dict(every_steps=1000, keep=2)
  c.log_every_steps = 50
  return c


def runlocal_sizes(c: ml_collections.ConfigDict) -> None:
  """Shrinks a config in place so it runs on a laptop CPU in minutes (the `runlocal` variants)."""
  c.compute_dtype = "float32"
  c.data.update(max_database=256, max_queries=32, num_workers=0)
  c.ids.codebook_size = 16
  c.ids.rqvae.update(latent_size=2, depth=2, latent_dim=8, channels=(8, 16), batch_size=32,
                     num_epochs=2.0, warmup_steps=2)
  tiny = dict(variant="", width=32, depth=1, num_heads=2, patch_size=8, init="random", act="gelu")
  c.tokenizer.encoder.update(tiny)
  c.retriever.encoder.update(tiny)
  c.retriever.decoder.update(depth=1, width=32, num_heads=2)
  c.tokenizer.update(batch_size=32, num_epochs=2.0, warmup_steps=2, kmeans_iters=5, lr=1e-3,
                     encoder_lr_mult=1.0,
                     first_refit_steps=min(c.tokenizer.first_refit_steps, 2))
  # No CLIP checkpoint on a laptop: the retriever's encoder starts from the stage-1 encoder.
  c.retriever.update(encoder_init="tokenizer", batch_size=32, num_epochs=2.0, warmup_steps=2, lr=1e-3,
                     encoder_lr_mult=1.0)
  c.search.update(beam_size=8, query_batch_size=32)
  c.eval.update(ivf_nlist=8, beam_check_queries=16, gallery_queries=4)
  c.checkpoint.every_steps = 4
  c.log_every_steps = 2


STAGES = ("data", "tokenizer", "retriever", "evaluate")
IDENTIFIER_KINDS = ("semantic", "random", "hkm", "rqvae")


def tokenizer_levels(c: ml_collections.ConfigDict) -> int:
  """M of the semantic tokenizer's residual quantizer: the identifier's length, except with RQ-VAE
  identifiers, whose length counts every latent position (the semantic tokenizer, trained for the
  retriever's encoder and the baselines' features, then quantizes to the RQ-VAE's depth)."""
  return int(c.ids.rqvae.depth) if c.ids.kind == "rqvae" else int(c.ids.length)


def stages(c: ml_collections.ConfigDict) -> list[str]:
  """The config's stage list, in run order."""
  names = [s.strip() for s in str(c.stages).split(",") if s.strip()]
  unknown = [s for s in names if s not in STAGES]
  if unknown or not names:
    raise ConfigError(f"config.stages={c.stages!r}: unknown stage(s) {unknown}; expected a comma-"
                     f"separated subset of {', '.join(STAGES)}.")
  return [s for s in STAGES if s in names]


def validate(c: ml_collections.ConfigDict, *, num_devices: int, num_processes: int = 1,
             dataset_names=None, workdir: str | None = None) -> None:
  """Checks a config before any compute; every error names the field and what was expected.

  With ``workdir``, also that every stage to run finds what it starts from: produced by an earlier
  stage of this run, or already in the workdir (e.g. ``stages=retriever`` with
  ``retriever.encoder_init='tokenizer'`` needs ``WORKDIR/tokenizer/params``).
  """
  need = _need
  stages(c)
  need(c.compute_dtype in ("float32", "bfloat16", "float16"), "compute_dtype", c.compute_dtype,
       "'float32', 'bfloat16' or 'float16'")
  if dataset_names is not None:
    need(c.data.name in dataset_names, "data.name", c.data.name,
         f"one of {', '.join(sorted(dataset_names))}")
  need(c.data.image_size > 0, "data.image_size", c.data.image_size, "a positive size")
  need(c.data.resize_size >= c.data.image_size, "data.resize_size", c.data.resize_size,
       f">= data.image_size ({c.data.image_size})")
  fraction = c.data.get("indexed_fraction", 1.0)
  need(0 < fraction <= 1, "data.indexed_fraction", fraction, "a fraction in (0, 1]")
  lo, hi = c.data.crop_scale
  need(0 < lo <= hi <= 1, "data.crop_scale", tuple(c.data.crop_scale), "0 < min <= max <= 1")
  need(c.ids.kind in IDENTIFIER_KINDS, "ids.kind", c.ids.kind,
       "'semantic', 'random', 'hkm' or 'rqvae'")
  if c.ids.kind == "rqvae":
    v = c.ids.rqvae
    need(v.latent_size >= 1, "ids.rqvae.latent_size", v.latent_size, "a latent map side >= 1")
    need(v.depth >= 1, "ids.rqvae.depth", v.depth, "a quantization depth >= 1")
    need(len(v.channels) >= 1 and all(int(ch) >= 1 for ch in v.channels), "ids.rqvae.channels",
         tuple(v.channels), "one positive conv width per downsampling, at least one")
    need(v.latent_dim >= 1, "ids.rqvae.latent_dim", v.latent_dim, "a codeword width >= 1")
    need(v.beta >= 0, "ids.rqvae.beta", v.beta, "a commitment weight >= 0")
    need(v.restart_below >= 0, "ids.rqvae.restart_below", v.restart_below,
         ">= 0 (0: dead codes are never restarted)")
    need(v.num_epochs > 0, "ids.rqvae.num_epochs", v.num_epochs, "> 0")
    need(v.lr > 0, "ids.rqvae.lr", v.lr, "> 0")
    need(c.ids.length == v.latent_size ** 2 * v.depth, "ids.length", c.ids.length,
         f"latent_size² · depth = {v.latent_size ** 2 * v.depth} for RQ-VAE identifiers "
         f"(ids.rqvae.latent_size={v.latent_size}, ids.rqvae.depth={v.depth})")
    need(v.batch_size > 0 and v.batch_size % num_devices == 0, "ids.rqvae.batch_size", v.batch_size,
         f"a positive multiple of the device count ({num_devices})")
    need(v.batch_size % num_processes == 0, "ids.rqvae.batch_size", v.batch_size,
         f"divisible by the process count ({num_processes})")
    need(0 < v.ema_decay < 1, "ids.rqvae.ema_decay", v.ema_decay, "a decay in (0, 1)")
  # Up to 256 tokens (the paper's RQ-VAE identifiers): beyond 16 the search scans its levels.
  need(1 <= c.ids.length <= 256, "ids.length", c.ids.length, "an identifier length M in [1, 256]")
  need(2 <= c.ids.codebook_size <= 65536, "ids.codebook_size", c.ids.codebook_size,
       "a codebook size L in [2, 65536]")
  for stage in ("tokenizer", "retriever"):
    s = c[stage]
    need(s.batch_size > 0 and s.batch_size % num_devices == 0, f"{stage}.batch_size", s.batch_size,
         f"a positive multiple of the device count ({num_devices})")
    need(s.batch_size % num_processes == 0, f"{stage}.batch_size", s.batch_size,
         f"divisible by the process count ({num_processes})")
    need(s.num_epochs > 0, f"{stage}.num_epochs", s.num_epochs, "> 0")
    need(s.lr > 0, f"{stage}.lr", s.lr, "> 0")
    need(s.encoder_lr_mult >= 0, f"{stage}.encoder_lr_mult", s.encoder_lr_mult,
         ">= 0 (0 freezes the encoder)")
  enc_inits = {"tokenizer": ("clip", "random"), "retriever": ("tokenizer", "clip", "random")}
  need(c.tokenizer.encoder.init in enc_inits["tokenizer"], "tokenizer.encoder.init",
       c.tokenizer.encoder.init, "'clip' or 'random'")
  need(c.retriever.encoder_init in enc_inits["retriever"], "retriever.encoder_init",
       c.retriever.encoder_init, "'tokenizer', 'clip' or 'random'")
  clip_users = []
  if c.tokenizer.encoder.init == "clip":
    clip_users.append("tokenizer.encoder")
  if c.retriever.encoder_init == "clip":
    clip_users.append("retriever.encoder")
  for field in clip_users:
    path = c[field.split(".")[0]].encoder.clip_path
    need(bool(path), f"{field}.clip_path", path,
         "the path of a CLIP checkpoint (a Hugging Face directory or an OpenAI .pt) because the "
         "encoder is initialized from CLIP")
    need(os.path.exists(path), f"{field}.clip_path", path, "an existing file or directory")
  need(c.tokenizer.lambda1 >= 0 and c.tokenizer.lambda2 >= 0, "tokenizer.lambda1/lambda2",
       (c.tokenizer.lambda1, c.tokenizer.lambda2), "non-negative weights")
  need(c.retriever.targets in ("class", "neighbors"), "retriever.targets", c.retriever.targets,
       "'class' or 'neighbors'")
  if c.retriever.targets == "neighbors":
    need(c.retriever.num_neighbors > 0, "retriever.num_neighbors", c.retriever.num_neighbors,
         "> 0 with targets='neighbors'")
  if c.retriever.get("soft_targets", False):
    need(c.retriever.targets == "class", "retriever.soft_targets", True,
         "False with retriever.targets='neighbors' (expected targets average over the whole class)")
  need(0 <= c.retriever.label_smoothing < 1, "retriever.label_smoothing",
       c.retriever.label_smoothing, "in [0, 1)")
  need(c.search.beam_size >= 1, "search.beam_size", c.search.beam_size, ">= 1")
  need(c.search.query_batch_size >= 1, "search.query_batch_size", c.search.query_batch_size, ">= 1")
  need(c.search.get("loop", "auto") in ("auto", "unroll", "scan"), "search.loop", c.search.get("loop"),
       "one of auto, unroll, scan")
  levels = c.search.get("class_levels", 1)
  need(levels == -1 or 1 <= levels <= c.ids.length, "search.class_levels", levels,
       f"-1 (every level) or in 1..ids.length ({c.ids.length})")
  for key, value in (c.search.get("xla_cpu_options") or {}).items():
    need(key.startswith("xla_cpu_") and isinstance(value, (str, bool, int, float)),
         f"search.xla_cpu_options.{key}", value, "an XLA:CPU option (a name xla_cpu_...) with a string, "
         "bool or number value")
  h = c.search.get("hedge") or ml_collections.ConfigDict(dict(slots=0))  # configs from before it
  need(h.slots >= 0, "search.hedge.slots", h.slots, ">= 0 (0 = no hedge)")
  if h.slots:
    need(h.at >= h.slots, "search.hedge.at", h.at, f">= search.hedge.slots ({h.slots})")
    need(0 < h.threshold <= 1, "search.hedge.threshold", h.threshold, "in (0, 1]")
    need(h.beam_size >= h.slots, "search.hedge.beam_size", h.beam_size,
         f">= search.hedge.slots ({h.slots})")
  ks = tuple(c.eval.ks)
  need(len(ks) > 0 and all(k >= 1 for k in ks), "eval.ks", ks, "positive K values")
  need(c.tokenizer.first_refit_steps >= 0, "tokenizer.first_refit_steps",
       c.tokenizer.first_refit_steps, ">= 0 (0 = before the first step)")
  need(c.eval.beam_check_queries >= 0, "eval.beam_check_queries", c.eval.beam_check_queries,
       ">= 0 (0 = no beam check)")
  need(c.tokenizer.get("refit_max_images", 0) >= 0, "tokenizer.refit_max_images",
       c.tokenizer.get("refit_max_images", 0), ">= 0 (0 = the whole database)")
  if c.eval.extra_encoder:
    need(os.path.exists(c.eval.extra_encoder), "eval.extra_encoder", c.eval.extra_encoder,
         "an existing CLIP checkpoint (a Hugging Face CLIP directory or an OpenAI CLIP .pt file)")
  unknown = [b for b in c.eval.baselines if b not in ("linear_scan", "faiss_ivfpq", "scann")]
  need(not unknown, "eval.baselines", tuple(c.eval.baselines),
       "names among linear_scan, faiss_ivfpq, scann")
  need(c.checkpoint.every_steps > 0, "checkpoint.every_steps", c.checkpoint.every_steps, "> 0")
  if workdir is not None:
    _check_stage_inputs(c, workdir)


def _need(ok, field, value, expected):
  if not ok:
    raise ConfigError(f"config.{field}={value!r}: expected {expected}.")


def _check_stage_inputs(c: ml_collections.ConfigDict, workdir: str) -> None:
  """Each stage to run starts from files of earlier stages: in this run's stages or in ``workdir``."""
  run = set(stages(c))

  def have(stage, *parts):
    return stage in run or os.path.exists(os.path.join(workdir, *parts))

  def missing(stage, *parts):
    return (f"{os.path.join(workdir, *parts)} (missing) from a finished {stage} stage, since "
            f"config.stages={c.stages!r} does not run it")

  if "retriever" in run:
    if c.retriever.encoder_init == "tokenizer":
      _need(have("tokenizer", "tokenizer", "params"), "retriever.encoder_init",
            c.retriever.encoder_init,
            "the trained tokenizer's encoder to initialize from: "
            + missing("tokenizer", "tokenizer", "params")
            + "; run the tokenizer stage first or set retriever.encoder_init to 'clip' or 'random'")
    _need(have("tokenizer", "tokenizer", "identifiers.npz"), "stages", c.stages,
          "the identifiers the retriever learns: " + missing("tokenizer", "tokenizer", "identifiers.npz"))
  if "evaluate" in run:
    _need(have("retriever", "retriever", "params"), "stages", c.stages,
          "the trained retriever: " + missing("retriever", "retriever", "params"))
    _need(have("tokenizer", "tokenizer", "identifiers.npz"), "stages", c.stages,
          "the identifiers and features of the database: "
          + missing("tokenizer", "tokenizer", "identifiers.npz"))
