"""Training data sources by name: `config.data.NAME.source` → a batch iterator.

Every source is an `example_at(position)` function batched by loader.BatchIterator:
this process's share of each global batch as numpy arrays in the model's batch format,
with `get_state()` / `set_state()` (plain JSON) so that a checkpoint resumes it exactly.
Loader options for every source: `num_threads`, `num_workers` (same batches for any
count).

Sources:
  synthetic  the on-the-fly few-shot task of synthetic.py (`task`: its TaskConfig fields).
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
"""
from flamingo_jax.config import ConfigError
from flamingo_jax.data import synthetic

_COMMON = {"source", "batch_size", "weight", "num_threads", "num_workers"}
_KEYS = {
    "synthetic": _COMMON | {"task", "seed"},
    "prepared": _COMMON | {"path", "kind", "tokenizer", "seed", "max_attempts"},
    "tfds": _COMMON | {"name", "split", "data_dir", "tokenizer", "image_key", "text_key",
                       "seed", "max_attempts"},
}
_REQUIRED = {
    "prepared": {"path": "the --output dir of `python -m flamingo_jax.data.prepare`"},
    "tfds": {"name": "the TFDS dataset name, e.g. coco_captions",
             "tokenizer": "a local HF tokenizer directory"},
}


def build(name: str, cfg, *, seed: int, process_index: int = 0, process_count: int = 1):
  from flamingo_jax.data import loader, prepared, tfds_source
  cfg = dict(cfg)
  source = cfg.get("source")
  if source not in _KEYS:
    raise ConfigError(f"data.{name}.source: unknown source {source!r}; available: "
                      f"{sorted(_KEYS)}")
  known = _KEYS[source] | (set(prepared.PROCESSING_DEFAULTS) if source != "synthetic" else set())
  unknown = set(cfg) - known
  if unknown:
    raise ConfigError(f"data.{name}: unknown keys {sorted(unknown)} for source {source!r}; "
                      f"known: {sorted(known)}")
  for key, what in _REQUIRED.get(source, {}).items():
    if not cfg.get(key):
      raise ConfigError(f"data.{name}.{key}: not set; give {what}, e.g. "
                        f"--config.data.{name}.{key}=...")
  options = dict(seed=int(cfg.pop("seed", seed)), process_index=process_index,
                 process_count=process_count, num_threads=int(cfg.pop("num_threads", 0)),
                 num_workers=int(cfg.pop("num_workers", 0)))
  batch_size = int(cfg.pop("batch_size"))
  for k in ("source", "weight"):
    cfg.pop(k, None)
  if source == "synthetic":
    task = synthetic.TaskConfig(**dict(cfg.get("task", {})))
    return synthetic.batch_iterator(batch_size, task=task, **options)
  try:
    if source == "prepared":
      return prepared.build_iterator(str(cfg.pop("path")), batch_size, **cfg, **options)
    return tfds_source.build_iterator(str(cfg.pop("name")), batch_size, **cfg, **options)
  except (prepared.PreparedDataError, tfds_source.TfdsSourceError,
          loader.NoReadableRecord) as e:
    raise ConfigError(f"data.{name}: {e}") from e
