"""A sweep's report: every run's metrics, aggregated per setting over its seeds (``launch/sweep.py``).

Input: the runs of a sweep (name, overrides, setting, seed, workdir, status) and their
``report/metrics.json``. Output (``write``): ``ROOT/<sweep>.json`` (every run, every setting's aggregates,
for other tools), ``ROOT/<sweep>.md`` (tables: per setting the mean ± standard deviation over its seeds
of every metric of every method and the number of seeds; IRGen minus the linear scan per seed with its
mean and spread; which setting is best by how much beyond seed noise; the per-seed rows) and
``ROOT/<sweep>.png`` (precision@K and recall@K of IRGen and the linear scan per setting, the band is ±
one standard deviation over seeds).

Statistics: the mean over seeds and the sample standard deviation (n - 1 in the denominator; "–" with a
single seed). "Beyond seed noise": the difference of two settings' means divided by its standard error
sqrt(s1²/n1 + s2²/n2) (a Welch t statistic); |t| > 2 is marked.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from irgen_jax import files

# The headline columns of the markdown tables (every metric is in the JSON).
HEADLINE = ("precision@1", "precision@10", "precision@30", "recall@1", "recall@10", "recall@30",
            "map@100")
DIFF_METHOD = ("irgen", "linear_scan")


def _stats(xs: Sequence[float]) -> dict[str, Any]:
  xs = [float(x) for x in xs]
  n = len(xs)
  mean = float(np.mean(xs)) if n else math.nan
  std = float(np.std(xs, ddof=1)) if n > 1 else None
  return {"mean": mean, "std": std, "n": n, "values": xs}


def aggregate(runs: Sequence[Mapping[str, Any]], metrics: Mapping[str, Mapping[str, Any]]
              ) -> list[dict[str, Any]]:
  """Per setting (in first-seen order): its runs, seeds and per-method metric statistics.

  ``runs``: ``{"name", "setting": {field: value}, "seed", ...}``; ``metrics``: run name -> its
  metrics.json (finished runs only).
  """
  groups: dict[str, dict[str, Any]] = {}
  for run in runs:
    key = label(run["setting"])
    g = groups.setdefault(key, {"label": key, "setting": dict(run["setting"]), "runs": [], "seeds": []})
    if run["name"] in metrics:
      g["runs"].append(run["name"])
      g["seeds"].append(run["seed"])
  out = []
  for g in groups.values():
    finished = [metrics[name] for name in g["runs"]]
    methods: dict[str, dict[str, Any]] = {}
    for m in sorted({m for r in finished for m in r.get("methods", {})}):
      keys = sorted({k for r in finished for k, v in r["methods"].get(m, {}).items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)})
      methods[m] = {k: _stats([r["methods"][m][k] for r in finished if k in r["methods"].get(m, {})])
                    for k in keys}
    diff = {}
    a, b = DIFF_METHOD
    if a in methods and b in methods:
      for k in sorted(set(methods[a]) & set(methods[b])):
        if k.startswith(("precision@", "recall@", "map@", "mrr@")):
          diff[k] = _stats([r["methods"][a][k] - r["methods"][b][k] for r in finished])
    out.append(dict(g, num_seeds=len(finished), methods=methods, irgen_minus_linear_scan=diff))
  return out


def label(setting: Mapping[str, Any]) -> str:
  """A setting as text: ``field=value`` pairs, or "default" for no override."""
  return ", ".join(f"{k}={v}" for k, v in setting.items()) or "default"


def report(*, sweep: str, config: str, root: str, runs: Sequence[Mapping[str, Any]],
           metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """The JSON report: every run (with its status, its metrics.json path and its headline metrics) and
  every setting's aggregates."""
  ks = sorted({int(k) for m in metrics.values() for k in m.get("ks", [])})
  rows = []
  for r in runs:
    found = metrics.get(r["name"], {}).get("methods", {})
    rows.append(dict(r, headline={m: {c: found[m][c] for c in HEADLINE if c in found[m]}
                                  for m in DIFF_METHOD if m in found}))
  return {"sweep": sweep, "config": config, "root": root, "ks": ks, "runs": rows,
          "settings": aggregate(runs, metrics),
          "statistics": "mean over seeds; std: sample standard deviation (ddof=1), null for one seed"}


def _fmt(s: Mapping[str, Any] | None, pct: bool = True) -> str:
  if not s or not s["n"]:
    return "–"
  scale = 100 if pct else 1
  mean = f"{scale * s['mean']:.1f}"
  return mean if s["std"] is None else f"{mean} ± {scale * s['std']:.1f}"


def _welch(a: Mapping[str, Any], b: Mapping[str, Any]) -> float | None:
  if a["std"] is None or b["std"] is None:
    return None
  se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
  return (a["mean"] - b["mean"]) / se if se > 0 else (math.inf if a["mean"] != b["mean"] else 0.0)


def markdown(rep: Mapping[str, Any]) -> str:
  settings = rep["settings"]
  cols = [c for c in HEADLINE if any(c in s["methods"].get("irgen", {}) for s in settings)]
  heads = [c.replace("precision@", "P@").replace("recall@", "R@").replace("map@", "MAP@") for c in cols]
  lines = [f"# Sweep `{rep['sweep']}` of `{rep['config']}`", "",
           f"{len(rep['runs'])} runs under `{rep['root']}`, {len(settings)} settings. Metrics in %, "
           "mean ± sample standard deviation over the seeds of each setting (n = seeds finished).", ""]
  methods = sorted({m for s in settings for m in s["methods"]},
                   key=lambda m: (m != "irgen", m != "linear_scan", m))
  for m in methods:
    lines += [f"## {m}", "", "| Setting | n | " + " | ".join(heads) + " |",
              "|:--|--:|" + "--:|" * len(cols)]
    for s in settings:
      row = [_fmt(s["methods"].get(m, {}).get(c)) for c in cols]
      lines.append(f"| {s['label']} | {s['num_seeds']} | " + " | ".join(row) + " |")
    lines.append("")
  if any(s["irgen_minus_linear_scan"] for s in settings):
    lines += ["## IRGen − linear scan (same run's tokenizer features), points", "",
              "| Setting | n | " + " | ".join(heads) + " | per seed (P@10) |", "|:--|--:|" + "--:|" * len(cols) + ":--|"]
    for s in settings:
      d = s["irgen_minus_linear_scan"]
      per_seed = ", ".join(f"{100 * v:+.1f}" for v in d.get("precision@10", {}).get("values", []))
      lines.append(f"| {s['label']} | {s['num_seeds']} | " + " | ".join(_fmt(d.get(c)) for c in cols)
                   + f" | {per_seed} |")
    lines.append("")
  if len(settings) > 1:
    lines += ["## Best setting (IRGen) and its margin", "",
              "| Metric | Best | Runner-up | Difference | t (Welch) |", "|:--|:--|:--|--:|--:|"]
    for c, h in zip(cols, heads):
      ranked = sorted((s for s in settings if c in s["methods"].get("irgen", {})),
                      key=lambda s: -s["methods"]["irgen"][c]["mean"])
      if len(ranked) < 2:
        continue
      a, b = ranked[0]["methods"]["irgen"][c], ranked[1]["methods"]["irgen"][c]
      t = _welch(a, b)
      t_txt = "–" if t is None else (f"**{t:.1f}**" if abs(t) > 2 else f"{t:.1f}")
      lines.append(f"| {h} | {ranked[0]['label']} | {ranked[1]['label']} | "
                   f"{100 * (a['mean'] - b['mean']):+.1f} | {t_txt} |")
    lines += ["", "t: the difference over its standard error; |t| > 2 (bold) is beyond seed noise.", ""]
  lines += ["## Runs (one row per seed)", "",
            "| Run | Seed | Status | Method | " + " | ".join(heads) + " |",
            "|:--|--:|:--|:--|" + "--:|" * len(cols)]
  for r in rep["runs"]:
    for m in DIFF_METHOD:
      values = r.get("headline", {}).get(m)
      if values is None:
        lines.append(f"| {r['name']} | {r['seed']} | {r['status']} | {m} | "
                     + " | ".join("–" for _ in cols) + " |")
        continue
      lines.append(f"| {r['name']} | {r['seed']} | {r['status']} | {m} | "
                   + " | ".join(f"{100 * values[c]:.1f}" if c in values else "–" for c in cols) + " |")
  return "\n".join(lines) + "\n"


def plot_png(rep: Mapping[str, Any]) -> bytes | None:
  """precision@K and recall@K per setting (IRGen solid, linear scan dashed), ± one std band."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  ks = rep["ks"]
  settings = [s for s in rep["settings"] if s["num_seeds"]]
  if not ks or not settings:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, metric in zip(axes, ("precision", "recall")):
    for i, s in enumerate(settings):
      color = f"C{i % 10}"
      for method, style in (("irgen", "-"), ("linear_scan", "--")):
        st = [s["methods"].get(method, {}).get(f"{metric}@{k}") for k in ks]
        if any(x is None for x in st):
          continue
        mean = np.array([100 * x["mean"] for x in st])
        std = np.array([100 * (x["std"] or 0.0) for x in st])
        ax.plot(ks, mean, style, color=color, marker="o", ms=3,
                label=f"{s['label']} ({'IRGen' if method == 'irgen' else 'linear scan'})")
        ax.fill_between(ks, mean - std, mean + std, color=color, alpha=0.15)
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("K")
    ax.set_ylabel(f"{metric}@K (%)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, loc="lower left")
  fig.suptitle(f"Sweep {rep['sweep']}: mean ± std over seeds")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  return buf.getvalue()


def write(root: str, rep: Mapping[str, Any]) -> dict[str, str]:
  """Writes ``<sweep>.json``, ``.md`` and ``.png`` under ``root`` (atomically); returns their paths."""
  name = rep["sweep"]
  paths = {ext: os.path.join(root, f"{name}.{ext}") for ext in ("json", "md", "png")}
  files.write_json(paths["json"], rep)
  files.write_text(paths["md"], markdown(rep))
  png = plot_png(rep)
  if png is not None:
    files.write_atomic(paths["png"], png)
  else:
    paths.pop("png")
  return paths
