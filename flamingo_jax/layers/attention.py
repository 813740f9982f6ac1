"""Multi-head attention shared by every part of the model.

Self-attention (LMs, ViT), the resampler's latents-over-media attention and the gated
cross-attention all use `Attention`; what differs is passed in: the context, a boolean
mask, an additive bias (ALiBi), rotary positions, grouped KV heads.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.layers import rotary
from flamingo_jax.layers.linear import Dense

_MASKED = -1e30  # finite, so a fully masked row gives a uniform softmax, never NaN


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                          mask: jax.Array | None = None, bias: jax.Array | None = None,
                          zero_empty_rows: bool = False) -> jax.Array:
  """softmax(q·k * scale + bias, masked) · v, with grouped KV heads.

  q [B, T, H, D]; k, v [B, S, K, D] with H % K == 0; mask [B, T, S] (True = attend);
  bias broadcastable to [B, H, T, S]. Logits and softmax run in float32. With
  `zero_empty_rows`, a query whose mask row is all False gets exactly zero output.
  """
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  groups = h // kv_heads
  q = q.reshape(b, t, kv_heads, groups, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    bias = jnp.broadcast_to(bias, (b, h) + logits.shape[-2:]).reshape(logits.shape)
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask[:, None, None], logits, _MASKED)
  weights = jax.nn.softmax(logits, axis=-1)
  if zero_empty_rows and mask is not None:
    weights = jnp.where(mask.any(axis=-1)[:, None, None, :, None], weights, 0.0)
  out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(v.dtype), v)
  return out.reshape(b, t, h, d)


class Attention(nn.Module):
  """Projections `query`, `key`, `value` ([in, heads*head_dim]) and `out`.

  `context` defaults to the input (self-attention). `rope_dim` > 0 rotates the first
  `rope_dim` channels of q and k at `positions`.
  """
  num_heads: int
  head_dim: int
  num_kv_heads: int | None = None
  qkv_bias: bool = False
  out_bias: bool = False
  out_features: int | None = None
  rope_dim: int = 0
  rope_theta: float = 10000.0
  rope_scaling: rotary.RopeScaling | None = None
  zero_empty_rows: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
               mask: jax.Array | None = None, bias: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    context = x if context is None else context
    kv_heads = self.num_kv_heads or self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = Dense(self.num_heads * self.head_dim, ("embed", "heads"), use_bias=self.qkv_bias,
              name="query", **kw)(x)
    k = Dense(kv_heads * self.head_dim, ("embed", "kv_heads"), use_bias=self.qkv_bias,
              name="key", **kw)(context)
    v = Dense(kv_heads * self.head_dim, ("embed", "kv_heads"), use_bias=self.qkv_bias,
              name="value", **kw)(context)
    q = q.reshape(q.shape[:-1] + (self.num_heads, self.head_dim))
    k = k.reshape(k.shape[:-1] + (kv_heads, self.head_dim))
    v = v.reshape(v.shape[:-1] + (kv_heads, self.head_dim))
    if self.rope_dim:
      rope = dict(rotary_dim=self.rope_dim, theta=self.rope_theta, scaling=self.rope_scaling)
      q = rotary.apply_rope(q, positions, **rope)
      k = rotary.apply_rope(k, positions, **rope)
    out = dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, mask=mask, bias=bias,
                                zero_empty_rows=self.zero_empty_rows)
    out = out.reshape(out.shape[:-2] + (self.num_heads * self.head_dim,))
    return Dense(self.out_features or x.shape[-1], ("heads", "embed"), use_bias=self.out_bias,
                 name="out", **kw)(out)
