"""loader.py: batches, process shares, state, threads and worker processes, skips."""
import json

import numpy as np
import pytest

from flamingo_jax.data import loader


def example_at(position: int) -> dict:
  rng = np.random.default_rng(position)  # "expensive" content that depends on position only
  return {"position": np.int64(position), "x": rng.normal(size=(3, 2)).astype(np.float32)}


def batches(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_global_batches_are_consecutive_positions_split_over_processes():
  whole = batches(loader.BatchIterator(example_at, 6), 3)
  for s, b in enumerate(whole):
    np.testing.assert_array_equal(b["position"], np.arange(6 * s, 6 * s + 6))
  shares = [batches(loader.BatchIterator(example_at, 6, process_index=p, process_count=3), 3)
            for p in range(3)]
  for s in range(3):
    union = {k: np.concatenate([shares[p][s][k] for p in range(3)]) for k in whole[s]}
    assert_same(union, whole[s])
  with pytest.raises(ValueError, match="multiple of process_count"):
    loader.BatchIterator(example_at, 6, process_count=4)
  with pytest.raises(ValueError, match="process_index=3 not in"):
    loader.BatchIterator(example_at, 6, process_index=3, process_count=3)


def test_state_resumes_exactly_and_rejects_non_boundaries():
  it = loader.BatchIterator(example_at, 4, process_index=1, process_count=2)
  batches(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  assert state == {"next_index": 12}
  want = batches(it, 2)
  resumed = loader.BatchIterator(example_at, 4, process_index=1, process_count=2, state=state)
  for a, b in zip(batches(resumed, 2), want):
    assert_same(a, b)
  assert_same(resumed.batch_at(3), want[0])  # random access, the iterator unmoved
  it.set_state({"next_index": 4})  # going back restarts the pipeline there
  np.testing.assert_array_equal(next(it)["position"], [6, 7])
  with pytest.raises(ValueError, match="global batch boundary"):
    it.set_state({"next_index": 6})


def test_threads_and_worker_processes_give_the_same_batches():
  want = batches(loader.BatchIterator(example_at, 4), 5)
  for options in (dict(num_threads=3), dict(num_workers=2)):
    it = loader.BatchIterator(example_at, 4, **options)
    for a, b in zip(batches(it, 5), want):
      assert_same(a, b)
    it.close()


def test_bad_records_are_replaced_by_the_next_of_the_epoch_and_counted():
  records = [{"id": i} for i in range(10)]

  def build(record, rng):
    if record["id"] in (3, 4):
      raise loader.SkipRecord("image_decode" if record["id"] == 3 else "empty_text")
    return {"id": np.int64(record["id"]), "r": rng.integers(1 << 30)}

  at = loader.shuffled_records(records, build, seed=1, name="toy")
  epoch = [int(at(q)["id"]) for q in range(10)]
  assert set(epoch) == set(range(10)) - {3, 4}  # each good record, two of them twice
  # Same seed, same order; another epoch, another order; another seed, another order.
  assert epoch == [int(at(q)["id"]) for q in range(10)]
  assert epoch != [int(at(q)["id"]) for q in range(10, 20)]
  assert epoch != [int(loader.shuffled_records(records, build, seed=2, name="toy")(q)["id"])
                   for q in range(10)]
  counts = sum(at(q)["skipped"] for q in range(10))
  reasons = {r: int(c) for r, c in zip(loader.SKIP_REASONS, counts) if c}
  # Each bad record is passed over by its own position and, if the position before it in
  # the order also lands on it, by that one too: at least once each.
  assert reasons.keys() == {"image_decode", "empty_text"} and min(reasons.values()) >= 1
  with pytest.raises(ValueError, match="unknown skip reason 'typo'"):
    loader.SkipRecord("typo")
  bad = loader.shuffled_records(records[3:5], build, seed=1, name="toy")
  with pytest.raises(loader.NoReadableRecord, match="toy: position 0: no example from 2"):
    bad(0)
