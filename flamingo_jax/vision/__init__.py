"""Frozen vision encoders: images [N, H, W, C] (normalised, NHWC) → features [N, V, D].

`build(config)` picks the module from the config type: `ViTConfig` → CLIP-style ViT
(patch tokens), `NFNetConfig` → NFNet-F (flattened final grid). Both are deterministic
unless called with `deterministic=False`.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flamingo_jax.config import NFNetConfig, ViTConfig
from flamingo_jax.vision.nfnet import NFNet
from flamingo_jax.vision.vit import ViT


def build(config: ViTConfig | NFNetConfig, dtype: Any = jnp.float32,
          param_dtype: Any = jnp.float32, name: str | None = None) -> nn.Module:
  config.check()
  if isinstance(config, ViTConfig):
    return ViT(config, dtype=dtype, param_dtype=param_dtype, name=name)
  if isinstance(config, NFNetConfig):
    return NFNet(config, dtype=dtype, param_dtype=param_dtype, name=name)
  raise TypeError(f"vision config must be a ViTConfig or NFNetConfig, got {type(config).__name__}")
