"""The shared optimizer: schedule, per-group learning rates, frozen groups, weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from irgen_jax.trainers import optim


def _params():
  return {"encoder": {"dense": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,))}},
          "decoder": {"dense": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,))}}}


def _updates(tx, params, grads):
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_schedule_warms_up_then_decays_to_zero():
  sched = optim.lr_schedule(lr=1.0, total_steps=100, warmup_steps=10)
  values = np.array([sched(i) for i in range(101)])
  assert values[0] == 0.0
  assert values[10] == pytest.approx(1.0)
  assert np.all(np.diff(values[:11]) > 0) and np.all(np.diff(values[10:]) <= 0)
  assert values[100] == pytest.approx(0.0, abs=1e-7)


def test_group_multiplier_scales_the_update():
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  kw = dict(lr=1e-2, total_steps=10, warmup_steps=0, weight_decay=0.0, b1=0.9, b2=0.99)
  base = _updates(optim.make_optimizer(**kw), params, grads)
  scaled = _updates(optim.make_optimizer(**kw, lr_multipliers={"encoder": 0.1}), params, grads)
  np.testing.assert_allclose(scaled["encoder"]["dense"]["kernel"],
                             0.1 * base["encoder"]["dense"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(scaled["decoder"]["dense"]["kernel"], base["decoder"]["dense"]["kernel"])


def test_weight_decay_spares_biases():
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = optim.make_optimizer(lr=1e-1, total_steps=10, warmup_steps=0, weight_decay=0.5, b1=0.9, b2=0.99)
  up = _updates(tx, params, zeros)
  assert float(jnp.abs(up["decoder"]["dense"]["kernel"]).min()) > 0   # decayed
  assert float(jnp.abs(up["decoder"]["dense"]["bias"]).max()) == 0.0  # not decayed


def test_frozen_group_gets_no_update_no_state_and_no_backward_pass():
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  tx = optim.make_optimizer(lr=1e-1, total_steps=10, warmup_steps=0, weight_decay=0.05, b1=0.9,
                            b2=0.99, grad_clip=1.0, lr_multipliers={"encoder": 0.0})
  up = _updates(tx, params, grads)
  assert float(jnp.abs(up["encoder"]["dense"]["kernel"]).max()) == 0.0
  assert float(jnp.abs(up["decoder"]["dense"]["kernel"]).min()) > 0
  # AdamW moments exist for the trainable group only.
  state_leaves = jax.tree.leaves(tx.init(params))
  moment_sizes = sorted(x.size for x in state_leaves if x.ndim > 0)
  assert moment_sizes == [3, 3, 9, 9]  # mu and nu of the decoder's bias and kernel

  frozen = optim.frozen_groups({"encoder": 0.0, "decoder": 1.0})
  assert frozen == {"encoder"}

  def loss(p, freeze):
    p = optim.stop_frozen(p, frozen) if freeze else p
    h = jnp.tanh(jnp.ones((4, 3)) @ p["encoder"]["dense"]["kernel"] + p["encoder"]["dense"]["bias"])
    return jnp.sum((h @ p["decoder"]["dense"]["kernel"]) ** 2)

  g = jax.grad(loss)(params, True)
  assert float(jnp.abs(g["encoder"]["dense"]["kernel"]).max()) == 0.0
  assert float(jnp.abs(g["decoder"]["dense"]["kernel"]).min()) > 0

  def matmuls(freeze):
    jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, freeze)
    return str(jaxpr).count("dot_general")
  assert matmuls(True) < matmuls(False)  # the encoder's backward matmuls are gone


@pytest.mark.parametrize("mult", [-0.1, float("nan")])
def test_bad_multiplier_is_named(mult):
  with pytest.raises(ValueError, match="multipliers"):
    optim.make_optimizer(lr=1e-3, total_steps=10, warmup_steps=0, weight_decay=0.0, b1=0.9, b2=0.99,
                         lr_multipliers={"encoder": mult})


def test_frozen_optimizer_state_round_trips_through_a_checkpoint(tmp_path):
  """The frozen group's state holds masked placeholders: a resumed run must restore the same tree."""
  from irgen_jax.trainers import checkpointing
  params = _params()
  tx = optim.make_optimizer(lr=1e-2, total_steps=10, warmup_steps=0, weight_decay=0.0, b1=0.9,
                            b2=0.99, lr_multipliers={"encoder": 0.0})
  _, opt = tx.update(jax.tree.map(lambda p: 0.3 * p, params), tx.init(params), params)
  state = {"params": params, "opt": opt, "step": jnp.array(1)}
  ck = checkpointing.Checkpointer(str(tmp_path))
  ck.save(1, state)
  ck.wait()
  restored, step = ck.restore(jax.eval_shape(lambda: state))
  ck.close()
  assert step == 1
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
