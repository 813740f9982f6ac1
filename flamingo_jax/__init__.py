"""Flamingo in JAX / Flax linen.

`load_openflamingo` (OpenFlamingo weights → model, params, tokenizer), `load_converted`,
`generate` and `score` are imported on first use, so `import flamingo_jax` stays light.
(`python -m flamingo_jax.generate` is the captioning command; as a function,
`flamingo_jax.generate` is `flamingo_jax.decoding.generate`.)
"""

_LAZY = {"load_openflamingo": "flamingo_jax.convert.openflamingo",
         "load_converted": "flamingo_jax.convert.openflamingo",
         "generate": "flamingo_jax.decoding",
         "score": "flamingo_jax.decoding"}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value
  raise AttributeError(f"module 'flamingo_jax' has no attribute {name!r}")


__all__ = list(_LAZY)
