"""The report's figures as PNG bytes: precision@K against K, the precision-recall (TPR) curve (the paper's
Figure 3), MRR at 1/2/4/8 (Figure 4), and image grids (the RQ-VAE's reconstructions).

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas directly: no pyplot, so no global
backend switch and no interactive state leaks into (or from) the caller's process.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# One line style per search kind so a reader can tell the groups of Table 1 apart at a glance.
_KIND_STYLE = {"linear_scan": "--", "faiss_ivfpq": ":", "scann": "-.", "beam_search": "-"}


def _style(kind: str) -> dict:
  return {"linestyle": _KIND_STYLE.get(kind, (0, (5, 1, 1, 1))),
          "linewidth": 2.4 if kind == "beam_search" else 1.6}


def _png(fig: Figure) -> bytes:
  FigureCanvasAgg(fig)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  return buf.getvalue()


def _new_axes(title: str, xlabel: str, ylabel: str):
  fig = Figure(figsize=(6.4, 4.4))
  ax = fig.add_subplot()
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  return fig, ax


def _legend(ax, n: int) -> None:
  # Many methods would hide the curves: put the legend under the axes instead.
  if n > 5:
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize="small", frameon=False)
  else:
    ax.legend(fontsize="small")


def precision_at_k_png(curves: Mapping[str, Mapping[str, np.ndarray]], kinds: Mapping[str, str],
                       ks: Sequence[int], dataset: str) -> bytes:
  """Precision@K (%) against K for every method; markers at the reported ks.

  ``curves[name]`` holds ``k int [M]`` and ``precision float [M]`` (metrics.precision_recall_curve).
  """
  fig, ax = _new_axes(f"Precision@K — {dataset}", "K", "precision@K (%)")
  for i, (name, c) in enumerate(curves.items()):
    k, p = np.asarray(c["k"]), 100 * np.asarray(c["precision"])
    line, = ax.plot(k, p, label=name, color=f"C{i % 10}", **_style(kinds[name]))
    at = np.isin(k, ks)
    ax.plot(k[at], p[at], "o", color=line.get_color(), markersize=5)
  max_k = max(int(np.max(c["k"])) for c in curves.values())
  if max_k >= 16:
    # K spans orders of magnitude (1..100): a log axis keeps small K readable; ticks at powers of two,
    # written as plain numbers.
    ax.set_xscale("log", base=2)
    ticks = [2**i for i in range(int(np.log2(max_k)) + 1)]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
  ax.set_ylim(0, 101)
  _legend(ax, len(curves))
  return _png(fig)


def precision_recall_png(curves: Mapping[str, Mapping[str, np.ndarray]], kinds: Mapping[str, str],
                         dataset: str) -> bytes:
  """Precision against recall (true-positive rate), one point per K = 1..max_k, in %."""
  fig, ax = _new_axes(f"Precision-recall (TPR) over K — {dataset}", "recall = true-positive rate (%)",
                      "precision (%)")
  for i, (name, c) in enumerate(curves.items()):
    ax.plot(100 * np.asarray(c["recall"]), 100 * np.asarray(c["precision"]), label=name,
            color=f"C{i % 10}", **_style(kinds[name]))
  # Recall only reaches #retrieved / #positives, often far below 100%: keep the x range to the data.
  ax.set_xlim(left=0)
  ax.set_ylim(0, 101)
  _legend(ax, len(curves))
  return _png(fig)


def mrr_png(mrr: Mapping[str, Mapping[int, float]], kinds: Mapping[str, str], dataset: str) -> bytes:
  """MRR@K (%) at the given Ks (the paper's 1, 2, 4, 8); ``mrr[name][K]`` in [0, 1]."""
  fig, ax = _new_axes(f"MRR@K — {dataset}", "K", "MRR@K (%)")
  all_ks: set[int] = set()
  for i, (name, by_k) in enumerate(mrr.items()):
    ks = sorted(by_k)
    all_ks.update(ks)
    ax.plot(ks, [100 * by_k[k] for k in ks], marker="o", label=name, color=f"C{i % 10}",
            **_style(kinds[name]))
  ax.set_xscale("log", base=2)
  ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
  ax.minorticks_off()
  _legend(ax, len(mrr))
  return _png(fig)


def image_grid_png(rows: Sequence[Sequence[np.ndarray]], *, row_titles: Sequence[str] = (),
                   scale: int = 0) -> bytes:
  """PNG of images in rows (uint8 ``[H, W]`` or ``[H, W, 3]``, one size), each row titled on its left;
  small images are scaled up by ``scale`` (0: to about 96 pixels), without smoothing."""
  h, w = np.asarray(rows[0][0]).shape[:2]
  scale = scale or max(1, 96 // max(h, w))
  cols = max(len(r) for r in rows)
  fig = Figure(figsize=(cols * w * scale / 100 + 1.0, len(rows) * h * scale / 100))
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      ax = fig.add_subplot(len(rows), cols, i * cols + j + 1)
      ax.imshow(np.asarray(img), cmap="gray", interpolation="nearest", vmin=0, vmax=255)
      ax.set_xticks([])
      ax.set_yticks([])
      if j == 0 and i < len(row_titles):
        ax.set_ylabel(row_titles[i])
  fig.subplots_adjust(wspace=0.05, hspace=0.05)
  return _png(fig)


# Panels of the stages' training curves: (logged key, panel title, log-scaled y).
TOKENIZER_PANELS = (("loss", "total loss (eq. 3)", True), ("ce_cls", "classifier CE on f_cls", True),
                    ("ce_rq", "prefix-reconstruction CE, summed over levels (λ1 term)", True),
                    ("quant", "residual terms, summed over levels (λ2 term)", True))
# The retriever's token accuracies are left out: within a class its target is uniform, so they stay low
# whatever it learns (the report's held-out pairs and class accuracy say what it learned).
RETRIEVER_PANELS = (("loss", "loss (label-smoothed CE per token)", True),
                    ("nll", "identifier NLL (nats)", True),
                    ("grad_norm", "gradient norm (before clipping)", True))


def training_curves_png(runs: Mapping[str, Sequence[Mapping[str, float]]], *,
                        panels: Sequence[tuple[str, str, bool]], title: str,
                        refits: Mapping[str, Sequence[int]] | None = None) -> bytes:
  """Training curves, one panel per ``(key, title, log_y)`` of ``panels`` and one line per run.

  ``runs[name]`` are a run's logged rows (``<stage>/metrics.jsonl``: ``{"step", key: value}``, each the
  mean over the ``log_every_steps`` steps up to ``step``); ``refits[name]`` marks that run's codebook
  refits as dotted lines in its color, where the tokenizer's losses jump. A panel whose key no run logged
  is left out.
  """
  logged = {key for rows in runs.values() for row in rows for key in row}
  if not any(p[0] in logged for p in panels):
    raise ValueError(f"training curves: none of the keys {[p[0] for p in panels]} is logged.")
  panels = [p for p in panels if p[0] in logged]
  ncols = min(2, len(panels))
  nrows = -(-len(panels) // ncols)
  fig = Figure(figsize=(6.0 * ncols, 3.6 * nrows))
  fig.suptitle(title + ("  (dotted: codebook refits)" if any((refits or {}).values()) else ""))
  for i, (key, panel_title, log_y) in enumerate(panels):
    ax = fig.add_subplot(nrows, ncols, i + 1)
    ax.set_title(panel_title, fontsize="medium")
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    low, high = np.inf, -np.inf
    for j, (name, rows) in enumerate(runs.items()):
      points = [(r["step"], r[key]) for r in rows if key in r]
      if not points:
        continue
      steps, values = zip(*points)
      low, high = min(low, *values), max(high, *values)
      ax.plot(steps, values, color=f"C{j % 10}", label=name, linewidth=1.6)
      for step in (refits or {}).get(name, ()):
        ax.axvline(step, color=f"C{j % 10}", linestyle=":", linewidth=1.0, alpha=0.7)
    if log_y and low > 0:  # a refit's jump and the slow decline after it, both readable
      ax.set_yscale("log")
      plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
      ax.yaxis.set_major_formatter(plain)
      # Within a decade or two the powers of ten alone leave the axis nearly unlabelled: 2s and 5s too.
      ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
      ax.yaxis.set_minor_formatter(plain if high / low < 300 else ticker.NullFormatter())
    if len(runs) > 1 and i == 0:
      ax.legend(fontsize="small")
  fig.tight_layout()
  return _png(fig)
