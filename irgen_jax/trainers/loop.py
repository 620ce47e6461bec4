"""The training loop both stages share: resume, step, check, log, checkpoint, stop cleanly.

A stage hands in its jitted ``train_step(state, batch) -> (state, metrics)``, a fresh state (created
sharded), a grain iterator of this process's batch slices and a step count. The loop

- resumes from the stage's latest checkpoint when there is one (state + iterator state),
- calls an optional ``before_step(step, state) -> state`` hook (the tokenizer refits its codebooks
  there at epoch boundaries),
- checks that every step's loss is finite one step late (so dispatch stays asynchronous) and always
  before a checkpoint is written: a non-finite loss stops the run naming the step, and nothing from
  that step is saved,
- writes metrics as JSON lines and TensorBoard events (process 0), with a progress bar; each logged
  line averages the steps since the previous one, and the running sums travel in the checkpoint, so a
  resumed run logs the same lines as an uninterrupted one (apart from its timing field, steps_per_sec),
- saves every ``checkpoint_every`` steps and at the end, and on SIGTERM (a preemption notice) saves at
  the next step boundary and raises ``Preempted`` (entry points exit with status 0: the run resumes).

Failpoints (``irgen_jax.failpoints``): ``<name>.loop_started`` once the checkpoint directory exists and
before the first step, ``<name>.step`` after every step, ``<name>.checkpoint`` after every committed
checkpoint (the save is awaited first when the point is armed).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
import tqdm

from irgen_jax import failpoints, files, parallel
from irgen_jax.trainers.checkpointing import Checkpointer

log = logging.getLogger(__name__)


class Preempted(Exception):
  """Raised after a checkpoint was saved in response to SIGTERM; the run can be resumed."""


class PreemptionGuard:
  """Turns SIGTERM into a flag the loop checks at step boundaries (then saves and stops)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


class MetricWriter:
  """JSON lines (``<name>.jsonl``) and TensorBoard events (``tb/``, or ``tb/<name>`` for other logs than
  the step metrics) under a stage directory.

  Resuming at ``resume_step`` drops the lines of later steps (the run redoes them; with
  ``redo_resume_step`` the line of the resume step too, for events logged before a step such as codebook
  refits) and tells TensorBoard to discard its events from there (``purge_step``).
  """

  def __init__(self, directory: str, *, resume_step: int = 0, name: str = "metrics",
               redo_resume_step: bool = False):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(directory, f"{name}.jsonl")
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(directory, exist_ok=True)
    last = resume_step - 1 if redo_resume_step else resume_step
    truncate_log(self.path, keep=lambda step: step <= last)
    from tensorboardX import SummaryWriter  # imported here: only process 0 writes events
    tb = os.path.join(directory, "tb") if name == "metrics" else os.path.join(directory, "tb", name)
    self._tb = SummaryWriter(tb, purge_step=resume_step or None)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def write_events(directory: str, step: int, metrics: dict[str, float]) -> None:
  """TensorBoard scalars at one step (e.g. the final identifiers' statistics)."""
  from tensorboardX import SummaryWriter  # imported here: only process 0 writes events
  with SummaryWriter(directory) as tb:
    for k, v in metrics.items():
      tb.add_scalar(k, float(v), step)


def truncate_log(path: str, keep: Callable[[int], bool]) -> None:
  """Keeps the lines of a JSON-lines log whose ``step`` satisfies ``keep`` (a resumed run redoes the
  others, and must log each once: the log stays a function of the steps, not of the restarts)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip() and keep(json.loads(line).get("step", 0))]
  files.write_text(path, "".join(lines))


def _check_finite(step: int, metrics: dict[str, Any]) -> dict[str, float]:
  host = {k: float(np.asarray(v)) for k, v in metrics.items()}
  loss = host.get("loss")
  if loss is not None and not np.isfinite(loss):
    raise FloatingPointError(
        f"Non-finite loss ({loss}) at step {step + 1}; nothing from this step was saved. "
        "Lower the learning rate, enable grad_clip, or check the input data.")
  return host


def init_key(seed: int, stream: int) -> jax.Array:
  """A parameter-init key per (seed, purpose): stages never share randomness by accident."""
  return jax.random.fold_in(jax.random.key(seed), stream)


def epochs_to_steps(num_epochs: float, steps_per_epoch: int) -> int:
  return max(1, int(round(num_epochs * steps_per_epoch)))


def train(
    *,
    stage_dir: str,
    state: Any,
    train_step: Callable[[Any, Any], tuple[Any, dict[str, Any]]],
    data_iterator: Iterator[Any],
    mesh: jax.sharding.Mesh,
    total_steps: int,
    checkpoint_every: int,
    keep_checkpoints: int = 2,
    log_every: int = 50,
    before_step: Callable[[int, Any], Any] | None = None,
    starting_state: Callable[[Any], Any] | None = None,
    description: str = "train",
) -> Any:
  """Runs ``train_step`` until ``total_steps`` steps are done; returns the final state.

  ``state`` is a freshly initialized state; when ``stage_dir/checkpoints`` holds a committed
  checkpoint it is only used as the restore template. ``starting_state(state) -> state`` (e.g. loading
  pretrained weights) is applied only when no checkpoint was committed, i.e. when the run starts at step
  0: whether to start fresh is decided by what orbax committed, never by whether the checkpoint
  directory exists (orbax creates it before the first save). Steps are counted from 0; a checkpoint at
  step s holds the state after s steps and the iterator positioned at batch s. ``description`` names
  the stage (progress bar, failpoints).
  """
  ckpt = Checkpointer(os.path.join(stage_dir, "checkpoints"), keep=keep_checkpoints)
  start = 0
  window: dict[str, Any] = {"sums": {}, "count": 0}
  if ckpt.latest_step() is not None:
    state, start, window = ckpt.restore(state, data_iterator, extra=True)
  elif starting_state is not None:
    state = starting_state(state)
  failpoints.hit(f"{description}.loop_started")
  writer = MetricWriter(stage_dir, resume_step=start)
  bar = tqdm.tqdm(total=total_steps, initial=start, desc=description, unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True, mininterval=2.0)
  pending: tuple[int, dict[str, Any]] | None = None
  sums: dict[str, float] = dict(window["sums"])
  count = int(window["count"])
  t_log, timed = time.perf_counter(), 0

  def settle(step_metrics):
    nonlocal sums, count, t_log, timed
    step, metrics = step_metrics
    host = _check_finite(step, metrics)
    for k, v in host.items():
      sums[k] = sums.get(k, 0.0) + v
    count += 1
    timed += 1
    done = step + 1
    if done % log_every == 0 or done == total_steps:
      now = time.perf_counter()
      averaged = {k: v / count for k, v in sums.items()}
      averaged["steps_per_sec"] = timed / max(now - t_log, 1e-9)
      writer.write(done, averaged)
      bar.set_postfix(loss=f"{averaged.get('loss', float('nan')):.4f}", refresh=False)
      sums, count, t_log, timed = {}, 0, now, 0

  try:
    with PreemptionGuard() as guard:
      for step in range(start, total_steps):
        if before_step is not None:
          state = before_step(step, state)
        batch = parallel.global_batch_from_local(next(data_iterator), mesh)
        state, metrics = train_step(state, batch)
        if pending is not None:
          settle(pending)
        pending = (step, metrics)
        bar.update(1)
        failpoints.hit(f"{description}.step")
        done = step + 1
        if done % checkpoint_every == 0 or done == total_steps or guard.requested:
          settle(pending)
          pending = None
          ckpt.save(done, state, data_iterator, extra={"sums": sums, "count": count})
          if failpoints.armed(f"{description}.checkpoint"):
            ckpt.wait()
            failpoints.hit(f"{description}.checkpoint")
          if guard.requested and done < total_steps:
            ckpt.wait()
            log.warning("SIGTERM: saved step %d under %s; stopping (resumable).", done, stage_dir)
            raise Preempted(f"Preempted at step {done}; checkpoint saved.")
      if pending is not None:
        settle(pending)
  finally:
    bar.close()
    writer.close()
    ckpt.close()
  return state
