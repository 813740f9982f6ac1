"""Training data sources by name: `config.data.NAME.source` → a batch iterator.

Every source is an `example_at(position)` function batched by loader.BatchIterator:
this process's share of each global batch as numpy arrays in the model's batch format,
with `get_state()` / `set_state()` (plain JSON) so that a checkpoint resumes it exactly.
Loader options for every source: `num_threads`, `num_workers` (same batches for any
count).

Sources:
  synthetic  the on-the-fly few-shot task of synthetic.py (`task`: its TaskConfig fields).
  random     random batches of any shape (random_batches.py): `seq_len`, `max_images`,
             `num_frames`, `image_size` (0: the model's); for smoke runs and benchmarks.
  prepared   a dataset written by `python -m flamingo_jax.data.prepare` (prepared.py):
             `path` (the output dir or the dataset dir), optional `kind` (checked against
             the dataset), `tokenizer` (default: the one recorded at preparation).
  tfds       an image–caption TFDS catalog dataset already on disk, read in place
             (tfds_source.py): `name`, `split`, `data_dir`, `tokenizer`, `image_key`,
             `text_key`.
prepared and tfds also take `seed`, `max_attempts` and the processing options of
prepared.PROCESSING_DEFAULTS (image_size, image_mode, augment, seq_len, rules, max_images,
p_next, single_image_drop_p, prepend_space_p, add_eos, num_frames); their batches carry
`skipped`, the records passed over by reason (loader.SKIP_REASONS).

`batch_shapes` gives a dataset's global batch shapes from its config alone (for
prepared data: with `kind` set), so a step compiles without reading a record.

Given the model config, `build` checks a source against the model before anything
compiles: the image size against a ViT's (`check_image_size`), and for prepared / tfds
data the tokenizer's vocabulary and `<image>` / `<|endofchunk|>` ids against the LM's
(`check_tokens`); a mismatch is a ConfigError naming both values and the fix.
"""
import functools

import numpy as np

from flamingo_jax.config import ConfigError
from flamingo_jax.data import random_batches, synthetic

_COMMON = {"source", "batch_size", "weight", "num_threads", "num_workers"}
_KEYS = {
    "synthetic": _COMMON | {"task", "seed"},
    "random": _COMMON | {"seed"} | set(random_batches.DEFAULTS),
    "prepared": _COMMON | {"path", "kind", "tokenizer", "seed", "max_attempts"},
    "tfds": _COMMON | {"name", "split", "data_dir", "tokenizer", "image_key", "text_key",
                       "seed", "max_attempts"},
}
_REQUIRED = {
    "prepared": {"path": "the --output dir of `python -m flamingo_jax.data.prepare`"},
    "tfds": {"name": "the TFDS dataset name, e.g. coco_captions",
             "tokenizer": "a local HF tokenizer directory"},
}


def _checked(name: str, cfg) -> dict:
  from flamingo_jax.data import prepared
  cfg = dict(cfg)
  source = cfg.get("source")
  if source not in _KEYS:
    raise ConfigError(f"data.{name}.source: unknown source {source!r}; available: "
                      f"{sorted(_KEYS)}")
  processing = set(prepared.PROCESSING_DEFAULTS) if source in ("prepared", "tfds") else set()
  known = _KEYS[source] | processing
  unknown = set(cfg) - known
  if unknown:
    raise ConfigError(f"data.{name}: unknown keys {sorted(unknown)} for source {source!r}; "
                      f"known: {sorted(known)}")
  return cfg


def check_image_size(name: str, cfg, model_config) -> None:
  """A ViT's position embeddings fix its input size: the data's must be the same. (NFNet
  is convolutional: any size makes tokens, so its config's size is not enforced.)"""
  from flamingo_jax.config import ViTConfig
  from flamingo_jax.data import prepared
  cfg = dict(cfg)
  if cfg["source"] == "synthetic":
    key, size = "task.image_size", synthetic.TaskConfig(**dict(cfg.get("task", {}))).image_size
  else:
    key = "image_size"
    size = int(cfg.get(key, 0 if cfg["source"] == "random" else prepared.PROCESSING_DEFAULTS[key]))
  want = model_config.vision.image_size
  if isinstance(model_config.vision, ViTConfig) and size and size != want:
    raise ConfigError(f"data.{name}.{key}: {size} px images, but the vision tower "
                      f"(model.vision.image_size) takes {want} px; set "
                      f"--config.data.{name}.{key}={want}")


def check_tokens(name: str, model_config, specials) -> None:
  """The tokenizer a dataset is read with (`specials`: its tokenizer.SpecialTokens) against
  the model: every id it can produce inside the LM's vocabulary, and the same `<image>`
  and `<|endofchunk|>` ids (else the model trains on NaN or on the wrong token)."""
  vocab = model_config.lm.vocab_size
  if specials.vocab_size > vocab:
    raise ConfigError(
        f"data.{name}: its tokenizer has {specials.vocab_size} tokens (ids up to "
        f"{specials.vocab_size - 1}), but model.lm.vocab_size is {vocab}; set "
        f"--config.model.lm.vocab_size={specials.vocab_size} or more (a new model), or "
        "prepare the data with the model's own tokenizer (prepare --tokenizer)")
  for token, field, theirs in (("<image>", "media_token_id", specials.media_token_id),
                               ("<|endofchunk|>", "eoc_token_id", specials.eoc_token_id)):
    ours = getattr(model_config, field)
    if ours != theirs:
      raise ConfigError(
          f"data.{name}: its tokenizer's {token} id is {theirs}, but model.{field} is "
          f"{ours}; set --config.model.{field}={theirs} (and model.trainable_token_ids), "
          "or prepare the data with the model's own tokenizer (prepare --tokenizer)")


def build(name: str, cfg, *, seed: int, process_index: int = 0, process_count: int = 1,
          model_config=None):
  """`model_config` (a FlamingoConfig): the vocabulary and image size of `random` batches;
  when given, the source is checked against it (`check_image_size`, `check_tokens`)."""
  from flamingo_jax.data import loader, prepared, tfds_source
  cfg = _checked(name, cfg)
  source = cfg["source"]
  for key, what in _REQUIRED.get(source, {}).items():
    if not cfg.get(key):
      raise ConfigError(f"data.{name}.{key}: not set; give {what}, e.g. "
                        f"--config.data.{name}.{key}=...")
  if model_config is not None:
    check_image_size(name, cfg, model_config)
    if source in ("prepared", "tfds"):  # called with the tokenizer, before any record is read
      cfg["check_tokens"] = functools.partial(check_tokens, name, model_config)
  options = dict(seed=int(cfg.pop("seed", seed)), process_index=process_index,
                 process_count=process_count, num_threads=int(cfg.pop("num_threads", 0)),
                 num_workers=int(cfg.pop("num_workers", 0)))
  batch_size = int(cfg.pop("batch_size"))
  for k in ("source", "weight"):
    cfg.pop(k, None)
  if source == "synthetic":
    task = synthetic.TaskConfig(**dict(cfg.get("task", {})))
    return synthetic.batch_iterator(batch_size, task=task, **options)
  if source == "random":
    if model_config is None:
      raise ValueError("the random source needs the model config (sources.build(model_config=...))")
    try:
      sizes = random_batches.check(name, cfg, model_config)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    return random_batches.batch_iterator(batch_size, model_config, **sizes, **options)
  try:
    if source == "prepared":
      return prepared.build_iterator(str(cfg.pop("path")), batch_size, **cfg, **options)
    return tfds_source.build_iterator(str(cfg.pop("name")), batch_size, **cfg, **options)
  except (prepared.PreparedDataError, tfds_source.TfdsSourceError,
          loader.NoReadableRecord) as e:
    raise ConfigError(f"data.{name}: {e}") from e


# The batch layout of each prepared kind: (media slots, frames per medium), seq_len default.
def _recorded_kind(path) -> str:
  """The kind a prepared dataset's metadata records ('' when the path holds none)."""
  from flamingo_jax.data import prepared
  if not path:
    return ""
  try:
    return prepared.PreparedDataset(path).kind or ""
  except (OSError, ValueError):  # no dataset there: the caller names the field to set
    return ""


def _prepared_layout(kind: str, o: dict) -> tuple[int, int, int]:
  from flamingo_jax.data import interleaved
  if kind == "mmc4":
    c = interleaved.InterleavedConfig(seq_len=o["seq_len"] or 256, max_images=o["max_images"],
                                      rules=o["rules"])
    return c.max_images, 1, c.seq_len
  if kind == "video":
    return 1, int(o["num_frames"]), o["seq_len"] or 32
  return 1, 1, o["seq_len"] or 32  # pairs, webdataset, tfds


_PREPARED_KINDS = ("mmc4", "pairs", "webdataset", "video")


def config_batch_shapes(config, model_config) -> dict:
  """`batch_shapes` of every dataset of a train config: dataset → key → (shape, dtype)."""
  return {name: batch_shapes(name, d, model_config) for name, d in config.data.items()}


def batch_shapes(name: str, cfg, model_config) -> dict:
  """Key → (shape, dtype) of dataset `name`'s global batch, from its config alone."""
  from flamingo_jax.data import loader, prepared
  cfg = _checked(name, cfg)
  if model_config is not None:
    check_image_size(name, cfg, model_config)
  source, batch = cfg["source"], int(cfg["batch_size"])
  if source == "synthetic":  # one episode: its shapes follow from the task alone
    task = synthetic.TaskConfig(**dict(cfg.get("task", {})))
    one = synthetic.batch_iterator(1, task=task).example_at(0)
    return {k: ((batch,) + v.shape, v.dtype) for k, v in one.items()}
  if source == "random":
    try:
      sizes = random_batches.check(name, cfg, model_config)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    return {k: ((batch,) + s, d) for k, (s, d) in random_batches.shapes(model_config, **sizes).items()}
  kind = cfg.get("kind") or ("tfds" if source == "tfds" else _recorded_kind(cfg.get("path")))
  if kind not in _PREPARED_KINDS + ("tfds",):
    raise ConfigError(f"data.{name}.kind: {kind!r}; the batch shapes of a prepared dataset "
                      f"follow from its kind: set one of {list(_PREPARED_KINDS)} (or use "
                      "source='random' with the same shapes)")
  o = {k: cfg.get(k, v) for k, v in prepared.PROCESSING_DEFAULTS.items()}
  slots, frames, seq = _prepared_layout(kind, o)
  size = int(o["image_size"])
  text = lambda dtype: ((batch, seq), dtype)
  return dict(images=((batch, slots, frames, size, size, 3), np.float32),
              media_mask=((batch, slots), np.bool_), input_ids=text(np.int32),
              attention_mask=text(np.int32), media_index=text(np.int32),
              targets=text(np.int32), loss_mask=text(np.float32),
              skipped=((batch, len(loader.SKIP_REASONS)), np.int32))
