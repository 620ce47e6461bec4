"""Running a jitted per-batch function over every record of a split, on every device of every host.

Used for f_cls features (codebook refits, identifiers, baselines) and for the search over queries.
Batches come from ``data.pipeline.eval_dataset`` (deterministic order, padded last batch); each process
loads its slice, the batch is placed on the mesh, and the outputs are gathered back to every host and
put in record order by their ``index`` (so the result never depends on how batches were split).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np
import tqdm

from irgen_jax import parallel
from irgen_jax.data import pipeline


class Subset:
  """Rows of a random-access source, re-indexed 0..n-1 (a sample of queries, of the database)."""

  def __init__(self, source, rows):
    self.source, self.rows = source, np.asarray(rows, np.int64)

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    return dict(self.source[int(self.rows[i])], index=int(i))


def batch_for(num_records: int, batch_size: int) -> int:
  """The batch for ``num_records`` records: ``batch_size``, or the power of two >= ``num_records`` when
  that is smaller (a handful of queries is not padded to a large batch; few sizes, few compiles)."""
  return max(1, min(batch_size, 1 << max(0, num_records - 1).bit_length()))


def round_batch(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """``batch_size`` rounded up to a multiple of the device count (every device gets equal rows)."""
  n = mesh.devices.size
  return max(n, -(-batch_size // n) * n)


def map_split(
    fn: Callable[[Any], Any], source: Any, *, mesh: jax.sharding.Mesh, batch_size: int,
    image_size: int, resize_size: int, description: str = "", num_threads: int = 1,
    warm_up: bool = False,
) -> tuple[Any, float]:
  """Applies ``fn(images float32 [b, S, S, 3]) -> pytree of [b, ...] arrays`` to every record.

  Returns ``(outputs, seconds)``: a pytree of numpy arrays ``[len(source), ...]`` in record order,
  and the wall time spent (loading included). ``fn`` should be jitted; it sees global arrays sharded
  over the mesh's ``data`` axis. ``warm_up`` first runs one batch (of the same size) untimed, so that
  compiles are not in the seconds.
  """
  if warm_up:
    map_split(fn, Subset(source, [0]), mesh=mesh, batch_size=batch_size, image_size=image_size,
              resize_size=resize_size, num_threads=num_threads)
  batch_size = round_batch(batch_size, mesh)
  ds = pipeline.eval_dataset(source, global_batch_size=batch_size, image_size=image_size,
                             resize_size=resize_size)
  it = pipeline.make_iterator(ds, num_threads=num_threads)
  n = len(source)
  out = None
  t0 = time.perf_counter()
  pending = None

  def collect(result, index, mask):
    nonlocal out
    result, index, mask = parallel.to_host((result, index, mask))
    keep = mask.astype(bool)
    rows = index[keep]
    if out is None:
      out = jax.tree.map(lambda a: np.zeros((n, *a.shape[1:]), a.dtype), result)
    jax.tree.map(lambda o, a: o.__setitem__(rows, a[keep]), out, result)

  for batch in tqdm.tqdm(it, total=len(ds), desc=description or "inference", unit="batch",
                         disable=jax.process_index() != 0 or not description, mininterval=2.0):
    g = parallel.global_batch_from_local(batch, mesh)
    result = fn(g["image"])
    # Fetch the previous batch's outputs while this one computes: dispatch stays ahead of the host.
    if pending is not None:
      collect(*pending)
    pending = (result, g["index"], g["mask"])
  if pending is not None:
    collect(*pending)
  return out, time.perf_counter() - t0
