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
from flamingo_jax.layers.attention import SelfAttentionInputs
from flamingo_jax.layers.mlp import MLP
from flamingo_jax.layers.norms import LayerNorm
from flamingo_jax.lm import self_attention


def alibi_slopes(num_heads: int, bias_max: float) -> np.ndarray:
  """Per-head ALiBi slopes as MPT computes them: 2^-(i * bias_max / n) for the next power of
  two n >= num_heads; when num_heads is not a power of two, the odd-indexed slopes first,
  then the even-indexed ones, cut to num_heads."""
  n = 2 ** math.ceil(math.log2(num_heads))
  slopes = 1.0 / 2.0 ** (np.arange(1, n + 1, dtype=np.float32) * (bias_max / n))
  if n != num_heads:
    slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
  return slopes.astype(np.float32)


def attention_bias(config: LMConfig, attn: SelfAttentionInputs) -> jax.Array:
  """ALiBi, shared by every layer."""
  return alibi_bias(attn.key_positions, attn.positions, config.num_heads, config.alibi_bias_max)


def alibi_bias(key_positions: jax.Array, query_positions: jax.Array, num_heads: int,
               bias_max: float) -> jax.Array:
  """Additive bias [B, H, 1, S] = slope_h * (key position - the row's last query position).

  ALiBi is slope * (key - query); each query row differs from the bias here by a constant,
  which the softmax ignores, so one [B, H, 1, S] row serves every query (never a
  [B, H, T, S] tensor). HF uses key indices, not positions: again a per-row constant for
  left-padded rows. Subtracting the last query position keeps the values near the query
  small, so float32 loses nothing at long contexts.
  """
  slopes = jnp.asarray(alibi_slopes(num_heads, bias_max))
  last = jnp.max(query_positions, axis=-1, keepdims=True)
  rel = (key_positions - last).astype(jnp.float32)  # [B, S]
  return slopes[None, :, None, None] * rel[:, None, None, :]


class Layer(nn.Module):
  config: LMConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, attn: SelfAttentionInputs) -> jax.Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = LayerNorm(eps=c.norm_eps, use_bias=c.use_bias, name="attn_norm", **kw)(x)
    x = x + self_attention(c, h, attn, **kw)
    h = LayerNorm(eps=c.norm_eps, use_bias=c.use_bias, name="mlp_norm", **kw)(x)
    return x + MLP(c.mlp_dim, c.activation, use_bias=c.use_bias, name="mlp", **kw)(h)


def final_norm(config: LMConfig, **kw) -> nn.Module:
  return LayerNorm(eps=config.norm_eps, use_bias=config.use_bias, name="final_norm", **kw)
