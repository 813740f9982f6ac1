"""Training examples from a dataset written by `prepare.py` (grain over `tfds.data_source`).

Storage: `tfds.builder_from_directory(dir).as_data_source("train")`, random access into
the array_record shards, decoded with numpy (no TensorFlow).

Order and skips: `loader.shuffled_records` (grain's global index shuffle, a new order
every epoch; a record that makes no example is replaced by the next of the same order
and counted by reason). Batches, sharding over processes, threads, worker processes and
the resumable state: `loader.BatchIterator`.

Processing: each record is decoded and turned into a fixed-shape example by the
processing functions of its kind (`images`, `pairs`, `interleaved`), with a generator
seeded by (seed, epoch, record index) for its random choices.
"""
import json
import os

from etils import epath
import numpy as np

from flamingo_jax.data import loader


class PreparedDataError(ValueError):
  """A prepared dataset that cannot be read."""


def find_dataset_dir(path: str, kind: str | None = None) -> str:
  """The TFDS dataset folder (the one holding dataset_info.json) at or under `path`: a
  local path or a bucket (`gs://...`: every path goes through etils epath, as TFDS's)."""
  root = epath.Path(path)
  if (root / "dataset_info.json").exists():
    return os.fspath(root)
  # Globs, not a walk: a bucket answers a glob in one listing (and epath's walk drops the
  # gs:// of the folders it yields). prepare writes OUTPUT/flamingo_KIND/VERSION/.
  found = sorted(os.fspath(f.parent) for depth in (1, 2, 3)
                 for f in root.glob("/".join(["*"] * depth + ["dataset_info.json"])))
  found = [d for d in found if kind is None or f"flamingo_{kind}" in d]
  if len(found) != 1:
    raise PreparedDataError(
        f"{path}: expected one prepared dataset" + (f" of kind {kind!r}" if kind else "")
        + (f", found {len(found)}: {found}" if found else ", found none (run "
           "`python -m flamingo_jax.data.prepare`)"))
  return found[0]


def read_metadata(path: str, kind: str | None = None) -> dict:
  """The metadata `prepare` recorded (`kind`, `tokenizer`: its path and special-token
  ids, ...), read from the dataset folder's metadata.json without opening the dataset."""
  file = epath.Path(find_dataset_dir(path, kind)) / "metadata.json"
  try:
    return json.loads(file.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise PreparedDataError(f"{file}: no readable metadata ({e})") from e


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
    elif k in ("sentences", "captions"):
      v = [s.decode("utf-8") if isinstance(s, bytes) else s for s in v]
    elif k in ("images", "frames"):
      v = list(v)
    out[k] = v
  return out


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


def load_tokenizer_for(dataset: PreparedDataset, path: str | None = None):
  """(tokenizer, SpecialTokens): `path`, else the one recorded when the dataset was
  prepared; checks the special-token ids against the recorded ones."""
  import dataclasses
  from flamingo_jax.data import tokenizer as tokenizer_lib
  recorded = dataset.metadata.get("tokenizer")
  if not path:  # None or '' (a config's unset field)
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


def record_fn(kind: str, tokenizer_and_specials, **options):
  """(record, rng) → a fixed-shape example, for records of `kind` (the prepared layouts:
  `image` / `frames` / `images` as encoded bytes or decoded uint8 arrays, `caption`,
  mmc4's `sentences` and `image_sentence`). A record that makes no example raises
  loader.SkipRecord with the reason."""
  from flamingo_jax.data import images, interleaved, pairs
  unknown = set(options) - set(PROCESSING_DEFAULTS)
  if unknown:
    raise ValueError(f"unknown processing options {sorted(unknown)}; "
                     f"known: {sorted(PROCESSING_DEFAULTS)}")
  o = dict(PROCESSING_DEFAULTS, **options)

  def pixels(image, seed) -> np.ndarray:
    # A generator per image (and the same one for every frame of a clip, so a clip is
    # flipped and colour-jittered as a whole).
    rng = np.random.default_rng(seed) if o["augment"] else None
    image = images.decode(image) if isinstance(image, bytes) else images.to_rgb(image)
    return images.preprocess(image, mode=o["image_mode"], size=o["image_size"],
                             train=bool(o["augment"]), rng=rng)

  if kind == "mmc4":
    config = interleaved.InterleavedConfig(
        seq_len=o["seq_len"] or 256, max_images=o["max_images"], p_next=o["p_next"],
        rules=o["rules"], single_image_drop_p=o["single_image_drop_p"], add_eos=o["add_eos"])

    def example(record, rng):
      base = int(rng.integers(2**63))
      doc = {"texts": record["sentences"],
             "images": list(enumerate(record["images"])),
             "image_sentence": [int(s) if s >= 0 else None for s in record["image_sentence"]]}
      return interleaved.interleaved_example(
          doc, tokenizer_and_specials, config, rng,
          image_fn=lambda payload: pixels(payload[1], [base, payload[0]]))

  elif kind in ("pairs", "webdataset", "video", "tfds"):
    pair_config = pairs.PairConfig(seq_len=o["seq_len"] or 32,
                                   prepend_space_p=o["prepend_space_p"], rules=o["rules"],
                                   add_eos=o["add_eos"])

    def example(record, rng):
      seed = int(rng.integers(2**63))
      if kind != "video":
        media = pixels(record["image"], seed)
      else:
        frames = [pixels(f, seed) for f in record["frames"][:o["num_frames"]]]
        if not frames:
          raise loader.SkipRecord("video_no_frames")
        media = np.stack(frames + [frames[-1]] * (o["num_frames"] - len(frames)))
      caption = (record["caption"] if "caption" in record  # tfds: one of its captions
                 else record["captions"][int(rng.integers(len(record["captions"])))])
      return pairs.pair_example(media, caption, tokenizer_and_specials, pair_config, rng)
  else:
    raise PreparedDataError(f"unknown dataset kind {kind!r}")

  def checked(record, rng):
    try:
      return example(record, rng)
    except interleaved.SkipExample as e:
      raise loader.SkipRecord(e.reason, e.detail) from e
    except images.ImageDecodeError as e:
      raise loader.SkipRecord("image_decode", str(e)) from e
  return checked


def build_iterator(path: str, global_batch_size: int, *, kind: str | None = None,
                   tokenizer: str | None = None, seed: int = 0, max_attempts: int = 32,
                   process_index: int = 0, process_count: int = 1, num_threads: int = 0,
                   num_workers: int = 0, state=None, check_tokens=None,
                   **processing) -> loader.BatchIterator:
  """Batches of the dataset at `path`, processed by its kind's functions (`processing`:
  see PROCESSING_DEFAULTS); the loader options: see loader.BatchIterator. `check_tokens`:
  called with the tokenizer's SpecialTokens before any record is read."""
  dataset = PreparedDataset(path, kind)
  tokens = load_tokenizer_for(dataset, tokenizer)
  if check_tokens:
    check_tokens(tokens[1])
  build = record_fn(dataset.kind, tokens, **processing)
  example_at = loader.shuffled_records(dataset, build, seed=seed, name=dataset.dir,
                                       max_attempts=max_attempts)
  return loader.BatchIterator(example_at, global_batch_size, process_index=process_index,
                              process_count=process_count, num_threads=num_threads,
                              num_workers=num_workers, state=state)
