"""A frozen decoder-only LM with GATED XATTN-DENSE blocks inserted between its layers.

Layers are grouped in runs of `xattn.every`; a group holds its LM layers and (at most)
one xattn block, placed before the group's first layer (paper) or last layer
(OpenFlamingo). Groups are `nn.scan`ned, and so are the LM layers inside a group (the
layers before the block and those from it on, one scan each), so the program holds one
LM layer's code whatever the depth. When `num_layers` is not a multiple of `every` (the
paper's 80B: 80 layers, every 7th) the remaining layers form one unscanned tail group.

Parameter layout (what `stack_layers` builds from per-layer trees):
  embed/embedding, final_norm/..., lm_head/kernel (untied only),
  new_tokens/{embedding, head} (only with `trainable_token_ids`; see token_rows.py),
  groups/layers_before/...  leading axes = group, layer k < the block's offset (OpenFlamingo's placement)
  groups/layers/...         leading axes = group, layer k - offset for the layers from the block on
  groups/xattn/...          leading axis = group index
  tail/layers_before/..., tail/layers/..., tail/xattn/...   (only when a tail exists; no group axis)
HF layer g * every + k is group g's layer k. With `scan_layers=False` (decoding) every
scan is unrolled: group_{g}/layer_{k}/..., group_{g}/xattn/..., tail/layer_{k}/...
(`unstack_groups`).
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax import lm as lm_families
from flamingo_jax.config import FlamingoConfig
from flamingo_jax.gated_xattn import GatedCrossAttentionBlock, media_attention_mask
from flamingo_jax.layers.attention import CACHE, CACHE_UPDATE, MEDIA_CACHE, SelfAttentionInputs
from flamingo_jax.layers.linear import DEFAULT_KERNEL_INIT, Dense, Embed
from flamingo_jax.layers.remat import remat
from flamingo_jax.lm.token_rows import NewTokenRows
from flamingo_jax.layers.scan import scan, stack_trees

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

  def xattn_layers(self) -> list[int]:
    """The LM layer index each xattn block precedes, in block order."""
    return [g * self.group_size + self.xattn_offset for g in range(self.num_xattn)]


def layout(config: FlamingoConfig) -> Layout:
  every, n = config.xattn.every, config.lm.num_layers
  offset = 0 if config.xattn.placement == "first" else every - 1
  return Layout(group_size=every, num_groups=n // every, tail_size=n % every, xattn_offset=offset)


SCANNED = ("groups", "layers_before", "layers")  # the containers `scan` stacks


def _runs(size: int, offset: int) -> tuple[tuple[str, range], ...]:
  """A group's (or the tail's) scanned runs of LM layers: those before the xattn block's
  offset, and those from it on."""
  split = min(offset, size)
  return tuple((name, r) for name, r in (("layers_before", range(split)), ("layers", range(split, size)))
               if len(r))


def stack_layers(config: FlamingoConfig, layers: list[dict], xattn: list[dict] | None) -> dict:
  """Per-layer param trees (HF order) → the `groups` / `tail` trees of `DecoderLM`."""
  lay = layout(config)
  if len(layers) != config.lm.num_layers:
    raise ValueError(f"got {len(layers)} LM layers, lm.num_layers={config.lm.num_layers}")
  if xattn is not None and len(xattn) != lay.num_xattn:
    raise ValueError(f"got {len(xattn)} xattn blocks, the layout has {lay.num_xattn} "
                     f"(xattn.every={config.xattn.every}, placement={config.xattn.placement!r})")
  out = {}
  if lay.num_groups:
    group = lambda g: {name: stack_trees([layers[g * lay.group_size + k] for k in r])
                       for name, r in _runs(lay.group_size, lay.xattn_offset)}
    out["groups"] = stack_trees([group(g) for g in range(lay.num_groups)])
    if xattn is not None:
      out["groups"]["xattn"] = stack_trees(xattn[:lay.num_groups])
  if lay.tail_size:
    start = lay.num_groups * lay.group_size
    out["tail"] = {name: stack_trees([layers[start + k] for k in r])
                   for name, r in _runs(lay.tail_size, lay.xattn_offset)}
    if xattn is not None and lay.tail_has_xattn:
      out["tail"]["xattn"] = xattn[-1]
  return out


def _unstack_runs(group: dict) -> dict:
  """One group's scanned runs (leading axis = layer) → its layers as `layer_{k}`."""
  out = {k: v for k, v in group.items() if k not in SCANNED}
  runs = [group[name] for name in SCANNED[1:] if name in group]
  per_layer = [jax.tree.map(lambda x, i=i: x[i], run)
               for run in runs for i in range(jax.tree.leaves(run)[0].shape[0])]
  out.update({f"layer_{k}": tree for k, tree in enumerate(per_layer)})
  return out


def unstack_groups(lm_params: dict) -> dict:
  """The LM's params in the scanned layout (`groups`, leading axis = group; each group's
  and the tail's layers in scanned runs) → the layout of `scan_layers=False`
  (`group_0/layer_0`, ..., `tail/layer_0`, ...)."""
  params = dict(lm_params)
  if "groups" in params:
    groups = params.pop("groups")
    n = jax.tree.leaves(groups)[0].shape[0]
    params.update({f"group_{g}": _unstack_runs(jax.tree.map(lambda x: x[g], groups)) for g in range(n)})
  if "tail" in params:
    params["tail"] = _unstack_runs(params["tail"])
  return params


@functools.cache
def _scan_body(layer_cls: type) -> type:
  """The LM family's Layer with scan's (carry, broadcast inputs) signature."""
  class ScannedLayer(layer_cls):
    def __call__(self, x, attn):
      x = super().__call__(x, attn=attn)
      return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed")), None
  return ScannedLayer


class LayerGroup(nn.Module):
  """`size` LM layers, with an xattn block (`with_xattn`, and when the group reaches it)
  before layer `layout(config).xattn_offset`; the layers before and after it are scans
  (`scan_layers`) or `layer_{k}`."""
  config: FlamingoConfig
  size: int
  with_xattn: bool = True
  # Decode steps unroll the runs: a scan inside the groups' scan would slice each group's
  # run of KV caches out and write it back whole at every step (XLA cannot update a
  # nested slice in place); unrolled, each layer writes its one cache slot in place.
  decoding: bool = False

  @nn.compact
  def __call__(self, x, media, xattn_mask, has_media, attn: SelfAttentionInputs):
    c = self.config
    kw = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype)
    Layer = lm_families.family(c.lm.family).Layer
    offset = layout(c).xattn_offset
    for name, run in _runs(self.size, offset):
      if run.start == offset and self.with_xattn:
        x = GatedCrossAttentionBlock(c.xattn, name="xattn", **kw)(
            x, media, mask=xattn_mask, has_media=has_media)
      if c.scan_layers:
        layers = scan(_scan_body(Layer), variable_axes={"params": 0, CACHE: 0, CACHE_UPDATE: 0},
                      split_rngs={"params": True}, in_axes=nn.broadcast, length=len(run),
                      unroll=self.decoding, metadata_params={nn.PARTITION_NAME: "group_layers"})
        x, _ = layers(c.lm, name=name, **kw)(x, attn)
      else:
        for k in run:
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
               segments: jax.Array | None = None, cached: SelfAttentionInputs | None = None,
               logits_at: jax.Array | None = None) -> jax.Array:
    """input_ids [B, T]; attention_mask [B, T] (1 = token, 0 = pad); media [B, M, N, Dv]
    (resampled visual tokens); media_index [B, T] (-1 = none); media_mask [B, M];
    segments [B, T]: packed rows (train/packing.py), a token attends within its segment.

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
      attn = SelfAttentionInputs.causal(attention_mask, positions, segments)
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

    lay, decoding = layout(c), cached is not None
    group = LayerGroup if decoding else remat(LayerGroup, c.remat_policy)
    if lay.num_groups and not c.scan_layers:
      for g in range(lay.num_groups):
        x, _ = group(c, lay.group_size, self.with_xattn, decoding, name=f"group_{g}")(x, *args)
    elif lay.num_groups:
      scanned = scan(group, variable_axes={"params": 0, CACHE: 0, CACHE_UPDATE: 0, MEDIA_CACHE: 0},
                     split_rngs={"params": True}, in_axes=(nn.broadcast,) * len(args),
                     length=lay.num_groups, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(c, lay.group_size, self.with_xattn, decoding, name="groups")(x, *args)
    if lay.tail_size:
      x, _ = LayerGroup(c, lay.tail_size, self.with_xattn, decoding, name="tail")(x, *args)

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


def cache_batch_axis(path) -> int:
  """The batch axis of a decode-cache leaf at `path` (a `"cache"` or `"media_cache"`
  collection of `DecoderLM`): after one axis per scan it sits in (`groups`, a run of layers)."""
  return sum(getattr(key, "key", None) in SCANNED for key in path)


def reorder_cache(cache, rows: jax.Array):
  """Gathers batch rows of a decode cache."""
  take = lambda path, leaf: jnp.take(leaf, rows, axis=cache_batch_axis(path))
  return jax.tree_util.tree_map_with_path(take, cache)
