"""A frozen decoder-only LM with GATED XATTN-DENSE blocks inserted between its layers.

Layers are grouped in runs of `xattn.every`; a group holds its LM layers and (at most)
one xattn block, placed before the group's first layer (paper) or last layer
(OpenFlamingo). Groups are `nn.scan`ned, so compile time does not grow with depth. When
`num_layers` is not a multiple of `every` (the paper's 80B: 80 layers, every 7th) the
remaining layers form one unscanned tail group.

Parameter layout (what `stack_layers` builds from per-layer trees):
  embed/embedding, final_norm/..., lm_head/kernel (untied only),
  new_tokens/{embedding, head} (only with `trainable_token_ids`; see token_rows.py),
  groups/layer_{k}/...   leading axis = group index   (HF layer g * every + k)
  groups/xattn/...       leading axis = group index
  tail/layer_{k}/..., tail/xattn/...                  (only when a tail exists)
With `scan_layers=False` (decoding) `groups` is replaced by group_{g}/layer_{k}/... and
group_{g}/xattn/..., one unstacked tree per group (`unstack_groups`).
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax import lm as lm_families
from flamingo_jax.config import FlamingoConfig
from flamingo_jax.gated_xattn import GatedCrossAttentionBlock, media_attention_mask
from flamingo_jax.layers.attention import CACHE, CACHE_UPDATE, MEDIA_CACHE, SelfAttentionInputs
from flamingo_jax.layers.linear import DEFAULT_KERNEL_INIT, Dense, Embed
from flamingo_jax.lm.token_rows import NewTokenRows
from flamingo_jax.layers.scan import scan

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each LM layer and xattn block lives."""
  group_size: int  # LM layers per group
  num_groups: int  # scanned groups
  tail_size: int  # LM layers in the unscanned tail (0: none)
  xattn_offset: int  # index within a group of the layer the block precedes

  @property
  def tail_has_xattn(self) -> bool:
    return self.xattn_offset < self.tail_size

  @property
  def num_xattn(self) -> int:
    return self.num_groups + int(self.tail_has_xattn)

  def layer_slot(self, i: int) -> tuple[str, int | None, int]:
    """LM layer i → (container 'groups' | 'tail', index along the scan axis, k in layer_k)."""
    g, k = divmod(i, self.group_size)
    return ("groups", g, k) if g < self.num_groups else ("tail", None, k)

  def xattn_layers(self) -> list[int]:
    """The LM layer index each xattn block precedes, in block order."""
    return [g * self.group_size + self.xattn_offset for g in range(self.num_xattn)]


def layout(config: FlamingoConfig) -> Layout:
  every, n = config.xattn.every, config.lm.num_layers
  offset = 0 if config.xattn.placement == "first" else every - 1
  return Layout(group_size=every, num_groups=n // every, tail_size=n % every, xattn_offset=offset)


def stack_layers(config: FlamingoConfig, layers: list[dict], xattn: list[dict] | None) -> dict:
  """Per-layer param trees (HF order) → the `groups` / `tail` trees of `DecoderLM`."""
  lay = layout(config)
  if len(layers) != config.lm.num_layers:
    raise ValueError(f"got {len(layers)} LM layers, lm.num_layers={config.lm.num_layers}")
  if xattn is not None and len(xattn) != lay.num_xattn:
    raise ValueError(f"got {len(xattn)} xattn blocks, the layout has {lay.num_xattn} "
                     f"(xattn.every={config.xattn.every}, placement={config.xattn.placement!r})")
  stack = lambda trees: jax.tree.map(lambda *xs: np.stack(xs), *trees)
  out = {}
  if lay.num_groups:
    groups = {f"layer_{k}": stack(layers[k:lay.num_groups * lay.group_size:lay.group_size])
              for k in range(lay.group_size)}
    if xattn is not None:
      groups["xattn"] = stack(xattn[:lay.num_groups])
    out["groups"] = groups
  if lay.tail_size:
    start = lay.num_groups * lay.group_size
    tail = {f"layer_{k}": layers[start + k] for k in range(lay.tail_size)}
    if xattn is not None and lay.tail_has_xattn:
      tail["xattn"] = xattn[-1]
    out["tail"] = tail
  return out


def unstack_groups(lm_params: dict) -> dict:
  """The LM's params in the scanned layout (`groups`, leading axis = group) → the layout of
  `scan_layers=False` (`group_0`, `group_1`, ...)."""
  params = dict(lm_params)
  if "groups" in params:
    groups = params.pop("groups")
    n = jax.tree.leaves(groups)[0].shape[0]
    params.update({f"group_{g}": jax.tree.map(lambda x: x[g], groups) for g in range(n)})
  return params


class LayerGroup(nn.Module):
  """`size` LM layers, with an xattn block before layer `xattn_at` (None: no block)."""
  config: FlamingoConfig
  size: int
  xattn_at: int | None

  @nn.compact
  def __call__(self, x, media, xattn_mask, has_media, attn: SelfAttentionInputs):
    c = self.config
    kw = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype)
    Layer = lm_families.family(c.lm.family).Layer
    for k in range(self.size):
      if k == self.xattn_at:
        x = GatedCrossAttentionBlock(c.xattn, name="xattn", **kw)(
            x, media, mask=xattn_mask, has_media=has_media)
      x = Layer(c.lm, name=f"layer_{k}", **kw)(x, attn=attn)
      x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
    return x, None


class DecoderLM(nn.Module):
  """Token ids → logits. `with_xattn=False` is the bare frozen LM (same layer params)."""
  config: FlamingoConfig
  with_xattn: bool = True

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               media: jax.Array | None = None, media_index: jax.Array | None = None,
               media_mask: jax.Array | None = None, positions: jax.Array | None = None,
               cached: SelfAttentionInputs | None = None,
               logits_at: jax.Array | None = None) -> jax.Array:
    """input_ids [B, T]; attention_mask [B, T] (1 = token, 0 = pad); media [B, M, N, Dv]
    (resampled visual tokens); media_index [B, T] (-1 = none); media_mask [B, M].

    Decoding (`cached` given, attention_mask and positions unused): the tokens see the KV
    cache's slots and each other as `cached.mask` allows, and their keys / values go to
    the `"cache_update"` collection (layers/attention.py); `media` is
    given with the prompt and None after it, when `media_mask` still says how many media
    slots the cached visual tokens hold. `logits_at` [B, K]: the positions whose logits
    are wanted (default: all), so the vocabulary projection runs only there.
    """
    c = self.config
    kw = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype)
    b, t = input_ids.shape
    embed = Embed(c.lm.vocab_size, c.lm.d_model, name="embed", **kw,
                  embedding_init=nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, ("vocab", "embed")))
    x = embed(input_ids)
    new_tokens = None
    if c.trainable_token_ids:
      new_tokens = NewTokenRows(c.trainable_token_ids, c.lm.d_model, c.lm.tie_embeddings,
                                name="new_tokens", **kw)
      x = new_tokens.embed(input_ids, x)
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))

    if cached is None:
      if attention_mask is None:
        attention_mask = jnp.ones((b, t), bool)
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
      attn = SelfAttentionInputs.causal(attention_mask, positions)
    else:
      attn = cached
    family = lm_families.family(c.lm.family)
    if hasattr(family, "attention_bias"):
      attn = attn.replace(bias=family.attention_bias(c.lm, attn))

    if media_index is None:
      media_index = jnp.full((b, t), -1, jnp.int32)
    has_media = media_index >= 0
    xattn_mask = None
    num_media = media.shape[1] if media is not None else 0
    if media is None and cached is not None and media_mask is not None:
      num_media = media_mask.shape[1]  # the visual tokens are in the cache
    if num_media:
      xattn_mask = media_attention_mask(media_index, num_media, c.resampler.num_latents, media_mask)
      has_media = xattn_mask.any(axis=-1)
    if media is not None:
      media = media.reshape(b, -1, media.shape[-1])
    args = (media, xattn_mask, has_media, attn)

    lay = layout(c)
    xattn_at = lay.xattn_offset if self.with_xattn else None
    group = LayerGroup
    if c.remat_policy != "none" and cached is None:
      group = nn.remat(group, policy=REMAT_POLICIES[c.remat_policy], prevent_cse=False)
    if lay.num_groups and not c.scan_layers:
      for g in range(lay.num_groups):
        x, _ = group(c, lay.group_size, xattn_at, name=f"group_{g}")(x, *args)
    elif lay.num_groups:
      scanned = scan(group, variable_axes={"params": 0, CACHE: 0, CACHE_UPDATE: 0, MEDIA_CACHE: 0},
                     split_rngs={"params": True}, in_axes=(nn.broadcast,) * len(args),
                     length=lay.num_groups, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(c, lay.group_size, xattn_at, name="groups")(x, *args)
    if lay.tail_size:
      tail_xattn = xattn_at if lay.tail_has_xattn else None
      x, _ = LayerGroup(c, lay.tail_size, tail_xattn, name="tail")(x, *args)

    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    x = family.final_norm(c.lm, **kw)(x)
    if c.lm.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = Dense(c.lm.vocab_size, ("embed", "vocab"), name="lm_head", **kw)(x)
    if new_tokens is not None:
      logits = new_tokens.logits(x, logits)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("act_batch", "act_len", "act_vocab"))


def reorder_cache(cache, rows: jax.Array):
  """Gathers batch rows of a decode cache (a `"cache"` or `"media_cache"` collection of
  `DecoderLM`): the scanned groups' leaves are [groups, B, ...], the tail's [B, ...]."""
  def take(path, leaf):
    scanned = any(getattr(key, "key", None) == "groups" for key in path)
    return jnp.take(leaf, rows, axis=1 if scanned else 0)
  return jax.tree_util.tree_map_with_path(take, cache)
