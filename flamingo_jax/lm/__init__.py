"""Frozen decoder-only LMs. Each family module (llama, mpt, gpt_neox) exports `Layer`
(one decoder layer: `(x, *, mask, positions) -> x`) and `final_norm(config, **kw)`."""
import importlib


def family(name: str):
  return importlib.import_module(f"flamingo_jax.lm.{name}")
