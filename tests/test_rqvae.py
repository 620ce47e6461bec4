"""RQ-VAE identifiers (``ids.kind="rqvae"``): the quantizer, the EMA codebook, the model, and a run end to
end that is killed inside the RQ-VAE's training and resumes to the same bytes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from irgen_jax import config_lib, sweeps
from irgen_jax.errors import ConfigError
from irgen_jax.models import rq
from irgen_jax.models import rqvae


def test_identifiers_are_raster_order_then_depth():
  codes = np.arange(2 * 3 * 3 * 4).reshape(2, 3, 3, 4)
  ids = np.asarray(rqvae.codes_to_identifiers(jnp.asarray(codes)))
  for b in range(2):
    for i in range(3):
      for j in range(3):
        for d in range(4):
          assert ids[b, (i * 3 + j) * 4 + d] == codes[b, i, j, d]
  np.testing.assert_array_equal(rqvae.identifiers_to_codes(jnp.asarray(ids), 3, 4), codes)


def test_quantize_uses_one_codebook_at_every_depth():
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(2, 3, 3, 5)), jnp.float32)
  codebook = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
  q = rqvae.quantize(z, codebook, depth=3)
  assert q.codes.shape == (2, 3, 3, 3) and q.inputs.shape == (18, 3, 5)
  # Per position, the greedy residual quantizer with the same codebook at every level.
  flat = rq.quantize(z.reshape(18, 5), jnp.stack([codebook] * 3))
  np.testing.assert_array_equal(q.codes.reshape(18, 3), flat.codes)
  # The quantized vector is the sum of the chosen codewords; each depth's input is what is left.
  words = np.asarray(codebook)[np.asarray(q.codes)]
  np.testing.assert_allclose(q.quantized, words.sum(-2), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(q.inputs[:, 0], z.reshape(18, 5), rtol=1e-6)
  np.testing.assert_allclose(q.inputs[:, 1], z.reshape(18, 5) - words.reshape(18, 3, 5)[:, 0],
                             rtol=1e-5, atol=1e-5)


def test_ema_moves_codes_to_their_means_and_restarts_dead_ones():
  rng = np.random.default_rng(1)
  centers = np.asarray([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]], np.float32)
  points = np.concatenate([c + 0.1 * rng.normal(size=(50, 2)) for c in centers]).astype(np.float32)
  inputs = jnp.asarray(points[:, None, :])  # depth 1
  ema = rqvae.init_ema(4, 2)
  codebook = jnp.zeros((4, 2))
  key = jax.random.key(0)
  codebook, ema, restarted = rqvae.ema_update(ema, inputs, jnp.zeros((150, 1), jnp.int32), key,
                                              decay=0.9, restart_below=1.0)
  assert int(restarted) == 3  # the three codes nobody was assigned start at batch vectors
  assert all(any(np.allclose(w, p, rtol=1e-3) for p in points) for w in np.asarray(codebook)[1:])
  for step in range(60):
    codes = rq.assign(jnp.asarray(points), codebook[None])
    codebook, ema, restarted = rqvae.ema_update(ema, inputs, codes, jax.random.fold_in(key, step),
                                                decay=0.9, restart_below=1.0)
  used = np.unique(np.asarray(rq.assign(jnp.asarray(points), codebook[None])))
  # Every cluster ends with a code at its mean (a spare code may wander among the restarts).
  for c in centers:
    assert np.min(np.linalg.norm(np.asarray(codebook)[used] - c, axis=1)) < 0.1


def test_every_depth_updates_the_shared_codebook():
  rng = np.random.default_rng(4)
  first = np.asarray([5.0, 0.0]) + 0.1 * rng.normal(size=(40, 2))
  second = np.asarray([0.0, 1.0]) + 0.1 * rng.normal(size=(40, 2))
  inputs = jnp.asarray(np.stack([first, second], axis=1), jnp.float32)  # [N, D=2, C]
  codes = jnp.asarray(np.tile([[0, 1]], (40, 1)), jnp.int32)             # depth 0 -> 0, depth 1 -> 1
  codebook, ema, restarted = rqvae.ema_update(rqvae.init_ema(3, 2), inputs, codes, jax.random.key(0),
                                              decay=0.99, restart_below=1.0)
  np.testing.assert_allclose(codebook[0], first.mean(0), rtol=1e-3)
  np.testing.assert_allclose(codebook[1], second.mean(0), rtol=1e-3, atol=1e-4)
  assert int(restarted) == 1 and np.asarray(ema.count)[:2] == pytest.approx([0.4, 0.4])


def test_straight_through_trains_the_encoder_from_the_reconstruction():
  model = rqvae.RQVAE(image_size=12, latent_size=2, depth=2, latent_dim=4, channels=(4, 8))
  assert model.work_size == 8
  images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 12, 12, 3)), jnp.float32)
  codebook = jnp.asarray(np.random.default_rng(3).normal(size=(8, 4)), jnp.float32)
  # Jitted: op by op, every primitive compiles on its own (most of this test's time on a busy CPU).
  apply = jax.jit(model.apply, static_argnames="method")
  params = jax.jit(model.init)(jax.random.key(0), images, codebook)["params"]
  out = apply({"params": params}, images, codebook)
  assert out["reconstruction"].shape == images.shape and out["codes"].shape == (2, 8)

  def recon_loss(p):
    return jnp.mean((model.apply({"params": p}, images, codebook)["reconstruction"] - images) ** 2)
  grads = jax.jit(jax.grad(recon_loss))(params)
  assert float(jnp.abs(grads["encoder"]["stem"]["kernel"]).sum()) > 0
  ids = apply({"params": params}, images, codebook, method="identifiers")
  np.testing.assert_array_equal(ids, out["codes"])
  # The decoder sees the quantized map (the codes' codewords), not the encoder's latent.
  np.testing.assert_allclose(out["reconstruction"],
                             apply({"params": params}, out["quantized"], method="decode"),
                             rtol=1e-5, atol=1e-5)
  words = np.asarray(codebook)[np.asarray(rqvae.identifiers_to_codes(out["codes"], 2, 2))]
  np.testing.assert_allclose(out["quantized"], words.sum(-2), rtol=1e-5, atol=1e-5)
  assert not np.allclose(out["quantized"], out["latent"], atol=1e-3)


def test_latents_are_layer_normalized_before_quantization():
  kw = dict(image_size=8, latent_size=2, depth=2, latent_dim=6, channels=(4, 8))
  images = 5 * jnp.asarray(np.random.default_rng(4).normal(size=(3, 8, 8, 3)), jnp.float32)
  codebook = jnp.asarray(np.random.default_rng(5).normal(size=(8, 6)), jnp.float32)
  normed, raw = rqvae.RQVAE(**kw), rqvae.RQVAE(**kw, normalize_latents=False)

  @jax.jit  # one program (run op by op, every convolution compiles on its own: 12 s here against 7)
  def encodings(images, codebook):
    params = normed.init(jax.random.key(1), images, codebook)["params"]
    return (normed.apply({"params": params}, images, method="encode"),
            raw.apply({"params": params}, images, method="encode"),
            normed.apply({"params": params}, images, codebook))

  z, r, out = jax.tree.map(np.asarray, encodings(images, codebook))
  np.testing.assert_allclose(z.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose((z ** 2).mean(-1), 1, rtol=1e-4)
  # The same parameters (it has none of its own); without it the scale is the encoder's.
  assert not np.allclose((r ** 2).mean(-1), 1, rtol=1e-2)
  centred = r - r.mean(-1, keepdims=True)
  np.testing.assert_allclose(z, centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-6),
                             rtol=1e-4, atol=1e-5)
  # What is quantized is the normalized latent.
  np.testing.assert_allclose(out["latent"], z, rtol=1e-6, atol=1e-6)


def test_normalized_pixels_go_back_to_the_same_bytes():
  from irgen_jax.data import pipeline
  images = np.random.default_rng(5).integers(0, 256, size=(4, 6, 6, 3), dtype=np.uint8)
  norm = pipeline.Normalizer()
  np.testing.assert_array_equal(norm.to_uint8(norm(images)), images)


def test_config_checks_the_length_against_the_code_map():
  c = config_lib.load("configs/fashion_mnist.py:runlocal")
  c.ids.kind = "rqvae"
  with pytest.raises(ConfigError, match=r"config\.ids\.length=4: expected latent_size² · depth = 8"):
    config_lib.validate(c, num_devices=1)
  c.ids.length = 8
  config_lib.validate(c, num_devices=1)
  assert config_lib.tokenizer_levels(c) == 2  # the semantic tokenizer quantizes to the RQ-VAE's depth


def test_the_rqvae_train_step_compiles_ahead_of_time():
  from irgen_jax import parallel
  from irgen_jax.trainers import train_tokenizer
  c = config_lib.load("configs/fashion_mnist.py:runlocal")
  c.ids.kind, c.ids.length = "rqvae", 8
  programs = train_tokenizer.aot_program(c, parallel.make_mesh())
  assert sorted(programs) == ["rqvae_train_step", "tokenizer_train_step"]
  jitted, args = programs["rqvae_train_step"]
  assert jitted.lower(*args).compile().cost_analysis()


def test_the_kind_sweep_has_the_rqvae_row():
  c = config_lib.load("configs/fashion_mnist.py")
  row = sweeps.standard(c)["ids_kind"][-1]
  assert row["ids.kind"] == "rqvae" and row["ids.length"] == 4 * 4 * 4
  # It reuses the semantic point's tokenizer, whose identifiers are 4 long.
  assert row["tokenizer.reuse_from"].target(row) == {"ids.kind": "semantic"}


@pytest.mark.slow
def test_rqvae_run_end_to_end_killed_and_resumed(fashion_runlocal_workdir, tmp_path):
  """A runlocal RQ-VAE run (reusing the shared run's tokenizer) finishes with RQ-VAE identifiers and
  their reconstructions in the report; killed after the RQ-VAE's first checkpoint, the restarted
  tokenizer stage writes the same identifiers, parameters and logs."""
  import importlib.util
  import sys
  spec = importlib.util.spec_from_file_location(
      "_kill_and_resume_rqvae", os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                            "launch", "kill_and_resume.py"))
  harness_lib = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = harness_lib
  spec.loader.exec_module(harness_lib)
  shared, data_dir = fashion_runlocal_workdir
  harness = harness_lib.Harness(
      "configs/fashion_mnist.py:runlocal", str(tmp_path),
      overrides=["--config.ids.kind=rqvae", "--config.ids.length=8",
                 f"--config.tokenizer.reuse_from={shared}"], data_dir=str(data_dir))
  reference = harness.ensure_reference()
  with np.load(os.path.join(reference, "tokenizer", "identifiers.npz")) as z:
    assert z["codes"].shape == (512, 8) and z["rqvae_codebook"].shape == (16, 8)
    assert z["codes"].max() < 16
  results = open(os.path.join(reference, "report", "results.md")).read()
  assert "![RQ-VAE reconstructions](rqvae_reconstructions.png)" in results
  assert os.path.getsize(os.path.join(reference, "report", "rqvae_reconstructions.png")) > 1000
  assert "| rqvae |" in results  # its training speed in the time table
  point = harness_lib.Point("rqvae.checkpoint@1", "tokenizer", "after the RQ-VAE's first checkpoint")
  assert harness.run_point(point) == []
  # Inserted images get the run's RQ-VAE codes of their pixels.
  import shutil
  import subprocess

  from irgen_jax import identifiers, inference, parallel
  from irgen_jax.workdir import IndexedImages, Workdir
  copy = tmp_path / "inserted_run"
  shutil.copytree(reference, copy)
  proc = subprocess.run(harness.insert_command(str(copy)), capture_output=True, text=True,
                        cwd=harness_lib.REPO, env=harness_lib._env(), timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  wd = Workdir(copy)
  c = wd.load_config()
  indexed = IndexedImages.open(wd, c)
  n = harness_lib.INSERT_IMAGES
  assert indexed.num_images == 512 + n
  model, params = wd.load_rqvae(c)
  expected = identifiers.rqvae_codes(model, params, wd.load_identifiers()["rqvae_codebook"],
                                     inference.Subset(indexed.dataset.query, range(n)), c,
                                     parallel.make_mesh())
  inserted = indexed.index.codes()[512:]
  assert sorted(map(tuple, inserted.tolist())) == sorted(map(tuple, expected.tolist()))


def test_collapse_warnings_look_at_the_shared_codebook():
  from irgen_jax import identifiers
  # A background position that uses 3 codes is no collapse; the shared codebook using 6 of 256 is.
  healthy = {"kind": "rqvae", "codebook_unused_codes": 10, "codebook_perplexity": 180.0,
             "unused_codes_l1": 253, "perplexity_l1": 2.0, "purity_l1": 0.9}
  assert identifiers.collapse_warnings(healthy, 64, 256) == []
  collapsed = dict(healthy, codebook_unused_codes=250, codebook_perplexity=4.0)
  assert identifiers.collapse_warnings(collapsed, 64, 256) == [
      "the RQ-VAE's shared codebook: only 6 of 256 codes are used: it collapsed"]
