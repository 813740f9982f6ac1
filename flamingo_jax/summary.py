"""Parameter counts of a config, per component, without allocating a single weight.

  python -m flamingo_jax.summary --config configs/flamingo_9b.py [--json]

Shapes come from `jax.eval_shape` of the model's init, so the 80B config is counted on a
laptop. Trainable versus frozen follows the config's `trainable` regexes.
"""
import json

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from flamingo_jax import trainable
from flamingo_jax.config import FlamingoConfig
from flamingo_jax.model import Flamingo

COMPONENTS = ("vision", "resampler", "xattn", "lm", "embeddings")


def component(path: str) -> str:
  """Which part of Flamingo a '/'-joined parameter path belongs to."""
  top = path.split("/")[0]
  if top in ("vision", "resampler"):
    return top
  if "/xattn/" in path:
    return "xattn"
  if path.startswith(("lm/embed/", "lm/lm_head/", "lm/new_tokens/")):
    return "embeddings"
  return "lm"


def abstract_params(config: FlamingoConfig):
  """Parameter shapes of the whole model (a tree of ShapeDtypeStructs)."""
  size = config.vision.image_size
  images = jax.ShapeDtypeStruct((1, 1, 1, size, size, 3), jnp.float32)
  input_ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  media_index = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  model = Flamingo(config)
  variables = jax.eval_shape(
      lambda ids, img, mi: model.init(jax.random.key(0), img, ids, media_index=mi),
      input_ids, images, media_index)
  return variables["params"]


def count(config: FlamingoConfig, trainable_patterns=trainable.DEFAULT_TRAINABLE) -> dict:
  """{'total', 'trainable', 'frozen', 'components': {name: {'total', 'trainable', 'frozen'}}}."""
  params = abstract_params(config)
  mask = trainable.trainable_mask(params, trainable_patterns)
  parts = {name: {"total": 0, "trainable": 0, "frozen": 0} for name in COMPONENTS}
  leaves = jax.tree_util.tree_leaves_with_path(params)
  for (path, leaf), trains in zip(leaves, jax.tree.leaves(mask)):
    n = int(np.prod(leaf.shape))
    part = parts[component(trainable.path_str(path))]
    part["total"] += n
    part["trainable" if trains else "frozen"] += n
  totals = {k: sum(p[k] for p in parts.values()) for k in ("total", "trainable", "frozen")}
  return {**totals, "components": parts}


def format_table(counts: dict) -> str:
  rows = [f"{'component':<12}{'total':>16}{'trainable':>16}{'frozen':>16}"]
  for name, c in list(counts["components"].items()) + [("all", counts)]:
    rows.append(f"{name:<12}{c['total']:>16,}{c['trainable']:>16,}{c['frozen']:>16,}")
  return "\n".join(rows)


def main(argv):
  del argv
  cfg = flags.FLAGS.config
  counts = count(FlamingoConfig.from_dict(cfg.model), tuple(cfg.trainable))
  print(json.dumps(counts) if flags.FLAGS.json else format_table(counts))


if __name__ == "__main__":  # flags only when run as a program: the module is also a library
  config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).")
  flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
  flags.mark_flag_as_required("config")
  app.run(main)
