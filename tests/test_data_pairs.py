"""The stage-2 pair sampler: same class always, new each epoch, a function of (seed, epoch, index)."""

from __future__ import annotations

import numpy as np
import pytest

from irgen_jax.data import pairs, randomness

# 4 classes; class 3 has train images but no database image.
DB_LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 0])
TRAIN_LABELS = np.array([0, 0, 1, 2, 3, 1, 0, 2, 3, 0])


def test_targets_never_cross_classes_and_exclude_classes_without_database_images():
  s = pairs.PairSampler(TRAIN_LABELS, DB_LABELS, seed=0)
  np.testing.assert_array_equal(s.eligible, [0, 1, 2, 3, 5, 6, 7, 9])
  assert s.num_excluded == 2
  for epoch in range(20):
    t = s.targets(s.eligible, epoch)
    np.testing.assert_array_equal(DB_LABELS[t], TRAIN_LABELS[s.eligible])
  with pytest.raises(ValueError, match="Train record 4 has no same-class database image"):
    s.target(4, 0)


def test_scalar_and_vectorized_draws_agree_and_are_deterministic():
  s = pairs.PairSampler(TRAIN_LABELS, DB_LABELS, seed=5)
  for epoch in (0, 1, 7):
    vec = s.targets(s.eligible, epoch)
    assert [s.target(i, epoch) for i in s.eligible] == vec.tolist()
    np.testing.assert_array_equal(vec, pairs.PairSampler(TRAIN_LABELS, DB_LABELS, seed=5)
                                  .targets(s.eligible, epoch))
  h = randomness.hash64_np((1, 2), np.array([3, 4]))
  assert h.tolist() == [randomness.hash64(1, 2, 3), randomness.hash64(1, 2, 4)]


def test_targets_change_across_epochs_and_cover_the_class():
  labels = np.repeat(np.arange(3), 50)
  s = pairs.PairSampler(labels, labels, seed=1)
  e0, e1 = s.targets(s.eligible, 0), s.targets(s.eligible, 1)
  assert (e0 != e1).mean() > 0.9  # 1/50 chance per record to repeat
  assert not np.array_equal(e0, pairs.PairSampler(labels, labels, seed=2).targets(s.eligible, 0))
  # Uniform over the class, itself included: over 200 epochs record 0 sees (nearly) all of class 0.
  seen = {s.target(0, epoch) for epoch in range(200)}
  assert seen <= set(range(50)) and len(seen) >= 45 and 0 in {s.target(0, e) for e in range(400)}


def test_candidate_table_restricts_draws():
  train = np.array([0, 0, 1])
  db = np.array([0, 1, 0, 0, 1])
  table = np.array([[2, 3], [-1, 0], [-1, -1]])
  s = pairs.PairSampler(train, db, seed=0, candidates=table)
  np.testing.assert_array_equal(s.eligible, [0, 1])  # row 2 has no valid candidate
  for epoch in range(30):
    assert s.target(0, epoch) in (2, 3)
    assert s.target(1, epoch) == 0
  assert {s.target(0, e) for e in range(30)} == {2, 3}


def test_candidate_table_errors():
  train, db = np.array([0, 1]), np.array([0, 1, 1])
  with pytest.raises(ValueError, match=r"must be int \[N_train=2, k>0\]"):
    pairs.PairSampler(train, db, seed=0, candidates=np.zeros((3, 2), np.int64))
  with pytest.raises(ValueError, match=r"candidates\[1, 0\] = 3 is not a database index in \[0, 3\)"):
    pairs.PairSampler(train, db, seed=0, candidates=np.array([[0], [3]]))
  with pytest.raises(ValueError, match=r"candidates\[0, 1\] = database image 2 of class 1, but train "
                                       r"image 0 is of class 0"):
    pairs.PairSampler(train, db, seed=0, candidates=np.array([[0, 2], [1, 2]]))
  with pytest.raises(ValueError, match="must be integers"):
    pairs.PairSampler(train, db, seed=0, candidates=np.array([[0.0], [1.0]]))


def test_no_pair_at_all_is_an_error():
  with pytest.raises(ValueError, match="stage 2 has no training pair"):
    pairs.PairSampler(np.array([3, 3]), np.array([0, 1]), seed=0)
  with pytest.raises(ValueError, match="The database is empty"):
    pairs.PairSampler(np.array([0]), np.array([], np.int64), seed=0)


def test_add_target():
  s = pairs.PairSampler(TRAIN_LABELS, DB_LABELS, seed=3)
  rec = s.add_target({"index": 2, "label": 1}, epoch=4)
  assert rec["target_index"].dtype == np.int32 and rec["target_index"] == s.target(2, 4)
  assert DB_LABELS[rec["target_index"]] == 1
