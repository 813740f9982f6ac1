"""MPT decoder layer (HF `MptForCausalLM`): bias-free pre-LayerNorm, ALiBi, GELU MLP, no
biases anywhere; the LM head is tied to the embedding. `qk_norm` adds MosaicML's QK
LayerNorm (MosaicGPT `attn_qk_ln`, MPT `attn_config.qk_ln`; used by mpt-1b-redpajama-200b)."""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.config import LMConfig
from flamingo_jax.layers.attention import Attention, dot_product_attention
from flamingo_jax.layers.linear import Dense
from flamingo_jax.layers.mlp import MLP
from flamingo_jax.layers.norms import LayerNorm


def alibi_slopes(num_heads: int, bias_max: float) -> np.ndarray:
  """Per-head ALiBi slopes as MPT computes them: 2^-(i * bias_max / n) for the next power of
  two n >= num_heads; when num_heads is not a power of two, the odd-indexed slopes first,
  then the even-indexed ones, cut to num_heads."""
  n = 2 ** math.ceil(math.log2(num_heads))
  slopes = 1.0 / 2.0 ** (np.arange(1, n + 1, dtype=np.float32) * (bias_max / n))
  if n != num_heads:
    slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
  return slopes.astype(np.float32)


def alibi_bias(positions: jax.Array, num_heads: int, bias_max: float) -> jax.Array:
  """[B, T] positions → additive bias [B, H, T, T] = slope_h * (pos_key - pos_query).

  HF adds slope * (key index - last index); each query row differs from this by a constant,
  which the softmax ignores, and position ids (rather than indices) keep the bias right
  for left-padded rows too.
  """
  slopes = jnp.asarray(alibi_slopes(num_heads, bias_max))
  pos = positions.astype(jnp.float32)
  rel = pos[:, None, None, :] - pos[:, None, :, None]  # [B, 1, T, S]
  return slopes[None, :, None, None] * rel


class QKNormAttention(nn.Module):
  """MosaicML's self-attention with `qk_ln`: LayerNorm over the whole projected q and over
  the whole k ([heads * head_dim], all heads together, before the head split), then
  scaled dot-product attention. Params as `Attention`'s plus `q_norm` and `k_norm`."""
  num_heads: int
  head_dim: int
  use_bias: bool = False
  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array, bias: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h, d = self.num_heads, self.head_dim
    q, k, v = (Dense(h * d, ("embed", "heads"), use_bias=self.use_bias, name=name, **kw)(x)
               for name in ("query", "key", "value"))
    q = LayerNorm(eps=self.eps, use_bias=self.use_bias, name="q_norm", **kw)(q)
    k = LayerNorm(eps=self.eps, use_bias=self.use_bias, name="k_norm", **kw)(k)
    split = lambda t: t.reshape(t.shape[:-1] + (h, d))
    out = dot_product_attention(split(q), split(k), split(v), scale=d ** -0.5, mask=mask, bias=bias)
    return Dense(x.shape[-1], ("heads", "embed"), use_bias=self.use_bias, name="out", **kw)(
        out.reshape(out.shape[:-2] + (h * d,)))


class Layer(nn.Module):
  config: LMConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array, positions: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    bias = alibi_bias(positions, c.num_heads, c.alibi_bias_max)
    h = LayerNorm(eps=c.norm_eps, use_bias=c.use_bias, name="attn_norm", **kw)(x)
    if c.qk_norm:
      attn = QKNormAttention(c.num_heads, c.dim_per_head, c.use_bias, c.norm_eps, name="attn", **kw)
    else:
      attn = Attention(c.num_heads, c.dim_per_head, c.kv_heads, qkv_bias=c.use_bias,
                       out_bias=c.use_bias, name="attn", **kw)
    x = x + attn(h, mask=mask, bias=bias)
    h = LayerNorm(eps=c.norm_eps, use_bias=c.use_bias, name="mlp_norm", **kw)(x)
    return x + MLP(c.mlp_dim, c.activation, use_bias=c.use_bias, name="mlp", **kw)(h)


def final_norm(config: LMConfig, **kw) -> nn.Module:
  return LayerNorm(eps=config.norm_eps, use_bias=config.use_bias, name="final_norm", **kw)
