"""`nn.scan` over repeated layers, with a switch to unroll every scan.

Scanning keeps compile time flat in depth. XLA's cost model counts a loop body once,
whatever its trip count, so FLOP accounting (train/flops.py) lowers the model inside
`unrolled()`: the same parameters and numbers, every layer visible to the cost model.
"""
import contextlib
import contextvars

import flax.linen as nn
import jax
import numpy as np

_UNROLL = contextvars.ContextVar("unroll_scans", default=False)


def scan(target, *, length: int, unroll: bool = False, **kwargs):
  """`nn.scan(target, length=length, **kwargs)`, fully unrolled when `unroll` or inside
  `unrolled()` (the params stay stacked either way)."""
  return nn.scan(target, length=length, unroll=length if unroll or _UNROLL.get() else 1, **kwargs)


def stack_trees(trees: list) -> dict:
  """Per-layer param trees (numpy) → the scan's layout: each leaf stacked on a leading
  layer axis (what weight conversion hands to a `scan`ned module)."""
  return jax.tree.map(lambda *xs: np.stack(xs), *trees)


@contextlib.contextmanager
def unrolled(enabled: bool = True):
  """Every `scan` traced inside unrolls (with `enabled`; else a no-op: a config's switch)."""
  token = _UNROLL.set(True) if enabled else None
  try:
    yield
  finally:
    if token is not None:
      _UNROLL.reset(token)
