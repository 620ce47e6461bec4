"""The valid-identifier index: which token may follow which prefix, and which images an identifier names.

An identifier is M tokens in [0, L). The database codes ``[N, M]`` are sorted lexicographically (stable,
so the images of one identifier stay in database order); the unique identifiers are the leaves of a trie
whose nodes at depth d (0..M-1, depth 0 is the root) are the unique prefixes of length d, numbered
0..n_d-1 in lexicographic order, so the children of a node have consecutive ids. No pointers; per depth d:

- ``first_child[d]``: int32 ``[n_d + 1]``: the children of node v are the depth-(d+1) ids
  ``first_child[d][v] .. first_child[d][v+1] - 1`` (at depth M-1 they are identifier ids, in [0, U)).
- ``child_token[d]``: uint8 (uint16 when L > 256) ``[n_{d+1}]``: the last token of every depth-(d+1) node,
  increasing within one parent.
- Dense levels only: ``masks[d]``, uint32 ``[n_d, W]`` with ``W = ceil(L / 32)``: bit ``c % 32`` of word
  ``c // 32`` of row v is set iff prefix(v) + [c] is a valid prefix, so one gather gives a beam's legal
  tokens; and ``word_rank[d]`` ``[n_d, W]`` (uint8 when L <= 256), the set bits of row v in words before w,
  so the child is ``first_child[v] + word_rank[v, c//32] + popcount(masks[v, c//32] & ((1 << c%32) - 1))``.
- Sparse levels have no mask: a beam gathers its node's (at most ``max_fanout[d]``) child tokens instead.
- ``offsets``: int32 ``[U + 1]`` and ``image_ids``: int32 ``[N]``: identifier u names images
  ``image_ids[offsets[u]:offsets[u+1]]``, in database order (CSR form).

Why two kinds of level. Dense masks cost 4W + W + 4 = 44 bytes per node at L = 256 whatever the node's
fan-out. Near the root every node has many children and that is cheap per child; at the deepest levels of a
large index almost every node has one child (N = 1M random codes, M = 4, L = 256: 970k depth-3 nodes with
1.03 children each), where the masks were 80% of the index and a sorted token list costs 4 + 1 bytes. The
default ``layout="auto"`` makes a level dense when its masks cost at most ``DENSE_BYTES_PER_CHILD`` bytes per
child (fan-out >= 11 at L = 256); ``layout="dense"`` is the all-mask table (masks at every level), ``"sparse"`` uses
none. All three give identical search results (tests/test_beam_search.py); at 1M codes "auto" is ~3x
smaller than "dense" (benchmarks/beam_search.py prints both). Bytes per internal node: 4W + W + 4 at a dense
level (44 at L = 256), 4 at a sparse one, plus one token byte per node below the root and per identifier;
at N = 1M random codes 46 for "dense" and 8.5 for "auto" (the bound asked for is 64).

L need not be a multiple of 32: the last mask word is padded, and bits >= L are never set.

Inserting images (fresh data, without retraining anything) merges their sorted codes into the database's
already-sorted codes (read back from the tables) and rebuilds the arrays: O(N) numpy, no Python loop
over images. New images get ids N, N+1, ...; the result is identical to building from the concatenation.

Files: ``save`` writes a versioned, checksummed file to a temporary name and renames it into place, so a crash
never leaves a file that loads; ``load`` refuses truncated or corrupted files, and files built for another M
or L than the caller's model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from irgen_jax import files
from irgen_jax.errors import UserError

FORMAT_VERSION = 1
LAYOUTS = ("auto", "dense", "sparse")
# "auto" makes a level dense when its masks and running counts cost at most this many bytes per child.
DENSE_BYTES_PER_CHILD = 4
_MAGIC = b"IRGENIDX"
_PREFIX = struct.Struct("<8sIQ")  # magic, format version, header length
_DIGEST_BYTES = 32  # SHA-256 of everything before it
_MAX_TOKENS = 1 << 16
_MAX_IMAGES = (1 << 31) - 1  # ids and offsets are int32


class IndexFormatError(UserError):
  """An index file that cannot be used: truncated, corrupted, another version, or built for another model."""


@flax.struct.dataclass
class IndexArrays:
  """The index's tables on the device, as the jitted search reads them (``Index.device_arrays()``).

  Leading dims may be padded (padded nodes have no children, padded identifiers no images). A level with
  ``masks[d] is None`` is sparse: a beam gathers its node's child tokens (``max_fanout[d]`` slots).
  """
  first_child: tuple[jax.Array, ...]         # M x int32 [n_d + 1]
  child_token: tuple[jax.Array, ...]         # M x uint8/16 [n_{d+1}]
  masks: tuple[jax.Array | None, ...]        # M x uint32 [n_d, W] (None: sparse level)
  word_rank: tuple[jax.Array | None, ...]    # M x uint8/16/32 [n_d, W] (None: sparse level)
  offsets: jax.Array                         # int32 [U + 1]
  image_ids: jax.Array                       # int32 [N]
  num_tokens: int = flax.struct.field(pytree_node=False)              # L
  max_fanout: tuple[int, ...] = flax.struct.field(pytree_node=False)  # per level; 0 for dense levels

  @property
  def num_levels(self) -> int:
    return len(self.first_child)


def num_words(num_tokens: int) -> int:
  """W, the uint32 words per mask row: ceil(L / 32)."""
  return -(-num_tokens // 32)


def _rank_dtype(num_tokens: int) -> np.dtype:
  # The running count before word w is at most 32 * (W - 1); keep it in the smallest unsigned type.
  top = 32 * (num_words(num_tokens) - 1)
  return np.dtype(np.uint8 if top <= 0xFF else np.uint16 if top <= 0xFFFF else np.uint32)


def _token_dtype(num_tokens: int) -> np.dtype:
  return np.dtype(np.uint8 if num_tokens <= 256 else np.uint16)


def _dense_bytes_per_node(num_tokens: int) -> int:
  w = num_words(num_tokens)
  return 4 * w + w * _rank_dtype(num_tokens).itemsize


@dataclasses.dataclass(frozen=True, eq=False)
class Index:
  """Immutable host-side (numpy) index; see the module docstring for the layout.

  Build it with ``Index.build(codes, num_tokens)``; move it to the device once with ``device_arrays()``
  (``IndexArrays``) and pass that to the search.
  """

  num_tokens: int                              # L
  layout: str                                  # how build/insert choose dense levels: auto, dense, sparse
  first_child: tuple[np.ndarray, ...]          # M arrays, int32 [n_d + 1]
  child_token: tuple[np.ndarray, ...]          # M arrays, uint8/16 [n_{d+1}]
  masks: tuple[np.ndarray | None, ...]         # M entries, uint32 [n_d, W] (None: sparse level)
  word_rank: tuple[np.ndarray | None, ...]     # M entries, uint8/16/32 [n_d, W] (None: sparse level)
  offsets: np.ndarray                          # int32 [U + 1]
  image_ids: np.ndarray                        # int32 [N]

  # ---------------------------------------------------------------- sizes

  @property
  def num_levels(self) -> int:
    """M, the tokens per identifier."""
    return len(self.first_child)

  @property
  def num_images(self) -> int:
    """N."""
    return int(self.image_ids.shape[0])

  @property
  def num_identifiers(self) -> int:
    """U, the distinct identifiers (leaves)."""
    return int(self.offsets.shape[0]) - 1

  @property
  def nodes_per_depth(self) -> tuple[int, ...]:
    """(n_0, ..., n_{M-1}): internal nodes per depth; n_0 = 1 (the root)."""
    return tuple(int(f.shape[0]) - 1 for f in self.first_child)

  @property
  def dense_levels(self) -> tuple[bool, ...]:
    return tuple(m is not None for m in self.masks)

  def max_fanout(self, d: int) -> int:
    """The most children any node at depth d has."""
    return int(np.diff(self.first_child[d]).max(initial=0))

  @property
  def node_nbytes(self) -> int:
    """Bytes of the trie tables, excluding the identifier → images map."""
    arrays = (*self.first_child, *self.child_token, *self.masks, *self.word_rank)
    return sum(a.nbytes for a in arrays if a is not None)

  @property
  def nbytes(self) -> int:
    """Bytes of every table (the whole index)."""
    return self.node_nbytes + self.offsets.nbytes + self.image_ids.nbytes

  @property
  def bytes_per_internal_node(self) -> float:
    return self.node_nbytes / max(1, sum(self.nodes_per_depth))

  @property
  def bytes_per_image(self) -> float:
    return self.nbytes / max(1, self.num_images)

  # ---------------------------------------------------------------- building

  @classmethod
  def build(cls, codes: Any, num_tokens: int, *, layout: str = "auto") -> Index:
    """Builds the index of database codes.

    Args:
      codes: integer array ``[N, M]``, values in [0, num_tokens); row i is the identifier of image i.
        N may be 0 (an empty database; insert into it later).
      num_tokens: L, the codebook size (any L >= 1; the mask's last word is padded when L % 32 != 0).
      layout: "auto" (dense masks where nodes have many children), "dense" (masks at every level) or
        "sparse" (none); see the module docstring.
    """
    num_tokens = _check_num_tokens(num_tokens)
    if layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}.")
    codes = _check_codes(codes, num_tokens)
    order = _sort_order(codes, num_tokens)
    return _build_sorted(codes[order], order.astype(np.int32), num_tokens, codes.shape[1], layout)

  def insert(self, codes: Any) -> Index:
    """A new index with images appended: their ids are N, N+1, ... in the order of ``codes`` [n, M].

    Equal to ``Index.build(concatenate([old codes, codes]), L, layout=self.layout)``, without re-sorting the
    old codes: those are read back from the tables in sorted order, the new ones are sorted and merged in
    (after old images that share their identifier, so every identifier's images stay in database order).
    """
    codes = _check_codes(codes, self.num_tokens, num_levels=self.num_levels)
    if codes.shape[0] == 0:
      return self
    n_old, n_new = self.num_images, codes.shape[0]
    if n_old + n_new > _MAX_IMAGES:
      raise ValueError(f"Index would hold {n_old + n_new} images; at most {_MAX_IMAGES} fit int32 ids.")
    old_sorted = np.repeat(self.identifiers().astype(codes.dtype), np.diff(self.offsets), axis=0)
    new_order = _sort_order(codes, self.num_tokens)
    new_sorted = codes[new_order]
    new_ids = (n_old + new_order).astype(np.int32)
    keys = _packed_keys(self.num_tokens, self.num_levels)
    if keys is not None:
      # side="right": a new image goes after every old image with the same identifier.
      pos = np.searchsorted(keys(old_sorted), keys(new_sorted), side="right") + np.arange(n_new)
      is_new = np.zeros(n_old + n_new, bool)
      is_new[pos] = True
      merged = np.empty((n_old + n_new, self.num_levels), codes.dtype)
      merged[pos], merged[~is_new] = new_sorted, old_sorted
      ids = np.empty(n_old + n_new, np.int32)
      ids[pos], ids[~is_new] = new_ids, self.image_ids
    else:  # identifiers too long to pack into int64: a stable sort of the concatenation, same result
      both = np.concatenate([old_sorted, new_sorted])
      order = np.lexsort(both.T[::-1])
      merged, ids = both[order], np.concatenate([self.image_ids, new_ids])[order]
    return _build_sorted(merged, ids, self.num_tokens, self.num_levels, self.layout)

  # ---------------------------------------------------------------- reading back

  def identifiers(self) -> np.ndarray:
    """int32 ``[U, M]``: the identifier of every leaf, in leaf-id (lexicographic) order."""
    u = self.num_identifiers
    out = np.empty((u, self.num_levels), np.int32)
    node = np.arange(u)
    for d in range(self.num_levels - 1, -1, -1):
      out[:, d] = self.child_token[d][node]
      parent = np.repeat(np.arange(self.nodes_per_depth[d], dtype=np.int64), np.diff(self.first_child[d]))
      node = parent[node]
    return out

  def codes(self) -> np.ndarray:
    """int32 ``[N, M]``: the identifier of every image, by image id (the codes the index was built from)."""
    out = np.empty((self.num_images, self.num_levels), np.int32)
    out[self.image_ids] = np.repeat(self.identifiers(), np.diff(self.offsets), axis=0)
    return out

  def child(self, d: int, node: int, token: int) -> int:
    """The id of ``node``'s child by ``token`` at depth d (a leaf id when d = M-1), or -1 if illegal.

    Scalar Python helper (tests, debugging); the search does the same arithmetic on arrays. Dense levels
    answer from the mask and running counts, sparse ones from the sorted child tokens.
    """
    token = int(token)
    if self.masks[d] is not None:
      row = self.masks[d][node]
      w, b = divmod(token, 32)
      if not 0 <= w < row.shape[0] or not (int(row[w]) >> b) & 1:
        return -1
      below = int(row[w]) & ((1 << b) - 1)
      return int(self.first_child[d][node]) + int(self.word_rank[d][node, w]) + below.bit_count()
    lo, hi = int(self.first_child[d][node]), int(self.first_child[d][node + 1])
    pos = lo + int(np.searchsorted(self.child_token[d][lo:hi], token))
    return pos if pos < hi and int(self.child_token[d][pos]) == token else -1

  def images_of(self, leaf: int) -> np.ndarray:
    """The image ids of identifier ``leaf``, in database order."""
    return self.image_ids[self.offsets[leaf]:self.offsets[leaf + 1]]

  def lookup(self, identifier: Any) -> np.ndarray:
    """The image ids whose identifier is ``identifier`` ([M] tokens); empty when it is not in the index."""
    identifier = np.asarray(identifier).reshape(-1)
    if identifier.shape[0] != self.num_levels:
      raise ValueError(f"An identifier has {self.num_levels} tokens; got {identifier.shape[0]}.")
    node = 0
    for d, token in enumerate(identifier):
      if not 0 <= int(token) < self.num_tokens:
        return np.zeros((0,), np.int32)
      node = self.child(d, node, int(token))
      if node < 0:
        return np.zeros((0,), np.int32)
    return self.images_of(node)

  # ---------------------------------------------------------------- device

  def device_arrays(self, *, bucket: bool = True) -> IndexArrays:
    """The tables as device arrays (``IndexArrays``), to pass to the jitted search.

    With ``bucket`` every table's leading dimension is rounded up to a few fixed sizes (at most 1/8 more
    rows; padded nodes have no children, padded identifiers no images) and each sparse level's fan-out
    bound to a power of two, so an index that grows by inserts keeps its shapes, and the search its compiled
    program, most of the time.
    """
    def rows(a, fill=0, extra=0):
      if a is None:
        return None
      n = a.shape[0] - extra
      target = (bucket_rows(n) if bucket else max(n, 1)) + extra
      if target == a.shape[0]:
        return jnp.asarray(a)
      pad = np.full((target - a.shape[0], *a.shape[1:]), fill, a.dtype)
      return jnp.asarray(np.concatenate([a, pad]))

    fanout = []
    for d in range(self.num_levels):
      f = max(1, self.max_fanout(d)) if self.masks[d] is None else 0
      fanout.append(min(1 << (f - 1).bit_length(), self.num_tokens) if bucket and f else f)
    return IndexArrays(
        first_child=tuple(rows(f, fill=f[-1], extra=1) for f in self.first_child),
        child_token=tuple(rows(t) for t in self.child_token),
        masks=tuple(rows(m) for m in self.masks),
        word_rank=tuple(rows(r) for r in self.word_rank),
        offsets=rows(self.offsets, fill=self.num_images, extra=1),
        image_ids=rows(self.image_ids, fill=-1),
        num_tokens=self.num_tokens,
        max_fanout=tuple(fanout),
    )

  # ---------------------------------------------------------------- files

  def _named_arrays(self) -> list[tuple[str, np.ndarray]]:
    out = []
    for d in range(self.num_levels):
      out += [(f"first_child.{d}", self.first_child[d]), (f"child_token.{d}", self.child_token[d])]
      if self.masks[d] is not None:
        out += [(f"masks.{d}", self.masks[d]), (f"word_rank.{d}", self.word_rank[d])]
    return out + [("offsets", self.offsets), ("image_ids", self.image_ids)]

  def save(self, path: str | os.PathLike) -> None:
    """Writes the index to ``path`` atomically: a temporary file in the same directory, fsync, rename.

    Layout: magic ``IRGENIDX``, uint32 format version, uint64 header length, a JSON header (M, L, N, U,
    layout and every array's name, dtype, shape, offset), the raw little-endian arrays, then the SHA-256 of
    all that.
    """
    path = os.fspath(path)
    arrays, specs, offset = [], [], 0
    for name, a in self._named_arrays():
      a = np.ascontiguousarray(a, a.dtype.newbyteorder("<"))
      specs.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset})
      arrays.append(a)
      offset += a.nbytes
    header = json.dumps({
        "format": "irgen_jax.index", "num_levels": self.num_levels, "num_tokens": self.num_tokens,
        "layout": self.layout, "num_images": self.num_images, "num_identifiers": self.num_identifiers,
        "payload_bytes": offset, "arrays": specs}).encode()
    digest = hashlib.sha256()

    def write(f):
      for chunk in (_PREFIX.pack(_MAGIC, FORMAT_VERSION, len(header)), header, *arrays):
        chunk = memoryview(chunk).cast("B")
        digest.update(chunk)
        f.write(chunk)
      f.write(digest.digest())
    files.write_atomic(path, write)

  @staticmethod
  def file_fingerprint(path: str | os.PathLike) -> dict[str, Any] | None:
    """``{"bytes", "sha256"}`` of an index file from the checksum it ends with (reads 32 bytes; a file
    that is not a complete index fails ``load``, not this). None when there is no file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      return None
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      f.seek(max(0, size - _DIGEST_BYTES))
      return {"bytes": size, "sha256": f.read().hex()}

  @classmethod
  def load(cls, path: str | os.PathLike, *, num_levels: int | None, num_tokens: int | None) -> Index:
    """Reads an index written by ``save``, refusing anything that is not exactly such a file.

    Args:
      num_levels, num_tokens: the M and L of the model that will search this index; a file built for
        another M or L is refused (pass None to skip a check, e.g. to inspect a file).
    Raises:
      IndexFormatError: not an index file, another format version, truncated, checksum mismatch,
        inconsistent tables, or M / L other than expected.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
      data = f.read()
    where = f"Index file {path!r}"
    if len(data) < _PREFIX.size or data[:len(_MAGIC)] != _MAGIC:
      raise IndexFormatError(f"{where} is not an irgen_jax index (no {_MAGIC!r} magic).")
    _, version, header_len = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
      raise IndexFormatError(
          f"{where} has format version {version}; this code reads version {FORMAT_VERSION}.")
    if len(data) < _PREFIX.size + header_len + _DIGEST_BYTES:
      raise IndexFormatError(f"{where} is truncated: {len(data)} bytes, shorter than its header says.")
    try:
      header = json.loads(data[_PREFIX.size:_PREFIX.size + header_len])
      payload_bytes = int(header["payload_bytes"])
    except (ValueError, KeyError, TypeError) as e:
      raise IndexFormatError(f"{where} has a corrupted header ({e}).") from None
    expected = _PREFIX.size + header_len + payload_bytes + _DIGEST_BYTES
    if len(data) != expected:
      state = "truncated" if len(data) < expected else "longer than its header says"
      raise IndexFormatError(f"{where} is {state}: {len(data)} bytes, expected {expected}.")
    body, stored = data[:-_DIGEST_BYTES], data[-_DIGEST_BYTES:]
    if hashlib.sha256(body).digest() != stored:
      raise IndexFormatError(f"{where} is corrupted: its SHA-256 checksum does not match its contents.")
    m, l = header["num_levels"], header["num_tokens"]
    if num_levels is not None and m != num_levels:
      raise IndexFormatError(f"{where} holds identifiers of M={m} tokens; the model expects M={num_levels}.")
    if num_tokens is not None and l != num_tokens:
      raise IndexFormatError(
          f"{where} was built for L={l} tokens per level; the model expects L={num_tokens}.")
    start = _PREFIX.size + header_len
    arrays = {}
    try:
      for spec in header["arrays"]:
        dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
        a = np.frombuffer(body, dtype, math.prod(shape), start + spec["offset"]).reshape(shape)
        arrays[spec["name"]] = a.astype(dtype.newbyteorder("="))  # a writable native-order copy
      index = cls(
          num_tokens=l, layout=header["layout"],
          first_child=tuple(arrays[f"first_child.{d}"] for d in range(m)),
          child_token=tuple(arrays[f"child_token.{d}"] for d in range(m)),
          masks=tuple(arrays.get(f"masks.{d}") for d in range(m)),
          word_rank=tuple(arrays.get(f"word_rank.{d}") for d in range(m)),
          offsets=arrays["offsets"], image_ids=arrays["image_ids"])
    except (ValueError, KeyError, TypeError) as e:
      raise IndexFormatError(f"{where} has a missing or malformed array ({e}).") from None
    problem = index.check_consistency()
    if problem:
      raise IndexFormatError(f"{where} is inconsistent: {problem}.")
    return index

  def check_consistency(self) -> str | None:
    """Structural checks of the tables (O(size), vectorized); returns the first problem found, or None."""
    m, l, w = self.num_levels, self.num_tokens, num_words(self.num_tokens)
    if self.layout not in LAYOUTS:
      return f"unknown layout {self.layout!r}"
    if m < 1 or not (len(self.child_token) == len(self.masks) == len(self.word_rank) == m):
      return "the per-level tables disagree on M"
    if self.first_child[0].shape != (2,):
      return "the root level must hold exactly one node"
    for d in range(m):
      first, token = self.first_child[d], self.child_token[d]
      n = first.shape[0] - 1
      n_next = self.first_child[d + 1].shape[0] - 1 if d + 1 < m else self.num_identifiers
      count = np.diff(first.astype(np.int64))
      if first.ndim != 1 or first[0] != 0 or first[-1] != n_next or (count < 0).any():
        return f"first_child[{d}] must rise from 0 to {n_next} (the nodes at depth {d + 1})"
      if d > 0 and n and count.min() == 0:
        return f"a node at depth {d} has no children"
      if token.shape != (n_next,) or (n_next and int(token.max()) >= l):
        return f"child_token[{d}] must hold {n_next} tokens < L={l}"
      parent = np.repeat(np.arange(n), count)
      if n_next > 1 and ((np.diff(token.astype(np.int64)) <= 0) & (parent[1:] == parent[:-1])).any():
        return f"child_token[{d}] is not increasing within a node"
      mask, rank = self.masks[d], self.word_rank[d]
      if (mask is None) != (rank is None):
        return f"level {d} has only one of masks / word_rank"
      if mask is None:
        continue
      if mask.dtype != np.uint32 or mask.shape != (n, w) or rank.shape != (n, w):
        return f"masks[{d}] / word_rank[{d}] are {mask.dtype}{list(mask.shape)} / {list(rank.shape)}, " \
               f"expected uint32[{n}, {w}]"
      if not np.array_equal(mask, _masks_from_children(parent, token, n, w)):
        return f"masks[{d}] disagree with child_token[{d}]"
      pop = np.bitwise_count(mask).astype(np.int64)
      if not np.array_equal(rank, np.cumsum(pop, axis=1) - pop):
        return f"word_rank[{d}] is not the running count of set bits"
    n = self.num_images
    if self.offsets.shape[0] < 1 or self.offsets[0] != 0 or self.offsets[-1] != n \
        or (self.num_identifiers and np.diff(self.offsets).min() < 1):
      return "offsets must rise strictly from 0 to the number of images"
    if n and not np.array_equal(np.sort(self.image_ids), np.arange(n)):
      return "image_ids is not a permutation of 0..N-1"
    return None


def abstract_arrays(num_images: int, num_levels: int, num_tokens: int, sharding: Any = None
                    ) -> IndexArrays:
  """``IndexArrays`` of ``jax.ShapeDtypeStruct``: the tables of the largest index of N images.

  For compiling the search before any identifier exists (ahead-of-time compilation). The worst case of
  the all-dense layout (``layout="dense"``): every prefix is distinct until there are as many as images,
  i.e. n_d = min(L^d, N) nodes at depth d and U = min(L^M, N) identifiers, each table padded as
  ``Index.device_arrays()`` pads it. A real index (``layout="auto"``, shared prefixes) is never larger.
  """
  def struct(rows, dtype, *rest):
    return jax.ShapeDtypeStruct((rows, *rest), dtype, sharding=sharding)

  w, token, rank = num_words(num_tokens), _token_dtype(num_tokens), _rank_dtype(num_tokens)
  nodes = [min(num_tokens**d, num_images) for d in range(num_levels + 1)]  # nodes[M] = U
  return IndexArrays(
      first_child=tuple(struct(bucket_rows(nodes[d]) + 1, jnp.int32) for d in range(num_levels)),
      child_token=tuple(struct(bucket_rows(nodes[d + 1]), token) for d in range(num_levels)),
      masks=tuple(struct(bucket_rows(nodes[d]), jnp.uint32, w) for d in range(num_levels)),
      word_rank=tuple(struct(bucket_rows(nodes[d]), rank, w) for d in range(num_levels)),
      offsets=struct(bucket_rows(nodes[num_levels]) + 1, jnp.int32),
      image_ids=struct(bucket_rows(num_images), jnp.int32),
      num_tokens=num_tokens, max_fanout=(0,) * num_levels)


# -------------------------------------------------------------------- helpers


def _check_num_tokens(num_tokens: Any) -> int:
  if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)):
    raise ValueError(f"num_tokens (L) must be an int; got {num_tokens!r}.")
  if not 1 <= num_tokens <= _MAX_TOKENS:
    raise ValueError(f"num_tokens (L) must be in [1, {_MAX_TOKENS}]; got {num_tokens}.")
  return int(num_tokens)


def _check_codes(codes: Any, num_tokens: int, num_levels: int | None = None) -> np.ndarray:
  """Validates codes ``[N, M]`` and returns them as a compact integer array; errors name the bad value."""
  codes = np.asarray(codes)
  if codes.dtype == bool or not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"codes must be an integer array; got dtype {codes.dtype}.")
  if codes.ndim != 2:
    raise ValueError(f"codes must be [N, M] (one identifier of M tokens per image); got shape {codes.shape}.")
  if codes.shape[1] < 1:
    raise ValueError(f"codes must have at least one token per identifier; got shape {codes.shape}.")
  if num_levels is not None and codes.shape[1] != num_levels:
    raise ValueError(f"codes have M={codes.shape[1]} tokens per identifier; the index has M={num_levels}.")
  if codes.shape[0] > _MAX_IMAGES:
    raise ValueError(f"{codes.shape[0]} images; at most {_MAX_IMAGES} fit int32 ids.")
  if codes.size:
    bad = (codes < 0) | (codes >= num_tokens)
    if bad.any():
      i, j = np.argwhere(bad)[0]
      raise ValueError(f"codes[{i}, {j}] = {codes[i, j]} is outside [0, L={num_tokens}) "
                       f"({int(bad.sum())} values out of range).")
  return codes.astype(_token_dtype(num_tokens))


def _packed_keys(num_tokens: int, num_levels: int):
  """A function mapping codes [n, M] to int64 keys in lexicographic order, or None if they do not fit."""
  bits = max(1, (num_tokens - 1).bit_length())
  if bits * num_levels > 63:
    return None

  def keys(codes: np.ndarray) -> np.ndarray:
    out = np.zeros(codes.shape[0], np.int64)
    for j in range(num_levels):
      out = (out << bits) | codes[:, j].astype(np.int64)
    return out
  return keys


def _sort_order(codes: np.ndarray, num_tokens: int) -> np.ndarray:
  """The stable lexicographic sort permutation of the rows of ``codes``."""
  keys = _packed_keys(num_tokens, codes.shape[1])
  if keys is not None:
    return np.argsort(keys(codes), kind="stable")
  return np.lexsort(codes.T[::-1])  # lexsort's last key is the primary one, and it is stable


def _masks_from_children(parent: np.ndarray, token: np.ndarray, n: int, w: int) -> np.ndarray:
  """uint32 [n, W] bit masks from the (parent, token) pairs of children sorted by (parent, token)."""
  token = token.astype(np.int64)
  flat = parent.astype(np.int64) * w + (token >> 5)
  bit = np.left_shift(np.uint32(1), (token & 31).astype(np.uint32))
  mask = np.zeros(n * w, np.uint32)
  if flat.shape[0]:
    # (parent, word) is non-decreasing, so each mask word is one OR-reduction of a run.
    run = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    mask[flat[run]] = np.bitwise_or.reduceat(bit, run)
  return mask.reshape(n, w)


def _build_sorted(sorted_codes: np.ndarray, image_ids: np.ndarray, num_tokens: int, num_levels: int,
                  layout: str) -> Index:
  """Builds the tables from lexicographically sorted codes ``[N, M]`` and their image ids ``[N]``."""
  n, m, w = sorted_codes.shape[0], num_levels, num_words(num_tokens)
  # starts[i, j]: row i begins a new prefix of length j+1 (it differs from row i-1 in one of its first j+1).
  starts = np.ones((n, m), bool)
  if n > 1:
    np.logical_or.accumulate(sorted_codes[1:] != sorted_codes[:-1], axis=1, out=starts[1:])
  prefix_id = np.cumsum(starts, axis=0, dtype=np.int32) - 1  # [N, M]: id of row i's prefix of length j+1
  first_child, child_token, masks, word_rank = [], [], [], []
  for d in range(m):
    n_d = 1 if d == 0 else (int(prefix_id[-1, d - 1]) + 1 if n else 0)
    rows = np.flatnonzero(starts[:, d])  # first row of every node at depth d+1, in id order
    parent = prefix_id[rows, d - 1] if d > 0 else np.zeros(rows.shape[0], np.int32)
    token = sorted_codes[rows, d].astype(_token_dtype(num_tokens))
    counts = np.bincount(parent, minlength=n_d).astype(np.int32)
    first_child.append(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    child_token.append(token)
    dense = layout == "dense" or (
        layout == "auto" and n_d * _dense_bytes_per_node(num_tokens) <= DENSE_BYTES_PER_CHILD * rows.shape[0])
    if dense:
      mask = _masks_from_children(parent, token, n_d, w)
      pop = np.bitwise_count(mask)
      masks.append(mask)
      word_rank.append((np.cumsum(pop, axis=1, dtype=np.int32) - pop).astype(_rank_dtype(num_tokens)))
    else:
      masks.append(None)
      word_rank.append(None)
  leaf_rows = np.flatnonzero(starts[:, m - 1]) if n else np.zeros(0, np.int64)
  offsets = np.concatenate([leaf_rows, [n]]).astype(np.int32)
  return Index(num_tokens=num_tokens, layout=layout, first_child=tuple(first_child),
               child_token=tuple(child_token), masks=tuple(masks), word_rank=tuple(word_rank),
               offsets=offsets, image_ids=np.asarray(image_ids, np.int32))


def bucket_rows(n: int) -> int:
  """The smallest size >= max(n, 1) of the form k * 2^e with 8 <= k < 16 (at most 1/8 larger than n)."""
  n = max(int(n), 1)
  if n <= 8:
    return n
  step = 1 << (n.bit_length() - 4)
  return -(-n // step) * step
