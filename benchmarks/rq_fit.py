"""Residual-codebook fitting (``rq.fit_residual_codebooks``): cold and warm wall time, and determinism.

  .venv/bin/python benchmarks/rq_fit.py [--n 60000] [--d 256] [--m 4] [--l 256] [--iters 20]
                                        [--repeats 2] [--json PATH]

Features: a seeded Gaussian mixture (``--components`` unit-variance-spread centres, ``--noise`` isotropic
noise around each), float32 ``[N, D]``, generated with numpy before any timing.

Figures (JSON keys; printed, never asserted):
  cold_s            the first fit in this process: tracing + XLA compilation + the fit itself
  warm_s            the best of ``--repeats`` further fits with the same arguments (compiled program reused)
  compile_s         cold_s - warm_s: what the first fit pays once per (N, D, L, iters, chunk) shape
  per_level_s       warm_s / M (every level runs the same compiled program)
  fit_gflop         analytic FLOPs of one fit: per level, (iters + 1) assignment passes of 2 N L D for the
                    distances plus 2 N L D for the one-hot cluster sums, and k-means++ seeding on its
                    sample (L passes of 2 n_s D)
  flops_fraction    achieved FLOP/s of the warm fit / FLOP/s of a plain float32 [chunk, D] x [D, L] matmul
                    at the same (HIGHEST) precision, measured in this run
  deterministic     every fit (cold, warm repeats) returned bit-identical codebooks for the same seed
  seed_changes_books  a fit with seed + 1 differs (the seed is really used)
  rel_error         mean ||x - x̂||² / mean ||x||² of the fitted M-level quantization (a sanity figure)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from irgen_jax.models import rq  # noqa: E402


def mixture(n: int, d: int, components: int, noise: float, seed: int) -> np.ndarray:
  """float32 [n, d]: ``components`` Gaussian centres (std 1), each point a centre + N(0, noise²)."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((components, d), dtype=np.float32)
  which = rng.integers(0, components, n)
  return centres[which] + noise * rng.standard_normal((n, d), dtype=np.float32)


def fit_flops(n: int, d: int, m: int, l: int, iters: int, init_sample: int | None) -> float:
  n_s = n if init_sample is None else max(l, min(n, init_sample))
  per_level = (iters + 1) * (2 * n * l * d) * 2 + l * 2 * n_s * d
  return float(m * per_level)


def matmul_flops_per_s(rows: int, d: int, l: int, repeats: int) -> float:
  a = jnp.asarray(np.random.default_rng(1).standard_normal((rows, d), dtype=np.float32))
  b = jnp.asarray(np.random.default_rng(2).standard_normal((d, l), dtype=np.float32))
  f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST))
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * rows * d * l / best


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--n", type=int, default=60_000, help="feature vectors")
  p.add_argument("--d", type=int, default=256, help="feature width")
  p.add_argument("--m", type=int, default=4, help="levels (identifier length)")
  p.add_argument("--l", type=int, default=256, help="codewords per level")
  p.add_argument("--iters", type=int, default=20, help="Lloyd iterations per level (the config default)")
  p.add_argument("--components", type=int, default=1000, help="Gaussian mixture components")
  p.add_argument("--noise", type=float, default=0.5, help="std of the noise around each centre")
  p.add_argument("--seed", type=int, default=0, help="fit seed (the data seed is fixed: 12345)")
  p.add_argument("--repeats", type=int, default=2, help="warm fits (the best is reported)")
  p.add_argument("--json", help="also write the figures to this JSON file")
  args = p.parse_args(argv)

  x = mixture(args.n, args.d, args.components, args.noise, seed=12345)
  kw = dict(num_levels=args.m, codebook_size=args.l, iters=args.iters)
  print(f"device={jax.devices()[0]} jax={jax.__version__} N={args.n} D={args.d} M={args.m} L={args.l} "
        f"iters={args.iters} mixture={args.components}x(noise {args.noise})", flush=True)

  t0 = time.perf_counter()
  cold_books = rq.fit_residual_codebooks(x, seed=args.seed, **kw)
  cold = time.perf_counter() - t0
  print(f"cold fit: {cold:.2f} s", flush=True)

  warm_times, identical = [], True
  for i in range(args.repeats):
    t0 = time.perf_counter()
    books = rq.fit_residual_codebooks(x, seed=args.seed, **kw)
    warm_times.append(time.perf_counter() - t0)
    identical &= bool(np.array_equal(books, cold_books))
    print(f"warm fit {i + 1}: {warm_times[-1]:.2f} s, identical to the cold fit: "
          f"{np.array_equal(books, cold_books)}", flush=True)
  warm = min(warm_times) if warm_times else float("nan")

  other = rq.fit_residual_codebooks(x, seed=args.seed + 1, **kw)
  seed_changes = not np.array_equal(other, cold_books)

  codes = rq.encode(x, cold_books)
  recon = np.asarray(rq.reconstruct(jnp.asarray(codes), jnp.asarray(cold_books)))
  rel_error = float(np.mean(np.sum((x - recon) ** 2, -1)) / np.mean(np.sum(x ** 2, -1)))

  chunk = 16384
  rows = min(args.n, chunk)
  flops = fit_flops(args.n, args.d, args.m, args.l, args.iters, 16384)
  matmul = matmul_flops_per_s(rows, args.d, args.l, repeats=5)
  fraction = flops / warm / matmul if warm_times else float("nan")

  figures = {
      "n": args.n, "d": args.d, "m": args.m, "l": args.l, "iters": args.iters,
      "device": str(jax.devices()[0]), "jax": jax.__version__,
      "cold_s": round(cold, 3), "warm_s": round(warm, 3), "warm_runs_s": [round(t, 3) for t in warm_times],
      "compile_s": round(cold - warm, 3), "per_level_s": round(warm / args.m, 3),
      "fit_gflop": round(flops / 1e9, 1), "achieved_gflop_per_s": round(flops / warm / 1e9, 1),
      "matmul_gflop_per_s": round(matmul / 1e9, 1), "flops_fraction": round(fraction, 3),
      "deterministic": identical, "seed_changes_books": seed_changes,
      "rel_error": round(rel_error, 4),
  }

  rows_out = [
      ("cold_s", f"{cold:.2f} s", "first fit: trace + compile + fit"),
      ("warm_s", f"{warm:.2f} s", f"best of {args.repeats}: {', '.join(f'{t:.2f}' for t in warm_times)} s"),
      ("compile_s", f"{cold - warm:.2f} s", "cold - warm"),
      ("per_level_s", f"{warm / args.m:.2f} s", f"{args.iters} Lloyd iterations + k-means++ seeding"),
      ("flops_fraction", f"{fraction:.2f}", f"{flops / warm / 1e9:.1f} GFLOP/s of {flops / 1e9:.1f} GFLOP "
                                            f"vs matmul {matmul / 1e9:.1f} GFLOP/s"),
      ("deterministic", str(identical), f"{1 + args.repeats} fits, seed {args.seed}, bit-identical"),
      ("seed_changes_books", str(seed_changes), f"seed {args.seed + 1} vs {args.seed}"),
      ("rel_error", f"{rel_error:.4f}", "mean ||x - x̂||² / mean ||x||²"),
  ]
  width = [max(len(r[i]) for r in rows_out + [("figure", "value", "note")]) for i in range(3)]
  line = lambda r: " | ".join(str(v).ljust(w) for v, w in zip(r, width))  # noqa: E731
  print()
  print(line(("figure", "value", "note")))
  print("-+-".join("-" * w for w in width))
  for r in rows_out:
    print(line(r))
  print(json.dumps(figures))
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(figures, fh, indent=2)
  return figures


if __name__ == "__main__":
  main()
