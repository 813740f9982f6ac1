"""Examples → this process's share of each global batch, with grain: deterministic,
resumable, multi-host.

Every training source (synthetic.py, prepared.py, tfds_source.py) is one pure function,
`example_at(position) -> example`, over the global positions 0, 1, 2, … of an endless
stream (a dict of fixed-shape numpy arrays, nothing else). This module does the rest:

  * Global batch s holds positions [s * G, (s + 1) * G); process p of P reads the
    contiguous share [s * G + p * L, s * G + (p + 1) * L), L = G / P. Shares are disjoint
    and, concatenated in process order, are the global batch.
  * `grain.MapDataset.range(...).map(example_at)`, read in `num_threads` threads (decoding
    and resizing in PIL release the GIL) and, with `num_workers` > 0, in worker processes
    (`mp_prefetch`, for the Python-bound tokenisation); both keep the order, so the
    batches are the same for any thread or worker count.
  * State: `{"next_index": the first position of the next global batch}`, plain JSON and
    the same on every process; `set_state` restarts the grain pipeline there.

Records a source cannot use are replaced inside `example_at` (see `shuffled_records`) and
reported in the batch: `skipped` [L, len(SKIP_REASONS)] int32 counts, per example, the
records passed over to make it. train.py sums them on device over the global batch and
keeps the totals in the train state, so the counts cover every process and survive a
resume.
"""
import sys
from typing import Callable, Mapping

import grain
import numpy as np

ExampleFn = Callable[[int], dict]

# Why a record made no example (the `skipped` columns; anything else is a bug, raised).
SKIP_REASONS = ("image_decode", "empty_text", "invalid_utf8", "no_images",
                "no_images_in_window", "single_image", "video_no_frames")


class SkipRecord(Exception):
  """Raised by a record → example function for a record that makes no example."""

  def __init__(self, reason: str, detail: str = ""):
    if reason not in SKIP_REASONS:
      raise ValueError(f"unknown skip reason {reason!r}; add it to loader.SKIP_REASONS")
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


class NoReadableRecord(ValueError):
  """`max_attempts` records in a row could not make an example."""


def collate(examples: list[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def shuffled_records(records, build: Callable[[dict, np.random.Generator], dict], *,
                     seed: int, name: str, max_attempts: int = 32) -> ExampleFn:
  """`example_at` over a random-access `records` (len + getitem; a grain source such as
  `tfds.data_source`), globally shuffled, a new order every epoch.

  Position q of epoch e = q // N reads record `order[q]`, grain's keyed index shuffle of
  [0, N) seeded by (seed + e); `build(record, rng)` gets a generator seeded by (seed, e,
  record index), so an example depends on nothing but those. A record that raises
  SkipRecord is replaced by the next one of the same epoch's order (then the next, up
  to `max_attempts`): every other position, and so resumption, stays exact.
  """
  n = len(records)
  if n == 0:
    raise NoReadableRecord(f"{name}: no records")
  order = grain.MapDataset.range(n).shuffle(seed=seed % 2**32).repeat()

  def example_at(position: int) -> dict:
    epoch, k = divmod(int(position), n)
    skipped = np.zeros(len(SKIP_REASONS), np.int32)
    last, attempts = None, min(max_attempts, n)
    for attempt in range(attempts):
      index = int(order[epoch * n + (k + attempt) % n])
      try:
        example = build(records[index], np.random.default_rng([seed, epoch, index]))
        return dict(example, skipped=skipped)
      except SkipRecord as e:
        skipped[SKIP_REASONS.index(e.reason)] += 1
        last = f"record {index}: {e}"
    raise NoReadableRecord(f"{name}: position {position}: no example from {attempts} "
                           f"records in a row; last: {last}")
  return example_at


class BatchIterator:
  """This process's share of each global batch of `example_at` (see the module doc)."""

  def __init__(self, example_at: ExampleFn, global_batch_size: int, *, process_index: int = 0,
               process_count: int = 1, num_threads: int = 0, num_workers: int = 0,
               state: Mapping | None = None):
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple "
                       f"of process_count={process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    self.example_at = example_at
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.num_threads, self.num_workers = int(num_threads), int(num_workers)
    self.next_index, self._it = 0, None
    if state is not None:
      self.set_state(state)

  def batch_at(self, step: int) -> dict:
    """This process's share of global batch `step`, without moving the iterator."""
    at, local = self._local_example(), self.local_batch_size
    return collate([at(step * local + i) for i in range(local)])

  def get_state(self) -> dict:
    return {"next_index": int(self.next_index)}

  def set_state(self, state: Mapping) -> None:
    n = int(state["next_index"])
    if n < 0 or n % self.global_batch_size:
      raise ValueError(f"next_index={n} is not a global batch boundary "
                       f"(global_batch_size={self.global_batch_size})")
    self.close()
    self.next_index = n

  def _local_example(self) -> "_LocalExample":
    return _LocalExample(self.example_at, self.global_batch_size, self.local_batch_size,
                         self.process_index)

  def _pipeline(self):
    step0, local = self.next_index // self.global_batch_size, self.local_batch_size
    ds = grain.MapDataset.range(step0 * local, sys.maxsize).map(self._local_example())
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=self.num_threads, prefetch_buffer_size=2 * local if self.num_threads else 0))
    if self.num_workers:  # before batching, so workers interleave examples in order
      from absl import flags
      if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (defaults here)
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
    return iter(ds.batch(local, batch_fn=collate))

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._it = self._pipeline()
    batch = next(self._it)
    self.next_index += self.global_batch_size
    return batch

  def close(self) -> None:
    """Stops grain's threads and worker processes (the iterator restarts on next())."""
    if self._it is not None:
      self._it.close()
      self._it = None


class _LocalExample:
  """Local element j is example j % L of this process's share of global batch j // L
  (a class, not a closure, so that grain can pickle it for worker processes)."""

  def __init__(self, example_at: ExampleFn, global_batch_size: int, local_batch_size: int,
               process_index: int):
    self.example_at = example_at
    self.global_batch_size, self.local_batch_size = global_batch_size, local_batch_size
    self.process_index = process_index

  def __call__(self, j: int) -> dict:
    step, i = divmod(int(j), self.local_batch_size)
    return self.example_at(step * self.global_batch_size
                           + self.process_index * self.local_batch_size + i)
