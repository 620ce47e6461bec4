"""The hedged list (decoding/hedge.py): first tokens' classes, the class posterior, the merge, and the
hedged search program on a trained runlocal workdir."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from irgen_jax import config_lib
from irgen_jax.decoding import hedge
from irgen_jax.decoding.index import Index
from irgen_jax.decoding.program import SearchProgram, class_levels, search_function, uses_classes
from irgen_jax.workdir import IndexedImages, Workdir, open_trained_retriever

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.integers(1, 60).flatmap(lambda n: st.tuples(
    hnp.arrays(np.int64, (n, 3), elements=st.integers(0, 7)),
    hnp.arrays(np.int64, (n,), elements=st.integers(-1, 4)))), st.integers(1, 3),
    st.sampled_from(["auto", "dense", "sparse"]), st.booleans())
def test_node_classes_are_majority_labels(case, depth, layout, bucket):
  codes, labels = case
  index = Index.build(codes, 8, layout=layout)
  tables = hedge.node_classes(index, labels, depth, bucket=bucket)
  arrays = index.device_arrays(bucket=bucket)
  assert [t.shape for t in tables] == [tuple(arrays.child_token[d].shape) for d in range(depth)]
  per_image = hedge.image_classes(index, tables)
  assert per_image.shape == (len(codes), depth)
  seen = [set() for _ in range(depth)]
  for d in range(depth):
    for prefix in {tuple(c[:d + 1]) for c in codes}:
      node = 0
      for t, token in enumerate(prefix):   # the prefix's node at depth d + 1, walked from the root
        node = index.child(t, node, token)
      seen[d].add(node)
      inside = [i for i, c in enumerate(codes) if tuple(c[:d + 1]) == prefix]
      under = [int(labels[i]) for i in inside if labels[i] >= 0]
      if not under:
        assert tables[d][node] == -1
      else:
        counts = {y: under.count(y) for y in set(under)}
        best = max(counts.values())
        assert tables[d][node] == min(y for y, n in counts.items() if n == best)  # ties to the smaller
      assert (per_image[inside, d] == tables[d][node]).all()
    # Nodes no prefix reaches are padding: no class.
    assert (np.delete(tables[d], sorted(seen[d])) == -1).all()
  with pytest.raises(ValueError, match="depth"):
    hedge.node_classes(index, labels, 4)
  with pytest.raises(ValueError, match="labels must be int"):
    hedge.node_classes(index, labels[:-1], 1)


def test_group_posterior_sums_the_first_token_distribution_per_group():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((5, 12)).astype(np.float32)
  groups = np.array([0, 0, 1, 2, -1, 1, 2, 2, 0, -1, 1, 0], np.int32)
  got = np.asarray(hedge.group_posterior(jnp.asarray(logits), jnp.asarray(groups), 3))
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  want = np.stack([p[:, groups == g].sum(1) for g in range(3)], 1)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got.sum(1) + p[:, groups == -1].sum(1), 1, rtol=1e-5)


# Fixed shapes (Q queries, K places) and a few (R, at) pairs, so the jitted merge compiles a dozen
# programs whatever hypothesis draws; short lists are rows padded with -1, as the search returns them.
Q, K = 4, 12
merge = jax.jit(hedge.merge, static_argnums=5)


def padded_row(draw, length):
  ids = draw(st.lists(st.integers(0, 15), min_size=0, max_size=length, unique=True))
  return ids + [-1] * (length - len(ids))


@st.composite
def lists(draw):
  r = draw(st.sampled_from([1, 2, 3]))
  at = draw(st.sampled_from([r, 5, 10, K]))
  main = [padded_row(draw, K) for _ in range(Q)]
  extra = [padded_row(draw, r) for _ in range(Q)]
  use = draw(st.lists(st.booleans(), min_size=Q, max_size=Q))
  return np.array(main, np.int32), np.array(extra, np.int32), np.array(use), at


@FAST
@given(lists())
def test_merge_puts_the_hedge_before_place_at_and_keeps_the_rest_in_order(case):
  main, extra, use, at = case
  main_scores = np.where(main >= 0, -np.arange(main.shape[1], dtype=np.float32), -np.inf)
  extra_scores = np.where(extra >= 0, -100 - np.arange(extra.shape[1], dtype=np.float32), -np.inf)
  ids, scores = map(np.asarray, merge(jnp.asarray(main), jnp.asarray(main_scores), jnp.asarray(extra),
                                      jnp.asarray(extra_scores), jnp.asarray(use), at))
  k, r = main.shape[1], extra.shape[1]
  for i in range(len(main)):
    if not use[i]:
      np.testing.assert_array_equal(ids[i], main[i])
      continue
    h = [x for x in extra[i] if x >= 0]
    rest = [x for x in main[i] if x >= 0 and x not in h]
    head = max(0, at - r)
    want = (rest[:head] + h + rest[head:])[:k]
    np.testing.assert_array_equal(ids[i], want + [-1] * (k - len(want)))
    valid = ids[i] >= 0
    assert len(set(ids[i][valid])) == valid.sum()             # no image twice
    # Each image keeps its own score; padding scores -inf.
    lookup = {**dict(zip(main[i], main_scores[i])), **dict(zip(extra[i], extra_scores[i]))}
    np.testing.assert_array_equal(scores[i][valid], [lookup[x] for x in ids[i][valid]])
    assert np.isneginf(scores[i][~valid]).all()


def test_hedged_program_on_a_trained_workdir(fashion_runlocal_workdir):
  """With a threshold every query passes, each list's places at-r .. at-1 hold images whose first token
  stands for the retriever's runner-up class; the other places are the unhedged list without them."""
  workdir, data_dir = fashion_runlocal_workdir
  run = open_trained_retriever(str(workdir), data_dir=str(data_dir))
  c, indexed, model, params = run.config, run.indexed, run.model, run.params
  tables, num_groups = hedge.index_groups(indexed.index, indexed.labels(), 2)
  classes = hedge.image_classes(indexed.index, tables)     # [N, 2]: each image's prefixes' classes
  assert num_groups == indexed.dataset.num_classes
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  c.search.class_first = False   # the plain beam first (the runlocal config searches class first)
  rule = hedge.Hedge(slots=2, at=6, threshold=1e-9, beam_size=4)
  kw = dict(mesh=mesh, beam_size=8, top_k=12, groups=tables[:1], num_groups=num_groups)
  plain, _ = SearchProgram(c, model, params, indexed.index, hedge=hedge.Hedge(), **kw).run(
      indexed.dataset.query)
  hedged, _ = SearchProgram(c, model, params, indexed.index, hedge=rule, **kw).run(indexed.dataset.query)
  assert (plain.top_groups[:, 0] != plain.top_groups[:, 1]).all()
  assert (np.diff(plain.group_probs, axis=1) <= 0).all() and (plain.group_probs.sum(1) <= 1 + 1e-5).all()
  np.testing.assert_array_equal(hedged.top_groups, plain.top_groups)
  assert hedged.hedged.all() and not plain.hedged.any()
  for i in range(len(plain.image_ids)):
    slot = hedged.image_ids[i, 4:6]
    assert (classes[slot, 0] == plain.top_groups[i, 1]).all()
    rest = [x for x in plain.image_ids[i] if x not in slot]
    np.testing.assert_array_equal(np.delete(hedged.image_ids[i], [4, 5]), rest[:10])
  # Class first: every listed image's first token stands for the likeliest class, and the runner-up's
  # hedge places come on top of that list.
  c.search.class_first = True
  first, _ = SearchProgram(c, model, params, indexed.index, hedge=hedge.Hedge(), **kw).run(
      indexed.dataset.query)
  listed = first.image_ids >= 0
  assert listed.any(1).all()
  assert (classes[np.where(listed, first.image_ids, 0), 0] == first.top_groups[:, :1])[listed].all()
  assert (plain.image_ids != first.image_ids).any()   # runlocal's decoder often starts elsewhere
  # At two levels, every listed image's two-token prefix stands for that class too.
  two, _ = SearchProgram(c, model, params, indexed.index, hedge=hedge.Hedge(),
                         **{**kw, "groups": tables}).run(indexed.dataset.query)
  listed = two.image_ids >= 0
  assert listed.any(1).all()
  ids = np.where(listed, two.image_ids, 0)
  assert (classes[ids, 1] == two.top_groups[:, :1])[listed].all()
  assert (classes[ids, 1] == first.top_groups[:, :1])[listed].all()
  assert not (classes[np.where(first.image_ids >= 0, first.image_ids, 0), 1]
              == first.top_groups[:, :1])[first.image_ids >= 0].all()   # one level lists others too
  # At every level (class_levels = M), every listed image's identifier stands for that class: the
  # images of other classes under the class's prefixes are not listed.
  deep, _ = hedge.index_groups(indexed.index, indexed.labels(), 4)
  every = hedge.image_classes(indexed.index, deep)
  full, _ = SearchProgram(c, model, params, indexed.index, hedge=hedge.Hedge(),
                          **{**kw, "groups": deep}).run(indexed.dataset.query)
  listed = full.image_ids >= 0
  assert listed.any(1).all()
  np.testing.assert_array_equal(full.top_groups, first.top_groups)
  ids = np.where(listed, full.image_ids, 0)
  assert (every[ids] == full.top_groups[:, :1, None])[listed].all()
  assert not (every[np.where(listed_two := two.image_ids >= 0, two.image_ids, 0), 3]
              == two.top_groups[:, :1])[listed_two].all()          # two levels list others too
  # The retriever's class decision is worth reporting: it is right above chance on runlocal data.
  hit = plain.top_groups[:, 0] == indexed.dataset.labels("query")
  assert hit.mean() > 1 / num_groups


def test_program_drops_the_hedge_where_it_cannot_apply(fashion_runlocal_workdir):
  workdir, _ = fashion_runlocal_workdir
  wd = Workdir(str(workdir))
  c = wd.load_config()
  model, params = wd.load_retriever(c)
  index = IndexedImages.open(wd, c, require_data=False).index
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  rule = hedge.Hedge(slots=1, at=10, threshold=0.5, beam_size=2)
  groups = (np.zeros(index.device_arrays().child_token[0].shape, np.int32),)
  assert SearchProgram(c, model, params, index, mesh=mesh, top_k=5, groups=groups, num_groups=3,
                       hedge=rule).hedge == hedge.Hedge()        # the list ends before place 10
  assert SearchProgram(c, model, params, index, mesh=mesh, top_k=20, groups=groups, num_groups=1,
                       hedge=rule).hedge == hedge.Hedge()        # one class: nothing to hedge across
  assert SearchProgram(c, model, params, index, mesh=mesh, top_k=20, groups=groups, num_groups=3,
                       hedge=rule).hedge == rule
  with pytest.raises(ValueError, match="at least 2 groups"):
    search_function(model, beam_size=4, top_k=20, num_groups=1, hedge=rule)


def test_program_builds_its_classes_from_the_labels(fashion_runlocal_workdir):
  """``labels=`` gives the tables ``index_groups`` builds to the config's class_levels; a plain-beam
  config needs no classes (the search command then skips the posterior's root step)."""
  workdir, _ = fashion_runlocal_workdir
  wd = Workdir(str(workdir))
  c = wd.load_config()
  model, params = wd.load_retriever(c)
  indexed = IndexedImages.open(wd, c, require_data=False)
  labels = indexed.labels()
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  for levels, depth in ((1, 1), (2, 2), (-1, 4)):
    c.search.class_levels = levels
    program = SearchProgram(c, model, params, indexed.index, mesh=mesh, top_k=20, labels=labels)
    tables, num_groups = hedge.index_groups(indexed.index, labels, depth)
    assert program.class_levels == depth and program.num_groups == num_groups == 10
    for built, expected in zip(program.groups, tables, strict=True):
      np.testing.assert_array_equal(built, expected)
  with pytest.raises(ValueError, match="not both"):
    SearchProgram(c, model, params, indexed.index, mesh=mesh, labels=labels, groups=tables,
                  num_groups=num_groups)
  with pytest.raises(ValueError, match="labels need an Index"):
    SearchProgram(c, model, params, indexed.index.device_arrays(), mesh=mesh, labels=labels)
  c.search.class_first, c.search.hedge.slots = False, 0
  assert not uses_classes(c)
  assert SearchProgram(c, model, params, indexed.index, mesh=mesh, top_k=20).num_groups == 0
  c.search.hedge.slots = 1
  assert uses_classes(c)
  c.search.class_first, c.search.hedge.slots = True, 0
  assert uses_classes(c)


@pytest.mark.parametrize("levels", [0, 5])
def test_class_levels_are_validated(levels):
  c = config_lib.load("configs/fashion_mnist.py:runlocal")
  c.search.class_levels = levels
  with pytest.raises(config_lib.ConfigError,
                     match=f"search.class_levels={levels}.*{re.escape('-1 (every level) or in 1..ids.length (4)')}"):
    config_lib.validate(c, num_devices=1)
  c.search.class_levels, c.ids.codebook_size = 4, 4096    # per node: any depth, any codebook
  config_lib.validate(c, num_devices=1)
  c.search.class_levels, c.ids.length = -1, 2             # every level, whatever the length
  config_lib.validate(c, num_devices=1)
  assert class_levels(c) == 2


def test_the_list_policy_tool_reproduces_the_evaluate_stage(fashion_runlocal_workdir, tmp_path):
  """benchmarks/list_policies.py searches a finished run with each policy through the evaluate stage's
  program and metrics: the run's own policy (the runlocal config's: class first at every level, the
  hedge at 0.2) gives its report's IRGen figures exactly, and another policy other lists."""
  import importlib.util
  import json
  import os
  workdir, data_dir = fashion_runlocal_workdir
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "list_policies.py")
  spec = importlib.util.spec_from_file_location("list_policies", path)
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  out = tool.main([f"--workdir={workdir}", f"--data_dir={data_dir}",
                   "--policies=class_first4+hedge,plain", "--threshold", "0.2",
                   f"--json={tmp_path / 'p.json'}"])
  with open(workdir / "report" / "metrics.json") as f:
    irgen = json.load(f)["methods"]["irgen"]
  got = out["policies"]["class_first4+hedge@0.2"]
  for k in tool.KS:
    assert got[f"P@{k}"] == irgen[f"precision@{k}"] and got[f"R@{k}"] == irgen[f"recall@{k}"]
  assert got["MAP@100"] == irgen["map@100"]
  assert out["policies"]["plain"]["hedged"] == 0.0
  assert json.loads((tmp_path / "p.json").read_text()) == json.loads(json.dumps(out))
  for bad in ("nope", "class_first9"):     # unknown; deeper than the run's 4-token identifiers
    with pytest.raises(SystemExit):
      tool.main([f"--workdir={workdir}", f"--data_dir={data_dir}", f"--policies={bad}"])


def test_evaluation_beams_widen_from_the_first_level_whose_beams_hold_too_few_images():
  """Every IRGen column must come from a list of at least K images: a level is widened (with all after
  it) where its B beams hold fewer than K / WIDEN_MARGIN images at the average node's N / n. The
  Fashion-MNIST default's index keeps its two widened levels; a small folder's nearly unique two-token
  prefixes widen from level 1 (where two levels listed ~30 images)."""
  from irgen_jax.decoding.program import WIDEN_MARGIN, evaluation_beams, index_nodes
  c = config_lib.load("configs/fashion_mnist.py")
  assert c.search.beam_size == 30 and c.eval.map_at == 100 and c.ids.length == 4
  assert evaluation_beams(c, 60000, (256, 24784, 54025, 58420)) == (30, 30, 100, 100)
  assert evaluation_beams(c, 60000) == (30, 30, 100, 100)            # no index: the last two
  assert evaluation_beams(c, 1438, (256, 1315, 1427, 1437)) == (30, 100, 100, 100)
  assert evaluation_beams(c, 60000, (1, 1, 1, 1)) == 30                # coarse nodes: nothing to widen
  n = 60000
  nodes = (256, int(30 * n * WIDEN_MARGIN / 100) + 1, n, n)           # just past the bar at level 1
  assert evaluation_beams(c, n, nodes) == (30, 100, 100, 100)
  assert evaluation_beams(c, n, (256, nodes[1] - 2, n, n)) == (30, 30, 100, 100)
  c.search.widen_to_list = False
  assert evaluation_beams(c, 1438, (256, 1315, 1427, 1437)) == 30
  index = Index.build(np.arange(40).reshape(10, 4) % 7, 8)
  assert index_nodes(index) == (*index.nodes_per_depth[1:], index.num_identifiers)
