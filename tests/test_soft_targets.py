"""Expected targets (retriever.soft_targets): the tables against a count by brute force, and the loss
against the mean of the paper's one-hot loss over every draw that shares the teacher-forced prefix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from irgen_jax import config_lib
from irgen_jax.data import soft_targets
from irgen_jax.trainers.losses import sequence_loss, soft_sequence_loss

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def brute_force(codes, labels, j, num_tokens):
  out = []
  for m in range(codes.shape[1]):
    same = (labels == labels[j]) & (codes[:, :m] == codes[j, :m]).all(1)
    out.append(np.bincount(codes[same, m], minlength=num_tokens) / same.sum())
  return np.stack(out)


# Hypothesis draws databases of many sizes; the device code is jitted over tables padded to one size
# (N_MAX images, E_MAX entries per level) and a fixed batch of targets, so it compiles once per M.
N_MAX, E_MAX, BATCH, NUM_TOKENS = 60, 64, 8, 9
distributions = jax.jit(soft_targets.distributions, static_argnums=2)


def padded(t: soft_targets.Tables) -> soft_targets.Tables:
  """The tables padded to N_MAX images and E_MAX entries: padding is never read, since every image's
  group is a run of real entries (which is what the padding checks)."""
  def pad(x, size):
    return np.pad(x, ((0, 0), (0, size - x.shape[1])))
  return soft_targets.Tables(pad(t.start, N_MAX), pad(t.length, N_MAX), pad(t.token, E_MAX),
                             pad(t.share, E_MAX))


@st.composite
def databases(draw):
  n = draw(st.integers(1, N_MAX))
  m = draw(st.integers(1, 4))
  top = draw(st.sampled_from([2, 3, 9]))        # few tokens: shared prefixes, repeated identifiers
  codes = draw(hnp.arrays(np.int64, (n, m), elements=st.integers(0, top - 1)))
  labels = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, 3)))
  return codes, labels


@FAST
@given(databases(), st.data())
def test_distributions_are_the_class_prefix_token_shares(db, data):
  codes, labels = db
  tables = jax.tree.map(jnp.asarray, padded(soft_targets.tables(codes, labels)))
  idx = np.array(data.draw(st.lists(st.integers(0, len(codes) - 1), min_size=BATCH, max_size=BATCH)))
  got = np.asarray(distributions(tables, jnp.asarray(idx), NUM_TOKENS))
  assert got.shape == (len(idx), codes.shape[1], NUM_TOKENS)
  for b, j in enumerate(idx):
    np.testing.assert_allclose(got[b], brute_force(codes, labels, j, NUM_TOKENS), rtol=1e-6)
    # The drawn identifier's own token always has mass: it is one of the group's images.
    assert (got[b][np.arange(codes.shape[1]), codes[j]] > 0).all()


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
  """Mean over rows of CE(softmax(logits), targets), in float64 numpy."""
  logits = logits.astype(np.float64)
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  return float(-(targets * log_p).sum(-1).mean())


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_loss_is_the_hard_loss_averaged_over_the_draws_sharing_the_prefix(smoothing):
  """The decoder is causal: its logits at level m depend on the prefix t_<m only, which every image of
  the target's (class, prefix) group shares; so the soft loss at level m must equal the one-hot loss
  averaged over the group's images."""
  rng = np.random.default_rng(1)
  num_tokens, m = 7, 3
  codes = rng.integers(0, 3, (200, m))
  labels = rng.integers(0, 3, 200)
  tables = jax.tree.map(jnp.asarray, soft_targets.tables(codes, labels))
  soft_loss = jax.jit(soft_sequence_loss, static_argnums=3)
  hard_loss = jax.jit(sequence_loss, static_argnums=2)
  for j in rng.integers(0, 200, 6):
    logits = rng.standard_normal((1, m, num_tokens)).astype(np.float32)
    soft = distributions(tables, jnp.asarray([j]), num_tokens)
    got, metrics = soft_loss(jnp.asarray(logits), jnp.asarray(codes[j:j + 1]), soft, smoothing)
    want = 0.0
    for level in range(m):
      same = np.flatnonzero((labels == labels[j]) & (codes[:, :level] == codes[j, :level]).all(1))
      one_hot = np.eye(num_tokens)[codes[same, level]] * (1 - smoothing) + smoothing / num_tokens
      want += cross_entropy(np.broadcast_to(logits[0, level], one_hot.shape), one_hot) / m
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # The logged accuracies and NLL read the drawn identifier, as the one-hot loss's do.
    _, hard_metrics = hard_loss(jnp.asarray(logits), jnp.asarray(codes[j:j + 1]), smoothing)
    assert jax.tree.map(float, metrics) == jax.tree.map(float, hard_metrics)


def test_tables_need_labels_and_soft_targets_need_class_targets():
  with pytest.raises(ValueError, match="every database image labeled"):
    soft_targets.tables(np.zeros((3, 2), np.int64), np.array([0, -1, 1]))
  c = config_lib.load("configs/fashion_mnist.py")
  c.retriever.update(soft_targets=True, targets="neighbors", num_neighbors=4)
  with pytest.raises(config_lib.ConfigError, match="retriever.soft_targets"):
    config_lib.validate(c, num_devices=1)


def test_the_train_step_takes_the_tables_ahead_of_time_and_for_real():
  """The retriever's train step with expected targets: its AOT program traces with the tables' shapes,
  and real steps train on the tables' targets. One compiled step, two databases of the same codes:
  every image its own class (each (class, prefix) group one image: the targets are the drawn
  identifier's one-hots, the paper's loss) and three classes (groups of many images: other targets)."""
  from irgen_jax import parallel
  from irgen_jax.models import build
  from irgen_jax.trainers import train_retriever
  c = config_lib.load("configs/fashion_mnist.py:runlocal")
  c.retriever.update(soft_targets=True, label_smoothing=0.0)
  mesh = parallel.make_mesh(jax.devices()[:1])
  (name, (fn, args)), = train_retriever.aot_program(c, mesh).items()
  assert isinstance(args[3], soft_targets.Tables)
  jax.eval_shape(fn, *args)
  model = build.retriever(c)
  tx = train_retriever.make_optimizer(c, 10)
  state = train_retriever.init_fn(model, tx, c)()
  rng = np.random.default_rng(0)
  n = 32
  codes = rng.integers(0, c.ids.codebook_size, (n, c.ids.length)).astype(np.int32)
  batch = {"image": jnp.asarray(rng.standard_normal((8, 28, 28, 3)), jnp.float32),
           "target_index": jnp.arange(8, dtype=jnp.int32)}
  step = train_retriever.make_train_step(model, tx, c)
  copy = lambda s: jax.tree.map(jnp.array, s)  # noqa: E731  (the step donates its state)

  def run(labels):
    t = soft_targets.tables(codes, labels)
    t = t._replace(token=np.pad(t.token, ((0, 0), (0, n - t.token.shape[1]))),
                   share=np.pad(t.share, ((0, 0), (0, n - t.share.shape[1]))))  # one shape: one compile
    return step(copy(state), batch, jnp.asarray(codes), jax.tree.map(jnp.asarray, t))[1]
  one_hot, soft = run(np.arange(n)), run(rng.integers(0, 3, n))
  # Singleton groups: the drawn identifier's one-hots, so the loss is the paper's (without smoothing,
  # the NLL of the identifier per level).
  np.testing.assert_allclose(float(one_hot["loss"]), float(one_hot["nll"]) / c.ids.length, rtol=1e-5)
  assert np.isfinite(float(soft["loss"])) and float(soft["loss"]) != float(one_hot["loss"])
  assert float(soft["nll"]) == float(one_hot["nll"])  # the same logits: the loss alone differs
