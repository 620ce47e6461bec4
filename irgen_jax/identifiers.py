"""Image identifiers: M tokens in [0, L) for every database image, by the kind the config names.

- ``semantic`` (the paper): residual quantization of the tokenizer's f_cls, codebooks fit by k-means on
  the final features (``models.rq``).
- ``random``: uniformly random codes (the paper's "Random" ablation, Table 3).
- ``hkm``: hierarchical k-means over the tokenizer's features (the "HKM_k" ablation, as DSI/NCI build
  document identifiers): ``k`` clusters at the first level, each cluster split into ``k`` again, and so
  on for M levels; a group of at most ``k`` points gets one code per point.
- ``rqvae``: the codes of an RQ-VAE trained on the database's pixels (the paper's RQ-VAE ablation); they
  come from the images, not from these features: ``trainers.train_rqvae``.

``assign`` gives the indexed database its identifiers (the tokenizer stage); ``for_new_images`` gives
images inserted later theirs, by the same kind and, for semantic identifiers, the same function;
``rqvae_codes`` codes images with a trained RQ-VAE, for both.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from irgen_jax.models import rq


def assign(kind: str, features: np.ndarray, *, length: int, codebook_size: int, seed: int,
           kmeans_iters: int = 20, kmeans_init: str = "kmeans++", hkm_clusters: int = 100
           ) -> tuple[np.ndarray, dict[str, Any]]:
  """Codes ``int32 [N, length]`` for ``features float32 [N, D]``, and the arrays that define them
  (``codebooks`` for ``semantic``)."""
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or not len(features):
    raise ValueError(f"features have shape {features.shape}: expected [N>0, D].")
  if kind == "semantic":
    codebooks = rq.fit_residual_codebooks(features, length, codebook_size, iters=kmeans_iters,
                                          init=kmeans_init, seed=seed)
    return rq.encode(features, codebooks), {"codebooks": codebooks}
  if kind == "random":
    rng = np.random.default_rng([seed, 0xC0DE])
    return rng.integers(0, codebook_size, size=(len(features), length), dtype=np.int32), {}
  if kind == "hkm":
    if not 2 <= hkm_clusters <= codebook_size:
      raise ValueError(f"ids.hkm_clusters={hkm_clusters}: expected 2 <= k <= ids.codebook_size "
                       f"({codebook_size}).")
    return hierarchical_kmeans(features, levels=length, clusters=hkm_clusters, iters=kmeans_iters,
                               seed=seed), {}
  if kind == "rqvae":
    raise ValueError("ids.kind='rqvae': RQ-VAE identifiers are codes of the pixels, assigned by "
                     "trainers.train_rqvae, not of the tokenizer's features.")
  raise ValueError(f"ids.kind={kind!r}: expected 'semantic', 'random', 'hkm' or 'rqvae'.")


def for_new_images(kind: str, features: np.ndarray, *, length: int, codebook_size: int, seed: int,
                   num_indexed: int, codebooks: np.ndarray | None = None,
                   indexed_features: np.ndarray | None = None,
                   indexed_codes: np.ndarray | None = None) -> np.ndarray:
  """Codes ``int32 [n, length]`` for images added to an index of ``num_indexed`` images, without
  retraining or refitting anything.

  - ``semantic``: residual quantization with the run's ``codebooks`` (``rq.encode``, exactly as
    ``assign`` coded the database): an image equal to a database image gets that image's identifier.
  - ``random``: fresh uniformly random codes, seeded by ``seed`` and the index size.
  - ``hkm``: the run kept no k-means centroids, so a new image takes the identifier of its nearest
    indexed image (``indexed_features`` [N, D], ``indexed_codes`` [N, M]): it joins that image's
    cluster at every level.
  """
  features = np.asarray(features, np.float32)
  if kind == "semantic":
    if codebooks is None:
      raise ValueError("semantic identifiers of new images need the run's codebooks.")
    return np.asarray(rq.encode(features, codebooks), np.int32)
  if kind == "random":
    rng = np.random.default_rng([int(seed), 0xC0DE, int(num_indexed)])
    return rng.integers(0, codebook_size, size=(len(features), length), dtype=np.int32)
  if kind == "hkm":
    import faiss
    known = np.ascontiguousarray(indexed_features, np.float32)
    flat = faiss.IndexFlatL2(known.shape[1])
    flat.add(known)
    _, nearest = flat.search(np.ascontiguousarray(features), 1)
    return np.asarray(indexed_codes)[nearest[:, 0]].astype(np.int32)
  raise ValueError(f"ids.kind={kind!r}: expected 'semantic', 'random', 'hkm' or 'rqvae'.")


def rqvae_codes(model, params, codebook, source, c, mesh, description: str = "") -> np.ndarray:
  """RQ-VAE identifiers, int32 ``[n, H·W·D]``, of every record of ``source`` (eval transform): the
  database's at the end of training, and inserted images' with the run's saved RQ-VAE and codebook (the
  same function: an image equal to a database image gets that image's identifier)."""
  from irgen_jax import inference  # imported here: only RQ-VAE identifiers run a model here

  @jax.jit
  def codes(params, codebook, images):
    return model.apply({"params": params}, images, codebook, method="identifiers")
  out, _ = inference.map_split(functools.partial(codes, params, jnp.asarray(codebook, jnp.float32)),
                               source, mesh=mesh, batch_size=c.search.query_batch_size * 4,
                               image_size=c.data.image_size, resize_size=c.data.resize_size,
                               description=description)
  return np.asarray(out, np.int32)


def prefix_purity(codes: np.ndarray, labels: np.ndarray) -> list[float]:
  """Per level m = 1..M: the share of images whose level-m prefix (codes[:, :m]) carries its majority
  label. 1.0 when every prefix is pure; with M tokens of semantic identifiers it grows with m."""
  codes, labels = np.asarray(codes), np.asarray(labels, np.int64)
  num_labels = int(labels.max(initial=0)) + 1
  out = []
  for m in range(1, codes.shape[1] + 1):
    _, prefix = np.unique(codes[:, :m], axis=0, return_inverse=True)
    # (prefix, label) pairs counted without a dense [prefixes, labels] table (In-shop: 8k labels).
    pairs, counts = np.unique(prefix.reshape(-1).astype(np.int64) * num_labels + labels,
                              return_counts=True)
    majority = np.zeros(int(prefix.max(initial=-1)) + 1, np.int64)
    np.maximum.at(majority, pairs // num_labels, counts)
    out.append(float(majority.sum() / max(1, len(labels))))
  return out


def purity_stats(codes: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """``{"purity_l1": ..., "purity_l{M}": ...}``: ``prefix_purity`` under the statistics' key names."""
  return {f"purity_l{m + 1}": p for m, p in enumerate(prefix_purity(codes, labels))}


def collapse_warnings(stats: dict[str, Any], length: int, codebook_size: int) -> list[str]:
  """What the identifier statistics say went wrong, naming the level: a codebook that collapsed (under a
  quarter of its codes used, or a perplexity under 5% of them) or prefixes that mix the classes."""
  out = []
  if stats.get("kind") == "rqvae":
    # One codebook shared by every position: its use over all of them says whether it collapsed.
    unused, ppl = stats.get("codebook_unused_codes"), stats.get("codebook_perplexity")
    if unused is not None and codebook_size - unused < codebook_size / 4:
      out.append(f"the RQ-VAE's shared codebook: only {codebook_size - int(unused)} of "
                 f"{codebook_size} codes are used: it collapsed")
    elif ppl is not None and ppl < 0.05 * codebook_size:
      out.append(f"the RQ-VAE's shared codebook: code perplexity {ppl:.1f} of {codebook_size}")
    length = 0  # its per-position use is no collapse sign (a background position uses few codes)
  for m in range(1, length + 1):
    unused, ppl = stats.get(f"unused_codes_l{m}"), stats.get(f"perplexity_l{m}")
    if unused is not None and codebook_size - unused < codebook_size / 4:
      out.append(f"level {m}: only {codebook_size - int(unused)} of {codebook_size} codes are used: the "
                 "codebook collapsed (check the features' scale and the refits)")
    elif ppl is not None and ppl < 0.05 * codebook_size:
      out.append(f"level {m}: code perplexity {ppl:.1f} of {codebook_size}: most images share a few "
                 "codes (a collapsing codebook)")
  purity = stats.get("purity_l1")
  if purity is not None and purity < 0.5:
    why = ("the identifiers are not semantic yet (an undertrained tokenizer?)"
           if stats.get("kind", "semantic") == "semantic" else
           f"{stats['kind']} identifiers do not follow the classes")
    out.append(f"level 1: only {100 * purity:.0f}% of the images share their first token's majority "
               f"class: {why}")
  return out


def hierarchical_kmeans(features: np.ndarray, *, levels: int, clusters: int, iters: int,
                        seed: int) -> np.ndarray:
  """Codes ``int32 [N, levels]``: level m splits every group of equal codes[:, :m] into ``clusters``."""
  import faiss  # imported here: only this ablation needs it

  n = len(features)
  codes = np.zeros((n, levels), np.int32)
  groups = [np.arange(n)]
  for m in range(levels):
    next_groups = []
    for g, members in enumerate(groups):
      if len(members) <= clusters:
        # Small group: one code per point (in database order), nothing left to split.
        codes[members, m] = np.arange(len(members))
        continue
      km = faiss.Kmeans(features.shape[1], clusters, niter=iters, seed=seed + 7919 * m + g,
                        verbose=False, min_points_per_centroid=1)
      km.train(features[members])
      _, assignment = km.index.search(features[members], 1)
      assignment = assignment[:, 0].astype(np.int32)
      codes[members, m] = assignment
      next_groups.extend(members[assignment == c] for c in range(clusters) if (assignment == c).any())
    groups = [grp for grp in next_groups if len(grp) > 1]
  return codes
