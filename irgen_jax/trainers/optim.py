"""The optimizer both stages use: AdamW, linear warmup then cosine decay, per-group learning rates.

The paper fine-tunes a pretrained encoder at 0.01x the learning rate of the freshly initialized heads or
decoder. Groups are named by the first key of the parameter path (``{"encoder": 0.01}``); a group's
multiplier scales its whole AdamW update, which is the same as scaling its learning rate (optax's AdamW
multiplies the decoupled weight decay by the learning rate too). A multiplier of 0 freezes the group: it
gets no optimizer state, and the train steps wrap it in ``stop_gradient`` (``stop_frozen``) so XLA does not
compute its backward pass at all (for a frozen encoder, about two thirds of its cost).
"""

from __future__ import annotations

from typing import Mapping

import jax
import optax


def lr_schedule(*, lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
  warmup_steps = max(0, min(warmup_steps, total_steps - 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)


def _decay_mask(params):
  # Decay the Dense/Conv kernels only: biases, LayerNorm gains, class/position/token embeddings and the
  # start token are left alone, the usual practice for transformers (CLIP fine-tunes included).
  def is_kernel(path, _):
    return bool(path) and getattr(path[-1], "key", None) == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def _group(path) -> str | None:
  """A parameter's group: the first key of its path."""
  return getattr(path[0], "key", None) if path else None


def _group_multipliers(params, multipliers: Mapping[str, float]):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: float(multipliers.get(_group(path), 1.0)), params)


def stage_multipliers(stage) -> dict[str, float]:
  """A stage's per-group multipliers from its config section (both stages: ``encoder_lr_mult``)."""
  return {"encoder": float(stage.encoder_lr_mult)}


def frozen_groups(lr_multipliers: Mapping[str, float] | None) -> frozenset[str]:
  """The groups whose multiplier is 0."""
  return frozenset(k for k, m in (lr_multipliers or {}).items() if m == 0)


def stop_frozen(params, groups: frozenset[str]):
  """``params`` with the frozen top-level groups under ``stop_gradient``: no backward pass through them."""
  if not groups:
    return params
  return {k: (jax.lax.stop_gradient(v) if k in groups else v) for k, v in params.items()}


def make_optimizer(
    *, lr: float, total_steps: int, warmup_steps: int, weight_decay: float, b1: float, b2: float,
    grad_clip: float = 0.0, lr_multipliers: Mapping[str, float] | None = None,
) -> optax.GradientTransformation:
  """AdamW with warmup + cosine, optional global-norm clipping and per-group learning rates.

  Args:
    lr: peak learning rate (of groups with multiplier 1).
    total_steps: length of the schedule.
    warmup_steps: linear warmup length.
    weight_decay, b1, b2: AdamW hyper-parameters (paper: 0.05, 0.9, 0.96).
    grad_clip: global-norm clip; 0 disables.
    lr_multipliers: ``{top-level param name: multiplier}``, e.g. ``{"encoder": 0.01}``; 0 freezes.
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps={total_steps}: expected a positive number of steps.")
  if lr <= 0:
    raise ValueError(f"lr={lr}: expected a positive learning rate.")
  bad = {k: m for k, m in (lr_multipliers or {}).items() if not m >= 0}
  if bad:
    raise ValueError(f"learning-rate multipliers {bad}: expected numbers >= 0 (0 freezes the group).")
  frozen = frozen_groups(lr_multipliers)
  parts = []
  if grad_clip:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.adamw(lr_schedule(lr=lr, total_steps=total_steps, warmup_steps=warmup_steps),
                           b1=b1, b2=b2, weight_decay=weight_decay, mask=_decay_mask))
  # Frozen groups are left to multi_transform below: scaling only the others is needed.
  mults = {k: m for k, m in (lr_multipliers or {}).items() if k not in frozen}
  if any(m != 1.0 for m in mults.values()):

    def init_fn(params):
      del params
      return optax.EmptyState()

    def update_fn(updates, state, params=None):
      del params
      scales = _group_multipliers(updates, mults)
      return jax.tree.map(lambda u, s: u * s, updates, scales), state

    parts.append(optax.GradientTransformation(init_fn, update_fn))
  tx = optax.chain(*parts)
  if frozen:
    # Frozen groups get zero updates and no AdamW moments (less memory); clipping sees the rest only.
    def labels(params):
      return jax.tree_util.tree_map_with_path(
          lambda path, _: "frozen" if _group(path) in frozen else "train", params)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx
