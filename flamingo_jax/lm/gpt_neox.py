"""GPT-NeoX decoder layer (HF `GPTNeoXForCausalLM`: Pythia, RedPajama-INCITE): pre-LayerNorm
with bias, partial rotary, biases on every projection, GELU MLP, and the parallel residual
x + attn(ln1(x)) + mlp(ln2(x)) (sequential when `parallel_residual=False`)."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.config import LMConfig
from flamingo_jax.layers.attention import SelfAttentionInputs
from flamingo_jax.layers.mlp import MLP
from flamingo_jax.layers.norms import LayerNorm
from flamingo_jax.lm import self_attention


class Layer(nn.Module):
  config: LMConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, attn: SelfAttentionInputs) -> jax.Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_norm = LayerNorm(eps=c.norm_eps, use_bias=c.use_bias, name="attn_norm", **kw)
    mlp_norm = LayerNorm(eps=c.norm_eps, use_bias=c.use_bias, name="mlp_norm", **kw)
    mlp = MLP(c.mlp_dim, c.activation, use_bias=c.use_bias, name="mlp", **kw)
    a = self_attention(c, attn_norm(x), attn, **kw)
    if c.parallel_residual:
      return x + a + mlp(mlp_norm(x))
    x = x + a
    return x + mlp(mlp_norm(x))


def final_norm(config: LMConfig, **kw) -> nn.Module:
  return LayerNorm(eps=config.norm_eps, use_bias=config.use_bias, name="final_norm", **kw)
