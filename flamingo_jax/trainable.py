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


def compile_patterns(patterns: Sequence[str]) -> list[re.Pattern]:
  if isinstance(patterns, str):
    raise TypeError(f"trainable patterns must be a sequence of regexes, got the string {patterns!r}")
  return [re.compile(p) for p in patterns]


def matches(compiled: Sequence[re.Pattern], path: str) -> bool:
  return any(p.fullmatch(path) for p in compiled)


def tree_map_paths(fn, tree):
  """`jax.tree.map` whose `fn(path, leaf)` gets the '/'-joined path string."""
  return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(path_str(path), leaf), tree)


def trainable_mask(params, patterns: Sequence[str] = DEFAULT_TRAINABLE):
  """A tree of bools shaped like `params`: True where the parameter trains."""
  compiled = compile_patterns(patterns)
  return tree_map_paths(lambda path, _: matches(compiled, path), params)
