"""TensorFlow-Datasets catalog datasets (e.g. `coco_captions`) as image–text sources.

Two ways in, both from a `data_dir` that already holds the dataset (never downloading):

  source='tfds' in a training config: read in place with `tfds.data_source` (random
    access, numpy decoding, no TensorFlow); array_record datasets only.
  `python -m flamingo_jax.data.prepare tfds --input NAME[:SPLIT] --data-dir DIR ...`:
    copies the split into a prepared dataset (image bytes + every caption), reading with
    `tfds.data_source`, or with `tfds.load` when the dataset is in another format
    (tfrecord) and TensorFlow is installed. Then train with source='prepared'.

In training, each record becomes an image–text pair, processed exactly as a prepared
'tfds' dataset (prepared.record_fn). Feature keys are paths into the record
('captions/text'); a text feature holding several captions (COCO has five per image)
gives one of them, drawn per example.

Order, skips, batches, sharding and state: loader.py, as for prepared datasets.
"""
import numpy as np

from flamingo_jax.data import loader, prepared

# Feature keys of catalog datasets we know; others name theirs in the config.
KNOWN_KEYS = {
    "coco_captions": ("image", "captions/text"),
    "ai2dcaption": ("image", "caption"),
}


class TfdsSourceError(ValueError):
  pass


def open_source(name: str, split: str, data_dir: str | None, decoders=None):
  """`tfds.data_source(name, split)` from `data_dir`, never downloading."""
  import tensorflow_datasets as tfds
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            decoders=decoders)
  except Exception as e:  # tfds raises AssertionError, DatasetNotFoundError, NotImplementedError…
    raise TfdsSourceError(
        f"tfds dataset {name!r} split {split!r} in data_dir={data_dir!r}: {type(e).__name__}: "
        f"{e}. Prepare it there first (it is never downloaded at training time). "
        "tfds.data_source reads the array_record format only: for a tfrecord dataset, "
        "run `python -m flamingo_jax.data.prepare tfds` (uses tfds.load; needs TensorFlow) "
        "and train on its output with source='prepared'") from e


def feature(record: dict, key: str, name: str):
  value = record
  for part in key.split("/"):
    if not isinstance(value, dict) or part not in value:
      raise TfdsSourceError(f"{name}: no feature {key!r} in its records (top-level features: "
                            f"{sorted(record)}); set data.NAME.image_key / text_key (prepare: "
                            "--image-key / --text-key)")
    value = value[part]
  return value


def catalog_record(record: dict, *, image_key: str, text_key: str, name: str) -> dict:
  """A catalog record → the prepared 'tfds' layout {"image", "captions"}."""
  texts = feature(record, text_key, name)
  captions = list(texts) if isinstance(texts, (list, tuple, np.ndarray)) else [texts]
  if not all(isinstance(t, (bytes, str)) for t in captions):
    raise TfdsSourceError(f"{name}: {text_key} is not a text feature")
  captions = [t for t in captions if t.strip()]
  if not captions:
    raise loader.SkipRecord("empty_text", f"{text_key} holds no non-blank caption")
  return {"image": feature(record, image_key, name), "captions": captions}


def build_iterator(name: str, global_batch_size: int, *, tokenizer: str, split: str = "train",
                   data_dir: str | None = None, image_key: str | None = None,
                   text_key: str | None = None, seed: int = 0, max_attempts: int = 32,
                   process_index: int = 0, process_count: int = 1,
                   num_threads: int = 0, num_workers: int = 0, state=None,
                   check_tokens=None, **processing) -> loader.BatchIterator:
  """Batches of the split read in place (`processing`: prepared.PROCESSING_DEFAULTS; the
  loader options: loader.BatchIterator; `check_tokens`: as prepared.build_iterator's)."""
  from flamingo_jax.data import tokenizer as tokenizer_lib
  image_key, text_key = _keys(name, image_key, text_key)
  source = open_source(name, split, data_dir)
  if len(source) == 0:
    raise TfdsSourceError(f"tfds dataset {name!r} split {split!r}: no records")
  try:  # a wrong key fails here, naming the features, not mid-training
    catalog_record(source[0], image_key=image_key, text_key=text_key, name=name)
  except loader.SkipRecord:
    pass  # the keys are right; this record is skipped when read
  tokens = tokenizer_lib.load_tokenizer(tokenizer)
  if check_tokens:
    check_tokens(tokens[1])
  process = prepared.record_fn("tfds", tokens, **processing)

  def build(record, rng):
    return process(catalog_record(record, image_key=image_key, text_key=text_key, name=name),
                   rng)
  example_at = loader.shuffled_records(source, build, seed=seed, name=f"tfds:{name}/{split}",
                                       max_attempts=max_attempts)
  return loader.BatchIterator(example_at, global_batch_size, process_index=process_index,
                              process_count=process_count, num_threads=num_threads,
                              num_workers=num_workers, state=state)


# ---------------------------------------------------------------------------------------
# Preparation: a catalog split → records {"id", "image": bytes, "captions": [str]}.

def read_tfds(inputs: str, *, data_dir: str | None = None, image_key: str | None = None,
              text_key: str | None = None, skip=None, num_workers: int = 0,
              max_image_size: int = 0, image_format: str = "jpeg"):
  """Records of `inputs` = 'NAME[:SPLIT]' (default split 'train'), for prepare.py: the
  image as stored (encoded bytes: checked and re-encoded like every prepared image),
  every caption of `text_key` (one or a list). Ids: 'tfds:NAME/SPLIT:INDEX'."""
  import functools
  from flamingo_jax.data import raw
  name, _, split = str(inputs).partition(":")
  split = split or "train"
  image_key, text_key = _keys(name, image_key, text_key)

  def rows(skip):
    for i, record in enumerate(_catalog_records(name, split, data_dir, image_key)):
      yield f"tfds:{name}/{split}:{i}", record
  return raw.records(rows, functools.partial(
      _captioned_image, image_key=image_key, text_key=text_key, name=name,
      max_image_size=max_image_size, image_format=image_format), skip, num_workers)


def _keys(name, image_key, text_key):
  default_image, default_text = KNOWN_KEYS.get(name, ("image", None))
  image_key, text_key = image_key or default_image, text_key or default_text
  if not text_key:
    raise TfdsSourceError(f"{name}: text_key is not set and not known for this dataset; "
                          "name the caption feature, e.g. text_key='captions/text'")
  return image_key, text_key


def _catalog_records(name, split, data_dir, image_key):
  """The split's records in stored order, images left encoded (SkipDecoding)."""
  import tensorflow_datasets as tfds
  decoders = {}
  node = decoders
  parts = image_key.split("/")
  for part in parts[:-1]:
    node = node.setdefault(part, {})
  node[parts[-1]] = tfds.decode.SkipDecoding()
  try:
    file_format = tfds.builder(name, data_dir=data_dir).info.file_format
  except Exception as e:
    raise TfdsSourceError(f"tfds dataset {name!r} in data_dir={data_dir!r}: "
                          f"{type(e).__name__}: {e} (it is never downloaded here)") from e
  if file_format == tfds.core.FileFormat.ARRAY_RECORD:
    source = open_source(name, split, data_dir, decoders)
    for i in range(len(source)):
      yield source[i]
    return
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    raise TfdsSourceError(
        f"tfds dataset {name!r} is stored as {file_format.value}: reading it needs "
        "tfds.load and TensorFlow (pip install tensorflow-cpu)") from None
  dataset = tfds.load(name, split=split, data_dir=data_dir, download=False,
                      decoders=decoders, shuffle_files=False)
  yield from tfds.as_numpy(dataset)


def _captioned_image(rid, record, skip, *, image_key, text_key, name, max_image_size,
                     image_format) -> dict:
  from flamingo_jax.data import raw
  try:
    record = catalog_record(record, image_key=image_key, text_key=text_key, name=name)
  except loader.SkipRecord as e:
    raise raw.BadRecord(e.reason, str(e)) from None
  try:
    captions = [t.decode("utf-8") if isinstance(t, bytes) else t for t in record["captions"]]
  except UnicodeDecodeError as e:
    raise raw.BadRecord("invalid_utf8", f"{text_key}: {e}") from None
  if not isinstance(record["image"], bytes):
    raise TfdsSourceError(f"{name}: {image_key} is not an encoded image feature")
  return {"id": rid, "image": raw.encode_image(record["image"], max_size=max_image_size,
                                               fmt=image_format), "captions": captions}
