"""`nn.scan` over repeated layers, with a switch to unroll every scan.

Scanning keeps compile time flat in depth. XLA's cost model counts a loop body once,
whatever its trip count, so FLOP accounting (train/flops.py) lowers the model inside
`unrolled()`: the same parameters and numbers, every layer visible to the cost model.
"""
import contextlib
import contextvars

import flax.linen as nn

_UNROLL = contextvars.ContextVar("unroll_scans", default=False)


def scan(target, *, length: int, **kwargs):
  """`nn.scan(target, length=length, **kwargs)`, fully unrolled inside `unrolled()`."""
  return nn.scan(target, length=length, unroll=length if _UNROLL.get() else 1, **kwargs)


@contextlib.contextmanager
def unrolled():
  token = _UNROLL.set(True)
  try:
    yield
  finally:
    _UNROLL.reset(token)
