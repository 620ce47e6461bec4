"""Stage 1, the semantic image tokenizer (paper section 3.1, eqs. 1-2); its loss is in trainers/losses.py.

encoder → f_cls (class token, optionally projected) → greedy residual quantization with fixed codebooks
→ classifier heads on f_cls and on every prefix reconstruction f̂≤m (through the straight-through
estimator, so those heads train the encoder too).

Codebooks are an input, not a parameter. The paper optimizes alternately: the network by gradient, the
codebooks by k-means on the residuals of freshly computed database features between epochs
(``rq.fit_residual_codebooks``). Keeping them out of ``params`` means the optimizer, weight decay and
checkpoints of params never touch them, and a refit is a new array, not a state surgery.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from irgen_jax.models import rq


class _LevelHeads(nn.Module):
  """One linear classifier per RQ level: ``[B, M, D] -> [B, M, C]``; kernel ``[M, D, C]``, bias ``[M, C]``."""
  num_levels: int
  num_classes: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
        "kernel", nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)),
        (self.num_levels, x.shape[-1], self.num_classes), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.num_levels, self.num_classes), jnp.float32)
    return jnp.einsum("bmd,mdc->bmc", x, kernel, precision=jax.lax.Precision.HIGHEST) + bias


class SemanticTokenizer(nn.Module):
  """Encoder + class-token feature + residual quantizer + classification heads.

  Attributes:
    encoder: any linen module with ``encoder(images, train=...) -> tokens [B, 1+P, W]`` (token 0 is
      the class token), e.g. ``models.vit.ViT``.
      Its params sit under ``params['encoder']`` (the name the optimizer's per-group learning rates use).
    num_classes: C, classes of the supervision labels.
    num_levels: M, the number of codebooks the model is called with. Required for per-level heads
      (it fixes their shape); with a shared head None accepts any M. When set, every call checks it.
    proj_dim: width D of f_cls after a Linear projection of the class token; None keeps the class token
      as is (the reference: ViT-B's 768-d pre-``ln_post`` token, no projection).
    shared_rq_head: True: one head ``rq_head`` (kernel ``[D, C]``) classifies every prefix
      reconstruction, as the reference's ``fc_rq``; False: one head per level, ``rq_heads`` (kernel
      ``[M, D, C]``). The f_cls head ``head`` is separate either way.
  """
  encoder: nn.Module
  num_classes: int
  num_levels: int | None = None
  proj_dim: int | None = None
  shared_rq_head: bool = True

  def setup(self):
    self.proj = None if self.proj_dim is None else nn.Dense(self.proj_dim, name="proj")
    # Heads in float32 whatever the encoder's dtype: they are tiny, and logits feed softmax/CE.
    self.head = nn.Dense(self.num_classes, name="head")
    if self.shared_rq_head:
      self.rq_head = nn.Dense(self.num_classes, name="rq_head")
    else:
      if self.num_levels is None:
        raise ValueError("shared_rq_head=False needs num_levels (one head per level).")
      self.rq_heads = _LevelHeads(self.num_levels, self.num_classes, name="rq_heads")

  def features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """f_cls, float32 ``[B, D]``: the (projected) class token, no normalization.

    Feature extraction for codebook fitting and for kNN baselines:
    ``model.apply(variables, images, method="features")``.
    """
    tokens = self.encoder(images, train=train)
    if tokens.ndim != 3:
      raise ValueError(f"encoder returned shape {tokens.shape}: expected tokens [B, 1+P, W].")
    # float32 from here: RQ codes come from distance argmins, which low precision would perturb.
    f_cls = tokens[:, 0].astype(jnp.float32)
    return f_cls if self.proj is None else self.proj(f_cls)

  def features_and_logits(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """(f_cls float32 ``[B, D]``, the class head's logits float32 ``[B, C]``): no codebooks needed."""
    f_cls = self.features(images, train=train)
    return f_cls, self.head(f_cls)

  def __call__(self, images: jax.Array, codebooks: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Runs the tokenizer on ``images [B, H, W, 3]`` with ``codebooks float32 [M, L, D]``.

    Returns:
      f_cls: float32 ``[B, D]``.
      logits: float32 ``[B, C]``, the head on f_cls.
      codes: int32 ``[B, M]``, the identifier of each image under ``codebooks``.
      prefix_recon: float32 ``[B, M, D]``, f̂≤m for m = 1..M (stop-gradient: no gradient anywhere).
      prefix_logits: float32 ``[B, M, C]``, the RQ head(s) on the straight-through f̂≤m, whose
        gradient flows into f_cls unchanged.
      code_counts: int32 ``[M, L]``, code use in this batch (for usage metrics).
    """
    f_cls = self.features(images, train=train)
    # Codebooks are fixed during a step (refit by k-means between epochs): no gradient may reach them.
    codebooks = jax.lax.stop_gradient(jnp.asarray(codebooks, jnp.float32))
    levels = codebooks.shape[0] if self.num_levels is None else self.num_levels
    if codebooks.ndim != 3 or codebooks.shape[0] != levels or codebooks.shape[-1] != f_cls.shape[-1]:
      raise ValueError(
          f"codebooks has shape {codebooks.shape}: expected [M={levels}, L, D={f_cls.shape[-1]}] "
          "(M: num_levels, D: the width of f_cls).")
    q = rq.quantize(jax.lax.stop_gradient(f_cls), codebooks)
    prefix = jax.lax.stop_gradient(q.prefix)
    prefix_st = rq.straight_through(f_cls, prefix)
    if self.shared_rq_head:
      prefix_logits = self.rq_head(prefix_st)
    else:
      prefix_logits = self.rq_heads(prefix_st)
    return {
        "f_cls": f_cls,
        "logits": self.head(f_cls),
        "codes": q.codes,
        "prefix_recon": prefix,
        "prefix_logits": prefix_logits,
        "code_counts": rq.code_counts(q.codes, codebooks.shape[1]),
    }
