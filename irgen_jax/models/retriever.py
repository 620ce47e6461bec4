"""Stage 2, the encoder-decoder retriever (paper section 3.2).

``Retriever`` = an image encoder (any linen module with ``encoder(images [B, H, W, C], train=...) ->
tokens [B, T, De]``, e.g. ``models.vit.ViT``) + a :class:`~irgen_jax.models.decoder.Decoder` that reads
every encoder token by cross-attention and predicts the M-token identifier of a neighbour image. Params
are ``{'encoder': ..., 'decoder': ...}`` (the top-level names the optimizer's learning-rate groups use).

Decoding methods (``decoding.program.retriever_decode_fns`` turns them into the beam search's contract):

  init_context(images [Q, H, W, C]) -> context     encoder once + every block's cross K/V; leaves [Q, ...]
  context_from_tokens(tokens [Q, T, De])           -> context, from precomputed encoder outputs
  decode_step(context, cache, prev [Q, B], t)      -> (logits float32 [Q, B, L] of token t, new cache)

``t`` is a static Python int in [0, M). One step costs one token per beam; the context is read by
every beam through an einsum, never copied per beam.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from irgen_jax.models import vit
from irgen_jax.models.decoder import Decoder


class Retriever(nn.Module):
  """Encoder + identifier decoder.

  Attributes:
    encoder: image encoder, ``encoder(images, train=...) -> tokens [B, T, De]`` (its params sit under
      ``params['encoder']``).
    decoder: the :class:`Decoder` (M, L, sizes, compute dtype).
  """
  encoder: nn.Module
  decoder: Decoder

  def encode(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Encoder tokens ``[B, T, De]`` (the encoder's dtype) of float32 images ``[B, H, W, C]``."""
    tokens = self.encoder(images, train=train)
    if tokens.ndim != 3:
      raise ValueError(f"the encoder returned shape {tuple(tokens.shape)}: expected tokens [B, T, De].")
    return tokens

  def __call__(self, images: jax.Array, codes: jax.Array, train: bool = False) -> jax.Array:
    """Teacher-forced logits float32 ``[B, S, L]`` of ``codes`` int ``[B, S]`` (S <= M) given the images.

    ``logits[:, s]`` is the distribution of ``codes[:, s]`` given ``codes[:, :s]`` and the image.
    """
    return self.decoder(codes, self.encode(images, train=train), train=train)

  def decode(self, codes: jax.Array, tokens: jax.Array, train: bool = False) -> jax.Array:
    """As ``__call__`` from precomputed encoder tokens ``[B, T, De]``."""
    return self.decoder(codes, tokens, train=train)

  def init_context(self, images: jax.Array) -> Any:
    """Decoding context of ``images [Q, H, W, C]``: every block's cross-attention K/V, leaves ``[Q, ...]``."""
    return self.decoder.context(self.encode(images))

  def context_from_tokens(self, tokens: jax.Array) -> Any:
    """Decoding context from encoder tokens ``[Q, T, De]``."""
    return self.decoder.context(tokens)

  def decode_step(self, context: Any, cache: Any, prev_tokens: jax.Array, t: int) -> tuple[jax.Array, Any]:
    """One decoding position for every beam: see :meth:`Decoder.step`."""
    return self.decoder.step(context, cache, prev_tokens, t)


# ------------------------------------------------------------------------------------------ factory

# Config fields of an encoder that describe its weights, not its architecture (see config_lib).
_ENCODER_WEIGHT_FIELDS = ("init", "clip_path")


def _build_encoder(encoder: Any, dtype: Any) -> nn.Module:
  if isinstance(encoder, nn.Module):
    return encoder
  if isinstance(encoder, str):
    return vit.Model(encoder, dtype=dtype)
  if hasattr(encoder, "to_dict"):  # an ml_collections.ConfigDict
    encoder = encoder.to_dict()
  if not isinstance(encoder, Mapping):
    raise ValueError(f"encoder={encoder!r}: expected a linen Module, a ViT variant name ('B/16') or a "
                     "dict of ViT sizes.")
  kw = {k: v for k, v in encoder.items() if k not in _ENCODER_WEIGHT_FIELDS}
  variant = kw.pop("variant", None) or None
  ratio = kw.pop("mlp_ratio", None)
  if ratio is not None and "mlp_dim" not in kw:
    width = kw.get("width") or vit.decode_variant(variant)["width"]
    kw["mlp_dim"] = int(round(ratio * width))
  kw.setdefault("dtype", dtype)
  return vit.Model(variant, **kw)


def Model(encoder: Any, *, width: int = 768, depth: int = 12, num_heads: int = 12,  # noqa: N802
          mlp_ratio: float = 4.0, num_levels: int = 4, num_tokens: int = 256, dtype: Any = jnp.float32,
          remat: bool = False, norm_memory: bool = True) -> Retriever:
  """A :class:`Retriever` from explicit sizes (big_vision's factory name).

  Args:
    encoder: a linen module with the encoder contract (used as is), or a ViT given by variant name
      (``'B/16'``) or by a dict of ``vit.Model`` arguments (``variant`` may be ``''``; config-only fields
      ``init``/``clip_path`` are ignored, ``mlp_ratio`` becomes ``mlp_dim``); a built ViT gets ``dtype``
      unless the dict names one.
    width, depth, num_heads, mlp_ratio: the decoder's size (paper: 768, 12 (24 for ImageNet and
      Places365), 12, 4).
    num_levels, num_tokens: M and L of the identifiers (paper: 4, 256).
    dtype: the decoder's compute dtype (parameters are float32).
    remat: rematerialize decoder blocks in training.
    norm_memory: LayerNorm the encoder tokens before cross-attention.
  """
  decoder = Decoder(num_tokens=num_tokens, num_levels=num_levels, width=width, depth=depth,
                    num_heads=num_heads, mlp_ratio=mlp_ratio, dtype=dtype, remat=remat,
                    norm_memory=norm_memory)
  decoder._check_sizes()  # fail on bad sizes here, not at the first init
  return Retriever(encoder=_build_encoder(encoder, dtype), decoder=decoder)


# ------------------------------------------------------------------------------------------ helpers


def encode(model: Retriever, params: Any, images: jax.Array) -> jax.Array:
  """Encoder tokens ``[B, T, De]`` of ``images [B, H, W, C]`` (eval mode)."""
  return model.apply({"params": params}, images, method=Retriever.encode)


def decode_prefix(model: Retriever, params: Any, prefix: jax.Array, tokens: jax.Array) -> jax.Array:
  """Next-token logits float32 ``[B, L]`` after ``prefix`` int ``[B, m]`` (0 <= m < M), with no cache.

  Runs the teacher-forced decoder over the m + 1 positions (cross-attention keys/values included), as
  a decoder without a cache must on every step; for baselines and tests.
  """
  b = prefix.shape[0]
  codes = jnp.concatenate([prefix.astype(jnp.int32), jnp.zeros((b, 1), jnp.int32)], axis=1)
  return model.apply({"params": params}, codes, tokens, method=Retriever.decode)[:, -1]


# ------------------------------------------------------------------------------------------ sizes


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or ``jax.ShapeDtypeStruct``."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def param_shapes(model: Retriever, image_shape: tuple[int, ...] | None = None) -> Any:
  """``variables['params']`` of ``model`` as ``jax.ShapeDtypeStruct`` (``jax.eval_shape``: no compute).

  ``image_shape`` is ``(H, W, C)``; default: the encoder's ``image_size`` with 3 channels (a ViT).
  """
  if image_shape is None:
    size = getattr(model.encoder, "image_size", None)
    if size is None:
      raise ValueError("the encoder has no image_size: pass image_shape=(H, W, C).")
    h, w = (size, size) if isinstance(size, int) else size
    image_shape = (h, w, 3)
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  codes = jax.ShapeDtypeStruct((1, model.decoder.num_levels), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), images, codes)["params"]


def param_counts(model: Retriever, image_shape: tuple[int, ...] | None = None) -> dict[str, int]:
  """Parameter counts ``{'encoder', 'decoder', 'total'}`` from :func:`param_shapes` (no compute)."""
  shapes = param_shapes(model, image_shape)
  counts = {name: count_params(sub) for name, sub in shapes.items()}
  counts["total"] = count_params(shapes)
  return counts
