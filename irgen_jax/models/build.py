"""The models a config describes, built the same way for training and for serving.

A trainer, the evaluate stage, the search and insert commands, the ahead-of-time compiler and the
benchmarks all build their models here, so a model that was trained is the model that is loaded.
Shapes come from ``jax.eval_shape`` (no compute): ``*_param_shapes`` are the templates that saved
parameters are restored onto.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from irgen_jax.errors import ConfigError
from irgen_jax import config_lib
from irgen_jax.models import retriever as retriever_lib
from irgen_jax.models import rqvae as rqvae_lib
from irgen_jax.models import vit
from irgen_jax.models.tokenizer import SemanticTokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(c: ml_collections.ConfigDict):
  """The activations' dtype (``config.compute_dtype``); parameters are always float32."""
  if c.compute_dtype not in DTYPES:
    raise ConfigError(f"config.compute_dtype={c.compute_dtype!r}: expected one of {sorted(DTYPES)}.")
  return DTYPES[c.compute_dtype]


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


# ------------------------------------------------------------------------------------------ tokenizer


def tokenizer(c: ml_collections.ConfigDict, num_classes: int) -> SemanticTokenizer:
  t = c.tokenizer
  enc = encoder(t.encoder, image_size=c.data.image_size, dtype=compute_dtype(c),
                from_clip=t.encoder.init == "clip")
  return SemanticTokenizer(encoder=enc, num_classes=num_classes, num_levels=config_lib.tokenizer_levels(c),
                           proj_dim=t.proj_dim or None, shared_rq_head=t.shared_head)


def feature_dim(model: SemanticTokenizer) -> int:
  """D, the width of f_cls (and of the codebooks)."""
  return model.proj_dim or model.encoder.width


def tokenizer_param_shapes(c: ml_collections.ConfigDict, model: SemanticTokenizer) -> Any:
  s = c.data.image_size
  codebooks = jax.ShapeDtypeStruct(
      (config_lib.tokenizer_levels(c), c.ids.codebook_size, feature_dim(model)), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32), codebooks)["params"]


# ------------------------------------------------------------------------------ RQ-VAE identifiers


def rqvae(c: ml_collections.ConfigDict) -> rqvae_lib.RQVAE:
  v = c.ids.rqvae
  return rqvae_lib.RQVAE(image_size=c.data.image_size, latent_size=v.latent_size, depth=v.depth,
                         latent_dim=v.latent_dim, channels=tuple(v.channels),
                         normalize_latents=bool(v.normalize_latents))


def rqvae_param_shapes(c: ml_collections.ConfigDict, model: rqvae_lib.RQVAE) -> Any:
  s = c.data.image_size
  codebook = jax.ShapeDtypeStruct((c.ids.codebook_size, model.latent_dim), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32), codebook)["params"]


# ------------------------------------------------------------------------------------------ retriever


def retriever_encoder_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The encoder section the retriever's encoder is built from (the tokenizer's when it inherits)."""
  return c.tokenizer.encoder if c.retriever.encoder_init == "tokenizer" else c.retriever.encoder


def retriever(c: ml_collections.ConfigDict) -> retriever_lib.Retriever:
  r, e = c.retriever, retriever_encoder_config(c)
  from_clip = e.init == "clip" if r.encoder_init == "tokenizer" else r.encoder_init == "clip"
  dtype = compute_dtype(c)
  enc = encoder(e, image_size=c.data.image_size, dtype=dtype, from_clip=from_clip)
  d = r.decoder
  return retriever_lib.Model(enc, width=d.width, depth=d.depth, num_heads=d.num_heads,
                             mlp_ratio=d.mlp_ratio, num_levels=c.ids.length,
                             num_tokens=c.ids.codebook_size, dtype=dtype,
                             remat=d.get("remat", False))


def retriever_param_shapes(c: ml_collections.ConfigDict, model: retriever_lib.Retriever) -> Any:
  return retriever_lib.param_shapes(model, (c.data.image_size, c.data.image_size, 3))
