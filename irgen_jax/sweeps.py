"""Config sweeps declared beside ``get_config``: small combinators over ``--config.FIELD`` overrides.

A config file may define ``get_sweeps(arg=None) -> {name: Sweep}``; ``launch/sweep.py`` runs one by name.
A ``Sweep`` is a list of points, each a dict ``{field: value}`` of config overrides::

  from irgen_jax import sweeps

  def get_sweeps(arg=None):
    lr = sweeps.values("retriever.lr", [3e-4, 1e-3])
    return {
        "seeds": sweeps.seeds(3),
        "lr": sweeps.product(lr, sweeps.seeds(3)),                          # 2 x 3 points
        "warmup_and_lr": sweeps.zipped(sweeps.values("retriever.warmup_steps", [100, 300]), lr),
        "kind": sweeps.chain(sweeps.point({"ids.kind": "semantic"}),         # concatenation
                             sweeps.point({"ids.kind": "random"})),
    }

A point whose value is ``Reuse(...)`` takes a trained stage from another point of the same sweep
(``tokenizer.reuse_from``: every identifier kind reuses one trained tokenizer; ``retriever.reuse_from``
too: a sweep over search or eval settings, ``evaluate_only``, trains once); the runner turns it into
that point's workdir and runs that point first. ``standard(config)`` gives every config the sweeps it
shares: ``seeds`` (3 seeds), ``ids_kind`` (the paper's Table 3: semantic, random, HKM 100/200/500,
RQ-VAE) and ``ids_length`` (Table 4: M = 2, 4, 6, 8).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, Mapping, Sequence

Point = dict[str, Any]
Sweep = list[Point]

SEED_FIELD = "seed"


@dataclasses.dataclass(frozen=True)
class Reuse:
  """A reference to another point of the sweep: the one whose overrides are this point's, with ``set``
  applied and the fields in ``drop`` (and every ``Reuse`` field) removed. Resolved by the runner to that
  point's workdir."""
  set: tuple[tuple[str, Any], ...] = ()
  drop: tuple[str, ...] = ()

  def target(self, point: Mapping[str, Any]) -> Point:
    out = {k: v for k, v in point.items() if k not in self.drop and not isinstance(v, Reuse)}
    out.update(dict(self.set))
    return out


def reuse(set: Mapping[str, Any] | None = None, drop: Sequence[str] = ()) -> Reuse:  # noqa: A002
  return Reuse(tuple(sorted((set or {}).items())), tuple(drop))


def point(overrides: Mapping[str, Any]) -> Sweep:
  """One point."""
  return [dict(overrides)]


def values(field: str, vals: Iterable[Any]) -> Sweep:
  """One point per value of ``field``."""
  out = [{field: v} for v in vals]
  if not out:
    raise ValueError(f"sweeps.values({field!r}, ...): no values.")
  return out


# Fields only the evaluate stage reads: a point that changes nothing else can take another's trained
# stages (config_lib.RETRIEVER_REUSE_MAY_DIFFER, which the retriever stage checks, includes these).
EVALUATE_ONLY = ("search.", "eval.")


def evaluate_only(field: str, vals: Iterable[Any]) -> Sweep:
  """One point per value of ``field``, a field only the evaluate stage reads (``search.*``, ``eval.*``):
  the first value's point trains, every other takes its trained tokenizer and retriever
  (``reuse_from``) and only searches and scores. Multiplied by seeds or other fields, each point
  reuses the first value's point with the same other fields."""
  if not field.startswith(EVALUATE_ONLY):
    raise ValueError(f"sweeps.evaluate_only({field!r}, ...): expected a field under "
                     f"{' or '.join(EVALUATE_ONLY)} (one only the evaluate stage reads).")
  out = values(field, vals)
  from_first = reuse(set={field: out[0][field]})
  return out[:1] + [dict(p, **{"tokenizer.reuse_from": from_first, "retriever.reuse_from": from_first})
                    for p in out[1:]]


def seeds(n: int, field: str = SEED_FIELD, start: int = 0) -> Sweep:
  """``n`` seeds: ``field`` = start, start + 1, ..."""
  if n < 1:
    raise ValueError(f"sweeps.seeds({n}): expected at least one seed.")
  return values(field, range(start, start + n))


def product(*parts: Sweep) -> Sweep:
  """Every combination of one point of each part (later parts vary fastest)."""
  out = []
  for combo in itertools.product(*parts):
    merged: Point = {}
    for p in combo:
      clash = set(merged) & set(p)
      if clash:
        raise ValueError(f"sweeps.product: field(s) {sorted(clash)} set by two parts.")
      merged.update(p)
    out.append(merged)
  return out


def zipped(*parts: Sweep) -> Sweep:
  """Point i of every part, merged (the parts must have the same length)."""
  lengths = {len(p) for p in parts}
  if len(lengths) > 1:
    raise ValueError(f"sweeps.zipped: parts of different lengths {sorted(lengths)}.")
  return [p for combo in zip(*parts) for p in product(*[[c] for c in combo])]


def chain(*parts: Sweep) -> Sweep:
  """The points of every part, one after the other."""
  return [dict(p) for part in parts for p in part]


def setting(p: Mapping[str, Any], seed_field: str = SEED_FIELD) -> Point:
  """A point without its seed and its ``Reuse`` fields: what the report groups seeds by."""
  return {k: v for k, v in p.items() if k != seed_field and not isinstance(v, Reuse)}


# ------------------------------------------------------------------------------- the shared sweeps

HKM_CLUSTERS = (100, 200, 500)
LENGTHS = (2, 4, 6, 8)


def ids_kind(codebook_size: int, rqvae_length: int | None = None) -> Sweep:
  """The paper's Table 3: ours (semantic), random codes, hierarchical k-means with 100 / 200 / 500
  clusters per level over the tokenizer's features and, with ``rqvae_length`` (the config's
  latent_size² · depth), RQ-VAE codes of the pixels. Every kind but ours reuses the semantic point's
  trained tokenizer (training the tokenizer does not depend on the kind; with RQ-VAE identifiers it
  still gives the retriever its encoder and the baselines their features); HKM with k clusters needs
  k tokens per level, so ``ids.codebook_size`` becomes max(L, k)."""
  from_ours = reuse(set={"ids.kind": "semantic"},
                    drop=("ids.hkm_clusters", "ids.codebook_size", "ids.length"))
  out = [{"ids.kind": "semantic"}, {"ids.kind": "random", "tokenizer.reuse_from": from_ours}]
  for k in HKM_CLUSTERS:
    p = {"ids.kind": "hkm", "ids.hkm_clusters": k, "tokenizer.reuse_from": from_ours}
    if k > codebook_size:
      p["ids.codebook_size"] = k
    out.append(p)
  if rqvae_length is not None:
    out.append({"ids.kind": "rqvae", "ids.length": rqvae_length, "tokenizer.reuse_from": from_ours})
  return out


def standard(config) -> dict[str, Sweep]:
  """The sweeps every config has: ``seeds``, ``ids_kind``, ``ids_length``."""
  v = config.ids.rqvae
  return {"seeds": seeds(3),
          "ids_kind": ids_kind(int(config.ids.codebook_size), int(v.latent_size) ** 2 * int(v.depth)),
          "ids_length": values("ids.length", LENGTHS)}
