"""The stage-1 tokenizer: outputs, the eq. 3-4 loss, its straight-through gradients, a toy fit."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from irgen_jax.models import rq
from irgen_jax.models.tokenizer import SemanticTokenizer
from irgen_jax.trainers.losses import tokenizer_loss

B, H, C, M, L, W = 6, 8, 5, 3, 4, 16  # batch, image side, classes, levels, codebook size, width


class TinyEncoder(nn.Module):
  """Stand-in with the encoder contract: images [B, H, W, 3] -> tokens [B, 1 + P, width]."""
  width: int = W
  patch: int = 4

  @nn.compact
  def __call__(self, images, train=False):
    b, h, w, c = images.shape
    p = self.patch
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
    x = nn.Dense(self.width, name="embed")(x)
    cls = jnp.broadcast_to(self.param("cls", nn.initializers.zeros, (self.width,)), (b, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)
    # The class token must see the patches: one mixing layer.
    return x + nn.Dense(self.width, name="mix")(jnp.tanh(x.mean(axis=1, keepdims=True)))


def _model(**kw):
  return SemanticTokenizer(encoder=TinyEncoder(), num_classes=C, **{"num_levels": M, **kw})


# Everything runs jitted: op-by-op dispatch compiles each primitive separately, which on a loaded 2-core
# machine costs more than the whole compiled programs.
_loss = jax.jit(tokenizer_loss)
_assign = jax.jit(rq.assign)
_prefixes = jax.jit(rq.reconstruct_prefixes)


def _key(seed=0):
  # RBG keys for parameter init: with the default threefry keys, XLA:CPU takes seconds to compile the
  # init of even these tiny models (~10 s for the 1-block ViT below); the tests do not care which
  # random stream initializes them.
  return jax.random.key(seed, impl="rbg")


def _jit_apply(model):
  return jax.jit(model.apply, static_argnames=("method", "train"))


def _data(seed=0, n=B):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(n, H, H, 3)), jnp.float32),
          jnp.asarray(rng.integers(0, C, n), jnp.int32))


def _codebooks(model, params, images, seed=0):
  """Codebooks drawn from the model's own features so codes spread over several codewords."""
  f = np.asarray(model.apply(params, images, method="features"))
  rng = np.random.default_rng(seed)
  books = [f[rng.choice(len(f), L, replace=False)] * (0.5 ** m) for m in range(M)]
  return jnp.asarray(np.stack(books), jnp.float32)


class _Jitted:
  """A module whose ``apply`` is jitted once (a fresh ``jax.jit`` per call site would recompile)."""

  def __init__(self, module):
    self.module = module
    self.apply = _jit_apply(module)


@pytest.fixture(scope="module")
def setup():
  model = _Jitted(_model())
  images, labels = _data()
  params = jax.jit(model.module.init)(_key(), images, jnp.zeros((M, L, W)))
  return model, params, images, labels, _codebooks(model, params, images)


def _ce(logits, labels):
  logits = np.asarray(logits, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return float(np.mean(logz - logits[np.arange(len(labels)), labels]))


def test_outputs_shapes_dtypes_and_codes(setup):
  model, params, images, _, books = setup
  out = model.apply(params, images, books)
  expect = {"f_cls": ((B, W), jnp.float32), "logits": ((B, C), jnp.float32),
            "codes": ((B, M), jnp.int32), "prefix_recon": ((B, M, W), jnp.float32),
            "prefix_logits": ((B, M, C), jnp.float32), "code_counts": ((M, L), jnp.int32)}
  assert set(expect) <= set(out)
  for k, (shape, dtype) in expect.items():
    assert out[k].shape == shape and out[k].dtype == dtype, (k, out[k].shape, out[k].dtype)
  np.testing.assert_array_equal(out["codes"], _assign(out["f_cls"], books))
  np.testing.assert_allclose(out["prefix_recon"], _prefixes(out["codes"], books), atol=1e-5)
  np.testing.assert_array_equal(out["code_counts"].sum(1), [B] * M)
  np.testing.assert_array_equal(model.apply(params, images, method="features"), out["f_cls"])
  assert len(np.unique(np.asarray(out["codes"][:, 0]))) > 1  # the fixture's codebooks are not degenerate


def test_rq_heads_classify_the_reconstructions(setup):
  model, params, images, _, books = setup
  out = model.apply(params, images, books)
  head = params["params"]["rq_head"]
  want = np.asarray(out["prefix_recon"]) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  np.testing.assert_allclose(out["prefix_logits"], want, atol=1e-5)
  f_head = params["params"]["head"]
  np.testing.assert_allclose(out["logits"], out["f_cls"] @ f_head["kernel"] + f_head["bias"], atol=1e-5)


def test_shared_and_per_level_head_shapes():
  images, _ = _data()
  shapes = lambda model, d=W: jax.tree.map(  # noqa: E731
      jnp.shape, jax.eval_shape(model.init, jax.random.key(0), images, jnp.zeros((M, L, d)))["params"])
  shared = shapes(_model(shared_rq_head=True))
  per_level = shapes(_model(shared_rq_head=False))
  assert shared["rq_head"] == {"kernel": (W, C), "bias": (C,)}
  assert per_level["rq_heads"] == {"kernel": (M, W, C), "bias": (M, C)}
  assert "rq_heads" not in shared and "rq_head" not in per_level
  assert shared["head"] == per_level["head"] == {"kernel": (W, C), "bias": (C,)}
  assert set(shared) == {"encoder", "head", "rq_head"}  # codebooks are not params
  projected = shapes(_model(proj_dim=12), 12)
  assert projected["proj"]["kernel"] == (W, 12) and projected["head"]["kernel"] == (12, C)


def test_per_level_heads_apply_their_own_weights(setup):
  _, shared, images, _, books = setup
  model = _model(shared_rq_head=False)
  # The shared model's encoder and f_cls head plus random per-level heads (saves compiling an init).
  rng = np.random.default_rng(1)
  tree = {k: v for k, v in shared["params"].items() if k != "rq_head"}
  tree["rq_heads"] = {"kernel": jnp.asarray(rng.normal(size=(M, W, C)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(M, C)), jnp.float32)}
  params = {"params": tree}
  out = _jit_apply(model)(params, images, books)
  k, b = (np.asarray(params["params"]["rq_heads"][n]) for n in ("kernel", "bias"))
  prefix = np.asarray(out["prefix_recon"])
  want = np.stack([prefix[:, m] @ k[m] + b[m] for m in range(M)], axis=1)
  np.testing.assert_allclose(out["prefix_logits"], want, atol=1e-5)


def test_codebook_shape_is_checked(setup):
  model, params, images, _, books = setup
  with pytest.raises(ValueError, match="codebooks has shape"):
    model.apply(params, images, books[:2])
  with pytest.raises(ValueError, match="codebooks has shape"):
    model.apply(params, images, books[..., :8])
  with pytest.raises(ValueError, match="num_levels"):
    _model(shared_rq_head=False, num_levels=None).init(_key(), images, books)


def test_loss_equals_hand_computed_value():
  # B=2, C=3, M=2, D=2.
  f = np.array([[1.0, 2.0], [0.0, -1.0]], np.float32)
  prefix = np.array([[[1.0, 1.0], [1.0, 2.5]], [[0.0, 0.0], [0.5, -1.0]]], np.float32)
  logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]], np.float32)
  prefix_logits = np.array([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                            [[0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]], np.float32)
  labels = np.array([0, 1])
  outputs = {"f_cls": jnp.asarray(f), "logits": jnp.asarray(logits), "prefix_recon": jnp.asarray(prefix),
             "prefix_logits": jnp.asarray(prefix_logits), "codes": jnp.array([[0, 1], [1, 1]], jnp.int32),
             "code_counts": jnp.array([[1, 1], [0, 2]], jnp.int32)}
  lse = lambda v: math.log(sum(math.exp(t) for t in v))  # noqa: E731
  ce_cls = ((lse([2, 0, 0]) - 2) + (lse([0, 1, 3]) - 1)) / 2
  ce_l1 = ((lse([1, 0, 0]) - 1) + (lse([0, 2, 0]) - 2)) / 2
  ce_l2 = ((lse([0, 0, 0]) - 0) + (lse([0, 0, 1]) - 0)) / 2
  # Mean over batch and dims of (f - f̂≤m)²: level 1 errors [0,1],[0,1] -> 2/4; level 2 [0,.25],[.25,0].
  q1, q2 = 2 / 4, 0.5 / 4
  lam1, lam2 = 0.3, 2.0
  loss, metrics = _loss(outputs, labels, lambda1=lam1, lambda2=lam2)
  assert float(loss) == pytest.approx(ce_cls + lam1 * (ce_l1 + ce_l2) + lam2 * (q1 + q2), rel=1e-6)
  assert float(metrics["loss"]) == pytest.approx(float(loss))
  assert float(metrics["ce_cls"]) == pytest.approx(ce_cls, rel=1e-6)
  assert float(metrics["ce_l1"]) == pytest.approx(ce_l1, rel=1e-6)
  assert float(metrics["ce_l2"]) == pytest.approx(ce_l2, rel=1e-6)
  assert float(metrics["quant_err_l1"]) == pytest.approx(q1)
  assert float(metrics["quant"]) == pytest.approx(q1 + q2)
  assert float(metrics["acc_cls"]) == 0.5      # argmax [0, 2] vs labels [0, 1]
  assert float(metrics["acc_l1"]) == 1.0       # argmax [0, 1]
  assert float(metrics["acc_l2"]) == 0.5       # argmax [0 (tie -> first), 2]
  assert float(metrics["perplexity_l1"]) == pytest.approx(2.0) and int(metrics["unused_codes_l1"]) == 0
  assert float(metrics["perplexity_l2"]) == pytest.approx(1.0) and int(metrics["unused_codes_l2"]) == 1
  assert all(np.ndim(v) == 0 for v in metrics.values())  # flat scalars for the logger


def test_model_loss_matches_numpy(setup):
  model, params, images, labels, books = setup
  out = model.apply(params, images, books)
  loss, _ = _loss(out, labels, lambda1=0.7, lambda2=0.4)
  lab = np.asarray(labels)
  f, p = np.asarray(out["f_cls"], np.float64), np.asarray(out["prefix_recon"], np.float64)
  want = (_ce(out["logits"], lab) + 0.7 * sum(_ce(out["prefix_logits"][:, m], lab) for m in range(M))
          + 0.4 * sum(np.mean((f - p[:, m]) ** 2) for m in range(M)))
  assert float(loss) == pytest.approx(want, rel=1e-5)


def test_prefix_ce_trains_the_encoder_through_straight_through(setup):
  model, params, images, labels, books = setup

  def prefix_only(p):
    # λ2 = 0 and the f_cls CE taken back out: only the λ1 Σ_m CE(f̂≤m) term remains.
    out = model.module.apply(p, images, books)
    loss, _ = tokenizer_loss(out, labels, lambda1=1.0, lambda2=0.0)
    return loss - jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out["logits"], labels))

  grads = jax.jit(jax.grad(prefix_only))(params)["params"]

  # The estimator by hand: the CE gradient at the (constant) f̂ values, summed over levels, handed to
  # f_cls and pulled back through the encoder.
  out = model.apply(params, images, books)
  head = params["params"]["rq_head"]

  def ce_at(z, head):
    logits = z @ head["kernel"] + head["bias"]
    return jnp.sum(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.broadcast_to(labels[:, None], (B, M))), axis=0))

  g_z, g_head = jax.jit(jax.grad(ce_at, argnums=(0, 1)))(out["prefix_recon"], head)

  @jax.jit
  def pull_back(p, cotangent):
    return jax.vjp(lambda p: model.module.apply(p, images, method="features"), p)[1](cotangent)[0]

  want_encoder = pull_back(params, g_z.sum(axis=1))["params"]["encoder"]

  leaves = jax.tree.leaves(grads["encoder"])
  assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads["encoder"], want_encoder)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads["rq_head"], g_head)
  # (zero up to the rounding of subtracting the f_cls CE back out)
  jax.tree.map(lambda g: np.testing.assert_allclose(g, 0.0, atol=1e-7), grads["head"])


def test_no_gradient_reaches_the_codebooks(setup):
  model, params, images, labels, books = setup

  def loss_of(books):
    out = model.apply(params, images, books)
    return tokenizer_loss(out, labels, lambda1=1.0, lambda2=1.0)[0]

  g = jax.jit(jax.grad(loss_of))(books)
  assert g.shape == books.shape
  np.testing.assert_array_equal(g, 0.0)


def test_lambda2_pulls_f_cls_toward_its_reconstructions(setup):
  model, params, images, labels, books = setup
  # The gradient on f_cls itself: 2 λ2 / (B D) Σ_m (f - f̂≤m); none on the reconstructions.
  out = model.apply(params, images, books)

  def quant_only(f, prefix):
    return tokenizer_loss(dict(out, f_cls=f, prefix_recon=prefix), labels, lambda1=0.0, lambda2=3.0)[0]

  g_f, g_prefix = jax.jit(jax.grad(quant_only, argnums=(0, 1)))(out["f_cls"], out["prefix_recon"])
  want = 2 * 3.0 / (B * W) * jnp.sum(out["f_cls"][:, None] - out["prefix_recon"], axis=1)
  np.testing.assert_allclose(g_f, want, rtol=1e-5, atol=1e-8)
  np.testing.assert_array_equal(g_prefix, 0.0)

  # Through the encoder: a small step on the λ2 term alone brings f_cls closer to the old f̂.
  def lam2_only(p):
    o = model.module.apply(p, images, books)
    full = tokenizer_loss(o, labels, lambda1=0.0, lambda2=1.0)[0]
    return full - jnp.mean(optax.softmax_cross_entropy_with_integer_labels(o["logits"], labels))

  grads = jax.jit(jax.grad(lam2_only))(params)
  stepped = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
  err = lambda f: float(jnp.sum((f[:, None] - out["prefix_recon"]) ** 2))  # noqa: E731
  before = err(out["f_cls"])
  after = err(model.apply(stepped, images, method="features"))
  assert after < 0.99 * before, (before, after)


def test_few_steps_on_a_separable_toy_problem_reduce_the_loss():
  # Class k is a fixed random pattern plus noise. Codebooks are refit from the features every 10 steps
  # and once more before the final evaluation (the paper's alternating optimization; with frozen
  # codebooks the growing features drift away from them and the λ2 term climbs).
  rng = np.random.default_rng(0)
  n = 48
  patterns = rng.normal(size=(C, H, H, 3))
  labels = jnp.asarray(np.arange(n) % C, jnp.int32)
  images = jnp.asarray(patterns[np.arange(n) % C] + 0.3 * rng.normal(size=(n, H, H, 3)), jnp.float32)
  model = _model()
  params = jax.jit(model.init)(_key(), images, jnp.zeros((M, L, W)))
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  features = jax.jit(lambda p: model.apply(p, images, method="features"))

  def refit(params):
    return jnp.asarray(rq.fit_residual_codebooks(features(params), M, L, iters=5, seed=0))

  def loss_fn(p, books):
    return tokenizer_loss(model.apply(p, images, books, train=True), labels, lambda1=1.0, lambda2=0.1)

  @jax.jit
  def step(params, opt, books):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, books)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, metrics

  books = refit(params)
  first = None
  for i in range(30):
    if i and i % 10 == 0:
      books = refit(params)
    params, opt, metrics = step(params, opt, books)
    first = float(metrics["loss"]) if first is None else first
  _, _, final = step(params, opt, refit(params))  # metrics are taken before the update
  report = (first, {k: round(float(v), 3) for k, v in final.items()})
  assert float(final["loss"]) < 0.3 * first, report
  assert float(final["acc_cls"]) == 1.0 and float(final[f"acc_l{M}"]) >= 0.9, report
  assert all(np.isfinite(float(v)) for v in final.values())


def test_works_with_the_project_vit():
  from irgen_jax.models import vit  # pylint: disable=g-import-not-at-top
  encoder = vit.Model(width=W, depth=1, num_heads=2, patch_size=4, image_size=H)
  model = SemanticTokenizer(encoder=encoder, num_classes=C, num_levels=M, proj_dim=8)
  images, labels = _data()
  params = jax.jit(model.init)(_key(), images, jnp.zeros((M, L, 8)))
  assert "encoder" in params["params"] and "class_embedding" in params["params"]["encoder"]
  books = jnp.asarray(np.random.default_rng(0).normal(size=(M, L, 8)), jnp.float32)

  @jax.jit  # one program: compiling is most of this test's time
  def run(params):
    tokens = encoder.apply({"params": params["params"]["encoder"]}, images)
    out = model.apply(params, images, books, train=True)
    return tokens, out, tokenizer_loss(out, labels, lambda1=1.0, lambda2=1.0)[0]

  tokens, out, loss = run(params)
  proj = jax.tree.map(np.asarray, params["params"]["proj"])
  np.testing.assert_allclose(out["f_cls"], np.asarray(tokens)[:, 0] @ proj["kernel"] + proj["bias"],
                             atol=1e-5)
  np.testing.assert_array_equal(out["codes"], _assign(out["f_cls"], books))
  assert out["codes"].shape == (B, M) and np.isfinite(float(loss))


def test_the_log_line_keeps_the_first_levels_of_a_long_identifier():
  from irgen_jax.trainers.train_tokenizer import loggable_stats
  stats = {"kind": "rqvae", "codebook_perplexity": 150.0,
           **{f"perplexity_l{m}": float(m) for m in range(1, 65)},
           **{f"purity_l{m}": 1.0 for m in range(1, 65)}}
  line = loggable_stats(stats)
  assert "'perplexity_l4': 4.0" in line and "perplexity_l5" not in line and "purity_l64" not in line
  assert "codebook_perplexity" in line and line.endswith("(levels 5-64: tokenizer/stats.json)")
  short = {"kind": "semantic", **{f"purity_l{m}": 1.0 for m in range(1, 5)}}
  assert loggable_stats(short) == str(short)
