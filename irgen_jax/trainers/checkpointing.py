"""Checkpoints of a training stage: train state + input-pipeline state + log state, written by orbax.

One checkpoint holds the whole train state pytree (params, optimizer state, step, rng and any extra
arrays such as the tokenizer's codebooks), the grain iterator's state and a small JSON record of the
loop's own state (the running sums of the metrics being averaged), so a restart continues with exactly
the batches, and logs exactly the lines, an uninterrupted run would have. Saves are asynchronous:
training goes on while the previous step is written.

Orbax writes each checkpoint into a temporary directory and renames it when complete (with a commit
marker), so a checkpoint half-written by a kill is never listed, and never restored.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Keeps the last ``keep`` checkpoints of a stage under ``directory``."""

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any | None = None, *,
           extra: dict[str, Any] | None = None, force: bool = True) -> None:
    """Saves ``state`` (and the iterator's position, and ``extra``, a JSON-able dict) as ``step``."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if extra is not None:
      items["extra"] = ocp.args.JsonSave(extra)
    self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, template: Any, data_iterator: Any | None = None, step: int | None = None, *,
              extra: bool = False):
    """Restores ``step`` (default: latest) onto ``template``'s shapes and shardings.

    ``template`` is a pytree of arrays or ``jax.ShapeDtypeStruct`` (with shardings), e.g. the state
    created fresh or its ``jax.eval_shape``. The data iterator, when given, is restored in place.
    Returns ``(state, step)``, or ``(state, step, extra dict)`` with ``extra``.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint under {self.directory}.")
    abstract = jax.tree.map(_abstract, template)
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    if extra:
      items["extra"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    log.info("Restored %s at step %d", self.directory, step)
    if extra:
      return restored["state"], step, dict(restored["extra"] or {})
    return restored["state"], step

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
