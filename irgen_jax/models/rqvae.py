"""An RQ-VAE image tokenizer (Lee et al., 2022): the paper's pixel-reconstruction identifier ablation.

  images [B, S, S, 3] → conv encoder → latent map z [B, H, W, C]
                      → residual quantization of every position, depth D, one shared codebook [L, C]
                      → conv decoder → reconstructed images [B, S, S, 3]

The identifier of an image is its H·W·D codes in raster order, then depth: the D codes of position
(0, 0), then those of (0, 1), ... (``codes_to_identifiers``). IRGen's paper runs it "in the standard
default setting": an 8×8 map, depth 4, one codebook of 256 (a 256-token identifier).

Sizes: ``len(channels)`` stride-2 downsamplings, so the encoder sees the image resized to
``latent_size · 2^len(channels)`` pixels (28 → 32 → 16 → 8 → 4 for a 4×4 map; 224 → 256 → ... → 8) and
the decoder's output is resized back; any image size works with any map size.

Where this differs from the RQ-VAE paper, and why:
- the loss is pixel MSE plus the commitment term; no perceptual or adversarial terms: those sharpen
  textures for generation, and the ablation's question is whether codes learned to reconstruct pixels
  suit retrieval, which MSE answers at a fraction of the cost;
- a small residual conv net without normalization layers (no GroupNorm, no attention block): enough to
  reconstruct small images on the machines the ablation runs on;
- the latents are layer-normalized before they are quantized (``normalize_latents``, on by default):
  with their scale free, training collapsed (``_normalize`` says how).
The codebook is learned as the RQ-VAE paper learns it: exponential moving averages of the vectors each
code is assigned, over every depth (one shared codebook), with codes unused for a while restarted at
vectors of the current batch (``ema_update``). Not by k-means refits as our semantic tokenizer: a refit
needs a pass over the database per refit, and between refits the encoder moves away from the codebook,
while the EMA follows it at every step, in the jitted step, with its state in the checkpoint.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from irgen_jax.models import rq


class _ResBlock(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.channels, (3, 3), name="conv1")(nn.gelu(x))
    h = nn.Conv(self.channels, (3, 3), name="conv2")(nn.gelu(h))
    return x + h


class _Encoder(nn.Module):
  channels: Sequence[int]
  latent_dim: int

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.channels[0], (3, 3), name="stem")(x)
    for i, ch in enumerate(self.channels):
      x = nn.Conv(ch, (3, 3), strides=(2, 2), name=f"down{i}")(nn.gelu(x))
      x = _ResBlock(ch, name=f"block{i}")(x)
    return nn.Conv(self.latent_dim, (1, 1), name="to_latent")(nn.gelu(x))


class _Decoder(nn.Module):
  channels: Sequence[int]

  @nn.compact
  def __call__(self, z):
    x = nn.Conv(self.channels[-1], (3, 3), name="from_latent")(z)
    for i, ch in reversed(list(enumerate(self.channels))):
      x = _ResBlock(x.shape[-1], name=f"block{i}")(x)
      b, h, w, c = x.shape
      x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")
      x = nn.Conv(ch, (3, 3), name=f"up{i}")(x)
    return nn.Conv(3, (3, 3), name="to_pixels")(nn.gelu(x))


def _normalize(z: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Zero mean, unit mean square over the last axis; no parameters.

  Why: without it the latents' scale is free, and the EMA codebook follows it with a lag of
  ~1/(1 - decay) steps. On Fashion-MNIST (the config's 4x4x4 map, one epoch) unnormalized latents
  trained well to step ~300 (pixel MSE 0.12, batch perplexity 200 of 256), while the largest
  codeword's norm, which tracks the latents, grew 7.5 → 14 by step 350; it was 33 at step 375 and
  120 at step 400, when perplexity had fallen to 10, the commitment term risen 0.04 → 4.4 and the
  MSE 0.11 → 0.72. The same run with this normalization kept the norm at ~7.9 to the end: MSE 0.10,
  perplexity 145 at step 467.
  """
  z = z - jnp.mean(z, axis=-1, keepdims=True)
  return z * jax.lax.rsqrt(jnp.mean(z * z, axis=-1, keepdims=True) + eps)


class Quantized(NamedTuple):
  """The quantizer's view of a latent map ``[B, H, W, C]`` at depth D."""
  codes: jax.Array      # int32 [B, H, W, D]
  quantized: jax.Array  # float32 [B, H, W, C]: the sum of the D codewords of each position
  inputs: jax.Array     # float32 [B·H·W, D, C]: the vector each depth quantized (the EMA's data)


def quantize(z: jax.Array, codebook: jax.Array, depth: int) -> Quantized:
  """Residual quantization of every position of ``z [B, H, W, C]`` with ``codebook [L, C]`` at every
  depth (``rq.quantize`` with the codebook repeated D times: the same greedy nearest-codeword rule)."""
  b, h, w, c = z.shape
  flat = z.reshape(b * h * w, c).astype(jnp.float32)
  q = rq.quantize(flat, jnp.broadcast_to(codebook, (depth,) + codebook.shape))
  inputs = jnp.concatenate([flat[:, None], q.residuals[:, :-1]], axis=1)
  return Quantized(q.codes.reshape(b, h, w, depth), q.prefix[:, -1].reshape(b, h, w, c), inputs)


def codes_to_identifiers(codes: jax.Array) -> jax.Array:
  """``[B, H, W, D]`` → ``[B, H·W·D]``: raster order, then depth."""
  return codes.reshape(codes.shape[0], -1)


def identifiers_to_codes(ids: jax.Array, latent_size: int, depth: int) -> jax.Array:
  """The inverse of ``codes_to_identifiers``."""
  return ids.reshape(ids.shape[0], latent_size, latent_size, depth)


class RQVAE(nn.Module):
  """Encoder, shared-codebook residual quantizer and decoder (module docstring).

  Attributes:
    image_size: S, the input's side.
    latent_size: H = W, the latent map's side.
    depth: D, codes per position.
    latent_dim: C, the latent (and codeword) width.
    channels: conv widths, one per stride-2 downsampling (coarse last).
    normalize_latents: layer-normalize every latent vector (no learned scale or offset: each has zero
      mean and unit mean square over its C channels) before it is quantized (``_normalize``).
  The codebook ``float32 [L, C]`` is an input, not a parameter: the EMA updates it (``ema_update``).
  """
  image_size: int
  latent_size: int
  depth: int
  latent_dim: int
  channels: Sequence[int]
  normalize_latents: bool = True

  def setup(self):
    self.encoder = _Encoder(tuple(self.channels), self.latent_dim)
    self.decoder = _Decoder(tuple(self.channels))

  @property
  def work_size(self) -> int:
    return self.latent_size * 2 ** len(self.channels)

  def encode(self, images: jax.Array) -> jax.Array:
    """The latent map ``float32 [B, H, W, C]`` of ``images [B, S, S, 3]``."""
    b = images.shape[0]
    x = jnp.asarray(images, jnp.float32)
    if self.work_size != self.image_size:
      x = jax.image.resize(x, (b, self.work_size, self.work_size, x.shape[-1]), "bilinear")
    z = self.encoder(x)
    return _normalize(z) if self.normalize_latents else z

  def decode(self, z: jax.Array) -> jax.Array:
    """Images ``float32 [B, S, S, 3]`` from a (quantized) latent map."""
    x = self.decoder(z)
    if self.work_size != self.image_size:
      x = jax.image.resize(x, (x.shape[0], self.image_size, self.image_size, x.shape[-1]), "bilinear")
    return x

  def identifiers(self, images: jax.Array, codebook: jax.Array) -> jax.Array:
    """int32 ``[B, H·W·D]``: the identifier of each image."""
    return codes_to_identifiers(quantize(self.encode(images), codebook, self.depth).codes)

  def __call__(self, images: jax.Array, codebook: jax.Array) -> dict[str, jax.Array]:
    """Encode, quantize (straight-through), decode.

    Returns ``reconstruction`` [B, S, S, 3], ``latent`` z and ``quantized`` ẑ [B, H, W, C] (ẑ without
    gradient), ``codes`` int32 [B, H·W·D] and ``inputs`` [B·H·W, D, C] for ``ema_update``.
    """
    codebook = jax.lax.stop_gradient(jnp.asarray(codebook, jnp.float32))
    z = self.encode(images)
    q = quantize(jax.lax.stop_gradient(z), codebook, self.depth)
    zq = jax.lax.stop_gradient(q.quantized)
    # Straight-through: the decoder sees ẑ, its gradient reaches the encoder as if it had seen z.
    recon = self.decode(z + jax.lax.stop_gradient(zq - z))
    return {"reconstruction": recon, "latent": z, "quantized": zq,
            "codes": codes_to_identifiers(q.codes), "inputs": q.inputs}


def loss(out: dict[str, jax.Array], images: jax.Array, *, beta: float) -> tuple[jax.Array, dict]:
  """Pixel MSE + ``beta`` · the commitment term ``mean ||z - sg(ẑ)||²`` (the codebook has no gradient
  term: the EMA learns it)."""
  recon = jnp.mean((out["reconstruction"] - images.astype(jnp.float32)) ** 2)
  commit = jnp.mean((out["latent"] - out["quantized"]) ** 2)
  return recon + beta * commit, {"reconstruction_mse": recon, "commitment": commit}


class EMA(NamedTuple):
  """The codebook's running statistics: how often each code was assigned, the sum of the vectors, and
  the averages' total weight ``1 - decay^steps`` (``count / weight``: assignments per step, unbiased
  from the first step on, as Adam's bias correction)."""
  count: jax.Array   # float32 [L]
  total: jax.Array   # float32 [L, C]
  weight: jax.Array  # float32 []


def init_ema(codebook_size: int, latent_dim: int) -> EMA:
  """Zero statistics: every code is dead. With the codebook at zeros every vector of the first batch
  picks code 0, which becomes their mean; the first step restarts all the others from the batch."""
  return EMA(jnp.zeros((codebook_size,), jnp.float32),
             jnp.zeros((codebook_size, latent_dim), jnp.float32), jnp.zeros((), jnp.float32))


def ema_update(ema: EMA, inputs: jax.Array, codes: jax.Array, key: jax.Array, *, decay: float,
               restart_below: float, eps: float = 1e-5) -> tuple[jax.Array, EMA, jax.Array]:
  """One EMA step of the shared codebook: ``(codebook [L, C], ema, restarted codes int32 [])``.

  ``inputs [N, D, C]``: the vector each depth quantized; ``codes [N, D]``: the code it got. Every
  depth's assignments count for the one codebook. A code assigned fewer than ``restart_below`` vectors
  per step on average (``count / weight``) is restarted at a random vector of this batch, with that
  usage: it must be assigned again at the next step, or it restarts elsewhere, until it lands where
  vectors are. No part of the codebook stays dead, and the codebook follows the encoder's latents as
  they move (restarting only codes unused for hundreds of steps let a Fashion-MNIST run collapse to a
  perplexity of 8 of 256 codes, its pixel MSE back to 0.98, within 100 steps).
  """
  size, width = ema.total.shape
  x = inputs.reshape(-1, width)
  onehot = (codes.reshape(-1)[:, None] == jnp.arange(size)[None, :]).astype(jnp.float32)
  # A one-hot matmul, not a scatter-add: deterministic on every backend (GPU scatter-adds of floats
  # are not), so a resumed run ends with the same bytes on a GPU too.
  counts = jnp.sum(onehot, axis=0)
  totals = jnp.matmul(onehot.T, x, precision=jax.lax.Precision.HIGHEST)
  count = decay * ema.count + (1 - decay) * counts
  total = decay * ema.total + (1 - decay) * totals
  weight = decay * ema.weight + (1 - decay)
  dead = count < restart_below * weight
  pick = x[jax.random.randint(key, (size,), 0, x.shape[0])]
  count = jnp.where(dead, restart_below * weight, count)
  total = jnp.where(dead[:, None], count[:, None] * pick, total)
  # Laplace smoothing keeps a rarely used code finite (the VQ-VAE EMA recipe).
  n = jnp.sum(count)
  smoothed = (count + eps) / (n + size * eps) * n
  return total / smoothed[:, None], EMA(count, total, weight), jnp.sum(dead).astype(jnp.int32)
