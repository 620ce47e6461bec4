"""grain pipelines on in-memory sources: determinism, exact restore, process shards, epochs, eval
padding, transforms, and errors raised before any compute."""

from __future__ import annotations

import numpy as np
import pytest

from irgen_jax.data import pairs as pairs_lib
from irgen_jax.data import pipeline, records

MEAN = np.array(pipeline.CLIP_MEAN, np.float32)
STD = np.array(pipeline.CLIP_STD, np.float32)


def gray_source(n=103, h=12, w=10, seed=0):
  rng = np.random.default_rng(seed)
  return records.ArraySource(rng.integers(0, 256, (n, h, w, 1), dtype=np.uint8), np.arange(n) % 5)


class ListSource:
  """Records of mixed sizes (the shape of real photo sources)."""

  def __init__(self, images, labels):
    self.images, self.labels = images, np.asarray(labels)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": int(self.labels[i]), "index": int(i)}


def train(src, **kw):
  args = dict(global_batch_size=8, image_size=8, seed=1, process_index=0, process_count=1)
  args.update(kw)
  return pipeline.train_dataset(src, **args)


def assert_batches_equal(a, b):
  assert len(a) == len(b) and len(a) > 0
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_batch_contract_and_normalization():
  imgs = np.zeros((16, 9, 11, 1), np.uint8)
  imgs[::2] = 255
  src = records.ArraySource(imgs, np.arange(16) % 3)
  b = train(src, image_size=6)[0]
  assert b["image"].dtype == np.float32 and b["image"].shape == (8, 6, 6, 3)
  assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
  white = imgs[b["index"], 0, 0, 0] == 255
  assert 0 < white.sum() < 8
  np.testing.assert_allclose(b["image"][white],
                             np.broadcast_to((1 - MEAN) / STD, (white.sum(), 6, 6, 3)), rtol=1e-5)
  black = ~white
  np.testing.assert_allclose(b["image"][black], np.broadcast_to(-MEAN / STD, (black.sum(), 6, 6, 3)),
                             rtol=1e-5)
  np.testing.assert_array_equal(b["label"], src.labels[b["index"]])


def test_gray_is_replicated_and_rgb_passes_through():
  rng = np.random.default_rng(0)
  gray = ListSource([rng.integers(0, 256, (7, 9, 1), dtype=np.uint8) for _ in range(8)], [0] * 8)
  b = train(gray)[0]
  pixels = b["image"] * STD + MEAN
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-6)
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-6)
  assert pixels.std() > 0.1
  rgb = ListSource([np.stack([np.full((7, 9), c, np.uint8) for c in (10, 120, 250)], -1)] * 8, [0] * 8)
  b = train(rgb)[0]
  expected = (np.array([10, 120, 250]) / 255 - MEAN) / STD
  np.testing.assert_allclose(b["image"][0, 0, 0], expected, rtol=1e-5)


def test_same_seed_same_batches_other_seed_other_batches():
  src = gray_source()
  a = [train(src)[k] for k in range(5)]
  assert_batches_equal(a, [train(src)[k] for k in range(5)])
  c = train(src, seed=2)[0]
  assert not np.array_equal(a[0]["index"], c["index"])


def test_threads_do_not_change_batches():
  src = gray_source()
  it0 = pipeline.make_iterator(train(src, num_epochs=1), num_threads=0)
  it3 = pipeline.make_iterator(train(src, num_epochs=1), num_threads=3, prefetch_batches=5)
  assert_batches_equal(list(it0), list(it3))


def test_restored_iterator_continues_exactly():
  src = gray_source()
  ds = train(src, num_epochs=3)  # 12 steps per epoch: the restore point crosses an epoch boundary
  it = pipeline.make_iterator(ds, num_threads=2)
  for _ in range(10):
    next(it)
  state = it.get_state()
  uninterrupted = list(it)
  assert len(uninterrupted) == 26
  fresh = pipeline.make_iterator(train(src, num_epochs=3), num_threads=2)
  fresh.set_state(state)
  assert_batches_equal(uninterrupted, list(fresh))


def test_orbax_checkpoint_of_iterator(tmp_path):
  import grain
  import orbax.checkpoint as ocp
  src = gray_source()
  it = pipeline.train_iterator(src, global_batch_size=8, image_size=8, seed=4, process_index=0,
                               process_count=1)
  for _ in range(7):
    next(it)
  with ocp.CheckpointManager(str(tmp_path)) as manager:
    manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = [next(it) for _ in range(6)]
  restored = pipeline.train_iterator(src, global_batch_size=8, image_size=8, seed=4, process_index=0,
                                     process_count=1)
  with ocp.CheckpointManager(str(tmp_path)) as manager:
    manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_batches_equal(expected, [next(restored) for _ in range(6)])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_partition_each_step_and_epoch(process_count):
  src = gray_source()
  single = train(src, num_epochs=2)
  steps = pipeline.steps_per_epoch(len(src), 8)
  assert len(single) == 2 * steps
  shards = [train(src, num_epochs=2, process_index=p, process_count=process_count)
            for p in range(process_count)]
  for epoch in range(2):
    seen = []
    for k in range(epoch * steps, (epoch + 1) * steps):
      parts = [s[k] for s in shards]
      assert all(len(p["index"]) == 8 // process_count for p in parts)
      joined = np.concatenate([p["index"] for p in parts])
      ref = single[k]
      assert sorted(joined.tolist()) == sorted(ref["index"].tolist())  # same global batch
      # ... with the same augmented pixels: they depend on the global position only.
      order = np.argsort(joined)
      np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts])[order],
                                    ref["image"][np.argsort(ref["index"])])
      seen.extend(joined.tolist())
    assert len(seen) == len(set(seen)) == steps * 8  # no overlap within an epoch


def test_epochs_reshuffle_and_drop_a_random_remainder():
  src = gray_source()  # 103 records, batch 8: 12 steps = 96 per epoch
  assert pipeline.steps_per_epoch(103, 8) == 12
  ds = train(src, num_epochs=3)
  epochs = [np.concatenate([ds[k]["index"] for k in range(e * 12, (e + 1) * 12)]) for e in range(3)]
  for e in epochs:
    assert len(set(e.tolist())) == 96
  assert not np.array_equal(epochs[0], epochs[1])
  dropped = [set(range(103)) - set(e.tolist()) for e in epochs]
  assert all(len(d) == 7 for d in dropped) and dropped[0] != dropped[1]
  assert len(list(pipeline.make_iterator(ds))) == 36  # finite: the iterator ends


def test_augmentation_varies():
  src = gray_source(n=16)
  ds = train(src, num_epochs=4, global_batch_size=16, crop_scale=(0.2, 0.5))
  images = {}
  for k in range(4):
    b = ds[k]
    for i, img in zip(b["index"], b["image"]):
      images.setdefault(int(i), []).append(img)
  assert all(not np.allclose(v[0], v[1]) for v in images.values())


def test_crop_boxes_stay_inside_and_respect_scale():
  rng = np.random.default_rng(0)
  n = 500
  h = rng.integers(20, 300, n)
  w = np.round(h * rng.uniform(0.8, 1.25, n))
  u = rng.random((n, pipeline.NUM_AUG_DRAWS))
  boxes = pipeline.crop_boxes(h, w, u, (0.3, 0.6))
  assert (boxes[:, :2] >= 0).all()
  assert (boxes[:, 2] <= w + 1e-9).all() and (boxes[:, 3] <= h + 1e-9).all()
  frac = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (h * w)
  assert ((frac >= 0.3 - 1e-9) & (frac <= 0.6 + 1e-9)).all()
  assert np.std(boxes[:, 0] / w) > 0.05  # placed at random, not centered
  aspect = (boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1])
  assert (aspect >= 3 / 4 - 1e-9).all() and (aspect <= 4 / 3 + 1e-9).all()
  # A strip no crop of the allowed aspect fits in: the largest centered crop, ratio clamped.
  box = pipeline.crop_boxes(np.array([10]), np.array([100]), u[:1], (0.3, 0.6))[0]
  np.testing.assert_allclose(box, [(100 - 40 / 3) / 2, 0, (100 + 40 / 3) / 2, 10])


def test_eval_order_padding_and_mask():
  src = gray_source(n=21)
  per_process = [list(pipeline.eval_dataset(src, global_batch_size=8, image_size=8, resize_size=10,
                                            process_index=p, process_count=2)) for p in range(2)]
  assert [len(b) for b in per_process] == [3, 3]
  seen = []
  for k in range(3):
    for b in (per_process[0][k], per_process[1][k]):
      assert b["mask"].dtype == bool and b["image"].shape == (4, 8, 8, 3)
      np.testing.assert_array_equal(b["index"][~b["mask"]], -1)
      np.testing.assert_array_equal(b["label"][~b["mask"]], -1)
      np.testing.assert_array_equal(b["label"][b["mask"]], src.labels[b["index"][b["mask"]]])
      seen.extend(b["index"][b["mask"]].tolist())
  assert sorted(seen) == list(range(21)) and len(seen) == 21
  np.testing.assert_array_equal(per_process[1][0]["index"], [1, 3, 5, 7])  # [1::2] of batch 0
  again = list(pipeline.eval_dataset(src, global_batch_size=8, image_size=8, resize_size=10,
                                     process_index=1, process_count=2))
  assert_batches_equal(per_process[1], again)


def test_eval_resize_then_center_crop():
  img = np.zeros((20, 40, 1), np.uint8)
  img[:, 10:30] = 255  # the middle half is white: exactly the center crop of the resized image
  src = ListSource([img], [0])
  b = next(iter(pipeline.eval_dataset(src, global_batch_size=1, image_size=10, resize_size=10,
                                      process_index=0, process_count=1)))
  pixels = b["image"][0] * STD + MEAN
  np.testing.assert_allclose(pixels[:, 1:-1], 1.0, atol=0.02)
  # resize 20 (shorter side) and crop 16: an already square image of the output size is untouched.
  same = ListSource([np.arange(64, dtype=np.uint8).reshape(8, 8, 1)], [0])
  b = pipeline.eval_dataset(same, global_batch_size=1, image_size=8, resize_size=8, process_index=0,
                            process_count=1)[0]
  np.testing.assert_allclose(b["image"][0, ..., 0] * STD[0] + MEAN[0],
                             np.arange(64).reshape(8, 8) / 255, atol=1e-6)


def test_pairs_in_the_pipeline():
  src = gray_source(n=60)  # labels = index % 5
  db_labels = np.array([0, 1, 2, 3, 0, 1, 2, 3] * 3)  # class 4 has no database image
  sampler = pairs_lib.PairSampler(src.labels, db_labels, seed=9)
  ds = train(src, pairs=sampler, num_epochs=2, global_batch_size=8)
  steps = pipeline.steps_per_epoch(len(sampler.eligible), 8)
  assert len(ds) == 2 * steps
  targets = {}
  for k in range(len(ds)):
    b = ds[k]
    assert b["target_index"].dtype == np.int32
    np.testing.assert_array_equal(db_labels[b["target_index"]], b["label"])
    assert not np.isin(b["label"], [4]).any()  # excluded records never appear
    epoch = k // steps
    for i, t in zip(b["index"], b["target_index"]):
      assert t == sampler.target(int(i), epoch)
      targets.setdefault(int(i), {})[epoch] = int(t)
  both = [v for v in targets.values() if len(v) == 2]
  assert sum(v[0] != v[1] for v in both) > len(both) // 2  # resampled each epoch


def test_bad_inputs_raise_before_compute():
  src = gray_source()
  with pytest.raises(ValueError, match="must be a positive multiple of the process count \\(3\\)"):
    train(src, process_count=3)
  with pytest.raises(ValueError, match="process_index=2 must be in \\[0, process_count=2\\)"):
    train(src, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="crop_scale"):
    train(src, crop_scale=(0.5, 1.2))
  with pytest.raises(ValueError, match="make no full batch of 256"):
    train(src, global_batch_size=256)
  with pytest.raises(ValueError, match="num_epochs=0"):
    train(src, num_epochs=0)
  with pytest.raises(ValueError, match="covers 5 train records, the source has 103"):
    train(src, pairs=pairs_lib.PairSampler(np.zeros(5, np.int64), np.zeros(3, np.int64), seed=0))
  with pytest.raises(ValueError, match="resize_size"):
    pipeline.eval_dataset(src, global_batch_size=8, image_size=8, resize_size=4, process_index=0,
                          process_count=1)
  with pytest.raises(ValueError, match="Expected a uint8 \\[H, W, 1\\|3\\] image"):
    train(ListSource([np.zeros((8, 8, 4), np.uint8)] * 8, [0] * 8))[0]


def test_global_batches_on_a_mesh():
  from irgen_jax import parallel
  import jax
  mesh = parallel.make_mesh()
  src = gray_source()
  local = [train(src)[k] for k in range(2)]
  placed = [parallel.global_batch_from_local(batch, mesh) for batch in local]
  for a, b in zip(local, placed):
    assert isinstance(b["image"], jax.Array) and b["image"].shape == a["image"].shape
    np.testing.assert_array_equal(np.asarray(b["index"]), a["index"])
