"""Multi-head attention shared by every part of the model.

Self-attention (LMs, ViT), the resampler's latents-over-media attention and the gated
cross-attention all use `Attention`; what differs is passed in: the context, a boolean
mask, an additive bias (ALiBi), rotary positions, grouped KV heads, MosaicML's QK norm.

Decoding keeps keys and values in Flax collections, stored [B, K, S, D] (batch, KV
heads, slots, head dim: the layout the attention matmuls read, so no step transposes them):
  - `"cache"`, self-attention: the keys / values of the S slots already decoded, read-only
    inside the model. The call's T tokens attend to those slots and to each other (the
    mask spans S + T keys), and their own keys / values go out through `"cache_update"`
    (when that collection is mutable); the caller writes them into the cache, in place,
    once per step (decoding/state.py), so no layer copies the cache.
  - `"media_cache"`, cross-attention with `context_cache=True`: the context's keys / values
    (the visual tokens) are computed once, when `context` is given and the collection is
    mutable, and read back when `context` is None.
"""
CACHE, CACHE_UPDATE, MEDIA_CACHE = "cache", "cache_update", "media_cache"
_NAMES = ("cached_key", "cached_value")  # the leaves of each collection, per layer
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from flamingo_jax.layers import rotary
from flamingo_jax.layers.linear import Dense, dense_together
from flamingo_jax.layers.norms import LayerNorm

_MASKED = -1e30  # finite, so a fully masked row gives a uniform softmax, never NaN


@flax.struct.dataclass
class SelfAttentionInputs:
  """How the T tokens of one LM call see each other (and, decoding, the KV cache).

  mask [B, T, S + T]: query t may attend key s, where the keys are the S slots of the KV
  cache (S = 0 without one), then the T tokens themselves. positions [B, T]: the queries'
  position ids (rotary). key_positions [B, S + T]: the keys' position ids (ALiBi).
  cache_rows [B, S]: the cache row that holds each slot of this row (beam search: beams
  share the slots of their common past, so following a beam moves indices, not the
  cache); None: the row itself. bias [B, H, 1, S + T]: an additive bias on every layer's
  logits (the LM family's `attention_bias`, ALiBi), built once per LM call; None: none.
  """
  mask: jax.Array
  positions: jax.Array
  key_positions: jax.Array
  cache_rows: jax.Array | None = None
  bias: jax.Array | None = None

  @classmethod
  def causal(cls, attention_mask: jax.Array, positions: jax.Array,
             segments: jax.Array | None = None) -> "SelfAttentionInputs":
    """T tokens [B, T] with no cache: causal, padding keys (mask 0) hidden; with
    `segments` [B, T] (packed rows), a token sees only its own segment's."""
    t = attention_mask.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & attention_mask.astype(bool)[:, None, :]
    if segments is not None:
      mask &= segments[:, :, None] == segments[:, None, :]
    return cls(mask=mask, positions=positions, key_positions=positions)


def dot_product_attention(q: jax.Array, keys_values: list[tuple[jax.Array, jax.Array]], *,
                          scale: float, mask: jax.Array | None = None,
                          bias: jax.Array | None = None,
                          zero_empty_rows: bool = False) -> jax.Array:
  """softmax(q·k * scale + bias, masked) · v over the keys of every segment, with grouped
  KV heads.

  q [B, T, H, D]; keys_values: segments (k, v), each [B, K, S_i, D] with H % K == 0, whose
  keys are concatenated (a cache and the new tokens, read where they lie, never copied
  into one array); mask [B, T, ΣS_i] (True = attend); bias [B or 1, H, T or 1, ΣS_i]
  (added without broadcasting it to [B, H, T, S] first). Logits and softmax run in
  float32. With `zero_empty_rows`, a query whose mask row is all False gets exactly zero.
  """
  b, t, h, d = q.shape
  kv_heads = keys_values[0][0].shape[1]
  groups = h // kv_heads
  q = q.reshape(b, t, kv_heads, groups, d)
  logits = [jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
            for k, _ in keys_values]
  logits = (logits[0] if len(logits) == 1 else jnp.concatenate(logits, axis=-1)) * scale
  if bias is not None:
    bias = bias.reshape(bias.shape[0], kv_heads, groups, *bias.shape[-2:])
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask[:, None, None], logits, _MASKED)
  weights = jax.nn.softmax(logits, axis=-1)
  if zero_empty_rows and mask is not None:
    weights = jnp.where(mask.any(axis=-1)[:, None, None, :, None], weights, 0.0)
  out, start = 0, 0
  for _, v in keys_values:
    w = weights[..., start:start + v.shape[2]]
    out = out + jnp.einsum("bkgts,bksd->btkgd", w.astype(v.dtype), v)
    start += v.shape[2]
  return out.reshape(b, t, h, d)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                    mask: jax.Array | None, implementation: str) -> jax.Array:
  """`jax.nn.dot_product_attention`: with `implementation` 'cudnn', cuDNN's fused (flash)
  kernel on GPU; 'xla', the same call lowered by XLA on any backend. One key segment,
  k, v [B, K, S, D]; the other arguments as `dot_product_attention`'s."""
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # its layout: [B, S, K, D]
  return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None],
                                      scale=scale, implementation=implementation)


class Attention(nn.Module):
  """Projections `query`, `key`, `value` ([in, heads*head_dim]) and `out`.

  `context` defaults to the input (self-attention). `rope_dim` > 0 rotates the first
  `rope_dim` channels of q and k at `positions`. `qk_norm`: MosaicML's QK LayerNorm
  (`attn_qk_ln` / `qk_ln`) over the whole projected q and k, before the head split
  (params `q_norm`, `k_norm`). See the module docstring for the caches.
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
  kv_cache: bool = False  # an LM's self-attention: uses `"cache"` / `"cache_update"`
  context_cache: bool = False
  impl: str = "einsum"  # or fused_attention's 'cudnn' / 'xla' (used where it applies)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
               mask: jax.Array | None = None, bias: jax.Array | None = None,
               positions: jax.Array | None = None,
               cache_rows: jax.Array | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # q, k, v of a self-attention without grouped KV heads in one matmul (the frozen LMs'
    # and vision towers'), else one each.
    qkv = context is None and not self.context_cache and self._kv_heads == self.num_heads
    q, *kv = self._project(x, ("query", "key", "value") if qkv else ("query",))
    if self.context_cache:
      keys_values = [self._context_keys_values(context)]
    else:
      k, v = kv or self._keys_values(x if context is None else context)
      if self.rope_dim:
        rope = dict(rotary_dim=self.rope_dim, theta=self.rope_theta, scaling=self.rope_scaling)
        q = rotary.apply_rope(q, positions, **rope)
        k = rotary.apply_rope(k, positions, **rope)
      k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, S, D]
      keys_values = self._with_cache(k, v, cache_rows) if self.kv_cache else [(k, v)]
    scale = self.head_dim ** -0.5
    if self.impl != "einsum" and bias is None and len(keys_values) == 1:  # no ALiBi, no cache
      out = fused_attention(q, *keys_values[0], scale=scale, mask=mask, implementation=self.impl)
    else:
      out = dot_product_attention(q, keys_values, scale=scale, mask=mask, bias=bias,
                                  zero_empty_rows=self.zero_empty_rows)
    out = out.reshape(out.shape[:-2] + (self.num_heads * self.head_dim,))
    return Dense(self.out_features or x.shape[-1], ("heads", "embed"), use_bias=self.out_bias,
                 name="out", **kw)(out)

  @property
  def _kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  def _project(self, x, names: tuple[str, ...]) -> list[jax.Array]:
    """`x` through the projections `names` (of one width) in one matmul
    (linear.dense_together), QK-normed, each split into heads [..., heads, head_dim]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    heads = lambda name: self.num_heads if name == "query" else self._kv_heads
    ys = dense_together(x, [Dense(heads(n) * self.head_dim, ("embed", "heads" if n == "query" else "kv_heads"),
                                  use_bias=self.qkv_bias, name=n, **kw) for n in names])
    out = []
    for name, y in zip(names, ys):
      if self.qk_norm and name != "value":
        y = LayerNorm(eps=self.qk_norm_eps, use_bias=self.qkv_bias, name=f"{name[0]}_norm", **kw)(y)
      out.append(y.reshape(y.shape[:-1] + (heads(name), self.head_dim)))
    return out

  def _keys_values(self, context: jax.Array) -> list[jax.Array]:
    return [self._project(context, (name,))[0] for name in ("key", "value")]

  def _context_keys_values(self, context: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    if context is None:  # decoding after the prompt: the visual tokens' K/V from the cache
      return tuple(self.get_variable(MEDIA_CACHE, name) for name in _NAMES)
    k, v = (jnp.swapaxes(y, 1, 2) for y in self._keys_values(context))
    if self.is_mutable_collection(MEDIA_CACHE) and not self.is_initializing():
      for name, y in zip(_NAMES, (k, v)):
        self.put_variable(MEDIA_CACHE, name, y)
    return k, v

  def _with_cache(self, k, v, cache_rows) -> list[tuple[jax.Array, jax.Array]]:
    """Self-attention keys: the cached slots (when decoding) first, then the call's own
    tokens, whose k, v [B, K, T, D] go to `"cache_update"` when it is mutable."""
    if self.is_mutable_collection(CACHE_UPDATE) and not self.is_initializing():
      for name, y in zip(_NAMES, (k, v)):
        self.put_variable(CACHE_UPDATE, name, y)
    if not self.has_variable(CACHE, _NAMES[0]):
      return [(k, v)]
    cached = [self.get_variable(CACHE, name) for name in _NAMES]
    if cache_rows is not None:  # [B, K, S, D]: slot s of row b from row cache_rows[b, s]
      heads, slots = cached[0].shape[1:3]
      index = (cache_rows[:, None, :], jnp.arange(heads)[None, :, None],
               jnp.arange(slots)[None, None, :])
      cached = [c[index] for c in cached]
    return [tuple(cached), (k, v)]
