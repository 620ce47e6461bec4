"""Train steps on 8 fake CPU devices against the same steps on 1 device, in one process.

  python tests/helpers/parallel_step.py OUT.json

The device count of the CPU backend is fixed when jax is imported, so this runs as its own process
(``--xla_force_host_platform_device_count=8`` is set below, before the import). For the tokenizer, the
retriever and the RQ-VAE train step of ``configs/fashion_mnist.py:runlocal`` (warmup off, so the first step
already moves the parameters), the same initial state and the same global batches go through
``STEPS`` steps on a 1-device mesh and on the 8-device ``data`` mesh (``parallel.make_mesh``). Writes
per stage and step, as JSON: the loss on each mesh, the relative differences
``max over leaves ||p8 - p1|| / ||p1||`` of the parameters (without the attention key biases, whose
gradient is rounding noise: ``key_bias_mask``) and of the optimizer state, and the shardings seen.
"""

import importlib.util
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from irgen_jax import parallel  # noqa: E402
from irgen_jax.models import build  # noqa: E402
from irgen_jax.trainers import train_retriever as retriever  # noqa: E402
from irgen_jax.trainers import train_rqvae as rqvae  # noqa: E402
from irgen_jax.trainers import train_tokenizer as tokenizer  # noqa: E402

STEPS = 2
NUM_CLASSES = 10
NUM_DATABASE = 64


def load_config():
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", "fashion_mnist.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("runlocal")
  c.tokenizer.warmup_steps = 0
  c.retriever.warmup_steps = 0
  return c


def batches(c, stage, rng):
  s, b = c.data.image_size, (c.ids.rqvae if stage == "rqvae" else c[stage]).batch_size
  out = []
  for _ in range(STEPS):
    batch = {"image": rng.normal(size=(b, s, s, 3)).astype(np.float32)}
    if stage == "tokenizer":
      batch["label"] = rng.integers(0, NUM_CLASSES, size=b).astype(np.int32)
    else:
      batch["target_index"] = rng.integers(0, NUM_DATABASE, size=b).astype(np.int32)
    out.append(batch)
  return out


def run(c, stage, mesh, data):
  """``STEPS`` train steps of ``stage`` on ``mesh``; returns [(loss, host state)] per step."""
  if stage == "tokenizer":
    model = build.tokenizer(c, NUM_CLASSES)
    tx = tokenizer.make_optimizer(c, total_steps=10)
    state = parallel.create_replicated(tokenizer.init_fn(model, tx, c), mesh)
    codebooks = data["codebooks"]
    state = dict(state, codebooks=parallel.replicate(codebooks, mesh))
    step = tokenizer.make_train_step(model, tx, c)
  elif stage == "rqvae":
    c = rqvae_config(c)
    model = build.rqvae(c)
    tx = rqvae.make_optimizer(c, total_steps=10)
    state = parallel.create_replicated(rqvae.init_fn(model, tx, c), mesh)
    step = rqvae.make_train_step(model, tx, c)
  else:
    model = build.retriever(c)
    tx = retriever.make_optimizer(c, total_steps=10)
    state = parallel.create_replicated(retriever.init_fn(model, tx, c), mesh)
    table = parallel.replicate(data["codes"], mesh)
    jitted = retriever.make_train_step(model, tx, c)
    step = lambda state, batch: jitted(state, batch, table)  # noqa: E731
  initial = parallel.to_host(state["params"])  # before the steps donate the state
  out, shardings = [], set()
  for local in data["batches"]:
    batch = parallel.global_batch_from_local(local, mesh)
    state, metrics = step(state, batch)
    leaf = jax.tree.leaves(state["params"])[0]
    shardings.add(f"{type(leaf.sharding).__name__} over {len(leaf.sharding.device_set)} device(s)")
    out.append((float(parallel.to_host(metrics["loss"])),
                parallel.to_host({k: state[k] for k in ("params", "opt", "codebook", "ema_count",
                                                        "ema_total") if k in state})))
  return out, sorted(shardings), initial


def rqvae_config(c):
  """The runlocal config with RQ-VAE identifiers (the RQ-VAE's own warmup off too)."""
  c = c.copy_and_resolve_references()
  c.ids.kind, c.ids.length = "rqvae", c.ids.rqvae.latent_size ** 2 * c.ids.rqvae.depth
  c.ids.rqvae.warmup_steps = 0
  return c


def rel_diff(a, b, skip_key_biases=False):
  """max over leaves of ||a - b|| / ||b|| (float64); optionally without the attention key biases."""
  def one(path, x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if skip_key_biases:
      keep = ~key_bias_mask(path, x.shape)
      x, y = x[keep], y[keep]
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))
  return max(jax.tree.leaves(jax.tree_util.tree_map_with_path(one, a, b)))


def global_rel_diff(a, b):
  sq = lambda t: sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(t))  # noqa: E731
  return (sq(jax.tree.map(lambda x, y: np.asarray(x, np.float64) - y, a, b)) / sq(b)) ** 0.5


def key_bias_mask(path, shape):
  """The key-bias entries of an attention bias leaf (False elsewhere).

  Softmax over keys is invariant to a bias added to every key (q.(k + b) shifts all logits of a query
  alike), so these entries have a gradient of exactly zero in exact arithmetic: what autodiff returns
  is rounding noise, and AdamW's first step turns noise of any size into an update of +-lr. Those
  entries move by noise on one device as on eight; the comparison leaves them out (and reports them).
  """
  names = [getattr(k, "key", None) for k in path]
  mask = np.zeros(shape, bool)
  if names[-1] != "bias" or len(names) < 2:
    return mask
  if names[-2] == "qkv" and len(shape) == 1:   # ViT: [3D], q | k | v
    d = shape[0] // 3
    mask[d:2 * d] = True
  elif names[-2] == "qkv":                     # decoder self-attention: [3, H, Dh]
    mask[1] = True
  elif names[-2] == "kv":                      # decoder cross-attention: [2, H, Dh]
    mask[0] = True
  return mask


def key_bias_gradient_ratio(opt_state):
  """max |first moment| over key-bias entries / max |first moment| over every other entry."""
  key, rest = 0.0, 0.0
  for path, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    if "mu" not in jax.tree_util.keystr(path):
      continue
    x = np.abs(np.asarray(x, np.float64))
    m = key_bias_mask(path, x.shape)
    key = max(key, float(x[m].max(initial=0.0)))
    rest = max(rest, float(x[~m].max(initial=0.0)))
  return key / rest


def main(argv):
  assert jax.device_count() == 8, jax.devices()
  c = load_config()
  rng = np.random.default_rng(0)
  feature_dim = c.tokenizer.encoder.width
  report = {"devices": jax.device_count()}
  for stage in ("tokenizer", "retriever", "rqvae"):
    data = {"batches": batches(c, stage, rng),
            "codebooks": rng.normal(scale=0.1, size=(c.ids.length, c.ids.codebook_size,
                                                      feature_dim)).astype(np.float32),
            "codes": rng.integers(0, c.ids.codebook_size,
                                  size=(NUM_DATABASE, c.ids.length)).astype(np.int32)}
    one, one_shardings, initial = run(c, stage, parallel.make_mesh(jax.devices()[:1]), data)
    eight, eight_shardings, _ = run(c, stage, parallel.make_mesh(), data)
    report[stage] = {
        "loss_1": [l for l, _ in one], "loss_8": [l for l, _ in eight],
        "loss_rel_diff": [abs(a - b) / abs(b) for (a, _), (b, _) in zip(eight, one)],
        # Every parameter but the key biases (see key_bias_mask), and all of them.
        "params_rel_diff": [rel_diff(s8["params"], s1["params"], skip_key_biases=True)
                            for (_, s8), (_, s1) in zip(eight, one)],
        "params_rel_diff_with_key_biases": [rel_diff(s8["params"], s1["params"])
                                            for (_, s8), (_, s1) in zip(eight, one)],
        # Adam's moments: the gradients (and their squares), every entry.
        "opt_rel_diff": [rel_diff(s8["opt"], s1["opt"]) for (_, s8), (_, s1) in zip(eight, one)],
        "key_bias_gradient_ratio": key_bias_gradient_ratio(one[0][1]["opt"]),
        # How far the steps moved the parameters, ||p_last - p_0|| / ||p_0|| over the whole tree.
        "params_update_rel": global_rel_diff(one[-1][1]["params"], initial),
        "shardings_1": one_shardings, "shardings_8": eight_shardings,
    }
    if stage == "rqvae":  # the EMA codebook and its statistics (the first step restarts codes)
      report[stage]["codebook_rel_diff"] = [
          rel_diff({k: s8[k] for k in ("codebook", "ema_count", "ema_total")},
                   {k: s1[k] for k in ("codebook", "ema_count", "ema_total")})
          for (_, s8), (_, s1) in zip(eight, one)]
  with open(argv[1], "w") as f:
    json.dump(report, f, indent=1)
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
