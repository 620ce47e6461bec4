"""What both stage trainers (and the evaluation) read from a config: data, encoders, dtypes, paths."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from irgen_jax.models import vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(c: ml_collections.ConfigDict):
  if c.compute_dtype not in DTYPES:
    raise ValueError(f"config.compute_dtype={c.compute_dtype!r}: expected one of {sorted(DTYPES)}.")
  return DTYPES[c.compute_dtype]


def load_dataset(d: ml_collections.ConfigDict, *, database_part: str = "indexed"):
  """The config's dataset (``irgen_jax.data.registry.load`` with the ``data`` fields).

  ``database_part``: "indexed" (what the models train on and the tokenizer indexes: with
  ``data.indexed_fraction`` < 1 a fixed part of the database) or "all" (the held-out rest after it).
  """
  from irgen_jax.data import registry
  return registry.load(
      d.name, data_dir=d.data_dir or None, manual_dir=d.manual_dir or None,
      max_database=d.max_database, max_queries=d.max_queries, skip_corrupt=d.skip_corrupt,
      synthetic=dict(d.synthetic) if d.name == "synthetic" else None,
      indexed_fraction=d.get("indexed_fraction", 1.0), database_part=database_part)


def prepare_dataset(d: ml_collections.ConfigDict) -> dict[str, Any]:
  """The ``data`` stage: builds the config's dataset files (idempotent)."""
  from irgen_jax.data import registry
  return registry.prepare(d.name, data_dir=d.data_dir or None, manual_dir=d.manual_dir or None,
                          skip_corrupt=d.skip_corrupt,
                          synthetic=dict(d.synthetic) if d.name == "synthetic" else None)


def encoder(e: ml_collections.ConfigDict, *, image_size: int, dtype, from_clip: bool) -> vit.ViT:
  """The ViT an ``encoder`` config section describes.

  From CLIP, the architecture is the checkpoint's (``vit.clip_config``) and ``variant``/sizes are
  ignored; otherwise ``variant`` ("B/16") or, when empty, the free sizes.
  """
  if from_clip:
    kw = vit.clip_config(e.clip_path)
    kw.update(image_size=image_size, dtype=dtype, remat=e.remat)
    return vit.ViT(**kw)
  kw = dict(image_size=image_size, dtype=dtype, remat=e.get("remat", False), act=e.act,
            mlp_dim=int(e.mlp_ratio * (vit.decode_variant(e.variant)["width"] if e.variant
                                       else e.width)))
  if e.variant:
    return vit.Model(e.variant, **kw)
  return vit.Model(width=e.width, depth=e.depth, num_heads=e.num_heads, patch_size=e.patch_size, **kw)


def graft_clip(params: Any, clip_path: str, *, at: str) -> Any:
  """``params`` with the subtree ``at`` replaced by the CLIP checkpoint's weights (resampled position
  embedding included); everything else untouched."""
  return vit.load(params, clip_path, at=at)


def stage_dir(workdir: str, stage: str) -> str:
  path = os.path.join(workdir, stage)
  os.makedirs(path, exist_ok=True)
  return path


def init_key(seed: int, stream: int) -> jax.Array:
  """A parameter-init key per (seed, purpose): stages never share randomness by accident."""
  return jax.random.fold_in(jax.random.key(seed), stream)


def epochs_to_steps(num_epochs: float, steps_per_epoch: int) -> int:
  return max(1, int(round(num_epochs * steps_per_epoch)))
