"""Ahead-of-time TPU compilation on this CPU (irgen_jax.aot) with a toy program provider.

Every TPU compile runs in a subprocess (this file run as a script, or the CLI), so libtpu never
loads into the test session: it parses XLA_FLAGS and keeps ~200 MB and its threads for the life of
the process, and no other test should depend on that. Checks that need no TPU compiler (topology
names, provider lookup, argument checks) run in-process.

libtpu is a test requirement (requirements-tpu.txt): without it these tests fail, they never skip.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

from irgen_jax import aot, config_lib, parallel
from irgen_jax.data import registry
from irgen_jax.decoding import index as index_lib
from irgen_jax.decoding import program
from irgen_jax.decoding.index import Index

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5e:2x2"   # 4 chips on one host: the smallest multi-chip v5e slice
HUGE_WIDTH = 2**25     # a [128, 2**25] float32 weight is 16 GiB; with AdamW's moments 3x a v5e chip
RUNLOCAL = "configs/fashion_mnist.py"
REAL_PROGRAMS = ("tokenizer_train_step", "retriever_train_step", "beam_search")
# The runlocal decoder (one block) has ~14 w^2 float32 params: at w = 2^15, 56 GiB replicated on every
# chip, 3.5x a v5e chip (2^14 still fits: 14 GiB).
HUGE_DECODER_WIDTH = 2**15


def load_config(path: str, arg: str | None = "runlocal"):
  spec = importlib.util.spec_from_file_location("aot_test_config", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# --- the toy provider (the CLI test names it: --providers=tests.test_aot:toy_programs) ------------


def toy_train_step(mesh, *, batch_size: int, width: int, in_dim: int = 128, classes: int = 16):
  """An MLP AdamW train step as (jitted_fn, abstract_args): params and optimizer state replicated,
  the batch split over ``data``, the state donated. Shapes only (``jax.eval_shape``): nothing is
  allocated, whatever the width."""
  tx = optax.adamw(1e-3)

  def init():
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (in_dim, width)) * in_dim**-0.5,
              "b1": jnp.zeros((width,)),
              "w2": jax.random.normal(k2, (width, classes)) * width**-0.5,
              "b2": jnp.zeros((classes,))}
    return {"params": params, "opt": tx.init(params)}

  def step(state, batch):
    def loss_fn(p):
      h = jax.nn.relu(batch["x"] @ p["w1"] + p["b1"])
      logits = h @ p["w2"] + p["b2"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss

  state = aot.with_sharding(jax.eval_shape(init), parallel.replicated(mesh))
  data = parallel.batch_sharded(mesh)
  batch = {"x": jax.ShapeDtypeStruct((batch_size, in_dim), jnp.float32, sharding=data),
           "y": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=data)}
  return jax.jit(step, donate_argnums=0), (state, batch)


def toy_programs(config, mesh):
  """A provider: the toy step sized by the config's tokenizer batch size and encoder width."""
  return {"toy/train_step": toy_train_step(mesh, batch_size=config.tokenizer.batch_size,
                                           width=config.tokenizer.encoder.width)}


# --- the subprocess side --------------------------------------------------------------------------


def _api_worker() -> dict:
  """Everything the in-process tests check about compiling, as JSON (runs with libtpu loaded)."""
  topo = aot.load_topology(TOPOLOGY)
  mesh = aot.make_mesh(topo)
  out = {"num_chips": topo.num_chips, "num_hosts": topo.num_hosts,
         "chips_per_host": topo.chips_per_host, "chip": topo.chip.name,
         "mesh_shape": dict(mesh.shape), "axis_types": [str(t) for t in mesh.axis_types]}
  for key, batch in (("small", 8), ("large", 8192)):
    out[key] = aot.compile_program(f"toy/batch{batch}",
                                   *toy_train_step(mesh, batch_size=batch, width=256)).to_json()
  # Known cost: a [M,K]@[K,N] matmul is 2MKN FLOPs; rows sharded, or everything replicated.
  m, k, n = 1024, 2048, 512
  rows, rep = parallel.batch_sharded(mesh), parallel.replicated(mesh)
  a = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=rows)
  b = jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=rep)
  out["matmul_2mkn"] = 2 * m * k * n
  out["matmul_rows_sharded"] = aot.compile_program("mm", jax.jit(jnp.matmul), (a, b)).flops
  a_rep = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=rep)
  out["matmul_replicated"] = aot.compile_program("mm", jax.jit(jnp.matmul), (a_rep, b)).flops
  huge = aot.compile_program("toy/huge", *toy_train_step(mesh, batch_size=8, width=HUGE_WIDTH))
  out["huge"] = huge.to_json()
  out["huge_text"] = aot.format_report(huge)
  out["small_text"] = aot.format_report(aot.compile_program(
      "toy/train_step", *toy_train_step(mesh, batch_size=8, width=256)))
  try:
    aot.load_topology("v5e:3x3")  # well formed, but no such slice
    out["bad_slice_error"] = None
  except ValueError as e:
    out["bad_slice_error"] = str(e)
  return out


def _configs_worker(json_path: str) -> dict:
  """The runlocal config's real programs (trainers' and search's providers), as JSON."""
  topo = aot.load_topology(TOPOLOGY)
  text = io.StringIO()
  config = load_config(RUNLOCAL)
  reports = aot.run(config, topo, json_path=json_path, out=text)
  out = {"programs": [r.name for r in reports]}
  # The same tokenizer step at twice the batch.
  config.tokenizer.batch_size *= 2
  (bigger,) = aot.run(config, topo, providers=[aot.DEFAULT_PROVIDERS["tokenizer"]], out=text)
  out["tokenizer_double_batch"] = bigger.to_json()
  # A decoder far too wide for a v5e chip: its search program (params replicated, no optimizer).
  config = load_config(RUNLOCAL)
  config.retriever.decoder.width = HUGE_DECODER_WIDTH
  (huge,) = aot.run(config, topo, providers=[aot.DEFAULT_PROVIDERS["evaluate"]], out=text)
  out["huge_search"] = huge.to_json()
  out["text"] = text.getvalue()  # all three runs' printed reports
  return out


def _env(tmp_path) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", TPU_LOG_DIR=str(tmp_path / "tpu_logs"),
             PYTHONPATH=os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")])))
  return env


def _need_libtpu():
  if not aot.libtpu_available():
    pytest.fail("libtpu is not installed; these tests compile for TPU topologies on the CPU. "
                "Install it: bash launch/install.sh",
                pytrace=False)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
  _need_libtpu()
  tmp = tmp_path_factory.mktemp("aot")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "api"], cwd=REPO,
                        env=_env(tmp), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
  """One subprocess: the runlocal config's three programs, a doubled batch, a too-wide decoder."""
  _need_libtpu()
  tmp = tmp_path_factory.mktemp("aot_configs")
  path = tmp / "runlocal.json"
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "configs", str(path)], cwd=REPO,
                        env=_env(tmp), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return dict(json.loads(proc.stdout.strip().splitlines()[-1]), report=json.loads(path.read_text()))


def _cli(tmp_path, *args):
  _need_libtpu()
  cmd = [sys.executable, "-m", "irgen_jax.aot", "--config=configs/fashion_mnist.py:runlocal",
         f"--topology={TOPOLOGY}", "--providers=tests.test_aot:toy_programs", *args]
  return subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
                        timeout=300)


# --- tests ----------------------------------------------------------------------------------------


def test_topology_devices_and_mesh(api):
  counts = (api["chip"], api["num_chips"], api["num_hosts"], api["chips_per_host"])
  assert counts == ("v5e", 4, 1, 4)
  assert api["mesh_shape"] == {parallel.DATA_AXIS: 4}
  assert api["axis_types"] == [str(jax.sharding.AxisType.Auto)]


def test_toy_program_compiles_and_memory_grows_with_batch(api):
  small, large = api["small"], api["large"]
  for r in (small, large):
    assert r["compiled"] and r["fits"] and r["verdict"] is None
    assert r["hbm_bytes"] == 16 * 2**30
    assert r["per_chip_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                                   + r["temp_bytes"] + r["generated_code_bytes"])
    assert r["alias_bytes"] > 0   # the donated state is updated in place
    assert r["flops"] > 0
  # 8192 vs 8 examples: the per-chip inputs x alone grow by (8192 - 8) / 4 x 128 x 4 bytes (the TPU
  # pads small arrays, so the labels' growth is not exact).
  assert large["argument_bytes"] - small["argument_bytes"] >= (8192 - 8) // 4 * 128 * 4
  assert large["per_chip_bytes"] > small["per_chip_bytes"] + 1_000_000
  assert large["flops"] > 100 * small["flops"] / 2
  assert "== toy/train_step" in api["small_text"]
  assert re.search(r"\n  fits +yes$", api["small_text"])
  assert re.search(r"P(artitionSpec)?\('data',\) +.* in 2 arrays", api["small_text"])


def test_flops_are_per_chip(api):
  # XLA's cost analysis counts one device's partitioned program.
  assert api["matmul_rows_sharded"] == api["matmul_2mkn"] / 4
  assert api["matmul_replicated"] == api["matmul_2mkn"]


def test_too_large_program_does_not_fit_with_verdict(api):
  huge = api["huge"]
  assert not huge["fits"] and not huge["compiled"]
  assert "RESOURCE_EXHAUSTED" in huge["xla_error"]
  assert huge["per_chip_bytes"] > 3 * 16 * 2**30          # params + two AdamW moments, at least
  assert huge["replicated_argument_bytes"] > 3 * 16 * 2**30
  verdict = huge["verdict"]
  assert verdict.startswith("toy/huge does not fit: it needs ")
  assert "a v5e chip has 16.00 GiB" in verdict
  assert "FSDP" in verdict
  assert "does not fit" in api["huge_text"]
  assert re.search(r"\n  fits +NO\n", api["huge_text"])


def test_slice_unknown_to_libtpu_is_a_clear_error(api):
  error = api["bad_slice_error"]
  assert error and "v5e:3x3" in error and "v5e:AxB" in error


def test_libtpu_stays_out_of_the_test_session(api):
  del api  # after the compiles: they ran in a subprocess
  with open("/proc/self/maps") as f:
    assert "libtpu" not in f.read()
  assert jax.default_backend() == "cpu"


@pytest.mark.parametrize("name", ["v5e", "foo:2x2", "v5e:4x4x1", "v4:2x2", "v5e:0x2", "",
                                  "v5litepod-16", "v6e:4x"])
def test_bad_topology_names(name):
  with pytest.raises(ValueError, match=r"Bad TPU topology .*v4:AxBxC.*v5e:AxB"):
    aot.parse_topology_name(name)


def test_good_topology_names():
  assert aot.parse_topology_name("v5e:4x4") == (aot.CHIPS["v5e"], (4, 4))
  assert aot.parse_topology_name("v4:2x2x1") == (aot.CHIPS["v4"], (2, 2, 1))
  assert aot.parse_topology_name("v5p:2x2x1")[0].hbm_bytes == 95 * 2**30
  assert aot.parse_topology_name("v6e:4x4")[0].peak_bf16_flops == 918e12


def test_missing_providers_are_named():
  config = config_lib.base_config()
  mesh = parallel.make_mesh(jax.devices()[:1])
  with pytest.raises(NotImplementedError) as e:
    aot.programs(config, mesh, providers=["irgen_jax.no_such_stage:aot_program",
                                          "irgen_jax.parallel:aot_program", toy_programs])
  assert "irgen_jax.no_such_stage:aot_program" in str(e.value)
  assert "irgen_jax.parallel:aot_program" in str(e.value)


def test_default_providers_follow_the_stages(monkeypatch):
  seen = []
  monkeypatch.setattr(aot, "resolve_provider", lambda spec: seen.append(spec) or (lambda c, m: {}))
  config = config_lib.base_config()
  config.stages = "retriever,evaluate"
  assert aot.programs(config, mesh=None) == {}
  assert seen == [aot.DEFAULT_PROVIDERS["retriever"], aot.DEFAULT_PROVIDERS["evaluate"]]


def test_arguments_need_shardings():
  with pytest.raises(ValueError, match=r"toy.*\['x'\].*has no sharding"):
    aot.compile_program("toy", jnp.sum, ({"x": jax.ShapeDtypeStruct((4,), jnp.float32)},))


def test_cli_table_and_json(tmp_path):
  path = tmp_path / "out" / "aot.json"
  proc = _cli(tmp_path, f"--json={path}", "--config.tokenizer.batch_size=64")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "v5e:2x2: 4 chips (TPU v5 lite)" in proc.stdout
  assert "== toy/train_step" in proc.stdout and "est. step time" in proc.stdout
  report = json.loads(path.read_text())
  assert report["topology"] == TOPOLOGY
  program = report["programs"]["toy/train_step"]
  assert isinstance(program["per_chip_bytes"], int) and program["per_chip_bytes"] > 0
  assert isinstance(program["flops"], float) and program["flops"] > 0
  assert program["fits"] is True


def test_cli_exit_status_when_a_program_does_not_fit(tmp_path):
  proc = _cli(tmp_path, f"--config.tokenizer.encoder.width={HUGE_WIDTH}")
  assert proc.returncode == 1, proc.stderr[-4000:]
  assert "toy/train_step does not fit" in proc.stdout


# --- the config's real programs (trainers and search) ---------------------------------------------


@pytest.mark.slow  # the `configs` subprocess: ~1-2 min of TPU compiles on 2 cores
def test_runlocal_config_compiles_every_program(configs):
  assert configs["programs"] == list(REAL_PROGRAMS)
  report = configs["report"]
  assert report["topology"] == TOPOLOGY and sorted(report["programs"]) == sorted(REAL_PROGRAMS)
  for name, r in report["programs"].items():
    assert r["compiled"] and r["fits"] and r["verdict"] is None, name
    assert isinstance(r["per_chip_bytes"], int) and 0 < r["per_chip_bytes"] < 2**30, name
    assert r["flops"] > 0 and r["est_step_time_s"] > 0, name
  # The search: the queries split over the 4 chips (float32 images), the rest replicated.
  c = load_config(RUNLOCAL)
  placed = report["programs"]["beam_search"]["argument_shardings"]
  sharded = {spec: v for spec, v in placed.items() if "data" in spec}
  image_bytes = c.data.image_size**2 * 3 * 4
  assert [v["bytes_per_chip"] for v in sharded.values()] == [
      c.search.query_batch_size // 4 * image_bytes]
  assert sum(v["arrays"] for spec, v in placed.items() if spec not in sharded) > 10
  for name in REAL_PROGRAMS:
    assert f"== {name}" in configs["text"]


@pytest.mark.slow  # the `configs` subprocess: ~1-2 min of TPU compiles on 2 cores
def test_runlocal_memory_grows_with_the_batch(configs):
  small = configs["report"]["programs"]["tokenizer_train_step"]
  big = configs["tokenizer_double_batch"]
  assert big["compiled"] and big["fits"]
  # batch_size / 4 more images per chip (float32) and their activations.
  c = load_config(RUNLOCAL)
  more = c.tokenizer.batch_size // 4 * c.data.image_size**2 * 3 * 4
  assert big["argument_bytes"] - small["argument_bytes"] >= more
  assert big["per_chip_bytes"] > small["per_chip_bytes"] + more
  assert big["flops"] > 1.5 * small["flops"]


@pytest.mark.slow  # the `configs` subprocess: ~1-2 min of TPU compiles on 2 cores
def test_too_wide_decoder_does_not_fit_with_verdict(configs):
  huge = configs["huge_search"]
  assert not huge["fits"]
  assert huge["replicated_argument_bytes"] > 3 * 16 * 2**30
  assert huge["per_chip_bytes"] > 3 * 16 * 2**30
  verdict = huge["verdict"]
  needed = re.match(r"beam_search does not fit: it needs ([\d.]+) GiB per chip, a v5e chip has "
                    r"16.00 GiB", verdict)
  assert needed and float(needed.group(1)) > 16, verdict
  assert "FSDP" in verdict and "rematerialization" not in verdict
  assert "beam_search does not fit" in configs["text"]


def test_search_index_shapes_are_those_of_a_worst_case_dense_index():
  # L = 4, M = 3, N = 16 images with every prefix distinct (n_1 = 4, n_2 = 16, U = 16): the tables
  # Index.device_arrays() gives are exactly the shapes the search program is compiled with.
  n, m, l = 16, 3, 4
  codes = [[i // 4, i % 4, 0] for i in range(n)]
  real = Index.build(codes, l, layout="dense").device_arrays()
  abstract = index_lib.abstract_arrays(n, m, l, sharding=None)
  assert (abstract.num_tokens, abstract.max_fanout) == (real.num_tokens, real.max_fanout)
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), t)  # noqa: E731
  assert shapes(abstract) == shapes(real)
  # Paper scale: the index of ImageNet's 1.28M images stays small beside the model.
  big = index_lib.abstract_arrays(1_281_167, 4, 256, sharding=None)
  assert sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(big)) < 100 * 2**20


def test_search_program_database_size_and_lowering_on_cpu():
  config = load_config(RUNLOCAL)
  assert registry.database_size(config.data) == 512  # data.max_database caps the 60,000
  config.data.max_database = 0
  assert registry.database_size(config.data) == 60000
  config.data.name = "no_such_dataset"
  with pytest.raises(ValueError, match="database size is not known"):
    registry.database_size(config.data)
  # The program traces as a run would (shapes only, on a 1-device CPU mesh; no TPU compiler).
  config = load_config(RUNLOCAL)
  mesh = parallel.make_mesh(jax.devices()[:1])
  (name, (fn, args)), = program.aot_program(config, mesh).items()
  assert name == "beam_search"
  q, s = config.search.query_batch_size, config.data.image_size
  assert args[2].shape == (q, s, s, 3)
  levels, nodes = program.class_levels(config), [x.shape for x in args[1].child_token]
  # The classes of the prefixes to class_levels tokens (the config's every level, then one, then
  # two), one per node of the largest index.
  assert config.search.class_levels == -1 and levels == 4 and [g.shape for g in args[3]] == nodes
  out = jax.eval_shape(fn, *args)
  # K = max(ks, map_at) = 100 <= N; then the two likeliest classes, their posteriors, hedged or not.
  assert [x.shape for x in out] == [(q, 100), (q, 100), (q,), (q, 2), (q, 2), (q,)]
  for levels in (1, 2):
    config.search.class_levels = levels
    (_, (fn, args)), = program.aot_program(config, mesh).items()
    assert [g.shape for g in args[3]] == nodes[:levels]
    assert [x.shape for x in jax.eval_shape(fn, *args)] == [x.shape for x in out]


if __name__ == "__main__":
  if sys.argv[1:] == ["api"]:
    print(json.dumps(_api_worker()))
  elif sys.argv[1:2] == ["configs"] and len(sys.argv) == 3:
    print(json.dumps(_configs_worker(sys.argv[2])))
  else:
    raise SystemExit(f"usage: {sys.argv[0]} api | configs JSON_PATH")
