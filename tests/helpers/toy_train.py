"""A tiny run of the shared training loop, as a separate process (killed and restarted by tests).

  python tests/helpers/toy_train.py WORKDIR STEPS [--die_at_step=S] [--nan_at_step=S] [--sigterm_at_step=S]

Trains a linear regression on a seeded grain pipeline with the real loop (checkpoints every 3 steps,
async saves) and writes the final parameters to WORKDIR/final.npy.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import grain  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from irgen_jax import parallel  # noqa: E402
from irgen_jax.trainers import loop  # noqa: E402


def main(argv):
  workdir, steps = argv[1], int(argv[2])
  flags = dict(a.lstrip("-").split("=") for a in argv[3:])
  die_at = int(flags.get("die_at_step", -1))
  nan_at = int(flags.get("nan_at_step", -1))
  term_at = int(flags.get("sigterm_at_step", -1))

  rng = np.random.default_rng(0)
  xs = rng.normal(size=(64, 5)).astype(np.float32)
  ys = (xs @ np.arange(1, 6, dtype=np.float32) + 0.1 * rng.normal(size=64)).astype(np.float32)
  ds = (grain.MapDataset.range(64).seed(7).shuffle().repeat()
        .map(lambda i: {"x": xs[i], "y": ys[i], "i": np.int32(i)}).batch(8).to_iter_dataset())
  it = iter(ds)

  mesh = parallel.make_mesh()
  tx = optax.adam(0.05)

  def init():
    params = {"w": jnp.zeros((5,)), "b": jnp.zeros(())}
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(0))}

  state = parallel.create_replicated(init, mesh)

  @jax.jit
  def train_step(state, batch):
    def loss_fn(p):
      pred = batch["x"] @ p["w"] + p["b"]
      noise = jax.random.normal(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]),
                                                   state["step"]), pred.shape) * 1e-3
      loss = jnp.mean((pred + noise - batch["y"]) ** 2)
      # A poisoned step for the NaN test.
      return jnp.where(state["step"] == nan_at, jnp.nan, loss)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    new = dict(state, params=optax.apply_updates(state["params"], updates), opt=opt,
               step=state["step"] + 1)
    return new, {"loss": loss}

  def before_step(step, state):
    if step == die_at:
      os.kill(os.getpid(), signal.SIGKILL)
    if step == term_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return state

  try:
    state = loop.train(stage_dir=workdir, state=state, train_step=train_step, data_iterator=it,
                       mesh=mesh, total_steps=steps, checkpoint_every=3, log_every=2,
                       before_step=before_step, description="toy")
  except loop.Preempted:
    return 0
  np.save(os.path.join(workdir, "final.npy"),
          np.concatenate([np.asarray(state["params"]["w"]), np.asarray(state["params"]["b"])[None]]))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
