"""The identifier decoder on its own: causality, the pre-LN residual, shapes, dtypes, remat, input checks.

Encoder tokens are random arrays here (the decoder only sees ``[B, T, De]``); the decoder's decode mode
is tested through the retriever's decode functions in test_retriever.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from irgen_jax.models.decoder import Decoder

L, M = 13, 4


def tiny(**kw) -> Decoder:
  return Decoder(**{**dict(num_tokens=L, num_levels=M, width=32, depth=2, num_heads=4), **kw})


def inputs(b=3, t=5, de=24, seed=0):
  rng = np.random.default_rng(seed)
  codes = jnp.asarray(rng.integers(0, L, (b, M)), jnp.int32)
  memory = jnp.asarray(rng.normal(size=(b, t, de)), jnp.float32)
  return codes, memory


@pytest.fixture(scope="module")
def model_and_params():
  model = tiny()
  codes, memory = inputs()
  return model, jax.jit(model.init)(jax.random.key(0), codes, memory)["params"]


# One jitted forward for the module's tests (same shapes: compiled once; CPU time is shared).
@jax.jit
def forward(params, codes, memory):
  return tiny().apply({"params": params}, codes, memory)


def test_causal_later_tokens_change_nothing_earlier_tokens_do(model_and_params):
  model, params = model_and_params
  codes, memory = inputs()
  fwd = lambda c: forward(params, c, memory)  # noqa: E731
  base = np.asarray(fwd(codes))
  for t in range(M):
    changed = codes.at[:, t].set((codes[:, t] + 1) % L)
    out = np.asarray(fwd(changed))
    # Token t is first read at position t + 1: positions 0..t see the same inputs.
    np.testing.assert_array_equal(out[:, :t + 1], base[:, :t + 1])
    if t + 1 < M:
      assert np.abs(out[:, t + 1:] - base[:, t + 1:]).min() > 0, f"position > {t} ignores token {t}"
  # The last token is never read (nothing after it is predicted).
  np.testing.assert_array_equal(np.asarray(fwd(codes.at[:, M - 1].set(0))), base)
  # And the encoder tokens reach every position (new random tokens: a constant shift or a scale of
  # every channel would be removed by ln_memory).
  other = np.asarray(forward(params, codes, inputs(seed=1)[1]))
  assert (np.abs(other - base).max(axis=(0, 2)) > 1e-3).all()


def test_prefix_lengths_give_the_same_logits(model_and_params):
  model, params = model_and_params
  codes, memory = inputs()
  full = np.asarray(forward(params, codes, memory))
  for s in (1, M - 1):
    part = np.asarray(forward(params, codes[:, :s], memory))
    assert part.shape == (3, s, L)
    np.testing.assert_allclose(part, full[:, :s], atol=1e-6, rtol=1e-6)


def test_pre_ln_residual_stream_is_kept(model_and_params):
  """With every sublayer's output projection zeroed, each block must be the identity (x + 0).

  The reference's block (``x = ln(x); x = x + attn(x)``) would instead normalize the stream, so the
  logits would differ from ``head(ln_final(embedding + position))``.
  """
  _, params = model_and_params
  codes, memory = inputs()
  # Make the embeddings far from unit scale so that an extra LayerNorm would show.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 7.0 + 3.0 if p[-1].key in ("embedding", "start_token", "pos_embedding") else x,
      params)

  def zero_outputs(path, x):
    names = [getattr(k, "key", None) for k in path]
    return jnp.zeros_like(x) if ("out" in names or "fc2" in names) else x
  zeroed = jax.tree_util.tree_map_with_path(zero_outputs, params)
  got = forward(zeroed, codes, memory)

  x = jnp.concatenate([jnp.broadcast_to(params["start_token"], (3, 1, 32)),
                       params["token_embed"]["embedding"][codes[:, :-1]]], axis=1) + params["pos_embedding"]
  ln = params["ln_final"]
  x = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5) * ln["scale"] + ln["bias"]
  want = x @ params["head"]["kernel"] + params["head"]["bias"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


def test_shapes_dtypes_bfloat16_and_other_encoder_width(model_and_params):
  f32, params = model_and_params                            # encoder width 24 != decoder width 32
  codes, memory = inputs()
  bf16 = tiny(dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  shapes = jax.tree.map(jnp.shape, params)
  assert shapes["block_0"]["cross_attn"]["kv"]["kernel"] == (24, 2, 4, 8)
  assert shapes["block_0"]["self_attn"]["qkv"]["kernel"] == (32, 3, 4, 8)
  assert shapes["pos_embedding"] == (M, 32) and shapes["head"]["kernel"] == (32, L)
  # The parameter tree does not depend on the compute dtype.
  assert jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(bf16.init, jax.random.key(0), codes,
                                                                   memory)["params"]) == \
      jax.tree.map(lambda x: (x.shape, x.dtype), params)

  @jax.jit
  def teacher_and_cached(p, codes, memory):
    """bfloat16 teacher forcing, and the same logits by M cached steps (one beam per query)."""
    full = bf16.apply({"params": p}, codes, memory)
    ctx = bf16.apply({"params": p}, memory, method=Decoder.context)
    cache, steps = bf16.init_cache(codes.shape[0], 1), []
    for t in range(M):
      prev = codes[:, max(t - 1, 0)][:, None]
      logits, cache = bf16.apply({"params": p}, ctx, cache, prev, t, method=Decoder.step)
      steps.append(logits[:, 0])
    return full, jnp.stack(steps, 1), ctx, cache

  lo, cached, ctx, cache = teacher_and_cached(params, codes, memory.astype(jnp.bfloat16))
  hi = forward(params, codes, memory)
  assert lo.dtype == cached.dtype == jnp.float32 and lo.shape == cached.shape == (3, M, L)
  # bfloat16 matmuls: close to float32, not equal; the cached path agrees to bfloat16 rounding.
  scale = float(jnp.abs(hi).max())
  assert 0 < float(jnp.abs(lo - hi).max()) < 0.1 * scale
  assert float(jnp.abs(cached - lo).max()) < 0.05 * scale
  # Decoding state is in the compute dtype: per query [Q, T, H, Dh], per beam [Q, B, M, H, Dh].
  assert ctx[0]["k"].shape == (3, 5, 4, 8) and ctx[0]["v"].dtype == jnp.bfloat16
  assert len(cache) == 2 and cache[0]["k"].shape == (3, 1, M, 4, 8) and cache[0]["k"].dtype == jnp.bfloat16


def test_remat_same_params_and_values_with_checkpointed_blocks(model_and_params):
  plain, params = model_and_params
  codes, memory = inputs()
  remat = tiny(remat=True)
  assert jax.tree.structure(jax.eval_shape(remat.init, jax.random.key(0), codes, memory)["params"]) == \
      jax.tree.structure(params)
  got = jax.jit(lambda p: remat.apply({"params": p}, codes, memory))(params)
  np.testing.assert_allclose(np.asarray(got), np.asarray(forward(params, codes, memory)), rtol=1e-6,
                             atol=1e-6)

  # Each block is a jax.checkpoint region (gradients through it are JAX's job; that the flag reaches
  # the blocks is ours). Checked on the jaxpr: no compile.
  def checkpoints(model):
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, codes, memory))(params)
    return sum("checkpoint" in str(e.primitive) or "remat" in str(e.primitive) for e in jaxpr.jaxpr.eqns)
  assert checkpoints(remat) == 2 and checkpoints(plain) == 0


def test_bad_inputs_raise_before_compute(model_and_params):
  model, params = model_and_params
  codes, memory = inputs()
  apply = lambda *a, **k: model.apply({"params": params}, *a, **k)  # noqa: E731
  with pytest.raises(ValueError, match=r"codes have shape \(3, 5\): expected \[B, S\] with 1 <= S <= M=4"):
    apply(jnp.zeros((3, 5), jnp.int32), memory)
  with pytest.raises(ValueError, match="expected integer tokens"):
    apply(codes.astype(jnp.float32), memory)
  with pytest.raises(ValueError, match=r"encoder tokens have shape \(2, 5, 24\): expected \[B=3"):
    apply(codes, memory[:2])
  ctx = apply(memory, method=Decoder.context)
  cache = model.init_cache(3, 2)
  with pytest.raises(ValueError, match=r"t=4: expected a Python int in \[0, M=4\)"):
    apply(ctx, cache, jnp.zeros((3, 2), jnp.int32), 4, method=Decoder.step)
  with pytest.raises(ValueError, match=r"prev_tokens have shape \(3, 1\): expected \[Q=3, B=2\]"):
    apply(ctx, cache, jnp.zeros((3, 1), jnp.int32), 1, method=Decoder.step)
  with pytest.raises(ValueError, match="not divisible by num_heads=5"):
    tiny(num_heads=5).init_cache(1, 1)
