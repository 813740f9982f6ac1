"""Which parameters train: regexes over '/'-joined parameter paths (big_vision style).

A parameter trains when its path fully matches any pattern in `config.trainable`; all
others are frozen. The summary counts with this rule and training partitions with it.
"""
import re
from typing import Sequence

import jax

# Flamingo's default: the resampler, the gated xattn blocks and the new tokens' embedding
# rows; the vision encoder and the LM frozen.
DEFAULT_TRAINABLE = ("resampler/.*", "lm/.*xattn/.*", "lm/new_tokens/.*")


def path_str(path) -> str:
  """A tree path → 'lm/groups/xattn/attn/query/kernel'."""
  parts = []
  for key in path:
    name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
    if name == "value" and type(key).__name__ == "GetAttrKey":  # a Partitioned box's .value
      continue
    parts.append(str(name))
  return "/".join(parts)


def trainable_mask(params, patterns: Sequence[str] = DEFAULT_TRAINABLE):
  """A tree of bools shaped like `params`: True where the parameter trains."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(p.fullmatch(path_str(path)) for p in compiled), params)
