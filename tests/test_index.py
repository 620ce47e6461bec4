"""The valid-identifier index against a plain Python dict trie built from the same codes."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest

from irgen_jax.decoding import index as index_lib
from irgen_jax.decoding.index import Index, IndexFormatError


def dict_trie(codes):
  """Nested dicts token → subtree; a leaf (depth M) is the list of image ids, in database order."""
  root = {}
  m = codes.shape[1]
  for i, code in enumerate(codes.tolist()):
    node = root
    for d, c in enumerate(code):
      node = node.setdefault(c, [] if d == m - 1 else {})
    node.append(i)
  return root


def prefixes_by_depth(trie, m):
  """[depth d] → sorted list of (prefix tuple, subtree) for d = 0..M (depth M: leaves)."""
  levels = [[((), trie)]]
  for _ in range(m):
    nxt = []
    for prefix, node in levels[-1]:
      for c in sorted(node):
        nxt.append((prefix + (c,), node[c]))
    levels.append(nxt)
  return levels


def assert_matches_dict_trie(index: Index, codes: np.ndarray):
  m, l = codes.shape[1], index.num_tokens
  levels = prefixes_by_depth(dict_trie(codes), m)
  ids = [{p: i for i, (p, _) in enumerate(level)} for level in levels]
  assert index.num_levels == m
  assert index.nodes_per_depth == tuple(len(level) for level in levels[:m])
  assert index.num_identifiers == len(levels[m])
  assert index.num_images == codes.shape[0]
  for d in range(m):
    for v, (prefix, node) in enumerate(levels[d]):
      children = sorted(node)
      first = int(index.first_child[d][v])
      assert int(index.first_child[d][v + 1]) - first == len(children), (d, prefix)
      assert index.child_token[d][first:first + len(children)].tolist() == children, (d, prefix)
      if index.masks[d] is not None:
        mask = index.masks[d]
        assert mask.dtype == np.uint32 and mask.shape[1] == index_lib.num_words(l)
        legal = {c for c in range(mask.shape[1] * 32) if (int(mask[v, c // 32]) >> (c % 32)) & 1}
        assert legal == set(children), (d, prefix)
      # Every child, and (all or a sample of) the illegal tokens.
      others = [c for c in range(l) if c not in node]
      if len(others) > 12:
        others = [others[0], others[-1], *np.random.default_rng(v).choice(others, 10, replace=False)]
      for c in children + others:
        want = ids[d + 1].get(prefix + (c,), -1)
        assert index.child(d, v, c) == want, (d, prefix, c)
  for u, (prefix, images) in enumerate(levels[m]):
    np.testing.assert_array_equal(index.images_of(u), images)
    np.testing.assert_array_equal(index.lookup(prefix), images)
  np.testing.assert_array_equal(index.identifiers(), np.array([p for p, _ in levels[m]]).reshape(-1, m))
  np.testing.assert_array_equal(index.codes(), codes)
  assert index.check_consistency() is None


def assert_same_index(a: Index, b: Index):
  assert a.num_tokens == b.num_tokens and a.num_levels == b.num_levels and a.layout == b.layout
  assert a.dense_levels == b.dense_levels
  for x, y in zip(a._named_arrays(), b._named_arrays()):
    assert x[0] == y[0]
    assert x[1].dtype == y[1].dtype, x[0]
    np.testing.assert_array_equal(x[1], y[1], err_msg=x[0])


def _cases():
  rng = np.random.default_rng(0)
  pool = rng.integers(0, 40, (7, 3))
  return {
      "random_L40": (rng.integers(0, 40, (300, 3)), 40),              # L not a multiple of 32: W = 2
      "random_L256_M4": (rng.integers(0, 256, (400, 4)), 256),
      "dense_small_L": (rng.integers(0, 3, (200, 4)), 3),            # nearly every prefix exists
      "heavy_collisions": (pool[rng.integers(0, 7, 500)], 40),        # 500 images on 7 identifiers
      "one_image": (np.array([[5, 0, 39]]), 40),
      "all_identical": (np.tile([[1, 2, 3, 4]], (50, 1)), 32),
      "single_level": (rng.integers(0, 70, (90, 1)), 70),
      "single_token": (np.zeros((6, 2), np.int64), 1),
      "long_identifiers_lexsort": (rng.integers(0, 256, (120, 9)), 256),  # 72 bits: no int64 key
  }


@pytest.mark.parametrize("layout", index_lib.LAYOUTS)
@pytest.mark.parametrize("name", list(_cases()))
def test_tables_match_dict_trie(name, layout):
  codes, l = _cases()[name]
  index = Index.build(codes, l, layout=layout)
  assert index.dense_levels[0] or layout != "dense"
  assert_matches_dict_trie(index, np.asarray(codes))


def test_auto_layout_is_dense_near_the_root_only():
  index = Index.build(np.random.default_rng(8).integers(0, 256, (100_000, 4)), 256)
  # Fan-outs ~256, ~256, ~1.5, ~1: masks where they cost at most 4 bytes per child.
  assert index.dense_levels == (True, True, False, False)
  dense = Index.build(index.codes(), 256, layout="dense")
  assert dense.nbytes > 2 * index.nbytes


def test_empty_index_then_insert():
  empty = Index.build(np.zeros((0, 3), np.int32), 40, layout="dense")
  assert empty.num_images == 0 and empty.num_identifiers == 0 and empty.nodes_per_depth == (1, 0, 0)
  assert empty.check_consistency() is None
  assert empty.lookup([1, 2, 3]).size == 0
  codes = np.random.default_rng(1).integers(0, 40, (30, 3))
  assert_same_index(empty.insert(codes), Index.build(codes, 40, layout="dense"))


@pytest.mark.parametrize("name, layout", [("random_L40", "auto"), ("heavy_collisions", "auto"),
                                          ("long_identifiers_lexsort", "auto"), ("one_image", "auto"),
                                          ("random_L40", "dense"), ("random_L40", "sparse")])
def test_insert_equals_rebuild(name, layout):
  codes, l = _cases()[name]
  codes = np.asarray(codes)
  rng = np.random.default_rng(2)
  # New images: some on existing identifiers (collisions with old images), some new.
  new = np.concatenate([codes[rng.integers(0, len(codes), 25)], rng.integers(0, l, (25, codes.shape[1]))])
  new = new[rng.permutation(len(new))]
  base = Index.build(codes, l, layout=layout)
  grown = base.insert(new)
  assert_same_index(grown, Index.build(np.concatenate([codes, new]), l, layout=layout))
  assert_matches_dict_trie(grown, np.concatenate([codes, new]))
  # New ids are N, N+1, ... in the order given; the old index is untouched (immutable).
  for j in range(len(new)):
    assert len(codes) + j in grown.lookup(new[j])
  assert_same_index(base, Index.build(codes, l, layout=layout))
  assert base.insert(np.zeros((0, codes.shape[1]), np.int32)) is base


def test_bytes_per_node_bound():
  codes = np.random.default_rng(3).integers(0, 256, (200_000, 4))
  for layout in index_lib.LAYOUTS:
    index = Index.build(codes, 256, layout=layout)
    nodes = sum(index.nodes_per_depth)
    # Dense: mask 32 B + running counts 8 B per node; every level: first_child 4 B per node (+1 entry)
    # and one token byte per child.
    masks = sum(n for n, dense in zip(index.nodes_per_depth, index.dense_levels) if dense)
    children = sum(index.nodes_per_depth[1:]) + index.num_identifiers
    assert index.node_nbytes == 40 * masks + 4 * (nodes + index.num_levels) + children
    assert index.bytes_per_internal_node <= 64
    assert index.nbytes == index.node_nbytes + 4 * (index.num_identifiers + 1) + 4 * index.num_images
  assert index.word_rank[0] is None and index.child_token[0].dtype == np.uint8  # sparse, L = 256
  # Larger L needs wider running counts and tokens: 4W + 2W + 4 bytes per dense node.
  wide = Index.build(codes[:100] * 3, 1024, layout="dense")
  assert wide.word_rank[0].dtype == np.uint16 and wide.child_token[0].dtype == np.uint16


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("codes, l, match", [
    (np.array([[0, 1], [2, 40]]), 40, r"codes\[1, 1\] = 40 is outside \[0, L=40\)"),
    (np.array([[0, -3], [2, 4]]), 40, r"codes\[0, 1\] = -3 is outside"),
    (np.zeros((4,), np.int32), 40, r"must be \[N, M\].*shape \(4,\)"),
    (np.zeros((2, 2, 2), np.int32), 40, r"must be \[N, M\]"),
    (np.zeros((3, 0), np.int32), 40, r"at least one token"),
    (np.zeros((3, 2), np.float32), 40, r"integer array; got dtype float32"),
    (np.zeros((3, 2), np.int32), 0, r"num_tokens \(L\) must be in \[1, 65536\]; got 0"),
    (np.zeros((3, 2), np.int32), 2.0, r"num_tokens \(L\) must be an int; got 2.0"),
])
def test_invalid_inputs_are_refused_naming_the_value(codes, l, match):
  with pytest.raises(ValueError, match=match):
    Index.build(codes, l)


def test_insert_validates_codes():
  index = Index.build(np.array([[1, 2, 3]]), 8)
  with pytest.raises(ValueError, match=r"M=2 tokens per identifier; the index has M=3"):
    index.insert(np.array([[1, 2]]))
  with pytest.raises(ValueError, match=r"codes\[0, 2\] = 8 is outside \[0, L=8\)"):
    index.insert(np.array([[1, 2, 8]]))


# ------------------------------------------------------------------ files


@pytest.fixture
def saved(tmp_path):
  codes = np.random.default_rng(4).integers(0, 40, (300, 3))
  index = Index.build(codes, 40)
  path = tmp_path / "db.irgenidx"
  index.save(path)
  return index, path


def test_save_load_round_trip(saved):
  index, path = saved
  loaded = Index.load(path, num_levels=3, num_tokens=40)
  assert_same_index(loaded, index)
  assert loaded.insert(np.array([[1, 2, 3]])).num_images == index.num_images + 1  # loaded arrays are writable
  assert [p for p in os.listdir(path.parent) if p != path.name] == []  # no temporary file left behind


def test_wrong_model_shape_is_refused(saved):
  _, path = saved
  with pytest.raises(IndexFormatError, match=r"M=3 tokens; the model expects M=4"):
    Index.load(path, num_levels=4, num_tokens=40)
  with pytest.raises(IndexFormatError, match=r"built for L=40 tokens per level; the model expects L=256"):
    Index.load(path, num_levels=3, num_tokens=256)


@pytest.mark.parametrize("cut", [1, 33, 500, "half", "header"])
def test_truncated_file_is_refused(saved, cut):
  _, path = saved
  data = path.read_bytes()
  keep = {"half": len(data) // 2, "header": 30}.get(cut, len(data) - cut if isinstance(cut, int) else 0)
  path.write_bytes(data[:keep])
  with pytest.raises(IndexFormatError, match="truncated|corrupted"):
    Index.load(path, num_levels=3, num_tokens=40)


@pytest.mark.parametrize("where", ["payload", "header", "digest"])
def test_flipped_byte_is_refused(saved, where):
  _, path = saved
  data = bytearray(path.read_bytes())
  pos = {"payload": len(data) // 2, "header": index_lib._PREFIX.size + 5, "digest": len(data) - 1}[where]
  data[pos] ^= 0x10
  path.write_bytes(bytes(data))
  with pytest.raises(IndexFormatError, match="checksum|corrupted"):
    Index.load(path, num_levels=3, num_tokens=40)


def test_other_files_and_versions_are_refused(saved, tmp_path):
  _, path = saved
  other = tmp_path / "other"
  other.write_bytes(b"PK\x03\x04 a zip file")
  with pytest.raises(IndexFormatError, match="not an irgen_jax index"):
    Index.load(other, num_levels=3, num_tokens=40)
  data = bytearray(path.read_bytes())
  data[8:12] = (index_lib.FORMAT_VERSION + 1).to_bytes(4, "little")
  path.write_bytes(bytes(data))
  with pytest.raises(IndexFormatError, match=f"format version {index_lib.FORMAT_VERSION + 1}"):
    Index.load(path, num_levels=3, num_tokens=40)


def test_crash_during_save_keeps_the_old_file(saved, monkeypatch):
  index, path = saved
  before = path.read_bytes()

  def crash(*args, **kwargs):
    raise KeyboardInterrupt("killed between write and rename")
  monkeypatch.setattr(index_lib.os, "replace", crash)
  with pytest.raises(KeyboardInterrupt):
    index.insert(np.array([[0, 0, 0]])).save(path)
  monkeypatch.undo()
  assert path.read_bytes() == before
  assert [p for p in os.listdir(path.parent) if p != path.name] == []
  assert_same_index(Index.load(path, num_levels=3, num_tokens=40), index)


def test_inconsistent_tables_are_refused(tmp_path):
  index = Index.build(np.random.default_rng(5).integers(0, 40, (50, 3)), 40)
  broken = dataclasses.replace(index, image_ids=index.image_ids * 0)
  broken.save(tmp_path / "broken")  # a valid checksum over bad tables
  with pytest.raises(IndexFormatError, match="image_ids is not a permutation"):
    Index.load(tmp_path / "broken", num_levels=3, num_tokens=40)
  # A mask that disagrees with the child tokens (a dense level's two descriptions of the same children).
  masks = list(index.masks)
  masks[0] = masks[0] ^ np.uint32(1 << 7)
  dataclasses.replace(index, masks=tuple(masks)).save(tmp_path / "broken")
  with pytest.raises(IndexFormatError, match=r"masks\[0\] disagree with child_token\[0\]"):
    Index.load(tmp_path / "broken", num_levels=3, num_tokens=40)


def test_device_arrays_bucketed_shapes():
  index = Index.build(np.random.default_rng(6).integers(0, 40, (1000, 3)), 40)
  assert index.dense_levels == (True, True, False)
  arrays = index.device_arrays()
  for d, n in enumerate(index.nodes_per_depth):
    assert arrays.first_child[d].shape[0] == index_lib.bucket_rows(n) + 1
    assert int(arrays.first_child[d][-1]) == int(index.first_child[d][-1])  # padded nodes: no children
    if index.dense_levels[d]:
      assert arrays.masks[d].shape[0] == index_lib.bucket_rows(n) >= n and arrays.max_fanout[d] == 0
    else:
      assert arrays.masks[d] is None and arrays.word_rank[d] is None
      assert arrays.max_fanout[d] == 1 << (index.max_fanout(d) - 1).bit_length() >= index.max_fanout(d)
  assert arrays.offsets.shape[0] == index_lib.bucket_rows(index.num_identifiers) + 1
  assert int(arrays.offsets[-1]) == index.num_images
  assert arrays.image_ids.shape[0] >= index.num_images
  exact = index.device_arrays(bucket=False)
  assert exact.first_child[2].shape[0] == index.nodes_per_depth[2] + 1
  assert exact.max_fanout[2] == index.max_fanout(2)
  # Inserting images on existing identifiers keeps every bucketed shape (no recompilation of the search).
  grown = index.insert(index.codes()[:5]).device_arrays()
  assert jax.tree.map(np.shape, grown) == jax.tree.map(np.shape, arrays)
  assert grown.max_fanout == arrays.max_fanout
