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

One call can resample several groups of items of different token counts (train/step.py:
stills and 8-frame clips): every projection and feed-forward runs once over all groups'
rows (tokens flattened, each batch shard's rows side by side), only the softmax once per
group. The program then holds one copy of the resampler's matmuls, not one per group.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.config import ResamplerConfig
from flamingo_jax.layers.attention import dot_product_attention
from flamingo_jax.layers.linear import Dense
from flamingo_jax.layers.mlp import MLP
from flamingo_jax.layers.norms import LayerNorm
from flamingo_jax.layers.remat import remat
from flamingo_jax.layers.scan import scan
from flamingo_jax.sharding import side_by_side, unstack_side_by_side

ROWS = ("act_batch", "act_embed")  # flat rows (tokens), batch-sharded


def temporal_embeddings(table: jax.Array, num_frames: int) -> jax.Array:
  """The first `num_frames` rows of `table` [max_frames, D], or all of it linearly
  interpolated to `num_frames` rows when the video is longer than the table."""
  if num_frames <= table.shape[0]:
    return table[:num_frames]
  return jax.image.resize(table, (num_frames, table.shape[1]), method="linear")


class ResamplerAttention(nn.Module):
  """Every item's latents attend to its own media tokens and to its latents; parameters
  named as `layers.attention.Attention`'s (query, key, value, out).

  groups: ((items, tokens an item), ...); shards: the batch shards every group's items
  split over (rows laid out side by side per shard, sharding.side_by_side)."""
  num_heads: int
  head_dim: int
  groups: tuple
  shards: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
    """z [N, L, D] every group's latents (normed), x [T, D] every item's media tokens
    (normed), N = Σ items, T = Σ items · tokens → [N, L, D]."""
    n, l, d = z.shape
    h, hd = self.num_heads, self.head_dim
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    items = [g for g, _ in self.groups]
    q = Dense(h * hd, ("embed", "heads"), name="query", **kw)(z)
    # Keys and values of every token and latent in one projection each.
    context = side_by_side([x, z.reshape(n * l, d)], self.shards)
    k, v = (Dense(h * hd, ("embed", "kv_heads"), name=name, **kw)(context) for name in ("key", "value"))

    def by_item(y):  # [T + N·L, H·hd] → per group [items, H, tokens + L, hd]
      media, latents = unstack_side_by_side(y, [x.shape[0], n * l], self.shards)
      media = unstack_side_by_side(media, [g * s for g, s in self.groups], self.shards)
      latents = unstack_side_by_side(latents, [g * l for g in items], self.shards)
      return [jnp.swapaxes(jnp.concatenate([m.reshape(g, s, h, hd), t.reshape(g, l, h, hd)], 1), 1, 2)
              for (g, s), m, t in zip(self.groups, media, latents)]

    outs = [dot_product_attention(qg.reshape(g, l, h, hd), [(kg, vg)], scale=hd ** -0.5).reshape(g, l, h * hd)
            for g, qg, kg, vg in zip(items, unstack_side_by_side(q, items, self.shards), by_item(k), by_item(v))]
    return Dense(d, ("heads", "embed"), name="out", **kw)(side_by_side(outs, self.shards))


class ResamplerLayer(nn.Module):
  config: ResamplerConfig
  groups: tuple
  shards: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, latents: jax.Array, tokens: jax.Array) -> tuple[jax.Array, None]:
    """latents [N, L, D] (the scan's carry), tokens [T, D] (ResamplerAttention's layout)
    → (latents [N, L, D], None)."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = LayerNorm(eps=c.ln_eps, name="media_norm", **kw)(tokens)
    z = LayerNorm(eps=c.ln_eps, name="latents_norm", **kw)(latents)
    latents = latents + ResamplerAttention(c.num_heads, c.head_dim, self.groups, self.shards,
                                           name="attn", **kw)(z, x)
    h = LayerNorm(eps=c.ln_eps, name="ff_norm", **kw)(latents)
    latents = latents + MLP(c.ff_mult * latents.shape[-1], c.activation, name="ff", **kw)(h)
    # The carry keeps the batch-sharded layout across layers, as the LM's layers do.
    return nn.with_logical_constraint(latents, ("act_batch", "act_len", "act_embed")), None


class PerceiverResampler(nn.Module):
  config: ResamplerConfig
  remat_policy: str = "full"  # FlamingoConfig.remat_policy (layers/remat.py)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array | Sequence[jax.Array], shards: int = 1):
    """features [B, M, F, V, D] (media items × frames × visual tokens) → [B, M, L, D].

    Or groups of items [N_g, F_g, V_g, D], every N_g split over `shards` batch shards →
    their visual tokens [N_g, L, D], resampled in one call (module docstring)."""
    single = not isinstance(features, (list, tuple))
    if single:
      b, m = features.shape[:2]
      features = [features.reshape((b * m,) + features.shape[2:])]
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = c.dim or features[0].shape[-1]
    shapes = [f.shape for f in features]
    # Every item's tokens as rows [T, D], each shard's rows of every group side by side.
    tokens = side_by_side([f.reshape(-1, f.shape[-1]) for f in features], shards)
    if c.dim and c.dim != features[0].shape[-1]:
      tokens = Dense(c.dim, ("embed", "embed_out"), name="input_proj", **kw)(tokens)
    if c.max_frames:
      table = self.param("temporal_embedding",
                         nn.with_logical_partitioning(nn.initializers.normal(1.0), ("frames", "embed")),
                         (c.max_frames, d), self.param_dtype)
      frames = [jnp.broadcast_to(temporal_embeddings(table, f)[None, :, None], (n, f, v, d)).reshape(-1, d)
                for n, f, v, _ in shapes]
      tokens = tokens + side_by_side(frames, shards).astype(tokens.dtype)
    tokens = nn.with_logical_constraint(tokens.astype(self.dtype), ROWS)
    latents = self.param("latents",
                         nn.with_logical_partitioning(nn.initializers.normal(1.0), ("latents", "embed")),
                         (c.num_latents, d), self.param_dtype)
    n = sum(s[0] for s in shapes)
    z = jnp.broadcast_to(latents.astype(self.dtype), (n, c.num_latents, d))
    z = nn.with_logical_constraint(z, ("act_batch", "act_len", "act_embed"))
    # Rematerialised as the LM's layers are (remat_policy): unrematerialised, a scan saves
    # every residual of its body stacked over layers (float32 norms of the media included);
    # recomputed in the backward, the layers cost one more resampler forward.
    layer = remat(ResamplerLayer, self.remat_policy)
    layers = scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                  in_axes=nn.broadcast, length=c.depth, metadata_params={nn.PARTITION_NAME: "layers"})
    groups = tuple((s[0], s[1] * s[2]) for s in shapes)
    z, _ = layers(c, groups, shards, name="layers", **kw)(z, tokens)
    z = LayerNorm(eps=c.ln_eps, name="norm", **kw)(z)
    out = unstack_side_by_side(z, [s[0] for s in shapes], shards)
    return out[0].reshape((b, m) + out[0].shape[1:]) if single else out
