"""Training examples from a TensorFlow-Datasets catalog dataset (e.g. `coco_captions`),
read with `tfds.data_source`: random access, numpy decoding, no TensorFlow.

The dataset must already be on disk in `data_dir` (nothing is downloaded) in the
array_record format (a tfrecord one is converted once with TFDS's `convert_format`,
which needs TensorFlow; reading tfrecord directly through `tfds.load` is not supported:
it has no random access, so no exact global shuffle or resumption). Each record becomes an image–text pair (`kind='pairs'`) or a
video–text pair (`kind='video'`, `image_key` holding the frames), processed exactly as a
prepared dataset of that kind (prepared.record_fn). Feature keys are paths into the
record ('captions/text'); a text feature holding several captions (COCO has five per
image) gives one of them, drawn per example.

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


def open_source(name: str, split: str, data_dir: str | None):
  """`tfds.data_source(name, split)` from `data_dir`, never downloading."""
  import tensorflow_datasets as tfds
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises AssertionError, DatasetNotFoundError, NotImplementedError…
    raise TfdsSourceError(
        f"tfds dataset {name!r} split {split!r} in data_dir={data_dir!r}: {type(e).__name__}: "
        f"{e}. Prepare it there first (it is never downloaded at training time). "
        "tfds.data_source reads the array_record format only: convert a tfrecord dataset "
        "once with `tfds convert_format --dataset_version_dir=DATA_DIR/NAME/CONFIG/VERSION "
        "--out_file_format=array_record` (needs TensorFlow)") from e


def feature(record: dict, key: str, name: str):
  value = record
  for part in key.split("/"):
    if not isinstance(value, dict) or part not in value:
      raise TfdsSourceError(f"{name}: no feature {key!r} in its records (top-level features: "
                            f"{sorted(record)}); set image_key / text_key")
    value = value[part]
  return value


def _text(value) -> str | bytes:
  if isinstance(value, (bytes, str)):
    return value
  raise TfdsSourceError(f"expected a text feature, got {type(value).__name__}")


def to_pair_record(record: dict, rng: np.random.Generator, *, image_key: str, text_key: str,
                   kind: str, name: str) -> dict:
  """A catalog record → the prepared layout of `kind` (`image` or `frames`, `caption`)."""
  text = feature(record, text_key, name)
  if isinstance(text, (list, tuple, np.ndarray)):  # several captions: one per example
    if len(text) == 0:
      raise loader.SkipRecord("empty_text", f"{text_key} holds no caption")
    text = text[int(rng.integers(len(text)))]
  media = feature(record, image_key, name)
  out = {"caption": _text(text)}
  if kind == "video":
    out["frames"] = list(media)
  else:
    out["image"] = media
  return out


def build_iterator(name: str, global_batch_size: int, *, tokenizer: str, split: str = "train",
                   data_dir: str | None = None, kind: str = "pairs",
                   image_key: str | None = None, text_key: str | None = None, seed: int = 0,
                   max_attempts: int = 32, process_index: int = 0, process_count: int = 1,
                   num_threads: int = 0, num_workers: int = 0, state=None,
                   **processing) -> loader.BatchIterator:
  from flamingo_jax.data import tokenizer as tokenizer_lib
  if kind not in ("pairs", "video"):
    raise TfdsSourceError(f"kind={kind!r}: a tfds source gives 'pairs' or 'video'")
  default_image, default_text = KNOWN_KEYS.get(name, ("image", None))
  image_key, text_key = image_key or default_image, text_key or default_text
  if not text_key:
    raise TfdsSourceError(f"{name}: text_key is not set and not known for this dataset; "
                          "name the caption feature, e.g. text_key='captions/text'")
  source = open_source(name, split, data_dir)
  if len(source):  # a wrong key fails here, naming the features, not mid-training
    to_pair_record(source[0], np.random.default_rng(0), image_key=image_key,
                   text_key=text_key, kind=kind, name=name)
  process = prepared.record_fn(kind, tokenizer_lib.load_tokenizer(tokenizer), **processing)

  def build(record, rng):
    return process(to_pair_record(record, rng, image_key=image_key, text_key=text_key,
                                  kind=kind, name=name), rng)
  example_at = loader.shuffled_records(source, build, seed=seed, name=f"tfds:{name}/{split}",
                                       max_attempts=max_attempts)
  return loader.BatchIterator(example_at, global_batch_size, process_index=process_index,
                              process_count=process_count, num_threads=num_threads,
                              num_workers=num_workers, state=state)
