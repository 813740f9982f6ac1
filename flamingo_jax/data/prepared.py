"""Training batches from a dataset written by `prepare.py`.

Storage: `tfds.builder_from_directory(dir).as_data_source("train")`, random access into
the array_record shards, decoded with numpy (no TensorFlow).

Order: global position q (0, 1, 2, … over all epochs) reads record
`shuffle(q mod N; seed, epoch = q // N)`, where `shuffle` is a keyed bijection of [0, N)
(a 4-round Feistel network with cycle walking: O(1) memory at any N, a different order
every epoch). Global batch s holds positions [s * G, (s + 1) * G); process p of P reads
the contiguous share [s * G + p * G/P, s * G + (p + 1) * G/P), so processes read
disjoint shares whose union is the global batch.

Processing: each record is decoded and turned into a fixed-shape example by the
processing functions of its kind (`images`, `pairs`, `interleaved`), with a generator
seeded by (seed, epoch, record index) for its random choices, so an example depends on
nothing but those three numbers.

Bad records: a record that fails at read time (undecodable image, a document with no
image left after filtering, …) is replaced by the next record of the same epoch's order
(then the next, up to `max_attempts`), and counted by reason in `skipped_counts()`;
replacing it in place keeps every other position, and resumption, exact.

State: `{"next_index": first position of the next global batch}`, as synthetic.py.
"""
import os
from typing import Callable, Mapping

import numpy as np

_M64 = (1 << 64) - 1


class PreparedDataError(ValueError):
  """A prepared dataset that cannot be read, or a position with no readable record."""


def find_dataset_dir(path: str, kind: str | None = None) -> str:
  """The TFDS dataset folder (the one holding dataset_info.json) at or under `path`."""
  path = os.fspath(path)
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    return path
  found = []
  for root, dirs, files in os.walk(path):
    dirs.sort()
    if "dataset_info.json" in files and (kind is None or f"flamingo_{kind}" in root):
      found.append(root)
  if len(found) != 1:
    raise PreparedDataError(
        f"{path}: expected one prepared dataset" + (f" of kind {kind!r}" if kind else "")
        + (f", found {len(found)}: {found}" if found else ", found none (run "
           "`python -m flamingo_jax.data.prepare`)"))
  return found[0]


class PreparedDataset:
  """Random access to the records of a prepared dataset, as dicts of numpy/bytes/str."""

  def __init__(self, path: str, kind: str | None = None):
    import tensorflow_datasets as tfds
    self.dir = find_dataset_dir(path, kind)
    builder = tfds.builder_from_directory(self.dir)
    self.metadata = dict(builder.info.metadata or {})
    self.kind = self.metadata.get("kind")
    if kind is not None and self.kind != kind:
      raise PreparedDataError(f"{self.dir} holds a {self.kind!r} dataset, not {kind!r}")
    self.source = builder.as_data_source(split="train")
    self.num_records = len(self.source)
    if self.num_records == 0:
      raise PreparedDataError(f"{self.dir} holds no records")

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict:
    return _to_python(self.source[int(index)])


def _to_python(record: dict) -> dict:
  """Text features come back as bytes: make them str (the stored text is UTF-8)."""
  out = {}
  for k, v in record.items():
    if k in ("id", "caption"):
      v = v.decode("utf-8") if isinstance(v, bytes) else v
    elif k == "sentences":
      v = [s.decode("utf-8") if isinstance(s, bytes) else s for s in v]
    elif k in ("images", "frames"):
      v = list(v)
    out[k] = v
  return out


# ---------------------------------------------------------------------------------------
# The shuffle: a keyed permutation of [0, n), computed per index.

def _splitmix(x: int) -> int:
  x = (x + 0x9E3779B97F4A7C15) & _M64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
  return x ^ (x >> 31)


def shuffled_index(i: int, n: int, seed: int, epoch: int, rounds: int = 4) -> int:
  """Position i of the order of epoch `epoch`: a bijection of [0, n) for each (seed, epoch)."""
  if not 0 <= i < n:
    raise IndexError(f"{i} not in [0, {n})")
  if n == 1:
    return 0
  bits = max(2, (n - 1).bit_length())
  bits += bits % 2
  half, mask = bits // 2, (1 << (bits // 2)) - 1
  key = _splitmix(_splitmix(seed & _M64) ^ (epoch & _M64))
  keys = [_splitmix(key + r) for r in range(rounds)]
  x = i
  while True:  # cycle walking: the network permutes [0, 2^bits) ⊇ [0, n), 2^bits < 4n
    left, right = x >> half, x & mask
    for k in keys:
      left, right = right, left ^ (_splitmix(right ^ k) & mask)
    x = (left << half) | right
    if x < n:
      return x


# ---------------------------------------------------------------------------------------
# Batches.

class SkipRecord(Exception):
  """Raised by an example function for a record that cannot make a training example."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


ExampleFn = Callable[[dict, np.random.Generator], dict]


def collate(examples: list[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class PreparedIterator:
  """This process's share of each global batch of a prepared dataset (sources.py contract)."""

  def __init__(self, dataset: PreparedDataset, example_fn: ExampleFn, global_batch_size: int,
               *, seed: int = 0, process_index: int = 0, process_count: int = 1,
               max_attempts: int = 32, skip_errors: tuple = (), state: Mapping | None = None):
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple "
                       f"of process_count={process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    self.dataset, self.example_fn = dataset, example_fn
    self.seed, self.max_attempts = int(seed), int(max_attempts)
    self.skip_errors = (SkipRecord,) + tuple(skip_errors)
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.next_index = 0
    self._skipped: dict[str, int] = {}
    self._skipped_ids: dict[str, str] = {}  # reason → the last record id skipped for it
    if state is not None:
      self.set_state(state)

  # The contract of sources.py.
  def get_state(self) -> dict:
    return {"next_index": int(self.next_index)}

  def set_state(self, state: Mapping) -> None:
    n = int(state["next_index"])
    if n < 0 or n % self.global_batch_size:
      raise ValueError(f"next_index={n} is not a global batch boundary "
                       f"(global_batch_size={self.global_batch_size})")
    self.next_index = n

  def batch_at(self, step: int) -> dict:
    """This process's share of global batch `step`, without moving the iterator."""
    start = step * self.global_batch_size + self.process_index * self.local_batch_size
    return collate([self.example_at(q) for q in range(start, start + self.local_batch_size)])

  def __iter__(self) -> "PreparedIterator":
    return self

  def __next__(self) -> dict:
    batch = self.batch_at(self.next_index // self.global_batch_size)
    self.next_index += self.global_batch_size
    return batch

  # Records.
  def record_index(self, position: int, attempt: int = 0) -> tuple[int, int]:
    """(epoch, record index) read at global `position` (the `attempt`-th replacement)."""
    n = len(self.dataset)
    epoch, k = divmod(int(position), n)
    return epoch, shuffled_index((k + attempt) % n, n, self.seed, epoch)

  def example_at(self, position: int) -> dict:
    last = None
    for attempt in range(min(self.max_attempts, len(self.dataset))):
      epoch, index = self.record_index(position, attempt)
      record_id = f"record {index}"
      try:
        record = self.dataset[index]
        record_id = record.get("id", record_id)
        rng = np.random.default_rng([self.seed, epoch, index])
        return self.example_fn(record, rng)
      except self.skip_errors as e:
        reason = getattr(e, "reason", None) or type(e).__name__
        self._skipped[reason] = self._skipped.get(reason, 0) + 1
        self._skipped_ids[reason] = f"{record_id}: {e}"
        last = e
    raise PreparedDataError(f"{self.dataset.dir}: position {position}: {self.max_attempts} "
                            f"records in a row could not be read; last: {last}")

  def skipped_counts(self) -> dict:
    """Records this iterator skipped at read time, by reason (for train.py's logs)."""
    return dict(sorted(self._skipped.items()))

  def last_skipped(self) -> dict:
    """reason → the last record skipped for it, with the error (for debugging)."""
    return dict(self._skipped_ids)
