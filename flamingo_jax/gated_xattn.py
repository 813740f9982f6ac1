"""GATED XATTN-DENSE: the trainable block inserted before frozen LM layers.

    x = x + tanh(attn_gate) * xattn(LN(x), media)      attention to visual tokens
    x = x + tanh(ff_gate)   * ffw(LN(x))               dense feed-forward

Both gates start at 0, so at initialisation the model is exactly the frozen LM. Each text
token attends only to the visual tokens of one media item, given by its media index
(-1: none). A token with no media gets exactly zero from the attention (its weights are
zeroed after the softmax) and, unless `ff_without_media` (OpenFlamingo's behaviour), from
the feed-forward too.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.config import XAttnConfig
from flamingo_jax.layers.attention import Attention
from flamingo_jax.layers.mlp import MLP
from flamingo_jax.layers.norms import LayerNorm


def media_attention_mask(media_index: jax.Array, num_media: int, tokens_per_media: int,
                         media_mask: jax.Array | None = None) -> jax.Array:
  """[B, T] media index → [B, T, num_media * tokens_per_media] boolean mask.

  Token t may see key s when s belongs to media item `media_index[t]` and that slot holds
  an image (`media_mask`, [B, M]).
  """
  key_media = jnp.repeat(jnp.arange(num_media), tokens_per_media)  # [S]
  mask = media_index[:, :, None] == key_media[None, None, :]
  if media_mask is not None:
    mask &= jnp.repeat(media_mask.astype(bool), tokens_per_media, axis=1)[:, None, :]
  return mask


class GatedCrossAttentionBlock(nn.Module):
  config: XAttnConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, media: jax.Array | None, *, mask: jax.Array | None,
               has_media: jax.Array) -> jax.Array:
    """x [B, T, D]; media [B, S, Dv] (all media items' tokens, flattened); mask [B, T, S]
    (None: no media); has_media [B, T] bool. Decoding, `media` is None after the prompt and
    the visual tokens' keys / values come from the cache (layers/attention.py)."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ())
    attn_gate = self.param("attn_gate", gate_init, (), self.param_dtype)
    ff_gate = self.param("ff_gate", gate_init, (), self.param_dtype)

    if mask is not None:
      h = LayerNorm(eps=c.ln_eps, name="attn_norm", **kw)(x)
      h = Attention(c.num_heads, c.head_dim, zero_empty_rows=True, context_cache=True,
                    name="attn", **kw)(h, media, mask=mask)
      x = x + jnp.tanh(attn_gate).astype(self.dtype) * h

    h = LayerNorm(eps=c.ln_eps, name="ff_norm", **kw)(x)
    h = MLP(c.ff_dim or c.ff_mult * x.shape[-1], c.activation, name="ff", **kw)(h)
    if not c.ff_without_media:
      h = jnp.where(has_media[..., None], h, 0)
    return x + jnp.tanh(ff_gate).astype(self.dtype) * h
