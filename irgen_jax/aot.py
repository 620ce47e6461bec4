"""Ahead-of-time compilation for TPU pod topologies, on a CPU machine: learn before renting a slice
whether a config compiles, how it is sharded and whether it fits in each chip's memory.

  python -m irgen_jax.aot --config=configs/inshop.py --topology=v5e:4x4 [--json=aot.json]

With ``libtpu`` (``launch/install.sh`` puts it under ``.venv/tpu-compiler``) JAX
describes a TPU slice it does not have (``jax.experimental.topologies.get_topology_desc``):
compile-only devices that the real TPU compiler targets. The config's ``data`` mesh is built over
them exactly as a run builds it over real chips (``parallel.make_mesh``), every program of the
config is lowered from shapes alone (``jax.ShapeDtypeStruct`` with a ``NamedSharding``; no data, no
weights) and compiled, and XLA's own analyses are reported per chip:

- memory (``memory_analysis()``): argument, output, donated (aliased), temporary and generated-code
  bytes of one chip's program; the total (args + outputs - aliased + temporaries + code) against the
  chip's HBM. A program larger than HBM is refused by the TPU compiler itself (RESOURCE_EXHAUSTED);
  it is reported as not fitting with the figure XLA gives, and a verdict says what to change first.
- FLOPs (``cost_analysis()``): XLA counts the FLOPs of the partitioned program, i.e. of ONE device.
  Verified here with matmuls of known cost on v5e:2x2: a [M,K]@[K,N] product with the rows sharded
  over 4 chips reports 2MKN/4; replicated operands report 2MKN (every chip does all of it); the
  contraction dimension sharded reports 2MKN/4 plus the all-reduce's additions. ``flops_global`` is
  per-chip FLOPs x chips (counting replicated work once per chip).
- an estimated step time: per-chip FLOPs / the chip's peak bf16 FLOP/s. An ideal lower bound, not a
  prediction: real steps also wait on HBM bandwidth, collectives and the input pipeline.

Which programs a config has is not decided here: providers hand them in (``programs``). A provider
is ``aot_program(config, mesh) -> {name: (jitted_fn, abstract_args)}``; the defaults are the stage
trainers' and the search's (``DEFAULT_PROVIDERS``), selected by ``config.stages``.

Loading libtpu into a process costs ~200 MB of memory and ~17 idle threads and writes logs under
/tmp/tpu_logs (``TPU_LOG_DIR``), but changes nothing in its CPU backend (measured: same devices,
same step times); the tests still compile in subprocesses so the test session never holds libtpu.
One slice only (no multi-slice).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import re
import sys
from typing import Any, Callable, Mapping, Sequence

import jax
from jax.sharding import Mesh

from irgen_jax import cli, config_lib, parallel
from irgen_jax.errors import UserError

GiB = 2**30

# A program: its jitted function and the abstract positional arguments it is lowered with.
Program = tuple[Callable[..., Any], Sequence[Any]]
Provider = Callable[[Any, Mesh], Mapping[str, Program]]


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation as a pod user rents it: one JAX device per chip (megacore on v4 and v5p)."""
  name: str                # "v5e": the generation in topology names
  device_kind: str         # what JAX reports as ``device.device_kind``
  hbm_bytes: int           # HBM per chip
  peak_bf16_flops: float   # per chip per second
  ndims: int               # topology dims in a name: 2 (v5e, v6e: AxB) or 3 (v4, v5p: AxBxC)
  max_chips_per_host: int  # slices up to this size are one host
  accelerator_type: str    # ``TPU_ACCELERATOR_TYPE`` for N chips; v4/v5p names count 2 cores a chip


CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", "TPU v4", 32 * GiB, 275e12, 3, 4, "v4-{cores}"),
    Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 2, 8, "v5litepod-{chips}"),
    Chip("v5p", "TPU v5", 95 * GiB, 459e12, 3, 4, "v5p-{cores}"),
    Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 2, 8, "v6e-{chips}"),
)}

_VALID_FORMS = ("v4:AxBxC, v5p:AxBxC (3-D tori), v5e:AxB, v6e:AxB (2-D), A, B, C chips along each "
                "axis, e.g. v5e:4x4 (a v5e-16 slice), v4:2x2x1, v5p:2x2x1, v6e:4x4")


def parse_topology_name(name: str) -> tuple[Chip, tuple[int, ...]]:
  """``"v5e:4x4"`` -> (the v5e Chip, (4, 4)). Raises ValueError listing the valid forms.

  Only the form is checked here (no libtpu needed); whether the shape is a slice libtpu knows is
  checked by ``load_topology``.
  """
  m = re.fullmatch(r"\s*(v\w+):(\d+(?:x\d+)*)\s*", name or "")
  chip = CHIPS.get(m.group(1)) if m else None
  shape = tuple(int(d) for d in m.group(2).split("x")) if m else ()
  if chip is None or len(shape) != chip.ndims or min(shape) < 1:
    raise UserError(f"Bad TPU topology {name!r}; expected one of {_VALID_FORMS}.")
  return chip, shape


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice described by libtpu: its chip and one compile-only device per chip."""
  name: str
  chip: Chip
  shape: tuple[int, ...]
  devices: tuple[Any, ...]

  @property
  def num_chips(self) -> int:
    return len(self.devices)

  @property
  def num_hosts(self) -> int:
    return len({d.process_index for d in self.devices})

  @property
  def chips_per_host(self) -> int:
    return self.num_chips // self.num_hosts


# launch/install.sh puts libtpu here, outside site-packages: a CPU-only process that leaves
# JAX_PLATFORMS unset would otherwise load it, print libtpu errors and hold ~200 MB for nothing. Only
# this module points JAX at it (TPU_LIBRARY_PATH), and only when no libtpu is installed normally (a
# TPU VM with jax[tpu] has its own).
VENDORED_LIBTPU = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               ".venv", "tpu-compiler", "libtpu", "libtpu.so")


def libtpu_available() -> bool:
  return (bool(os.environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None
          or os.path.isfile(VENDORED_LIBTPU))


def require_libtpu() -> None:
  """Points JAX at libtpu (the TPU compiler); raises with the install command when it is missing."""
  if not libtpu_available():
    raise RuntimeError(
        "Ahead-of-time TPU compilation needs libtpu (the TPU compiler), which is not installed. "
        "Install it with: bash launch/install.sh (it puts libtpu under .venv/tpu-compiler), or "
        "pip install -c constraints.txt -r requirements-tpu.txt")
  if (not os.environ.get("TPU_LIBRARY_PATH") and importlib.util.find_spec("libtpu") is None):
    os.environ["TPU_LIBRARY_PATH"] = VENDORED_LIBTPU


def load_topology(name: str) -> Topology:
  """Describes the slice ``name`` (e.g. ``"v5e:4x4"``) with libtpu; no TPU needed.

  Side effect: the first call in a process loads libtpu, after setting (if unset) the environment
  variables a real TPU VM would set, so libtpu does not print warnings about the machine it runs on.
  """
  chip, shape = parse_topology_name(name)
  require_libtpu()
  from jax.experimental import topologies
  chips = math.prod(shape)
  # libtpu takes /tmp/libtpu_lockfile when it loads, so a second process loading it (another
  # compile, a test while the CLI runs, this CLI on a TPU VM whose run holds the chips) fails with
  # "Internal error when accessing libtpu multi-process lockfile". The lock guards the chips; a
  # compile-only process opens none.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # libtpu reads these once, when it loads; on a TPU VM they are already set and stay untouched.
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                        chip.accelerator_type.format(chips=chips, cores=2 * chips))
  kwargs: dict[str, Any] = {}
  if chip.name == "v4":
    # libtpu's default v4 config has one device per TensorCore; JAX on a real v4 has one per chip.
    kwargs["chip_config_name"] = "megacore"
  if chips <= chip.max_chips_per_host:
    # libtpu's default is 2x2x1 chips a host; v5e/v6e slices of up to 8 chips (and v5e:1x1) are
    # one host.
    kwargs["chips_per_host_bounds"] = (*shape, 1)[:3]
  canonical = f"{chip.name}:{'x'.join(map(str, shape))}"
  try:
    desc = topologies.get_topology_desc(topology_name=canonical, platform="tpu", **kwargs)
  except jax.errors.JaxRuntimeError as e:
    raise UserError(f"libtpu does not know the TPU topology {name!r}: {e}. "
                     f"Expected one of {_VALID_FORMS}.") from e
  devices = tuple(desc.devices)
  if len(devices) != chips:
    raise RuntimeError(f"libtpu described {canonical} with {len(devices)} devices, expected one "
                       f"per chip ({chips}); this libtpu does not match irgen_jax.aot.")
  return Topology(canonical, chip, shape, devices)


def make_mesh(topology: Topology) -> Mesh:
  """The run's 1-D ``data`` mesh (``parallel.make_mesh``) over the topology's chips."""
  return parallel.make_mesh(topology.devices)


def with_sharding(tree: Any, sharding: Any) -> Any:
  """Abstract arguments for a provider: ``jax.eval_shape`` output -> ShapeDtypeStructs placed by
  ``sharding``, one ``jax.sharding.Sharding`` for every leaf or a pytree of them matching ``tree``.
  """
  def place(x, s):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: place(x, sharding), tree)
  return jax.tree.map(place, tree, sharding)


# --- compiling one program ------------------------------------------------------------------------


# Programs that only infer (the verdict suggests no remat for them).
SEARCH_PROGRAMS = ("beam_search",)


@dataclasses.dataclass
class ProgramReport:
  """What XLA says about one program on one chip of the topology. Bytes and FLOPs are per chip.

  When the TPU compiler refused the program for lack of HBM (``compiled`` False), ``per_chip_bytes``
  is the total XLA reported (rounded by XLA to 0.01 GB), the byte breakdown and FLOPs are None
  (XLA gives none), and ``argument_bytes`` comes from the abstract arguments' shardings.
  """
  name: str
  chip: Chip
  num_chips: int
  compiled: bool
  per_chip_bytes: int
  argument_bytes: int
  replicated_argument_bytes: int   # the part of the arguments held whole on every chip
  argument_shardings: dict[str, dict[str, int]]  # PartitionSpec -> {"arrays", "bytes_per_chip"}
  output_bytes: int | None = None
  alias_bytes: int | None = None   # outputs written into donated arguments (counted once)
  temp_bytes: int | None = None
  generated_code_bytes: int | None = None
  flops: float | None = None       # per chip per step (XLA's cost analysis)
  bytes_accessed: float | None = None
  xla_error: str | None = None
  xla_available_bytes: int | None = None  # HBM the compiler allows (its refusal message says)

  @property
  def hbm_bytes(self) -> int:
    return self.chip.hbm_bytes

  @property
  def fits(self) -> bool:
    return self.compiled and self.per_chip_bytes <= self.hbm_bytes

  @property
  def flops_global(self) -> float | None:
    return None if self.flops is None else self.flops * self.num_chips

  @property
  def est_step_time_s(self) -> float | None:
    """Per-chip FLOPs at the chip's peak bf16 rate: an ideal lower bound, not a prediction."""
    return None if self.flops is None else self.flops / self.chip.peak_bf16_flops

  @property
  def verdict(self) -> str | None:
    """None when the program fits; else what it needs, what a chip has, and what to change first."""
    if self.fits:
      return None
    need, have, n = self.per_chip_bytes, self.hbm_bytes, self.num_chips
    usable = ("" if self.xla_available_bytes is None else
              f" (the TPU compiler lets a program use {fmt_bytes(self.xla_available_bytes)})")
    head = (f"{self.name} does not fit: it needs {fmt_bytes(need)} per chip, a {self.chip.name} "
            f"chip has {fmt_bytes(have)}{usable}.")
    replicated, search = self.replicated_argument_bytes, self.name in SEARCH_PROGRAMS
    state = "parameters (and index tables)" if search else "parameters and optimizer state"
    fsdp = (f"shard {state} over the `data` axis (FSDP) instead of "
            f"replicating them: {fmt_bytes(replicated)} of the arguments are held whole on every "
            f"chip; split over {n} chips they would take {fmt_bytes(replicated // n)} per chip")
    if search:  # inference: no gradients, nothing to rematerialize
      others = ["a smaller search.query_batch_size or search.beam_size: the encoder's activations "
                "and the decoder's caches grow with the queries x beams per chip"]
    else:
      others = [("a smaller batch (the stage's batch_size): activations and their gradients grow "
                 "with the batch per chip"),
                ("rematerialization (the stage's encoder.remat / decoder.remat = True): recompute "
                 "block activations in the backward pass instead of keeping them (~30% more "
                 "compute)")]
    first = [fsdp, *others] if replicated * 2 >= need else [*others, fsdp]
    if replicated >= have:
      first = [fsdp]  # the replicated state alone is too large: nothing about the batch helps
      if replicated // n >= have:
        first.append(f"a larger slice: even split over {n} chips the replicated arguments need "
                     f"{fmt_bytes(replicated // n)} per chip")
    bigger = [f"{c.name} {fmt_bytes(c.hbm_bytes)}" for c in CHIPS.values() if c.hbm_bytes > need]
    if bigger:
      first.append(f"a chip with more HBM ({', '.join(bigger)})")
    steps = [f"  {i}. {s}" for i, s in enumerate(first, 1)]
    return "\n".join([head, "First things to change:", *steps])

  def to_json(self) -> dict[str, Any]:
    out = {k: getattr(self, k) for k in (
        "per_chip_bytes", "flops", "fits", "compiled", "argument_bytes",
        "replicated_argument_bytes", "argument_shardings", "output_bytes", "alias_bytes",
        "temp_bytes", "generated_code_bytes", "bytes_accessed", "flops_global",
        "est_step_time_s", "hbm_bytes", "verdict", "xla_error", "xla_available_bytes")}
    out["flops_are"] = "per chip per step"
    out["est_step_time_is"] = "per-chip FLOPs / peak bf16 FLOP/s: an ideal lower bound"
    return out


def _leaves_with_paths(abstract_args: Sequence[Any]) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tuple(abstract_args))
  return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]


@dataclasses.dataclass
class _Arguments:
  """The abstract arguments' placement, read from their shardings (before any compile)."""
  chip: Chip
  num_chips: int
  bytes: int              # per chip, unpadded
  replicated_bytes: int   # per chip, of leaves held whole on every chip
  by_spec: dict[str, dict[str, int]]  # PartitionSpec -> {"arrays": n, "bytes_per_chip": b}


def _arguments(name: str, abstract_args: Sequence[Any]) -> _Arguments:
  """Reads how the arguments are placed; checks every leaf sits on one TPU topology."""
  chip, total, replicated, devices, by_spec = None, 0, 0, set(), {}
  for path, leaf in _leaves_with_paths(abstract_args):
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      # A leaf without a sharding would be placed on the default (CPU) device and the compile would
      # fail with a device-mismatch error far from its cause.
      raise ValueError(f"Program {name!r}: argument {path} ({leaf!r}) has no sharding; give every "
                       "jax.ShapeDtypeStruct a NamedSharding over the topology's mesh "
                       "(aot.with_sharding helps).")
    kinds = {d.device_kind for d in sharding.device_set}
    leaf_chips = [c for c in CHIPS.values() if c.device_kind in kinds]
    if len(kinds) != 1 or not leaf_chips:
      raise ValueError(f"Program {name!r}: argument {path} is placed on {sorted(kinds)}, not on "
                       f"the devices of a TPU topology ({', '.join(CHIPS)}).")
    if chip is not None and leaf_chips[0] != chip:
      raise ValueError(f"Program {name!r}: arguments on different chips ({chip.name}, "
                       f"{leaf_chips[0].name}).")
    chip = leaf_chips[0]
    devices |= sharding.device_set
    nbytes = math.prod(sharding.shard_shape(leaf.shape)) * jax.numpy.dtype(leaf.dtype).itemsize
    total += nbytes
    if sharding.is_fully_replicated:
      replicated += nbytes
    spec = str(getattr(sharding, "spec", sharding))
    entry = by_spec.setdefault(spec, {"arrays": 0, "bytes_per_chip": 0})
    entry["arrays"] += 1
    entry["bytes_per_chip"] += nbytes
  if chip is None:
    raise ValueError(f"Program {name!r} has no array arguments; the chip cannot be told from them.")
  return _Arguments(chip, len(devices), total, replicated, by_spec)


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _oom_bytes(message: str) -> tuple[int | None, int | None]:
  """(needed, available) per chip from the TPU compiler's out-of-memory message, None where absent.

  Its G are GiB: v5e's 16 GiB less the runtime's reserve prints as 15.75G. It has two forms.
  """
  number = r"([\d.]+)([KMGT]?)B?"
  for pattern in (rf"memory required for [^(]*\({number}\) exceeds available HBM \({number}\)",
                  rf"Used {number} of {number} hbm"):
    m = re.search(pattern, message)
    if m:
      return (int(float(m.group(1)) * _UNITS[m.group(2)]),
              int(float(m.group(3)) * _UNITS[m.group(4)]))
  return None, None


def compile_program(name: str, jitted_fn: Callable[..., Any], abstract_args: Sequence[Any], *,
                    chip: Chip | None = None) -> ProgramReport:
  """Lowers and compiles ``jitted_fn(*abstract_args)`` for the TPU chips its arguments sit on.

  ``abstract_args``: positional arguments, pytrees of ``jax.ShapeDtypeStruct`` each with a
  ``sharding`` over a topology's mesh (the chip is read from those devices unless ``chip`` is
  given).
  ``jitted_fn``: a ``jax.jit`` function (its shardings and donations apply) or a plain function.
  A program the TPU compiler refuses for lack of HBM is reported (``fits`` False, with a verdict);
  any other compile error is raised, naming the program.
  """
  args = _arguments(name, abstract_args)
  chip = chip or args.chip
  common = dict(name=name, chip=chip, num_chips=args.num_chips,
                replicated_argument_bytes=args.replicated_bytes, argument_shardings=args.by_spec)
  fn = jitted_fn if hasattr(jitted_fn, "lower") else jax.jit(jitted_fn)
  try:
    compiled = fn.lower(*abstract_args).compile()
  except jax.errors.JaxRuntimeError as e:
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message:
      raise RuntimeError(f"Ahead-of-time compile of program {name!r} for {chip.name} failed: "
                         f"{message}") from e
    needed, available = _oom_bytes(message)
    # Without a figure in the message, the arguments are a lower bound of what the program needs.
    return ProgramReport(**common, compiled=False, per_chip_bytes=needed or args.bytes,
                         argument_bytes=args.bytes, xla_error=message.splitlines()[0],
                         xla_available_bytes=available)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per partition, all equal under SPMD
    cost = cost[0] if cost else {}
  cost = cost or {}
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  return ProgramReport(
      **common, compiled=True, per_chip_bytes=int(total),
      argument_bytes=int(mem.argument_size_in_bytes),
      output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
      temp_bytes=int(mem.temp_size_in_bytes),
      generated_code_bytes=int(mem.generated_code_size_in_bytes),
      flops=float(cost["flops"]) if "flops" in cost else None,
      bytes_accessed=float(cost["bytes accessed"]) if "bytes accessed" in cost else None)


# --- which programs a config has ------------------------------------------------------------------

# Stage (config.stages) -> "module:function" that returns that stage's programs.
DEFAULT_PROVIDERS: dict[str, str] = {
    "tokenizer": "irgen_jax.trainers.train_tokenizer:aot_program",
    "retriever": "irgen_jax.trainers.train_retriever:aot_program",
    "evaluate": "irgen_jax.decoding.program:aot_program",
}


def resolve_provider(spec: str | Provider) -> Provider:
  """``"module:function"`` -> the function; a callable is returned as is.

  Raises NotImplementedError naming the provider when its module or function does not exist (an
  import error inside an existing module is raised as is: that is a bug, not a missing provider).
  """
  if callable(spec):
    return spec
  module_name, sep, attr = spec.partition(":")
  if not sep or not module_name or not attr:
    raise ValueError(f"Bad provider {spec!r}; expected 'module:function'.")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
      raise NotImplementedError(
          f"AOT program provider {spec} does not exist yet (no module {e.name}). A provider is "
          "`aot_program(config, mesh) -> {name: (jitted_fn, abstract_args)}`.") from e
    raise
  fn = getattr(module, attr, None)
  if fn is None:
    raise NotImplementedError(
        f"AOT program provider {spec} does not exist yet ({module_name} has no {attr}). A "
        "provider is `aot_program(config, mesh) -> {name: (jitted_fn, abstract_args)}`.")
  return fn


def programs(config: Any, mesh: Mesh,
             providers: Sequence[str | Provider] | None = None) -> dict[str, Program]:
  """Every program to compile: ``{name: (jitted_fn, abstract_args)}`` from the providers.

  ``providers`` default: ``DEFAULT_PROVIDERS`` of the stages in ``config.stages``. Every provider is
  resolved before any is called, so all missing ones are named at once (NotImplementedError).
  """
  if providers is None:
    providers = [DEFAULT_PROVIDERS[s] for s in config_lib.stages(config) if s in DEFAULT_PROVIDERS]
  resolved, missing = [], []
  for spec in providers:
    try:
      resolved.append((spec, resolve_provider(spec)))
    except NotImplementedError as e:
      missing.append(str(e))
  if missing:
    raise NotImplementedError("\n".join(missing + [
        "Compile the other stages by leaving these out of --config.stages, or pass --providers."]))
  out: dict[str, Program] = {}
  for spec, fn in resolved:
    for name, program in dict(fn(config, mesh)).items():
      if name in out:
        raise ValueError(f"Two providers name a program {name!r} (the second is {spec}).")
      jitted, args = program
      out[name] = (jitted, tuple(args))
  return out


def shapes_config(config: Any) -> Any:
  """The config the programs are built from: CLIP init without a checkpoint becomes random init.

  An encoder initialized from CLIP takes its architecture from the checkpoint (``vit.clip_config``);
  compiling needs shapes only, so when ``clip_path`` is unset or absent the encoder is built from
  the config's own sizes instead (``variant``, e.g. the base config's B/16 with quick-GELU: the same
  architecture as OpenAI's CLIP ViT-B/16). A checkpoint that exists is read as in a run.
  """
  relaxed = copy.deepcopy(config)

  def missing(e):
    return not (e.clip_path and os.path.exists(e.clip_path))
  if relaxed.tokenizer.encoder.init == "clip" and missing(relaxed.tokenizer.encoder):
    relaxed.tokenizer.encoder.init = "random"
  if relaxed.retriever.encoder_init == "clip" and missing(relaxed.retriever.encoder):
    relaxed.retriever.encoder_init = "random"
  return relaxed


def check_config(config: Any, topology: Topology) -> None:
  """The config's own validation for this slice's device and host counts.

  Checkpoint paths (CLIP weights) are not required: compiling needs shapes only (``shapes_config``).
  """
  config_lib.validate(shapes_config(config), num_devices=topology.num_chips,
                      num_processes=topology.num_hosts)


# --- report ---------------------------------------------------------------------------------------


def fmt_bytes(n: float | None) -> str:
  if n is None:
    return "?"
  for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def _fmt_flops(f: float) -> str:
  for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6),
                     ("kFLOP", 1e3)):
    if f >= size:
      return f"{f / size:.2f} {unit}"
  return f"{f:.0f} FLOP"


def _fmt_seconds(s: float) -> str:
  if s < 1e-3:
    return f"{s * 1e6:.2f} us"
  return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def describe_topology(topology: Topology) -> str:
  c = topology.chip
  return (f"{topology.name}: {topology.num_chips} chips ({c.device_kind}) on {topology.num_hosts} "
          f"host(s) x {topology.chips_per_host} chips; per chip {fmt_bytes(c.hbm_bytes)} HBM, "
          f"{c.peak_bf16_flops / 1e12:.0f} TFLOP/s peak bf16")


def format_report(report: ProgramReport) -> str:
  """The per-chip table of one program (text)."""
  r = report
  placement = [(f"  {spec}", f"{fmt_bytes(v['bytes_per_chip'])} in {v['arrays']} arrays")
               for spec, v in r.argument_shardings.items()]
  rows = [(f"== {r.name}", "")]
  if r.compiled:
    rows += [("arguments", fmt_bytes(r.argument_bytes) + "; by sharding, unpadded:"), *placement,
             ("outputs", fmt_bytes(r.output_bytes)),
             ("aliased (donated)", "-" + fmt_bytes(r.alias_bytes)),
             ("temporaries", fmt_bytes(r.temp_bytes)),
             ("generated code", fmt_bytes(r.generated_code_bytes))]
  else:
    rows += [("arguments", fmt_bytes(r.argument_bytes) + " (unpadded); by sharding:"), *placement,
             ("XLA", r.xla_error or "")]
  share = f" ({100 * r.per_chip_bytes / r.hbm_bytes:.1f}%)"
  rows.append(("total per chip",
               f"{fmt_bytes(r.per_chip_bytes)} of {fmt_bytes(r.hbm_bytes)}{share}"))
  if r.flops is not None:
    rows.append(("FLOPs per step", f"{_fmt_flops(r.flops)} per chip, "
                                   f"{_fmt_flops(r.flops_global)} over {r.num_chips} chips"))
    rows.append(("est. step time", f"{_fmt_seconds(r.est_step_time_s)} (estimate: per-chip "
                                   "FLOPs at peak bf16, a lower bound)"))
  rows.append(("fits", "yes" if r.fits else "NO"))
  width = max(len(k) for k, v in rows if v) + 2
  text = "\n".join(f"  {k:<{width}}{v}" if v else k for k, v in rows)
  if r.verdict:
    text += "\n" + r.verdict
  return text


def report_json(topology: Topology, reports: Sequence[ProgramReport]) -> dict[str, Any]:
  c = topology.chip
  return {
      "topology": topology.name,
      "chip": c.name,
      "num_chips": topology.num_chips,
      "num_hosts": topology.num_hosts,
      "chips_per_host": topology.chips_per_host,
      "hbm_bytes_per_chip": c.hbm_bytes,
      "peak_bf16_flops_per_chip": c.peak_bf16_flops,
      "programs": {r.name: r.to_json() for r in reports},
  }


def run(config: Any, topology: Topology | str, *,
        providers: Sequence[str | Provider] | None = None, json_path: str | None = None,
        out=sys.stdout) -> list[ProgramReport]:
  """The CLI's work as a function: topology, mesh, config check, programs, compile, print, JSON."""
  if isinstance(topology, str):
    topology = load_topology(topology)
  check_config(config, topology)
  shapes = shapes_config(config)
  mesh = make_mesh(topology)
  progs = programs(shapes, mesh, providers)
  print(describe_topology(topology), file=out)
  if shapes.to_dict() != config.to_dict():
    print("(no CLIP checkpoint at clip_path: encoders sized by the config's variant/sizes instead)",
          file=out)
  reports = []
  for name, (fn, args) in progs.items():
    reports.append(compile_program(name, fn, args, chip=topology.chip))
    print(format_report(reports[-1]), file=out, flush=True)
  if json_path:
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
      json.dump(report_json(topology, reports), f, indent=2)
  return reports


def _main() -> None:
  from absl import flags
  from ml_collections import config_flags

  # Flags are defined here, not at import, so importing this module (tests, the main entry point)
  # never collides with another module's --config.
  config_flags.DEFINE_config_file("config", None, "configs/<dataset>.py[:args]", lock_config=True)
  flags.DEFINE_string("topology", None, f"TPU slice: {_VALID_FORMS}")
  flags.DEFINE_string("json", None, "also write the report as JSON to this path")
  flags.DEFINE_list("providers", None, "module:function program providers replacing the defaults "
                    f"({', '.join(DEFAULT_PROVIDERS.values())})")
  flags.mark_flags_as_required(["config", "topology"])
  FLAGS = flags.FLAGS

  def main(argv):
    if len(argv) > 1:
      raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    # Compiling for a described slice needs no attached accelerator; on a TPU VM whose chips a run
    # holds, opening them would fail.
    if not os.environ.get("JAX_PLATFORMS"):
      jax.config.update("jax_platforms", "cpu")
    topology = load_topology(FLAGS.topology)
    reports = run(FLAGS.config, topology, providers=FLAGS.providers, json_path=FLAGS.json)
    sys.exit(0 if all(r.fits for r in reports) else 1)

  cli.run(main, config_flag="config")


if __name__ == "__main__":
  _main()
