"""Flamingo in JAX / Flax linen.

`load_openflamingo` (OpenFlamingo weights → model, params, tokenizer) and `load_converted`
are imported on first use, so `import flamingo_jax` stays light.
"""

_LAZY = {"load_openflamingo": "flamingo_jax.convert.openflamingo",
         "load_converted": "flamingo_jax.convert.openflamingo"}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'flamingo_jax' has no attribute {name!r}")


__all__ = list(_LAZY)
