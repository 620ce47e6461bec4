"""Beam search and index benchmarks: every figure is a ratio measured side by side in this one run
(interleaved repeats, best of each).

  .venv/bin/python benchmarks/beam_search.py [--preset cpu|paper] [--json PATH] [--parts a,b,...]

Figures (JSON keys), and the target each is read against (never asserted):
  latency_ratio_1m_10k      per-query search latency with a 1M-identifier index / with a 10k one     (<= 1.1)
  constraint_overhead       masked / unmasked decoding time - 1, at N = 1M                           (<= 0.05)
  flops_fraction            achieved FLOP/s of a batched search / FLOP/s of a plain matmul            (>= 0.5)
  speedup_vs_reference_b10  per-query time of the reference algorithm / ours, B = K = 10
  speedup_vs_reference_b30  same at B = K = 30
  decoder_speedup_vs_reference_b{10,30}_batch16
                            (--parts latency,reference) the reference's decoder part (its whole query
                            minus its encoder, batch 1) / ours at batch 16        (>= 50 at B=10, >= 70 at 30)
  encoder_ms_per_query_batch{1,16}, search_ms_per_query_b{10,30}_batch{1,16}, decoder_ms_per_query_...
                            (--parts latency) the whole query (encoder + cross-attention K/V + M steps +
                            identifiers -> images) and its parts, with FLOP/s against a matmul, a
                            profile of where the time goes and the batch-1 memory-bandwidth floor
  torch_encoder_ms_per_query_batch{1,16}, encoder_speedup_vs_torch_batch{1,16}
                            (--parts latency, with torch and transformers installed) PyTorch's CLIP
                            vision tower of the same size timed in the same interleaved runs  (>= 1)
  bytes_per_node            index bytes per internal trie node                                       (<= 64)
  dict_trie_ratio           bytes of a Python dict-of-dicts trie / bytes of the index, same codes    (>= 20)

Parts (--parts): memory (no model needed), gallery, overhead, flops, latency, length, reference (these need
the real retriever, irgen_jax/models/retriever.py, and the ViT encoder, irgen_jax/models/vit.py).
``length``: search_ms_per_query_{unroll,scan}_m{M} and compile times for M = 4, 8, 16, 64, 256 (the
scanned levels of long identifiers against the unrolled steps; 8 queries, B = 10, N = 10,000).

Presets: ``cpu`` (default) is a CPU-sized retriever: ViT encoder 32x32 images, patch 4 (65 tokens), width 128,
depth 2; decoder width 256, 4 blocks, 4 heads; M = 4, L = 256; 64 queries per batch. ``paper`` is the
paper's size for a GPU: ViT-B/16 at 224 (197 tokens), decoder 12 blocks of width 768, M = 4, L = 256,
B = 10 and 30.

FLOPs are counted analytically (``analytic_flops``: encoder, cross-attention K/V once per query,
then per new token per block 28 d^2 + attention, and the d x L output layer, for all Q x B beams at each of
the M steps); XLA's cost_analysis of the compiled search is printed beside it as a cross-check.

The reference algorithm (the public PyTorch code's ``beam_search``) is re-implemented here on
the same model: one query at a time, beam size = K, no KV cache (every step re-runs the decoder over the
whole prefix for every beam, including the cross-attention keys/values of the encoder tokens), a Python
walk of a dict trie per beam to find legal tokens, products of softmax probabilities, and a scan of all N
codes per final beam to find its images. Its decoder calls are jitted JAX (one program per prefix length),
so the comparison is of algorithms on one framework, not of PyTorch against JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import sys
import time
import tracemalloc
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from irgen_jax.decoding import beam_search as bs  # noqa: E402
from irgen_jax.decoding import program  # noqa: E402
from irgen_jax.decoding.index import Index, IndexArrays  # noqa: E402
from irgen_jax.models import retriever  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Preset:
  image_size: int
  patch_size: int
  enc_width: int
  enc_depth: int
  enc_heads: int
  dec_width: int
  dec_depth: int
  dec_heads: int
  num_levels: int = 4      # M
  num_tokens: int = 256    # L
  batch: int = 64          # queries per batch
  beams: tuple[int, ...] = (10, 30)
  gallery_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
  reference_queries: int = 5
  repeats: int = 7

  @property
  def enc_tokens(self) -> int:
    return 1 + (self.image_size // self.patch_size) ** 2


PRESETS = {
    "cpu": Preset(image_size=32, patch_size=4, enc_width=128, enc_depth=2, enc_heads=4,
                  dec_width=256, dec_depth=4, dec_heads=4),
    "paper": Preset(image_size=224, patch_size=16, enc_width=768, enc_depth=12, enc_heads=12,
                    dec_width=768, dec_depth=12, dec_heads=12, reference_queries=2, repeats=7),
}


# ------------------------------------------------------------------------------------------- timing


def block(x: Any) -> Any:
  return jax.block_until_ready(x)


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Best wall time of each function over ``repeats`` runs, interleaved so load drift hits all alike.

  The minimum, not the median: on a shared machine the noise is other processes taking the cores, which
  only ever adds time, so the fastest run is the best estimate of each program's own cost.
  """
  for f in fns.values():
    block(f())  # compile and warm up
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t = time.perf_counter()
      block(f())
      times[k].append(time.perf_counter() - t)
  return {k: min(v) for k, v in times.items()}


def synthetic_codes(n: int, p: Preset, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, p.num_tokens, (n, p.num_levels), dtype=np.int32)


# ------------------------------------------------------------------------------------------- memory


def dict_trie(codes: list[list[int]]) -> dict:
  """The reference's kind of trie: nested dicts token → child; a leaf holds its images' ids (a list)."""
  root: dict = {}
  last = len(codes[0]) - 1 if codes else 0
  for i, code in enumerate(codes):
    node = root
    for d, c in enumerate(code):
      node = node.setdefault(c, [] if d == last else {})
    node.append(i)
  return root


def bench_memory(p: Preset, n: int) -> dict[str, Any]:
  """Index sizes (default "auto" layout and the all-mask "dense" one) vs a dict trie of the same codes."""
  codes = synthetic_codes(n, p)
  out: dict[str, Any] = {"n": n}
  for layout in ("auto", "dense"):
    t = time.perf_counter()
    index = Index.build(codes, p.num_tokens, layout=layout)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    index.insert(synthetic_codes(10_000, p, seed=1))
    out[layout] = {
        "build_s": build_s, "insert_10k_s": time.perf_counter() - t, "nbytes": index.nbytes,
        "dense_levels": index.dense_levels, "bytes_per_node": index.bytes_per_internal_node,
        "bytes_per_image": index.bytes_per_image}
  out["nodes"] = sum(index.nodes_per_depth)
  out["identifiers"] = index.num_identifiers
  as_lists = codes.tolist()  # made before measuring: the codes are the input, not the trie
  gc.collect()
  tracemalloc.start()
  trie = dict_trie(as_lists)
  trie_bytes, _ = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  del trie
  out["dict_trie_bytes"] = trie_bytes
  out["dict_trie_bytes_per_node"] = trie_bytes / out["nodes"]
  for layout in ("auto", "dense"):
    out[layout]["dict_trie_ratio"] = trie_bytes / out[layout]["nbytes"]
  return out


# ------------------------------------------------------------------------------------------- model


class ModelBench:
  """The real retriever at a preset's size, with random weights: decode functions, params, queries."""

  def __init__(self, p: Preset, seed: int = 0):
    self.p = p
    self.retriever = retriever
    self.model = retriever.Model(
        encoder=dict(width=p.enc_width, depth=p.enc_depth, num_heads=p.enc_heads, patch_size=p.patch_size,
                     image_size=p.image_size),
        width=p.dec_width, depth=p.dec_depth, num_heads=p.dec_heads, num_levels=p.num_levels,
        num_tokens=p.num_tokens)
    images = jnp.zeros((1, p.image_size, p.image_size, 3), jnp.float32)
    targets = jnp.zeros((1, p.num_levels), jnp.int32)
    self.params = jax.jit(self.model.init)(jax.random.key(seed), images, targets)["params"]
    self.fns = program.retriever_decode_fns(self.model)

  def queries(self, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(
        (n, self.p.image_size, self.p.image_size, 3)).astype(np.float32)


def search_fn(mb: ModelBench, arrays: IndexArrays, queries: jax.Array, beam: int, top_k: int,
              constrained: bool = True) -> Callable[[], Any]:
  return lambda: bs.beam_search(mb.fns, mb.params, arrays, queries, beam_size=beam, top_k=top_k,
                                constrained=constrained).image_ids


def bench_gallery(mb: ModelBench, beam: int) -> dict[str, float]:
  p = mb.p
  q = jnp.asarray(mb.queries(p.batch))
  fns = {}
  for n in p.gallery_sizes:
    arrays = Index.build(synthetic_codes(n, p), p.num_tokens).device_arrays()
    fns[n] = search_fn(mb, arrays, q, beam, beam)
  t = interleaved_times(fns, p.repeats)
  out = {f"per_query_ms_{n}": 1e3 * t[n] / p.batch for n in p.gallery_sizes}
  out["latency_ratio"] = t[p.gallery_sizes[-1]] / t[p.gallery_sizes[0]]
  return out


def _torch_encoders(p: Preset) -> dict[int, Callable[[], Any]]:
  """PyTorch's CLIP vision tower of the preset's size (Hugging Face ``CLIPVisionModel``, random
  weights, float32, eager, ``inference_mode``, torch's own thread count) at batch 1 and 16, for the
  encoder's side-by-side figure; empty when torch or transformers is not installed. The same layout
  and arithmetic as our ViT (``irgen_jax/models/vit.py``): what differs is the framework."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from transformers import CLIPVisionConfig, CLIPVisionModel  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {}
  torch.manual_seed(0)
  model = CLIPVisionModel(CLIPVisionConfig(
      hidden_size=p.enc_width, intermediate_size=4 * p.enc_width, num_hidden_layers=p.enc_depth,
      num_attention_heads=p.enc_heads, image_size=p.image_size, patch_size=p.patch_size)).eval()

  def run(x):
    with torch.inference_mode():
      model(pixel_values=x)
  return {b: functools.partial(run, torch.randn(b, 3, p.image_size, p.image_size)) for b in (1, 16)}


def _xla_cost(mb: ModelBench, arrays: IndexArrays, queries: jax.Array, beam: int,
              constrained: bool = True) -> dict[str, float]:
  compiled = bs.beam_search.lower(mb.fns, mb.params, arrays, queries, beam_size=beam, top_k=beam,
                                  constrained=constrained).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"flops": float(cost.get("flops", float("nan"))),
          "bytes": float(cost.get("bytes accessed", float("nan")))} if cost else {}


def bench_overhead(mb: ModelBench, beam: int, n: int) -> dict[str, float]:
  p = mb.p
  q = jnp.asarray(mb.queries(p.batch))
  arrays = Index.build(synthetic_codes(n, p), p.num_tokens).device_arrays()
  t = interleaved_times({"masked": search_fn(mb, arrays, q, beam, beam, True),
                         "unmasked": search_fn(mb, arrays, q, beam, beam, False)},
                        3 * p.repeats)  # a small difference of two large times: more runs
  # XLA's own count of the two programs: the constraint's extra work, free of timing noise.
  masked, unmasked = _xla_cost(mb, arrays, q, beam, True), _xla_cost(mb, arrays, q, beam, False)
  return {"masked_ms": 1e3 * t["masked"], "unmasked_ms": 1e3 * t["unmasked"],
          "constraint_overhead": t["masked"] / t["unmasked"] - 1,
          "xla_extra_flops": masked.get("flops", np.nan) / unmasked.get("flops", np.nan) - 1,
          "xla_extra_bytes": masked.get("bytes", np.nan) / unmasked.get("bytes", np.nan) - 1}


def bench_latency(mb: ModelBench, n: int = 10_000) -> dict[str, Any]:
  """Per-query latency of the whole query at batch 1 and 16 (encoder + cross-attention keys/values +
  M decode steps + identifiers -> images), B = 10 and 30, and of the encoder alone; achieved FLOP/s of
  each against a plain matmul and a memory stream timed in the same interleaved runs; and where the
  time goes (``profile``: encoder, cross-attention K/V, decode steps, each timed on its own, with
  XLA's FLOP and byte counts)."""
  p = mb.p
  arrays = Index.build(synthetic_codes(n, p), p.num_tokens).device_arrays()
  encode = jax.jit(lambda params, x: retriever.encode(mb.model, params, x))
  context = jax.jit(lambda params, tokens: mb.model.apply({"params": params}, tokens,
                                                          method=retriever.Retriever.context_from_tokens))
  from_tokens = program.retriever_decode_fns(mb.model, from_tokens=True)
  fns, shapes = {}, {}
  for batch in (1, 16):
    q = jnp.asarray(mb.queries(batch))
    tokens = encode(mb.params, q)
    fns[f"encoder_batch{batch}"] = lambda q=q: encode(mb.params, q)
    fns[f"cross_kv_batch{batch}"] = lambda t=tokens: context(mb.params, t)
    for beam in p.beams:
      fns[f"search_b{beam}_batch{batch}"] = search_fn(mb, arrays, q, beam, beam)
      fns[f"from_tokens_b{beam}_batch{batch}"] = (
          lambda t=tokens, b=beam: bs.beam_search(from_tokens, mb.params, arrays, t, beam_size=b,
                                                  top_k=b).image_ids)
      shapes[(beam, batch)] = (q, tokens)
  e = p.dec_width
  a = jax.random.normal(jax.random.key(1), (16 * max(p.beams), e), jnp.float32)
  w = jax.random.normal(jax.random.key(2), (e, 4 * e), jnp.float32)
  stream = jnp.ones((64 << 20,), jnp.float32)  # 256 MB: read once per call
  fns["matmul"] = lambda: jnp.dot(a, w)
  fns["stream"] = lambda: jnp.sum(stream)
  torch_encoders = _torch_encoders(p)
  for batch, f in torch_encoders.items():
    fns[f"torch_encoder_batch{batch}"] = f
  t = interleaved_times(fns, max(3, p.repeats // 2))
  matmul_rate = 2 * a.shape[0] * e * 4 * e / t["matmul"]
  bandwidth = stream.nbytes / t["stream"]
  out: dict[str, Any] = {"matmul_gflops": matmul_rate / 1e9, "memory_gb_per_s": bandwidth / 1e9}
  decoder_bytes = sum(x.nbytes for x in jax.tree.leaves(mb.params["decoder"]))
  for batch in (1, 16):
    enc = analytic_flops(p, batch, 1)["encoder"]
    out[f"encoder_ms_per_query_batch{batch}"] = 1e3 * t[f"encoder_batch{batch}"] / batch
    if batch in torch_encoders:
      out[f"torch_encoder_ms_per_query_batch{batch}"] = 1e3 * t[f"torch_encoder_batch{batch}"] / batch
      out[f"encoder_speedup_vs_torch_batch{batch}"] = (t[f"torch_encoder_batch{batch}"]
                                                       / t[f"encoder_batch{batch}"])
    out[f"encoder_of_matmul_batch{batch}"] = enc / t[f"encoder_batch{batch}"] / matmul_rate
    for beam in p.beams:
      f = analytic_flops(p, batch, beam)
      total = t[f"search_b{beam}_batch{batch}"]
      steps = t[f"from_tokens_b{beam}_batch{batch}"] - t[f"cross_kv_batch{batch}"]
      out[f"search_ms_per_query_b{beam}_batch{batch}"] = 1e3 * total / batch
      out[f"decoder_ms_per_query_b{beam}_batch{batch}"] = 1e3 * (total - t[f"encoder_batch{batch}"]) / batch
      out[f"search_of_matmul_b{beam}_batch{batch}"] = f["total"] / total / matmul_rate
      out[f"decoder_of_matmul_b{beam}_batch{batch}"] = (
          (f["cross_kv"] + f["decode"]) / (total - t[f"encoder_batch{batch}"]) / matmul_rate)
      out[f"profile_b{beam}_batch{batch}"] = {
          "encoder_ms": 1e3 * t[f"encoder_batch{batch}"], "cross_kv_ms": 1e3 * t[f"cross_kv_batch{batch}"],
          "decode_steps_ms": 1e3 * steps, "decode_steps_gflops": f["decode"] / steps / 1e9,
          "encoder_gflops": f["encoder"] / t[f"encoder_batch{batch}"] / 1e9}
  # Batch 1 reads every decoder weight at each of the M steps: what that costs at this bandwidth.
  out["batch1_decoder_floor_ms"] = 1e3 * p.num_levels * decoder_bytes / bandwidth
  out["decoder_weight_mb"] = decoder_bytes / 1e6
  q, tokens = shapes[(max(p.beams), 16)]
  out["xla_cost_b30_batch16"] = {
      "search": _cost(jax.jit(lambda x: bs.beam_search(mb.fns, mb.params, arrays, x, beam_size=max(p.beams),
                                                       top_k=max(p.beams)).image_ids), q),
      "cross_kv": _cost(jax.jit(lambda x: context(mb.params, x)), tokens),
      "encoder": _cost(jax.jit(lambda x: encode(mb.params, x)), q)}
  return out


def bench_length(p: Preset, lengths: tuple[int, ...] = (4, 8, 16, 64, 256), beam: int = 10,
                 n: int = 10_000, queries: int = 8, unroll_max: int = 64) -> dict[str, Any]:
  """Per-query search time against the identifier length M: the unrolled steps against the scanned
  ones (``beam_search(loop=...)``), each with its compile time; a preset's model with M positions,
  N random identifiers. The unrolled program grows with M (one program per step), so it is timed up to
  ``unroll_max`` only."""
  out: dict[str, Any] = {"beam": beam, "n": n, "queries": queries}
  for m in lengths:
    mp = dataclasses.replace(p, num_levels=m)
    mb = ModelBench(mp)
    index = Index.build(synthetic_codes(n, mp), mp.num_tokens)
    arrays = index.device_arrays()
    q = jnp.asarray(mb.queries(queries))
    fns = {}
    for loop in ("unroll", "scan"):
      if loop == "unroll" and m > unroll_max:
        continue
      run = functools.partial(bs.beam_search, mb.fns, mb.params, arrays, q, beam_size=beam, top_k=beam,
                              loop=loop)
      t = time.perf_counter()
      block(run().image_ids)
      out[f"compile_s_{loop}_m{m}"] = time.perf_counter() - t
      fns[loop] = lambda run=run: run().image_ids
    s0, s1 = bs.scanned_levels(arrays, bs.beam_widths(beam, m), "scan")
    out[f"scanned_levels_m{m}"] = [s0, s1]
    out[f"index_bytes_per_image_m{m}"] = index.bytes_per_image
    times = interleaved_times(fns, max(2, p.repeats // 2))
    for loop, sec in times.items():
      out[f"search_ms_per_query_{loop}_m{m}"] = 1e3 * sec / queries
    if len(times) == 2:
      out[f"scan_over_unroll_m{m}"] = times["scan"] / times["unroll"]
    print(f"M={m}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in out.items() if k.endswith(f"_m{m}")), flush=True)
    del mb, arrays
    gc.collect()
  return out


def _cost(jitted, *args) -> dict[str, float]:
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"gflop": float(cost.get("flops", np.nan)) / 1e9,
          "gb_accessed": float(cost.get("bytes accessed", np.nan)) / 1e9} if cost else {}


def analytic_flops(p: Preset, queries: int, beam: int) -> dict[str, float]:
  """FLOPs of one batched search (2 per multiply-add), counted from the model's shapes.

  At the paper's size (decoder width 768, 12 blocks, 197 encoder tokens, M = 4) this is ~0.21 GFLOP per
  new token, ~5.6 GFLOP of cross-attention keys/values per query once, ~12 GFLOP per query at B = 10 and
  ~24 at B = 30; the ViT-B/16 encoder is ~35 GFLOP per image. A search without a cache that re-runs every
  prefix for every beam (the public reference's) costs ~0.7 / 2.1 TFLOP per query at B = 10 / 30.
  """
  d, t_enc = p.enc_width, p.enc_tokens
  patches = t_enc - 1
  encoder = 2 * patches * (p.patch_size ** 2 * 3) * d + p.enc_depth * t_enc * (24 * d * d + 4 * t_enc * d)
  e = p.dec_width
  cross_kv = p.dec_depth * 4 * t_enc * d * e  # keys and values of every encoder token, once per query
  # Per new token and block: self q,k,v,out 8e^2; cross q,out 4e^2; MLP 16e^2; attention over the prefix
  # (<= M+1 positions) and the encoder tokens; then the e x L output layer.
  per_token = p.dec_depth * (28 * e * e + 4 * (p.num_levels + 1) * e + 4 * t_enc * e) + 2 * e * p.num_tokens
  # The root is decoded once per query (every beam would see the same prefix), then B beams per level.
  tokens = queries * (1 + beam * (p.num_levels - 1))
  return {"encoder": queries * encoder, "cross_kv": queries * cross_kv, "decode": tokens * per_token,
          "total": queries * (encoder + cross_kv) + tokens * per_token}


def bench_flops(mb: ModelBench, beam: int, n: int) -> dict[str, float]:
  p = mb.p
  q = jnp.asarray(mb.queries(p.batch))
  arrays = Index.build(synthetic_codes(n, p), p.num_tokens).device_arrays()
  search = search_fn(mb, arrays, q, beam, beam)
  rows, e = p.batch * beam, p.dec_width
  a = jax.random.normal(jax.random.key(1), (rows, e), jnp.float32)
  w = jax.random.normal(jax.random.key(2), (e, 4 * e), jnp.float32)
  matmul = jax.jit(lambda a, w: a @ w)
  t = interleaved_times({"search": search, "matmul": lambda: matmul(a, w)}, p.repeats)
  flops = analytic_flops(p, p.batch, beam)
  cost = _xla_cost(mb, arrays, q, beam)
  search_rate = flops["total"] / t["search"]
  matmul_rate = 2 * rows * e * 4 * e / t["matmul"]
  return {"search_ms": 1e3 * t["search"], "analytic_gflop": flops["total"] / 1e9,
          "xla_gflop": cost.get("flops", float("nan")) / 1e9,
          "search_gflops": search_rate / 1e9, "matmul_gflops": matmul_rate / 1e9,
          "flops_fraction": search_rate / matmul_rate}


# ------------------------------------------------------------------------------------------- reference


class ReferenceSearch:
  """The reference's beam search on our model (see the module docstring). One query at a time."""

  def __init__(self, mb: ModelBench, codes: np.ndarray):
    self.mb, self.codes = mb, codes
    self.trie = dict_trie(codes.tolist())
    self.encode = jax.jit(lambda params, image: mb.retriever.encode(mb.model, params, image))
    # decoder(prefix [B, m], encoder tokens [B, T, D]) -> next-token logits [B, L]: the whole prefix and
    # the cross-attention keys/values are recomputed on every call (no cache). One program per m.
    self.decode = jax.jit(
        lambda params, prefix, enc: mb.retriever.decode_prefix(mb.model, params, prefix, enc))

  def __call__(self, image: np.ndarray, k: int) -> np.ndarray:
    p = self.mb.p
    l = p.num_tokens
    enc = self.encode(self.mb.params, image[None])
    enc = jnp.repeat(enc, k, axis=0)  # the reference repeats the encoder output for every beam
    probs = np.asarray(jax.nn.softmax(self.decode(self.mb.params, jnp.zeros((k, 0), jnp.int32), enc)))
    pred = np.full(l, -1.0)
    for j in self.trie:
      pred[j] = probs[0, j]
    top = np.argsort(-pred, kind="stable")[:k]
    v, prefixes = pred[top], top[:, None]
    for _ in range(1, p.num_levels):
      probs = np.asarray(jax.nn.softmax(self.decode(self.mb.params, jnp.asarray(prefixes, jnp.int32), enc)))
      pred = np.full(k * l, -1.0)
      for i in range(k):
        node = self.trie
        for c in prefixes[i]:
          node = node[int(c)]
        pr = v[i] * probs[i]
        for j in node:
          pred[i * l + j] = pr[j]
      top = np.argsort(-pred, kind="stable")[:k]
      v = pred[top]
      prefixes = np.concatenate([prefixes[top // l], (top % l)[:, None]], axis=1)
    out = []
    for i in range(k):  # the reference scans all N codes for every final beam
      out.extend(np.flatnonzero((self.codes == prefixes[i]).all(1)).tolist())
    return np.array(out[:k])


def bench_reference(mb: ModelBench, n: int) -> dict[str, float]:
  p = mb.p
  codes = synthetic_codes(n, p)
  index = Index.build(codes, p.num_tokens)
  arrays = index.device_arrays()
  ref = ReferenceSearch(mb, codes)
  q_np = mb.queries(p.batch)
  q = jnp.asarray(q_np)
  out = {}
  # Its encoder alone (batch 1, as it runs), so its decoder part can be set beside ours.
  encoder = interleaved_times({"encoder": lambda: ref.encode(mb.params, q[:1])}, p.repeats)["encoder"]
  out["reference_encoder_ms_per_query"] = 1e3 * encoder
  for beam in p.beams:
    ours = interleaved_times({"ours": search_fn(mb, arrays, q, beam, beam)}, p.repeats)["ours"] / p.batch
    ref(q_np[0], beam)  # compile its per-prefix-length programs
    per_query = []
    for i in range(p.reference_queries):
      t = time.perf_counter()
      ref(q_np[i], beam)
      per_query.append(time.perf_counter() - t)
    theirs = min(per_query)  # best run, as for ours
    out[f"ours_ms_per_query_b{beam}"] = 1e3 * ours
    out[f"reference_ms_per_query_b{beam}"] = 1e3 * theirs
    out[f"reference_decoder_ms_per_query_b{beam}"] = 1e3 * (theirs - encoder)
    out[f"speedup_vs_reference_b{beam}"] = theirs / ours
  return out


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--json", help="write the figures to this JSON file")
  parser.add_argument("--parts", default="memory,gallery,overhead,flops,reference")
  parser.add_argument("--memory_n", type=int, default=1_000_000, help="codes for the memory figures")
  args = parser.parse_args(argv)
  p = PRESETS[args.preset]
  parts = [s.strip() for s in args.parts.split(",") if s.strip()]
  big = p.gallery_sizes[-1]
  rows: list[tuple[str, str, str, str]] = []  # figure, value, target, note
  figures: dict[str, Any] = {"preset": args.preset, "device": str(jax.devices()[0]),
                             "preset_config": dataclasses.asdict(p)}
  print(f"preset={args.preset} device={jax.devices()[0]} {p}", flush=True)

  if "memory" in parts:
    m = bench_memory(p, args.memory_n)
    a, d = m["auto"], m["dense"]
    figures.update(bytes_per_node=a["bytes_per_node"], dict_trie_ratio=a["dict_trie_ratio"], memory=m)
    rows += [
        ("bytes_per_node", f"{a['bytes_per_node']:.1f}", "<= 64",
         f"{m['nodes']:,} internal nodes, N={m['n']:,} random codes; "
         f"all-mask layout: {d['bytes_per_node']:.1f}"),
        ("bytes_per_image", f"{a['bytes_per_image']:.1f}", "",
         f"index {a['nbytes'] / 1e6:.1f} MB; all-mask layout: {d['bytes_per_image']:.1f} B, "
         f"{d['nbytes'] / 1e6:.1f} MB"),
        ("dict_trie_ratio", f"{a['dict_trie_ratio']:.1f}x", ">= 20x",
         f"dict trie {m['dict_trie_bytes'] / 1e6:.0f} MB (tracemalloc, "
         f"{m['dict_trie_bytes_per_node']:.0f} B/node); all-mask layout: {d['dict_trie_ratio']:.1f}x"),
        ("index build / insert 10k", f"{a['build_s']:.2f} s / {a['insert_10k_s']:.2f} s", "",
         f"N={m['n']:,}; all-mask layout {d['build_s']:.2f} s / {d['insert_10k_s']:.2f} s")]
    for r in rows[-4:]:
      print(r, flush=True)

  model_parts = [x for x in parts if x != "memory"]
  if model_parts:
    mb = ModelBench(p)
    beam = max(p.beams)
    if "gallery" in parts:
      g = bench_gallery(mb, beam)
      figures.update(latency_ratio_1m_10k=g["latency_ratio"], gallery=g)
      rows.append(("latency_ratio_1m_10k", f"{g['latency_ratio']:.3f}", "<= 1.1",
                   ", ".join(f"{n:,}: {g[f'per_query_ms_{n}']:.2f} ms/q" for n in p.gallery_sizes)
                   + f" (B={beam}, {p.batch} q/batch)"))
      print(rows[-1], flush=True)
    if "overhead" in parts:
      o = bench_overhead(mb, beam, big)
      figures.update(constraint_overhead=o["constraint_overhead"], overhead=o)
      rows.append(("constraint_overhead", f"{100 * o['constraint_overhead']:+.1f}%", "<= +5%",
                   f"masked {o['masked_ms']:.1f} ms vs unmasked {o['unmasked_ms']:.1f} ms per batch, "
                   f"N={big:,}; XLA count: {100 * o['xla_extra_flops']:+.2f}% FLOPs, "
                   f"{100 * o['xla_extra_bytes']:+.2f}% bytes"))
      print(rows[-1], flush=True)
    if "flops" in parts:
      f = bench_flops(mb, beam, big)
      figures.update(flops_fraction=f["flops_fraction"], flops=f)
      rows.append(("flops_fraction", f"{f['flops_fraction']:.2f}", ">= 0.5",
                   f"{f['search_gflops']:.1f} GFLOP/s (analytic {f['analytic_gflop']:.2f} GFLOP/batch, "
                   f"XLA {f['xla_gflop']:.2f}) vs matmul {f['matmul_gflops']:.1f} GFLOP/s"))
      print(rows[-1], flush=True)
    if "latency" in parts:
      lat = bench_latency(mb, p.gallery_sizes[0])
      figures.update({k: v for k, v in lat.items()}, latency=lat)
      first = len(rows)
      for key in sorted(k for k in lat if k.startswith(("encoder_ms", "torch_encoder_ms", "search_ms",
                                                         "decoder_ms"))):
        rows.append((key, f"{lat[key]:.1f} ms", "", ""))
      for key in sorted(k for k in lat if k.startswith("encoder_speedup_vs_torch")):
        rows.append((key, f"{lat[key]:.2f}x", ">= 1", "PyTorch's CLIP tower / ours, same run"))
      rows.append(("batch1_decoder_floor_ms", f"{lat['batch1_decoder_floor_ms']:.1f} ms", "",
                   f"{p.num_levels} x {lat['decoder_weight_mb']:.0f} MB of decoder weights at "
                   f"{lat['memory_gb_per_s']:.1f} GB/s"))
      for r in rows[first:]:
        print(r, flush=True)
    if "length" in parts:
      ln = bench_length(p)
      figures.update(length=ln)
      for m in (4, 8, 16, 64, 256):
        scan = ln.get(f"search_ms_per_query_scan_m{m}")
        unroll = ln.get(f"search_ms_per_query_unroll_m{m}")
        rows.append((f"search_ms_per_query_m{m}", f"{scan:.1f} ms (scan)", "",
                     (f"unrolled {unroll:.1f} ms; " if unroll is not None else "unrolled: not timed; ")
                     + f"compile scan {ln[f'compile_s_scan_m{m}']:.0f} s"
                     + (f", unrolled {ln[f'compile_s_unroll_m{m}']:.0f} s" if unroll is not None else "")
                     + f"; B={ln['beam']}, {ln['queries']} q/batch, N={ln['n']:,}"))
        print(rows[-1], flush=True)
    if "reference" in parts:
      r = bench_reference(mb, p.gallery_sizes[0])
      figures.update({k: v for k, v in r.items() if k.startswith("speedup")}, reference=r)
      for b in p.beams:
        rows.append((f"speedup_vs_reference_b{b}", f"{r[f'speedup_vs_reference_b{b}']:.0f}x", "",
                     f"reference {r[f'reference_ms_per_query_b{b}']:.0f} ms/q vs ours "
                     f"{r[f'ours_ms_per_query_b{b}']:.2f} ms/q (N={p.gallery_sizes[0]:,})"))
        print(rows[-1], flush=True)
        if "latency" in parts:  # the decoder parts, both measured in this run
          key = f"decoder_speedup_vs_reference_b{b}_batch16"
          figures[key] = (r[f"reference_decoder_ms_per_query_b{b}"]
                          / figures[f"decoder_ms_per_query_b{b}_batch16"])
          rows.append((key, f"{figures[key]:.0f}x", ">= 50" if b == 10 else ">= 70",
                       f"reference decoder part {r[f'reference_decoder_ms_per_query_b{b}']:.0f} ms/q "
                       f"(batch 1) vs ours {figures[f'decoder_ms_per_query_b{b}_batch16']:.1f} ms/q"))
          print(rows[-1], flush=True)

  width = [max(len(r[i]) for r in rows + [("figure", "value", "target", "note")]) for i in range(4)]
  line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, width))  # noqa: E731
  print()
  print(line(("figure", "value", "target", "note")))
  print("-+-".join("-" * w for w in width))
  for r in rows:
    print(line(r))
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(figures, fh, indent=2, default=float)
  return figures


if __name__ == "__main__":
  main()
