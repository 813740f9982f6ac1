"""Splitting parameters into the trainable subtree and the frozen rest.

The update step differentiates only the trainable subtree and closes over the frozen one,
so XLA builds no weight-gradient matmul for a frozen layer and the optimizer holds no
state for a frozen leaf. Frozen weights are kept in a compute dtype (bf16 by default,
as in the paper); trainable ones in float32.
"""
from typing import Sequence

import flax.traverse_util as tu
import jax
import jax.numpy as jnp

from flamingo_jax import trainable as trainable_rule


def split(params: dict, patterns: Sequence[str]) -> tuple[dict, dict]:
  """(trainable, frozen): two nested dicts that together hold every leaf of `params`."""
  flat = tu.flatten_dict(params, sep="/")
  compiled = trainable_rule.compile_patterns(patterns)
  trains = {k: v for k, v in flat.items() if trainable_rule.matches(compiled, k)}
  frozen = {k: v for k, v in flat.items() if k not in trains}
  return tu.unflatten_dict(trains, sep="/"), tu.unflatten_dict(frozen, sep="/")


def merge(trainable: dict, frozen: dict) -> dict:
  """The full parameter tree again."""
  flat = tu.flatten_dict(frozen, sep="/")
  flat.update(tu.flatten_dict(trainable, sep="/"))
  return tu.unflatten_dict(flat, sep="/")


def cast(tree, dtype):
  """Floating leaves to `dtype` (integer leaves, if any, untouched)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
