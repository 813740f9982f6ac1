"""Perceiver Resampler: any number of visual features → a fixed set of visual tokens.

Each media item's features (all frames flattened together, after adding a learned
temporal embedding per frame) are read by `num_latents` learned queries:

    for each layer:  z = z + attn(q=LN(z), kv=concat(LN(x), LN(z)));  z = z + ffw(z)
    out = LN(z)

Keys and values include the latents themselves (paper §2.1 / OpenFlamingo). There are no
spatial position encodings, so the output shape does not depend on image resolution or
frame count. The layers are `nn.scan`ned (params `layers/...`, leading axis = layer), so
the compiled program holds one layer's code whatever the depth.
When the vision width differs from the resampler's (`dim`) a linear input
projection comes first. Temporal embeddings learned on `max_frames` frames are linearly interpolated
when a video has more frames (paper: 8 frames in training, 30 at inference).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.config import ResamplerConfig
from flamingo_jax.layers.attention import Attention
from flamingo_jax.layers.linear import Dense
from flamingo_jax.layers.mlp import MLP
from flamingo_jax.layers.norms import LayerNorm
from flamingo_jax.layers.scan import scan


def temporal_embeddings(table: jax.Array, num_frames: int) -> jax.Array:
  """The first `num_frames` rows of `table` [max_frames, D], or all of it linearly
  interpolated to `num_frames` rows when the video is longer than the table."""
  if num_frames <= table.shape[0]:
    return table[:num_frames]
  return jax.image.resize(table, (num_frames, table.shape[1]), method="linear")


class ResamplerLayer(nn.Module):
  config: ResamplerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, latents: jax.Array, media: jax.Array) -> tuple[jax.Array, None]:
    """latents [N, L, D] (the scan's carry), media [N, S, D] → (latents [N, L, D], None)."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = LayerNorm(eps=c.ln_eps, name="media_norm", **kw)(media)
    z = LayerNorm(eps=c.ln_eps, name="latents_norm", **kw)(latents)
    context = jnp.concatenate([x, z], axis=1)
    latents = latents + Attention(c.num_heads, c.head_dim, name="attn", **kw)(z, context)
    h = LayerNorm(eps=c.ln_eps, name="ff_norm", **kw)(latents)
    latents = latents + MLP(c.ff_mult * latents.shape[-1], c.activation, name="ff", **kw)(h)
    # The carry keeps the batch-sharded layout across layers, as the LM's layers do.
    return nn.with_logical_constraint(latents, ("act_batch", "act_len", "act_embed")), None


class PerceiverResampler(nn.Module):
  config: ResamplerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    """features [B, M, F, V, D] (media items × frames × visual tokens) → [B, M, L, D]."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, m, f, v, d = features.shape
    if c.dim and c.dim != d:
      features = Dense(c.dim, ("embed", "embed_out"), name="input_proj", **kw)(features)
      d = c.dim
    if c.max_frames:
      table = self.param("temporal_embedding",
                         nn.with_logical_partitioning(nn.initializers.normal(1.0), ("frames", "embed")),
                         (c.max_frames, d), self.param_dtype)
      features = features + temporal_embeddings(table, f)[:, None, :].astype(features.dtype)
    x = features.reshape(b * m, f * v, d).astype(self.dtype)
    latents = self.param("latents",
                         nn.with_logical_partitioning(nn.initializers.normal(1.0), ("latents", "embed")),
                         (c.num_latents, d), self.param_dtype)
    z = jnp.broadcast_to(latents.astype(self.dtype), (b * m, c.num_latents, d))
    x, z = (nn.with_logical_constraint(a, ("act_batch", "act_len", "act_embed")) for a in (x, z))
    # Rematerialised: a scan saves every residual of its body stacked over layers (float32
    # norms of the media included); recomputing the small layer in the backward costs a
    # resampler forward and keeps only each layer's latents.
    layer = nn.remat(ResamplerLayer, prevent_cse=False)
    layers = scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                  in_axes=nn.broadcast, length=c.depth, metadata_params={nn.PARTITION_NAME: "layers"})
    z, _ = layers(c, name="layers", **kw)(z, x)
    z = LayerNorm(eps=c.ln_eps, name="norm", **kw)(z)
    return z.reshape(b, m, c.num_latents, d)
