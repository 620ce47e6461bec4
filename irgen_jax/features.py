"""The trained tokenizer's f_cls over a split: codebook refits, identifiers, baselines, inserted images.

Always the eval transform and the model in eval mode (the reference computed refit features with the
training augmentation, a bug not copied here), batched over every device (``inference.map_split``).
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from irgen_jax import inference
from irgen_jax.models.tokenizer import SemanticTokenizer


def features_fn(model: SemanticTokenizer):
  """Jitted ``(params, images) -> f_cls float32 [B, D]`` (eval mode)."""
  @jax.jit
  def features(params, images):
    return model.apply({"params": params}, images, train=False, method="features")
  return features


def features_and_logits_fn(model: SemanticTokenizer):
  """Jitted ``(params, images) -> (f_cls float32 [B, D], class logits float32 [B, C])`` (eval mode)."""
  @jax.jit
  def both(params, images):
    return model.apply({"params": params}, images, train=False, method="features_and_logits")
  return both


def of_source(model: SemanticTokenizer, params, source, c: ml_collections.ConfigDict, mesh,
              description: str = "") -> np.ndarray:
  """float32 [len(source), D]: f_cls of every record, in record order."""
  fn = functools.partial(features_fn(model), params)
  feats, _ = inference.map_split(fn, source, mesh=mesh, batch_size=c.search.query_batch_size * 4,
                                 image_size=c.data.image_size, resize_size=c.data.resize_size,
                                 description=description)
  return feats
