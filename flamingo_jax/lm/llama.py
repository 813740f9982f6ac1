"""LLaMA-family decoder layer (also Chinchilla-shaped configs): pre-RMSNorm, RoPE, GQA, SwiGLU."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.config import LMConfig
from flamingo_jax.layers.attention import SelfAttentionInputs
from flamingo_jax.layers.mlp import MLP
from flamingo_jax.layers.norms import RMSNorm
from flamingo_jax.lm import self_attention


class Layer(nn.Module):
  config: LMConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, attn: SelfAttentionInputs) -> jax.Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(c.norm_eps, name="attn_norm", **kw)(x)
    x = x + self_attention(c, h, attn, **kw)
    h = RMSNorm(c.norm_eps, name="mlp_norm", **kw)(x)
    return x + MLP(c.mlp_dim, c.activation, gated=True, use_bias=c.use_bias, name="mlp", **kw)(h)


def final_norm(config: LMConfig, **kw) -> nn.Module:
  return RMSNorm(config.norm_eps, name="final_norm", **kw)
