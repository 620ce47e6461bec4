"""The identifier decoder (paper section 3.2): a pre-LayerNorm Transformer decoder over M tokens in [0, L).

Each block is ``x + self_attn(ln_1(x))`` (causal), ``x + cross_attn(ln_2(x), memory)`` (every encoder
token), ``x + mlp(ln_3(x))`` (MLP ratio x width, exact GELU). The public PyTorch reference's block replaces
the residual stream with its LayerNorm output (``x = ln(x); x = x + attn(x)``), which turns the residual
connections into a post-LN stack; this is the standard pre-LN block the paper describes.

Inputs. Position s of the decoder sees ``[start, l_1, ..., l_{M-1}][s]`` plus a learned position
embedding, and predicts ``l_{s+1}``: ``logits[:, s]`` is the distribution of ``codes[:, s]`` given
``codes[:, :s]``. The position table has M rows, not the reference's M + 1: the reference also feeds
``l_M``, whose output is never used and (causally) changes no earlier output; a reference table of M + 1
rows loads by dropping its last row.

Encoder tokens ("memory") are LayerNorm'ed once (``ln_memory``, on by default) before the cross-attention
projections: the CLIP tower is used without its ``ln_post``, and its raw residual stream has a few
channels far larger than the rest. The cross-attention key/value projections take any encoder width.

Two ways to run the same parameters:
- teacher forcing, ``Decoder.__call__(codes [B, S], memory [B, T, De]) -> logits [B, S, L]`` (S <= M);
- decoding, one token per beam per call: ``Decoder.context(memory [Q, T, De])`` computes every block's
  cross-attention keys/values once per query; ``Decoder.step(context, cache, prev_tokens [Q, B], t)``
  runs position t for the B beams of every query against an explicit self-attention KV cache
  (``Decoder.init_cache``, leaves ``[Q, B, M, H, Dh]``). Beams attend to their query's keys/values by an
  einsum over ``[Q, B, H, Dh] x [Q, T, H, Dh]``: the context is never copied per beam.

Precision: parameters are float32; ``dtype`` is the compute dtype of the matmuls (bfloat16 on
accelerators). LayerNorms, attention softmaxes and the output layer run in float32, and the residual
stream is carried in float32 (it is only M tokens long per sequence, so this costs nothing measurable and
keeps bfloat16 rounding out of a sum over 12-24 blocks). Logits are float32.

Parameter tree (``H`` heads of ``Dh = width / H``, ``De`` the encoder width)::

  token_embed/embedding [L, D]   start_token [D]   pos_embedding [M, D]   ln_memory/{scale,bias} [De]
  block_{i}/ln_1, self_attn/qkv/{kernel [D, 3, H, Dh], bias [3, H, Dh]}, self_attn/out/{kernel [H, Dh, D]}
           ln_2, cross_attn/q [D, H, Dh], cross_attn/kv [De, 2, H, Dh], cross_attn/out, ln_3, mlp/fc1, mlp/fc2
  ln_final/{scale,bias}   head/{kernel [D, L], bias [L]}
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# A finite "minus infinity" for masked attention logits: exp() of it is exactly 0 after the max
# subtraction, and it never produces inf - inf = nan.
_MASKED = -1e30


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
  # Statistics and output in float32 whatever the compute dtype: the next Dense casts to its dtype.
  # Two-pass variance: the one-pass E[x^2] - E[x]^2 form loses digits when the mean of x is large next
  # to its spread (seen on embeddings with an offset).
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False,
                      name=name)


def _dense(features: Any, dtype: Any, name: str, axis: Any = -1) -> nn.DenseGeneral:
  return nn.DenseGeneral(features, axis=axis, dtype=dtype, param_dtype=jnp.float32,
                         kernel_init=nn.initializers.xavier_uniform(), name=name)


def _softmax(logits: jax.Array, dtype: Any) -> jax.Array:
  # float32 softmax, probabilities cast back to the compute dtype for the value matmul.
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


class SelfAttention(nn.Module):
  """Causal multi-head self-attention with a fused qkv projection; ``[..., D] -> [..., D]`` in ``dtype``."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: dict[str, jax.Array] | None = None, t: int | None = None):
    """Teacher forcing (``cache is None``): x ``[N, S, D]`` -> ``[N, S, D]``, position s sees 0..s.

    Decoding: x ``[Q, B, D]`` is position ``t`` (an int, or a traced scalar) of every beam; ``cache``
    holds ``k``, ``v`` ``[Q, B, M, H, Dh]``. Writes this position's key/value at ``t``, attends to
    positions 0..t, and returns ``(y [Q, B, D], new cache)``.
    """
    d = x.shape[-1]
    h, dh = self.num_heads, d // self.num_heads
    qkv = _dense((3, h, dh), self.dtype, "qkv")(x)              # [..., 3, H, Dh]
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    q = q * jnp.asarray(dh ** -0.5, q.dtype)
    out_proj = _dense(d, self.dtype, "out", axis=(-2, -1))
    if cache is None:
      s = x.shape[1]
      logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32)
      causal = jnp.tril(jnp.ones((s, s), bool))
      probs = _softmax(jnp.where(causal, logits, _MASKED), self.dtype)
      return out_proj(jnp.einsum("nhqk,nkhd->nqhd", probs, v))
    new = {
        "k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k[:, :, None].astype(cache["k"].dtype), t, 2),
        "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v[:, :, None].astype(cache["v"].dtype), t, 2),
    }
    if isinstance(t, int):
      # Static t (the unrolled search): the read is a static slice of t + 1 positions, so no mask is
      # needed and each t compiles to its own small program.
      keys, values = new["k"][:, :, :t + 1], new["v"][:, :, :t + 1]  # [Q, B, t+1, H, Dh]
      logits = jnp.einsum("qbhd,qbshd->qbhs", q, keys, preferred_element_type=jnp.float32)
    else:
      # Traced t (a search that scans its steps): every step reads the whole static-size cache and
      # masks the positions after t; exp() of the masked logits is exactly 0, so only the order of
      # the sums can differ from the static path (float rounding).
      keys, values = new["k"], new["v"]                                # [Q, B, M, H, Dh]
      logits = jnp.einsum("qbhd,qbshd->qbhs", q, keys, preferred_element_type=jnp.float32)
      logits = jnp.where(jnp.arange(keys.shape[2]) <= t, logits, _MASKED)
    probs = _softmax(logits, self.dtype)
    return out_proj(jnp.einsum("qbhs,qbshd->qbhd", probs, values)), new


class CrossAttention(nn.Module):
  """Multi-head attention from decoder positions to encoder tokens; keys/values from any encoder width."""
  num_heads: int
  width: int
  dtype: Any = jnp.float32

  def setup(self):
    h, dh = self.num_heads, self.width // self.num_heads
    self.q = _dense((h, dh), self.dtype, "q")
    self.kv = _dense((2, h, dh), self.dtype, "kv")
    self.out = _dense(self.width, self.dtype, "out", axis=(-2, -1))

  def memory_kv(self, memory: jax.Array) -> dict[str, jax.Array]:
    """memory ``[N, T, De]`` -> ``{'k', 'v'}`` each ``[N, T, H, Dh]`` in ``dtype``."""
    kv = self.kv(memory)
    return {"k": kv[..., 0, :, :], "v": kv[..., 1, :, :]}

  def __call__(self, x: jax.Array, kv: dict[str, jax.Array]) -> jax.Array:
    """x ``[N, S, D]`` attends to ``kv`` of its own row n (``[N, T, H, Dh]``): ``[N, S, D]``.

    Teacher forcing: N = batch, S = positions. Decoding: N = queries, S = beams, so every beam of a
    query reads the query's single copy of the keys/values.
    """
    q = self.q(x)
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum("nshd,nthd->nhst", q, kv["k"], preferred_element_type=jnp.float32)
    probs = _softmax(logits, self.dtype)
    return self.out(jnp.einsum("nhst,nthd->nshd", probs, kv["v"]))


class Mlp(nn.Module):
  """``[..., D] -> [..., hidden] -> GELU (exact erf form, torch's nn.GELU) -> [..., D]`` in ``dtype``."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.gelu(_dense(self.hidden, self.dtype, "fc1")(x), approximate=False)
    return _dense(x.shape[-1], self.dtype, "fc2")(y)


class Block(nn.Module):
  """Pre-LN decoder block on a float32 residual stream ``[N, S, D]``.

  ``__call__`` is the teacher-forced path (cross keys/values computed from ``memory`` inside, so that
  ``remat`` recomputes them too); ``step`` is one decoding position against precomputed keys/values.
  """
  width: int
  num_heads: int
  mlp_dim: int
  ln_eps: float = 1e-5
  dtype: Any = jnp.float32

  def setup(self):
    self.ln_1 = _layer_norm(self.ln_eps, "ln_1")
    self.self_attn = SelfAttention(self.num_heads, self.dtype, name="self_attn")
    self.ln_2 = _layer_norm(self.ln_eps, "ln_2")
    self.cross_attn = CrossAttention(self.num_heads, self.width, self.dtype, name="cross_attn")
    self.ln_3 = _layer_norm(self.ln_eps, "ln_3")
    self.mlp = Mlp(self.mlp_dim, self.dtype, name="mlp")

  def memory_kv(self, memory: jax.Array) -> dict[str, jax.Array]:
    return self.cross_attn.memory_kv(memory)

  def __call__(self, x: jax.Array, memory: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.ln_1(x))
    x = x + self.cross_attn(self.ln_2(x), self.memory_kv(memory))
    return x + self.mlp(self.ln_3(x))

  def step(self, x: jax.Array, kv: dict[str, jax.Array], cache: dict[str, jax.Array],
           t: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    y, cache = self.self_attn(self.ln_1(x), cache, t)
    x = x + y
    x = x + self.cross_attn(self.ln_2(x), kv)
    return x + self.mlp(self.ln_3(x)), cache


class Decoder(nn.Module):
  """Autoregressive decoder of M-token identifiers over L codes, conditioned on encoder tokens.

  Attributes:
    num_tokens: L, the codebook size (vocabulary of every position).
    num_levels: M, the identifier length (rows of the position table; longest ``codes`` accepted).
    width, depth, num_heads: D, blocks, heads (paper: 768, 12, 12; 24 blocks for ImageNet/Places365).
    mlp_ratio: MLP hidden width / D (4 in the paper).
    dtype: compute dtype of the matmuls and of the caches; parameters are float32.
    remat: ``jax.checkpoint`` each block in the teacher-forced path (less activation memory, ~1/3 more
      compute in the backward pass); decoding is unaffected.
    norm_memory: LayerNorm the encoder tokens before cross-attention (see the module docstring).
    ln_eps: LayerNorm epsilon (torch's default 1e-5).
  """
  num_tokens: int
  num_levels: int
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  remat: bool = False
  norm_memory: bool = True
  ln_eps: float = 1e-5

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  def setup(self):
    self._check_sizes()
    d = self.width
    emb_init = nn.initializers.normal(stddev=0.02)
    self.token_embed = nn.Embed(self.num_tokens, d, dtype=jnp.float32, param_dtype=jnp.float32,
                                embedding_init=emb_init, name="token_embed")
    self.start_token = self.param("start_token", emb_init, (d,), jnp.float32)
    self.pos_embedding = self.param("pos_embedding", emb_init, (self.num_levels, d), jnp.float32)
    self.ln_memory = _layer_norm(self.ln_eps, "ln_memory") if self.norm_memory else None
    block = nn.remat(Block) if self.remat else Block
    mlp_dim = int(round(self.mlp_ratio * d))
    self.blocks = [block(d, self.num_heads, mlp_dim, self.ln_eps, self.dtype, name=f"block_{i}")
                   for i in range(self.depth)]
    self.ln_final = _layer_norm(self.ln_eps, "ln_final")
    # float32 output layer: D x L is < 0.1% of a step's FLOPs, and the logits feed log_softmax sums.
    self.head = nn.Dense(self.num_tokens, dtype=jnp.float32, param_dtype=jnp.float32,
                         kernel_init=nn.initializers.xavier_uniform(), name="head")

  @nn.nowrap
  def _check_sizes(self) -> None:
    for field in ("num_tokens", "num_levels", "width", "depth", "num_heads"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"Decoder.{field}={value!r}: expected a positive int.")
    if self.width % self.num_heads:
      raise ValueError(f"Decoder.width={self.width} is not divisible by num_heads={self.num_heads}.")
    if self.mlp_ratio <= 0:
      raise ValueError(f"Decoder.mlp_ratio={self.mlp_ratio}: expected > 0.")

  def _memory(self, memory: jax.Array) -> jax.Array:
    if memory.ndim != 3:
      raise ValueError(f"encoder tokens have shape {tuple(memory.shape)}: expected [N, T, De].")
    return self.ln_memory(memory) if self.ln_memory is not None else memory

  def _logits(self, x: jax.Array) -> jax.Array:
    return self.head(self.ln_final(x))

  def __call__(self, codes: jax.Array, memory: jax.Array, train: bool = False) -> jax.Array:
    """Teacher forcing: logits float32 ``[B, S, L]``; ``logits[:, s]`` predicts ``codes[:, s]``.

    Args:
      codes: int ``[B, S]``, 1 <= S <= M, tokens in [0, L). ``codes[:, S-1]`` is not read (nothing
        after it is predicted), so a prefix of length S-1 can be padded with any token to score
        its next token.
      memory: encoder tokens ``[B, T, De]`` (any float dtype, any De).
      train: accepted for the model contract; the decoder has no dropout, so it changes nothing.
    """
    del train
    if codes.ndim != 2 or not 1 <= codes.shape[1] <= self.num_levels:
      raise ValueError(f"codes have shape {tuple(codes.shape)}: expected [B, S] with 1 <= S <= "
                       f"M={self.num_levels}.")
    if not jnp.issubdtype(codes.dtype, jnp.integer):
      raise ValueError(f"codes have dtype {codes.dtype}: expected integer tokens.")
    if memory.ndim != 3 or memory.shape[0] != codes.shape[0]:
      raise ValueError(f"encoder tokens have shape {tuple(memory.shape)}: expected [B={codes.shape[0]}, "
                       "T, De].")
    b, s = codes.shape
    memory = self._memory(memory)
    start = jnp.broadcast_to(self.start_token, (b, 1, self.width))
    x = jnp.concatenate([start, self.token_embed(codes[:, :s - 1])], axis=1) + self.pos_embedding[:s]
    for blk in self.blocks:
      x = blk(x, memory)
    return self._logits(x)

  def context(self, memory: jax.Array) -> tuple[dict[str, jax.Array], ...]:
    """Per-query decoding context: for every block, cross-attention ``{'k', 'v'}`` ``[Q, T, H, Dh]``.

    Computed once per query (the keys/values of every encoder token, ``depth x 4 T De D`` FLOPs) and
    read by every beam and every step. Leaves are in the compute ``dtype``.
    """
    memory = self._memory(memory)
    return tuple(blk.memory_kv(memory) for blk in self.blocks)

  @nn.nowrap
  def init_cache(self, num_queries: int, beam_size: int) -> tuple[dict[str, jax.Array], ...]:
    """Zeros for the self-attention KV cache: per block ``{'k', 'v'}`` ``[Q, B, M, H, Dh]`` in ``dtype``.

    Needs no parameters (callable on an unbound module). Leading dims [Q, B], so a beam search can
    reorder beams by gathering every leaf along axis 1.
    """
    self._check_sizes()
    shape = (num_queries, beam_size, self.num_levels, self.num_heads, self.head_dim)
    return tuple({"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
                 for _ in range(self.depth))

  def step(self, context: tuple[dict[str, jax.Array], ...], cache: tuple[dict[str, jax.Array], ...],
           prev_tokens: jax.Array, t: int) -> tuple[jax.Array, tuple[dict[str, jax.Array], ...]]:
    """Decodes position ``t`` of every beam: (logits float32 ``[Q, B, L]`` of token t, new cache).

    Args:
      context: from :meth:`context`, leaves ``[Q, T, H, Dh]``.
      cache: from :meth:`init_cache` or a previous step (positions 0..t-1 filled), ``[Q, B, M, H, Dh]``.
      prev_tokens: int ``[Q, B]``, token t-1 of each beam; ignored at t = 0 (the start token is used).
      t: Python int in [0, M) (static: each t is its own small program under ``jit``), or a traced
        int32 scalar (one program for every t, as a ``lax.scan`` over the steps needs; the cache is
        read whole and masked after t).
    """
    if isinstance(t, int):
      if not 0 <= t < self.num_levels:
        raise ValueError(f"t={t!r}: expected a Python int in [0, M={self.num_levels}).")
    elif not (hasattr(t, "shape") and t.shape == () and jnp.issubdtype(t.dtype, jnp.integer)):
      raise ValueError(f"t={t!r}: expected a Python int in [0, M={self.num_levels}) or an integer "
                       "scalar array.")
    if len(cache) != self.depth or len(context) != self.depth:
      raise ValueError(f"cache has {len(cache)} and context {len(context)} blocks: expected "
                       f"depth={self.depth} each.")
    q, b = cache[0]["k"].shape[:2]
    if prev_tokens.shape != (q, b):
      raise ValueError(f"prev_tokens have shape {tuple(prev_tokens.shape)}: expected [Q={q}, B={b}] "
                       "(the cache's leading dims).")
    if context[0]["k"].shape[0] != q:
      raise ValueError(f"context has {context[0]['k'].shape[0]} queries, the cache {q}.")
    if isinstance(t, int):
      x = (jnp.broadcast_to(self.start_token, (q, b, self.width)) if t == 0
           else self.token_embed(prev_tokens))
    else:
      x = jnp.where(t == 0, self.start_token, self.token_embed(prev_tokens))
    x = x + self.pos_embedding[t]
    new_cache = []
    for blk, kv, c in zip(self.blocks, context, cache):
      x, c = blk.step(x, kv, c, t)
      new_cache.append(c)
    return self._logits(x), tuple(new_cache)
