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

Speed: `num_threads` > 0 builds the examples of a batch in a thread pool (same batches).
"""
import concurrent.futures
import os
import threading
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
               max_attempts: int = 32, skip_errors: tuple = (), num_threads: int = 0,
               state: Mapping | None = None):
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
    # Examples of a batch are independent (each a function of its position), so threads
    # change nothing but speed: decoding and resizing in PIL release the GIL.
    self._lock = threading.Lock()
    self._pool = (concurrent.futures.ThreadPoolExecutor(num_threads) if num_threads > 0
                  else None)
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
    positions = range(start, start + self.local_batch_size)
    if self._pool is None:
      return collate([self.example_at(q) for q in positions])
    return collate(list(self._pool.map(self.example_at, positions)))

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
        with self._lock:  # one reader at a time into the array_record shards
          record = self.dataset[index]
        record_id = record.get("id", record_id)
        rng = np.random.default_rng([self.seed, epoch, index])
        return self.example_fn(record, rng)
      except self.skip_errors as e:
        reason = getattr(e, "reason", None) or type(e).__name__
        with self._lock:
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


# ---------------------------------------------------------------------------------------
# Records → examples, with the processing functions of images.py, pairs.py, interleaved.py.

PROCESSING_DEFAULTS = dict(
    image_size=320,        # paper: 320 (NFNet-F6); OpenFlamingo: 224 with image_mode='clip'
    image_mode="paper",    # images.preprocess: 'paper' (pad to square) or 'clip' (crop)
    augment=True,          # random flip + colour jitter in training
    seq_len=None,          # default: 32 for pairs / video, 256 for mmc4
    rules="paper",         # 'paper' or 'openflamingo' (labels, window, association)
    max_images=None,       # mmc4; None: the rules' default (5 paper, 6 OpenFlamingo)
    p_next=None,           # mmc4; None: the rules' default
    single_image_drop_p=None,  # mmc4; None: the rules' default
    prepend_space_p=0.5,   # pairs / video
    add_eos=True,
    num_frames=8,          # video: clips with fewer frames repeat their last frame
)


def _skip_reason(e: Exception) -> str:
  from flamingo_jax.data.images import ImageDecodeError
  if isinstance(e, ImageDecodeError):
    return "image_decode"
  return getattr(e, "reason", None) or type(e).__name__


def load_tokenizer_for(dataset: PreparedDataset, path: str | None = None):
  """(tokenizer, SpecialTokens): `path`, else the one recorded when the dataset was
  prepared; checks the special-token ids against the recorded ones."""
  import dataclasses
  from flamingo_jax.data import tokenizer as tokenizer_lib
  recorded = dataset.metadata.get("tokenizer")
  if path is None:
    if not recorded:
      raise PreparedDataError(f"{dataset.dir}: no tokenizer given and none recorded at "
                              "preparation (prepare --tokenizer DIR, or set `tokenizer`)")
    path = recorded["path"]
  tok, specials = tokenizer_lib.load_tokenizer(path)
  if recorded and recorded.get("special_tokens") not in (None, dataclasses.asdict(specials)):
    raise PreparedDataError(
        f"{dataset.dir} was prepared with tokenizer {recorded['path']} (special tokens "
        f"{recorded['special_tokens']}), but {path} gives {dataclasses.asdict(specials)}")
  return tok, specials


def example_fn_for(kind: str, tokenizer_and_specials, **options) -> ExampleFn:
  """(record, rng) → a fixed-shape example for a prepared dataset of `kind`."""
  from flamingo_jax.data import images, interleaved, pairs
  unknown = set(options) - set(PROCESSING_DEFAULTS)
  if unknown:
    raise ValueError(f"unknown processing options {sorted(unknown)}; "
                     f"known: {sorted(PROCESSING_DEFAULTS)}")
  o = dict(PROCESSING_DEFAULTS, **options)

  def pixels(data: bytes, seed) -> np.ndarray:
    # A generator per image (and the same one for every frame of a clip, so a clip is
    # flipped and colour-jittered as a whole).
    rng = np.random.default_rng(seed) if o["augment"] else None
    return images.preprocess(images.decode(data), mode=o["image_mode"], size=o["image_size"],
                             train=bool(o["augment"]), rng=rng)

  if kind == "mmc4":
    config = interleaved.InterleavedConfig(
        seq_len=o["seq_len"] or 256, max_images=o["max_images"], p_next=o["p_next"],
        rules=o["rules"], single_image_drop_p=o["single_image_drop_p"], add_eos=o["add_eos"])

    def mmc4_example(record, rng):
      base = int(rng.integers(2**63))
      doc = {"texts": record["sentences"],
             "images": list(enumerate(record["images"])),
             "image_sentence": [int(s) if s >= 0 else None for s in record["image_sentence"]]}
      return interleaved.interleaved_example(
          doc, tokenizer_and_specials, config, rng,
          image_fn=lambda payload: pixels(payload[1], [base, payload[0]]))
    return mmc4_example

  pair_config = pairs.PairConfig(seq_len=o["seq_len"] or 32,
                                 prepend_space_p=o["prepend_space_p"], rules=o["rules"],
                                 add_eos=o["add_eos"])
  if kind in ("pairs", "webdataset"):
    def pair(record, rng):
      image = pixels(record["image"], int(rng.integers(2**63)))
      return pairs.pair_example(image, record["caption"], tokenizer_and_specials,
                                pair_config, rng)
    return pair

  if kind == "video":
    def video(record, rng):
      seed = int(rng.integers(2**63))
      frames = [pixels(f, seed) for f in record["frames"][:o["num_frames"]]]
      if not frames:
        raise SkipRecord("video_no_frames")
      frames += [frames[-1]] * (o["num_frames"] - len(frames))
      return pairs.pair_example(np.stack(frames), record["caption"], tokenizer_and_specials,
                                pair_config, rng)
    return video
  raise PreparedDataError(f"unknown dataset kind {kind!r}")


def build_iterator(path: str, global_batch_size: int, *, kind: str | None = None,
                   tokenizer: str | None = None, seed: int = 0, process_index: int = 0,
                   process_count: int = 1, max_attempts: int = 32, num_threads: int = 0,
                   state: Mapping | None = None, **processing) -> PreparedIterator:
  """A `PreparedIterator` over the dataset at `path` with the processing functions of
  its kind; `processing`: see PROCESSING_DEFAULTS."""
  from flamingo_jax.data.images import ImageDecodeError
  from flamingo_jax.data.interleaved import SkipExample
  dataset = PreparedDataset(path, kind)
  example_fn = example_fn_for(dataset.kind, load_tokenizer_for(dataset, tokenizer), **processing)

  def fn(record, rng):
    try:
      return example_fn(record, rng)
    except (SkipExample, ImageDecodeError) as e:
      raise SkipRecord(_skip_reason(e), str(e)) from e
  return PreparedIterator(dataset, fn, global_batch_size, seed=seed,
                          process_index=process_index, process_count=process_count,
                          max_attempts=max_attempts, num_threads=num_threads, state=state)
