"""Expected targets (retriever.soft_targets): the tables against a count by brute force, and the loss
against the mean of the paper's one-hot loss over every draw that shares the teacher-forced prefix."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
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


@st.composite
def databases(draw):
  n = draw(st.integers(1, 60))
  m = draw(st.integers(1, 4))
  top = draw(st.sampled_from([2, 3, 9]))        # few tokens: shared prefixes, repeated identifiers
  codes = draw(hnp.arrays(np.int64, (n, m), elements=st.integers(0, top - 1)))
  labels = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, 3)))
  return codes, labels


@FAST
@given(databases(), st.data())
def test_distributions_are_the_class_prefix_token_shares(db, data):
  codes, labels = db
  num_tokens = 9
  tables = jax.tree.map(jnp.asarray, soft_targets.tables(codes, labels))
  idx = np.array(data.draw(st.lists(st.integers(0, len(codes) - 1), min_size=1, max_size=8)))
  got = np.asarray(soft_targets.distributions(tables, jnp.asarray(idx), num_tokens))
  assert got.shape == (len(idx), codes.shape[1], num_tokens)
  for b, j in enumerate(idx):
    np.testing.assert_allclose(got[b], brute_force(codes, labels, j, num_tokens), rtol=1e-6)
    # The drawn identifier's own token always has mass: it is one of the group's images.
    assert (got[b][np.arange(codes.shape[1]), codes[j]] > 0).all()


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
  for j in rng.integers(0, 200, 6):
    logits = jnp.asarray(rng.standard_normal((1, m, num_tokens)).astype(np.float32))
    soft = soft_targets.distributions(tables, jnp.asarray([j]), num_tokens)
    got, metrics = soft_sequence_loss(logits, jnp.asarray(codes[j:j + 1]), soft, smoothing)
    want = 0.0
    for level in range(m):
      same = np.flatnonzero((labels == labels[j]) & (codes[:, :level] == codes[j, :level]).all(1))
      one_hot = optax.smooth_labels(jax.nn.one_hot(codes[same, level], num_tokens), smoothing)
      want += float(optax.softmax_cross_entropy(logits[0, level][None], one_hot).mean()) / m
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # The logged accuracies and NLL read the drawn identifier, as the one-hot loss's do.
    _, hard_metrics = sequence_loss(logits, jnp.asarray(codes[j:j + 1]), smoothing)
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
  and one real step on a tiny database trains on the soft loss (which differs from the one-hot one)."""
  from irgen_jax import parallel
  from irgen_jax.models import build
  from irgen_jax.trainers import train_retriever
  c = config_lib.load("configs/fashion_mnist.py:runlocal")
  c.retriever.soft_targets = True
  mesh = parallel.make_mesh(jax.devices()[:1])
  (name, (fn, args)), = train_retriever.aot_program(c, mesh).items()
  assert isinstance(args[3], soft_targets.Tables)
  jax.eval_shape(fn, *args)
  model = build.retriever(c)
  tx = train_retriever.make_optimizer(c, 10)
  state = train_retriever.init_fn(model, tx, c)()
  rng = np.random.default_rng(0)
  codes = rng.integers(0, c.ids.codebook_size, (32, c.ids.length)).astype(np.int32)
  labels = rng.integers(0, 3, 32)
  batch = {"image": jnp.asarray(rng.standard_normal((8, 28, 28, 3)), jnp.float32),
           "target_index": jnp.arange(8, dtype=jnp.int32)}
  step = train_retriever.make_train_step(model, tx, c)
  copy = lambda s: jax.tree.map(jnp.array, s)  # noqa: E731  (the step donates its state)
  _, soft = step(copy(state), batch, jnp.asarray(codes),
                 jax.tree.map(jnp.asarray, soft_targets.tables(codes, labels)))
  _, hard = step(copy(state), batch, jnp.asarray(codes))
  assert np.isfinite(float(soft["loss"])) and float(soft["loss"]) != float(hard["loss"])
  assert float(soft["nll"]) == float(hard["nll"])  # the same logits: the loss alone differs
