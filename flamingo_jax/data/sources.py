"""Training data sources by name: `config.data.NAME.source` → a batch iterator.

An iterator yields this process's share of each global batch as numpy arrays in the
model's batch format, and has `get_state()` / `set_state()` (plain JSON) so that a
checkpoint can resume it exactly.
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
  raise ConfigError(f"data.{name}.source: unknown source {source!r}; available: 'synthetic'")
