"""The retriever (real tiny ViT + decoder): cached decoding through ``retriever_decode_fns`` against teacher
forcing, cache reordering, recompilation, the decode-function layout, dtypes, sizes, and a toy training run.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from irgen_jax.decoding import program
from irgen_jax.models import retriever as R
from irgen_jax.models import vit

L, M, Q, B = 16, 4, 2, 3
IMAGE = 16
ENCODER = dict(width=32, depth=1, num_heads=2, patch_size=8, image_size=IMAGE)  # 5 tokens of width 32
DECODER = dict(width=48, depth=2, num_heads=4, num_levels=M, num_tokens=L)      # width 48 != 32


def tiny_model(dtype=jnp.float32) -> R.Retriever:
  return R.Model(vit.Model(**ENCODER, dtype=dtype), **DECODER, dtype=dtype)


MODEL = tiny_model()
FNS = program.retriever_decode_fns(MODEL)


def images(n, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, IMAGE, IMAGE, 3)), jnp.float32)


@pytest.fixture(scope="module")
def params():
  return jax.jit(MODEL.init)(jax.random.key(0), images(1), jnp.zeros((1, M), jnp.int32))["params"]


# Compiled once per shape and shared by the tests below (compiles dominate on a small shared CPU).
forward = jax.jit(lambda p, x, c: MODEL.apply({"params": p}, x, c))
init = jax.jit(FNS.init)
encode = jax.jit(R.encode, static_argnums=0)

# Every call of the step in this file goes through here, always with [Q, B] = [2, 3], so however the
# tests are ordered each t must be traced exactly once (checked by test_stepping_does_not_recompile).
STEP_TRACES: collections.Counter = collections.Counter()


@functools.partial(jax.jit, static_argnums=(0, 5))
def counted_step(fns, p, context, cache, prev, t):
  STEP_TRACES[t] += 1  # runs only while tracing
  return fns.step(p, context, cache, prev, t)


def step(p, context, cache, prev, t):
  return counted_step(FNS, p, context, cache, prev, t)


def histories(seed=0):
  """int32 [Q, B, M]: different token histories for every beam of every query."""
  h = np.random.default_rng(seed).integers(0, L, (Q, B, M))
  h[:, :, 0] = np.arange(B)  # beams differ from their first token on
  return jnp.asarray(h, jnp.int32)


def teacher_forced(params, imgs, hist):
  """Logits [Q, B, M, L] of every beam's history by the full forward (images repeated per beam)."""
  q, b, m = hist.shape
  out = forward(params, jnp.repeat(imgs, b, axis=0), hist.reshape(q * b, m))
  return np.asarray(out).reshape(q, b, m, L)


def decode(params, context, hist, cache=None, start=0):
  """Steps t = start..M-1 feeding ``hist``'s tokens; returns (logits [Q, B, M-start, L], cache)."""
  cache = FNS.init_cache(*hist.shape[:2]) if cache is None else cache
  out = []
  for t in range(start, M):
    prev = hist[:, :, t - 1] if t else jnp.zeros(hist.shape[:2], jnp.int32)
    logits, cache = step(params, context, cache, prev, t)
    out.append(np.asarray(logits))
  return np.stack(out, axis=2), cache


def test_cached_steps_equal_teacher_forcing(params):
  imgs, hist = images(Q), histories()
  context = init(params, imgs)
  got, _ = decode(params, context, hist)
  want = teacher_forced(params, imgs, hist)
  assert got.shape == (Q, B, M, L) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # The beams really differ (a cache shared by mistake across beams would not be caught otherwise).
  assert np.abs(want[:, 0, 1:] - want[:, 1, 1:]).max() > 1e-2
  # The encoder-output entry point gives the same context.
  from_tokens = program.retriever_decode_fns(MODEL, from_tokens=True)
  same = jax.jit(from_tokens.init)(params, encode(MODEL, params, imgs))
  for a, b in zip(jax.tree.leaves(context), jax.tree.leaves(same)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_reordered_cache_equals_decoding_reordered_histories(params):
  imgs, hist = images(Q), histories()
  context = init(params, imgs)
  # Positions 0..1 of every beam, where a beam search is after step t = 1.
  cache = FNS.init_cache(Q, B)
  for t in range(2):
    _, cache = step(params, context, cache, hist[:, :, t - 1] if t else jnp.zeros((Q, B), jnp.int32), t)
  # The beam search keeps beams 2, 2, 0 of query 0 and 1, 0, 1 of query 1, each extended by a new token.
  parent = jnp.array([[2, 2, 0], [1, 0, 1]], jnp.int32)
  rows = jnp.arange(Q)[:, None]
  reordered = jax.tree.map(lambda x: x[rows, parent], cache)
  rng = np.random.default_rng(1)
  extension = jnp.asarray(rng.integers(0, L, (Q, B, M - 1)), jnp.int32)
  new = jnp.concatenate([hist[rows, parent][:, :, :1], extension], axis=2)
  got, _ = decode(params, context, new, cache=reordered, start=2)
  np.testing.assert_allclose(got, teacher_forced(params, imgs, new)[:, :, 2:], atol=1e-5, rtol=1e-5)
  from_scratch, _ = decode(params, context, new)
  np.testing.assert_allclose(got, from_scratch[:, :, 2:], atol=1e-5, rtol=1e-5)
  # Without the reorder the cache belongs to other histories, and the logits differ.
  stale, _ = decode(params, context, new, cache=cache, start=2)
  assert np.abs(stale - got).max() > 1e-3


def test_stepping_does_not_recompile(params):
  for round_ in range(3):
    fns = program.retriever_decode_fns(MODEL)  # a new but equal object: must hit the same programs
    p = jax.tree.map(lambda x: x * (1 + 0.01 * round_), params)
    context = init(p, images(Q, seed=round_))
    cache = fns.init_cache(Q, B)
    for t in range(M):
      prev = jnp.asarray(np.random.default_rng(t + 10 * round_).integers(0, L, (Q, B)), jnp.int32)
      logits, cache = counted_step(fns, p, context, cache, prev, t)
  jax.block_until_ready(logits)
  assert dict(STEP_TRACES) == {t: 1 for t in range(M)}


def _intermediate_shapes(jaxpr) -> set[tuple[int, ...]]:
  """Shapes of every value a jaxpr computes, nested jaxprs (pjit, custom_jvp, ...) included."""
  out = set()
  for eqn in jaxpr.eqns:
    out |= {tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars}
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out |= _intermediate_shapes(inner)
  return out


def test_decode_function_layout(params):
  imgs = images(Q)
  context = jax.eval_shape(FNS.init, params, imgs)

  def step_shapes(p, c, k, x, t):
    return jax.eval_shape(functools.partial(FNS.step, t=t), p, c, k, x)

  for leaf in jax.tree.leaves(context):
    assert leaf.shape == (Q, 5, 4, 12)          # [Q, T, H, Dh]: one copy per query, no beam axis
  for q, b in ((Q, B), (1, 5)):
    cache = FNS.init_cache(q, b)
    assert all(leaf.shape == (q, b, M, 4, 12) for leaf in jax.tree.leaves(cache))
    assert all(not leaf.any() for leaf in jax.tree.leaves(cache))
    ctx = jax.eval_shape(FNS.init, params, images(q))
    out, new_cache = step_shapes(params, ctx, cache, jnp.zeros((q, b), jnp.int32), 1)
    assert out.shape == (q, b, L) and out.dtype == jnp.float32
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_cache) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), cache)
  # Cross-attention reads the per-query keys/values directly: no intermediate of a step is the context
  # broadcast to the beams ([Q, B, T, ...] or [Q * B, T, ...]).
  jaxpr = jax.make_jaxpr(functools.partial(FNS.step, t=2))(
      params, context, FNS.init_cache(Q, B), jnp.zeros((Q, B), jnp.int32))
  shapes = _intermediate_shapes(jaxpr.jaxpr)
  # (sanity: the walk sees the step's values, e.g. the cross-attention logits over Q, B, H, T)
  assert any(sorted(s) == sorted((Q, B, 4, 5)) for s in shapes)
  for bad in ((Q, B, 5), (Q * B, 5)):
    assert not [s for s in shapes if s[:len(bad)] == bad], f"context broadcast to beams: {bad}"
  # The decode functions are hashable and equal across calls (a static argument of beam_search).
  again = program.retriever_decode_fns(MODEL)
  assert again == FNS and hash(again) == hash(FNS)
  assert program.retriever_decode_fns(tiny_model(jnp.bfloat16)) != FNS


def test_decode_prefix_matches_teacher_forcing(params):
  imgs, hist = images(Q), histories()
  want = teacher_forced(params, imgs, hist)[:, 0]              # beam 0 of each query: [Q, M, L]
  tokens = encode(MODEL, params, imgs)
  for m in (0, M - 1):
    got = jax.jit(R.decode_prefix, static_argnums=0)(MODEL, params, hist[:, 0, :m], tokens)
    np.testing.assert_allclose(np.asarray(got), want[:, m], atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_float32_params_and_logits():
  model = tiny_model(jnp.bfloat16)
  fns = program.retriever_decode_fns(model)
  p = jax.eval_shape(model.init, jax.random.key(0), images(1), jnp.zeros((1, M), jnp.int32))["params"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
  assert p["decoder"]["block_0"]["cross_attn"]["kv"]["kernel"].shape == (32, 2, 4, 12)
  logits = jax.eval_shape(model.apply, {"params": p}, images(Q), jnp.zeros((Q, M), jnp.int32))
  assert logits.shape == (Q, M, L) and logits.dtype == jnp.float32
  context = jax.eval_shape(fns.init, p, images(Q))
  cache = fns.init_cache(Q, B)
  assert {x.dtype for x in jax.tree.leaves(context)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(cache)} == {jnp.dtype(jnp.bfloat16)}
  out, _ = jax.eval_shape(functools.partial(fns.step, t=3), p, context, cache, jnp.zeros((Q, B), jnp.int32))
  assert out.dtype == jnp.float32


def test_param_counts(params):
  counts = R.param_counts(MODEL)
  assert counts == {"encoder": R.count_params(params["encoder"]),
                    "decoder": R.count_params(params["decoder"]), "total": R.count_params(params)}

  # The paper's size, from shapes only; the encoder from a config-style dict (config_lib's fields).
  enc = dict(variant="B/16", width=768, depth=12, num_heads=12, patch_size=16, mlp_ratio=4.0,
             act="quick_gelu", init="clip", clip_path="", remat=False)
  paper = R.Model(enc, width=768, depth=12, num_heads=12, num_levels=4, num_tokens=256)
  counts = R.param_counts(paper)
  d, de, l, m, depth = 768, 768, 256, 4, 12
  block = (d * 3 * d + 3 * d) + (d * d + d)                    # self-attention qkv, out
  block += (d * d + d) + (de * 2 * d + 2 * d) + (d * d + d)    # cross-attention q, kv, out
  block += (d * 4 * d + 4 * d) + (4 * d * d + d) + 3 * 2 * d   # MLP, three LayerNorms
  decoder = depth * block + l * d + d + m * d + 2 * de + 2 * d + d * l + l
  assert counts["decoder"] == decoder
  assert 85e6 < counts["encoder"] < 87e6                       # ViT-B/16 without proj: ~85.8M
  assert counts["total"] == counts["encoder"] + counts["decoder"]


def test_toy_training_learns_class_to_code_mapping(params):
  """Images of 4 classes -> a fixed identifier per class (two pairs share a first token, so the
  later tokens must come from the image, not from the prefix alone)."""
  codes_of_class = jnp.array([[1, 2, 3, 4], [1, 5, 6, 7], [8, 9, 10, 11], [8, 9, 12, 13]], jnp.int32)
  rng = np.random.default_rng(0)
  protos = rng.normal(size=(4, IMAGE, IMAGE, 3))
  labels = np.repeat(np.arange(4), 4)
  x = jnp.asarray(protos[labels] + 0.3 * rng.normal(size=(16, IMAGE, IMAGE, 3)), jnp.float32)
  y = codes_of_class[labels]
  tx = optax.adamw(3e-3, weight_decay=0.05)

  def loss_fn(p):
    logits = MODEL.apply({"params": p}, x, y, train=True)
    acc = jnp.mean(jnp.all(jnp.argmax(logits, -1) == y, axis=-1))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), acc

  @jax.jit
  def train_step(p, opt):
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss, acc

  p, opt = params, tx.init(params)
  losses = []
  for _ in range(40):
    p, opt, loss, acc = train_step(p, opt)
    losses.append(float(loss))
  assert losses[0] > 2.0                             # ~ log(16) at random init
  assert losses[-1] < 0.15 * losses[0], losses
  assert float(acc) == 1.0                           # every identifier right under teacher forcing
