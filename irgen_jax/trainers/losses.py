"""The two stages' objectives (training only: serving never imports this module, nor optax).

- ``tokenizer_loss``: the stage-1 objective of the paper (eq. 3) on ``SemanticTokenizer`` outputs.
- ``sequence_loss``: the stage-2 objective, label-smoothed cross-entropy over identifier tokens;
  ``soft_sequence_loss`` the same against target distributions (``retriever.soft_targets``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from irgen_jax.models import rq


def tokenizer_loss(
    outputs: dict[str, jax.Array], labels: jax.Array, *, lambda1: float, lambda2: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The stage-1 objective (eq. 3) and flat scalar metrics for logging.

  ``L = CE(f_cls) + λ1 Σ_m CE(f̂≤m) + λ2 Σ_m ||r_m||²`` with ``r_m = f_cls - sg(f̂≤m)`` (eq. 4);
  CE is the batch mean of softmax cross-entropy against ``labels int [B]``.

  ``||r_m||²`` is taken as the mean over the D dimensions (and the batch), as the reference's
  ``mse_loss`` does, not the sum the notation suggests: that keeps λ2's meaning when the feature width
  changes (ViT-S 384 vs ViT-B 768), and the reference's λ values carry over. The paper's sum is this
  term times D: λ2_sum = λ2 / D. Its gradient on f_cls is ``2 λ2 / D Σ_m (f_cls - f̂≤m)`` per example
  (divided by B): it pulls f_cls toward its own reconstructions (a commitment loss; the codebooks do not
  move).

  ``outputs`` is what :class:`SemanticTokenizer` returns. The prefix CE terms train the encoder through
  the straight-through estimator inside the model. ``lambda1``/``lambda2`` are plain floats (the
  reference's hard-coded effective value was 1e-7 for both, i.e. almost a plain classifier fine-tune).

  Metrics (scalars): ``loss``, ``ce_cls``, ``ce_rq`` (Σ_m), ``quant`` (Σ_m), ``acc_cls``, and per level
  m = 1..M ``ce_l{m}``, ``acc_l{m}``, ``quant_err_l{m}`` (the mean squared error of f̂≤m),
  ``perplexity_l{m}`` and ``unused_codes_l{m}`` (code use within this batch: perplexity ≤ B).
  """
  labels = jnp.asarray(labels)
  logits, prefix_logits = outputs["logits"], outputs["prefix_logits"]
  num_levels = prefix_logits.shape[1]
  ce_cls = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  ce_levels = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      prefix_logits, jnp.broadcast_to(labels[:, None], labels.shape + (num_levels,))), axis=0)
  quant_levels = rq.quantization_errors(outputs["f_cls"], jax.lax.stop_gradient(outputs["prefix_recon"]))
  ce_rq, quant = jnp.sum(ce_levels), jnp.sum(quant_levels)
  loss = ce_cls + lambda1 * ce_rq + lambda2 * quant

  acc_levels = jnp.mean(jnp.argmax(prefix_logits, -1) == labels[:, None], axis=0)
  perplexity, unused = rq.usage_from_counts(outputs["code_counts"])
  metrics: dict[str, Any] = {
      "loss": loss, "ce_cls": ce_cls, "ce_rq": ce_rq, "quant": quant,
      "acc_cls": jnp.mean(jnp.argmax(logits, -1) == labels),
  }
  for m in range(num_levels):
    metrics[f"ce_l{m + 1}"] = ce_levels[m]
    metrics[f"acc_l{m + 1}"] = acc_levels[m]
    metrics[f"quant_err_l{m + 1}"] = quant_levels[m]
    metrics[f"perplexity_l{m + 1}"] = perplexity[m]
    metrics[f"unused_codes_l{m + 1}"] = unused[m]
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def sequence_loss(logits: jax.Array, codes: jax.Array, label_smoothing: float):
  """Label-smoothed CE over ``logits float32 [B, M, L]`` of ``codes int [B, M]``, and accuracies."""
  return soft_sequence_loss(logits, codes, jax.nn.one_hot(codes, logits.shape[-1]), label_smoothing)


def _token_metrics(logits: jax.Array, codes: jax.Array) -> dict[str, jax.Array]:
  hit = jnp.argmax(logits, -1) == codes
  metrics = {f"acc_l{m + 1}": hit[:, m].mean() for m in range(codes.shape[1])}
  metrics["acc_sequence"] = hit.all(axis=1).mean()
  metrics["nll"] = optax.softmax_cross_entropy_with_integer_labels(logits, codes).sum(-1).mean()
  return metrics


def soft_sequence_loss(logits: jax.Array, codes: jax.Array, targets: jax.Array, label_smoothing: float):
  """``sequence_loss`` against target distributions ``targets float32 [B, M, L]`` (e.g. the expected
  targets of ``data.soft_targets``) instead of one-hots of ``codes``; the accuracies and ``nll`` still
  read ``codes``, the teacher-forced identifier, so the logs compare with ``sequence_loss``'s."""
  smoothed = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, smoothed).mean(), _token_metrics(logits, codes)
