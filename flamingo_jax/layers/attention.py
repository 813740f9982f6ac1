"""Multi-head attention shared by every part of the model.

Self-attention (LMs, ViT), the resampler's latents-over-media attention and the gated
cross-attention all use `Attention`; what differs is passed in: the context, a boolean
mask, an additive bias (ALiBi), rotary positions, grouped KV heads, MosaicML's QK norm.

Decoding keeps keys and values in two Flax collections:
  - `"cache"`, self-attention with `cache_index` given: the call's T new keys / values are
    written at slots [cache_index, cache_index + T) of a fixed-size cache [B, S, K, D]
    (S = `mask.shape[-1]`), and the queries attend over all S slots as `mask` allows.
    Prefill (T = prompt length) and extend (T = 1) are the same code.
  - `"media_cache"`, cross-attention with `context_cache=True`: the context's keys / values
    (the visual tokens) are computed once, when `context` is given and the collection is
    mutable, and read back when `context` is None. A collection of their own, so the steps
    after the prompt read them without writing them back.
"""
CACHE, MEDIA_CACHE = "cache", "media_cache"
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from flamingo_jax.layers import rotary
from flamingo_jax.layers.linear import Dense
from flamingo_jax.layers.norms import LayerNorm

_MASKED = -1e30  # finite, so a fully masked row gives a uniform softmax, never NaN


@flax.struct.dataclass
class SelfAttentionInputs:
  """How the T tokens of one LM call see each other (and, decoding, the KV cache).

  mask [B, T, S]: query t may attend key slot s. positions [B, T]: the queries' position
  ids (rotary). key_positions [B, S]: the keys' position ids (ALiBi). cache_index: None
  for a plain forward (S = T, the keys are the tokens themselves), else the cache slot of
  the first of the T tokens.
  """
  mask: jax.Array
  positions: jax.Array
  key_positions: jax.Array
  cache_index: jax.Array | None = None

  @classmethod
  def causal(cls, attention_mask: jax.Array, positions: jax.Array) -> "SelfAttentionInputs":
    """A plain forward over [B, T] tokens: causal, padding keys (mask 0) hidden."""
    t = attention_mask.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & attention_mask.astype(bool)[:, None, :]
    return cls(mask=mask, positions=positions, key_positions=positions)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                          mask: jax.Array | None = None, bias: jax.Array | None = None,
                          zero_empty_rows: bool = False) -> jax.Array:
  """softmax(q·k * scale + bias, masked) · v, with grouped KV heads.

  q [B, T, H, D]; k, v [B, S, K, D] with H % K == 0; mask [B, T, S] (True = attend);
  bias [B or 1, H, T or 1, S] (added without broadcasting it to [B, H, T, S] first).
  Logits and softmax run in float32. With `zero_empty_rows`, a query whose mask row is
  all False gets exactly zero output.
  """
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  groups = h // kv_heads
  q = q.reshape(b, t, kv_heads, groups, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    bias = bias.reshape(bias.shape[0], kv_heads, groups, *bias.shape[-2:])
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
  `rope_dim` channels of q and k at `positions`. `qk_norm`: MosaicML's QK LayerNorm
  (`attn_qk_ln` / `qk_ln`) over the whole projected q and k, before the head split
  (params `q_norm`, `k_norm`). See the module docstring for the two caches.
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
  qk_norm: bool = False
  qk_norm_eps: float = 1e-5
  zero_empty_rows: bool = False
  context_cache: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
               mask: jax.Array | None = None, bias: jax.Array | None = None,
               positions: jax.Array | None = None,
               cache_index: jax.Array | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = self._heads(self._project(x, "query", self.num_heads), self.num_heads)
    if self.context_cache:
      k, v = self._context_keys_values(context)
    else:
      k, v = self._keys_values(x if context is None else context)
    if self.rope_dim:
      rope = dict(rotary_dim=self.rope_dim, theta=self.rope_theta, scaling=self.rope_scaling)
      q = rotary.apply_rope(q, positions, **rope)
      k = rotary.apply_rope(k, positions, **rope)
    if cache_index is not None:
      k, v = self._write_cache(k, v, cache_index, mask.shape[-1])
    out = dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, mask=mask, bias=bias,
                                zero_empty_rows=self.zero_empty_rows)
    out = out.reshape(out.shape[:-2] + (self.num_heads * self.head_dim,))
    return Dense(self.out_features or x.shape[-1], ("heads", "embed"), use_bias=self.out_bias,
                 name="out", **kw)(out)

  @property
  def _kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  def _project(self, x, name: str, heads: int) -> jax.Array:
    axes = ("embed", "heads" if name == "query" else "kv_heads")
    y = Dense(heads * self.head_dim, axes, use_bias=self.qkv_bias, name=name,
              dtype=self.dtype, param_dtype=self.param_dtype)(x)
    if self.qk_norm and name != "value":
      norm = "q_norm" if name == "query" else "k_norm"
      y = LayerNorm(eps=self.qk_norm_eps, use_bias=self.qkv_bias, name=norm, dtype=self.dtype,
                    param_dtype=self.param_dtype)(y)
    return y

  def _heads(self, y: jax.Array, heads: int) -> jax.Array:
    return y.reshape(y.shape[:-1] + (heads, self.head_dim))

  def _keys_values(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    return tuple(self._heads(self._project(context, name, self._kv_heads), self._kv_heads)
                 for name in ("key", "value"))

  def _context_keys_values(self, context: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    # Stored [B, K, S, D] like the self-attention cache (see `_write_cache`).
    if context is None:  # decoding after the prompt: the visual tokens' K/V from the cache
      return tuple(jnp.swapaxes(self.get_variable(MEDIA_CACHE, name), 1, 2)
                   for name in ("cached_key", "cached_value"))
    k, v = self._keys_values(context)
    if self.is_mutable_collection(MEDIA_CACHE) and not self.is_initializing():
      self.put_variable(MEDIA_CACHE, "cached_key", jnp.swapaxes(k, 1, 2))
      self.put_variable(MEDIA_CACHE, "cached_value", jnp.swapaxes(v, 1, 2))
    return k, v

  def _write_cache(self, k, v, index, size: int) -> tuple[jax.Array, jax.Array]:
    """Writes the new k, v [B, T, K, D] at slot `index` of the cache and returns all
    `size` slots as [B, size, K, D]. The cache is stored [B, K, size, D], the layout the
    attention matmuls read, so no step transposes it."""
    b, _, heads, d = k.shape
    cached = [self.variable(CACHE, name, jnp.zeros, (b, heads, size, d), self.dtype)
              for name in ("cached_key", "cached_value")]
    for var, new in zip(cached, (k, v)):
      var.value = jax.lax.dynamic_update_slice(
          var.value, jnp.swapaxes(new, 1, 2).astype(var.value.dtype), (0, 0, index, 0))
    return tuple(jnp.swapaxes(var.value, 1, 2) for var in cached)
