"""Training data sources by name: `config.data.NAME.source` → a batch iterator.

An iterator yields this process's share of each global batch as numpy arrays in the
model's batch format, and has `get_state()` / `set_state()` (plain JSON) so that a
checkpoint can resume it exactly.

Sources:
  synthetic  the on-the-fly few-shot task of synthetic.py (`task`: its TaskConfig fields).
  prepared   a dataset written by `python -m flamingo_jax.data.prepare` (prepared.py):
             `path` (the output dir or the dataset dir), optional `kind` (checked against
             the dataset), `tokenizer` (default: the one recorded at preparation), `seed`,
             `max_attempts`, `num_threads` (a thread pool per batch; same batches), and the
             processing options of prepared.PROCESSING_DEFAULTS
             (image_size, image_mode, augment, seq_len, rules, max_images, p_next,
             single_image_drop_p, prepend_space_p, add_eos, num_frames). Its iterator's
             `skipped_counts()` gives the records skipped at read time, by reason.
"""
from flamingo_jax.config import ConfigError
from flamingo_jax.data import synthetic


def build(name: str, cfg, *, seed: int, process_index: int = 0, process_count: int = 1):
  source = cfg["source"]
  if source == "synthetic":
    task = synthetic.TaskConfig(**dict(cfg.get("task", {})))
    return synthetic.BatchIterator(int(cfg["batch_size"]), seed=int(cfg.get("seed", seed)),
                                   task=task, process_index=process_index,
                                   process_count=process_count)
  if source == "prepared":
    return _prepared(name, cfg, seed=seed, process_index=process_index,
                     process_count=process_count)
  raise ConfigError(f"data.{name}.source: unknown source {source!r}; available: 'synthetic', "
                    "'prepared'")


_PREPARED_KEYS = {"source", "batch_size", "weight", "path", "kind", "tokenizer", "seed",
                  "max_attempts", "num_threads"}


def _prepared(name, cfg, *, seed, process_index, process_count):
  from flamingo_jax.data import prepared
  cfg = dict(cfg)
  unknown = set(cfg) - _PREPARED_KEYS - set(prepared.PROCESSING_DEFAULTS)
  if unknown:
    raise ConfigError(f"data.{name}: unknown keys {sorted(unknown)} for source 'prepared'; "
                      f"known: {sorted(_PREPARED_KEYS | set(prepared.PROCESSING_DEFAULTS))}")
  if not cfg.get("path"):
    raise ConfigError(f"data.{name}.path: not set; give the --output dir of `python -m "
                      f"flamingo_jax.data.prepare`, e.g. --config.data.{name}.path=DIR")
  processing = {k: cfg[k] for k in prepared.PROCESSING_DEFAULTS if k in cfg}
  try:
    return prepared.build_iterator(
        str(cfg["path"]), int(cfg["batch_size"]), kind=cfg.get("kind"),
        tokenizer=cfg.get("tokenizer"), seed=int(cfg.get("seed", seed)),
        process_index=process_index, process_count=process_count,
        max_attempts=int(cfg.get("max_attempts", 32)),
        num_threads=int(cfg.get("num_threads", 0)), **processing)
  except prepared.PreparedDataError as e:
    raise ConfigError(f"data.{name}: {e}") from e
