"""The model's decode state, and its two steps: prefill a prompt once, extend by tokens.

The KV cache has a fixed number of slots S (static shapes: one compile per prompt length
and output length, none per step). Prompts are left-padded, so every row writes its
next token into the same slot `index`; `key_mask` says which slots hold real tokens.
The visual tokens' keys / values of every xattn block are computed in the prefill and
read back at every later step (they depend on the images only).

Positions follow HF generate, `cumsum(attention_mask) - 1` over the prompt (or, to match
open_flamingo, the slot numbers: `prompt_positions`), then one more per new token. A new
token attends to the last media item of its prompt (open_flamingo's rule); `<image>`
tokens generated later do not move it.
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from flamingo_jax.inputs import media_index_from_tokens
from flamingo_jax.layers.attention import CACHE, CACHE_UPDATE, MEDIA_CACHE, SelfAttentionInputs
from flamingo_jax.lm.decoder import reorder_cache


@flax.struct.dataclass
class DecodeState:
  cache: Any  # the model's "cache" collection: self-attention K/V [.., N, K, S, D]
  media_cache: Any  # its "media_cache": the visual tokens' K/V per xattn block
  index: jax.Array  # int32 []: the next free cache slot, the same for every row
  key_mask: jax.Array  # bool [N, S]: slots holding a real token
  key_positions: jax.Array  # int32 [N, S]: each slot's position id
  next_position: jax.Array  # int32 [N]: the position id of the next token
  media_index: jax.Array  # int32 [N]: the media slot new tokens look at (-1: none)
  media_mask: jax.Array | None  # bool [N, M]: media slots holding an image (None: no media)
  # int32 [N, S]: the cache row holding each slot of a row, once beams are followed
  # (`reorder`); None: every row's slots are its own.
  cache_rows: jax.Array | None = None


def prompt_positions(attention_mask: jax.Array, count_padding: bool = False) -> jax.Array:
  """Position ids of left-padded prompts [B, T].

  HF generate's rule, `cumsum(attention_mask) - 1` (pads get 1, never seen), so a row's
  positions do not depend on its padding. `count_padding=True` numbers the slots instead
  (0 … T-1, pads included): what open_flamingo's generate does, because HF derives
  position ids only for models whose `forward` names them and open_flamingo's wrapper does
  not. Position-free ALiBi (MPT) is the same either way; rotary LMs (LLaMA, GPT-NeoX) are
  not.
  """
  if count_padding:
    return jnp.broadcast_to(jnp.arange(attention_mask.shape[1], dtype=jnp.int32),
                            attention_mask.shape)
  positions = jnp.cumsum(attention_mask, axis=-1, dtype=jnp.int32) - 1
  return jnp.where(attention_mask > 0, positions, 1)


def prefill(model, params, *, images, input_ids, attention_mask, media_mask=None,
            cache_size: int, logits_at: jax.Array | None = None, count_padding: bool = False):
  """Runs the prompt [B, T] and keeps its keys / values in a cache of `cache_size` >= T
  slots (`count_padding`: see `prompt_positions`).

  Returns (logits, state): logits [B, V] of the next token after the prompt, or [B, K, V]
  at the prompt positions `logits_at` [B, K] when given.
  """
  b, t = input_ids.shape
  if cache_size < t:
    raise ValueError(f"cache_size={cache_size} is smaller than the prompt ({t} tokens)")
  attention_mask = attention_mask.astype(jnp.int32)
  positions = prompt_positions(attention_mask, count_padding)
  attn = SelfAttentionInputs.causal(attention_mask, positions)
  media_index = media_index_from_tokens(input_ids, model.config.media_token_id)
  if images is not None and images.shape[1] > 0:
    media_mask = jnp.ones(images.shape[:2], bool) if media_mask is None else media_mask.astype(bool)
  else:
    images, media_mask = None, None
  last = logits_at is None
  if last:
    logits_at = jnp.full((b, 1), t - 1, jnp.int32)
  logits, variables = model.apply(
      {"params": params}, images, input_ids, media_mask=media_mask, media_index=media_index,
      cached=attn, logits_at=logits_at, mutable=[CACHE_UPDATE, MEDIA_CACHE])
  # The prompt's keys / values fill slots [0, T); the rest wait for new tokens.
  grow = lambda kv: jnp.pad(kv, [(0, 0)] * (kv.ndim - 2) + [(0, cache_size - t), (0, 0)])
  pad = ((0, 0), (0, cache_size - t))
  state = DecodeState(cache=jax.tree.map(grow, variables[CACHE_UPDATE]),
                      media_cache=variables.get(MEDIA_CACHE, {}), index=jnp.int32(t),
                      key_mask=jnp.pad(attention_mask > 0, pad),
                      key_positions=jnp.pad(positions, pad), next_position=positions[:, -1] + 1,
                      media_index=media_index[:, -1], media_mask=media_mask)
  return (logits[:, 0] if last else logits), state


def extend(model, params, state: DecodeState, tokens: jax.Array, *, positions=None,
           mask=None, logits_at=None, advance: bool = True):
  """Feeds tokens [N, T] after the cached ones.

  By default (generation) the tokens follow one another: they get the next positions and
  see every filled slot and each other causally; their keys / values are then written at
  slots [index, index + T), in place. Scoring passes its own `positions` [N, T] and `mask`
  [N, T, S + T] (S cache slots, then the T tokens: several candidate continuations side
  by side) and `advance=False`: the cache is only read, and the state returned unchanged.
  Returns (logits [N, T or K, V], the state).
  """
  n, t = tokens.shape
  if positions is None:
    positions = state.next_position[:, None] + jnp.arange(t, dtype=jnp.int32)
  if mask is None:
    filled = jnp.broadcast_to(state.key_mask[:, None, :], (n, t, state.key_mask.shape[1]))
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (n, t, t))
    mask = jnp.concatenate([filled, causal], axis=-1)
  attn = SelfAttentionInputs(mask=mask, positions=positions,
                             key_positions=jnp.concatenate([state.key_positions, positions], axis=1),
                             cache_rows=state.cache_rows)
  logits, variables = model.apply(
      {"params": params, CACHE: state.cache, MEDIA_CACHE: state.media_cache}, tokens,
      media_index=jnp.broadcast_to(state.media_index[:, None], (n, t)),
      media_mask=state.media_mask, cached=attn, logits_at=logits_at,
      method=lambda module, *a, **k: module.lm_logits(*a, **k),
      mutable=[CACHE_UPDATE] if advance else [])
  if not advance:
    return logits, state
  write = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(
      cache, new.astype(cache.dtype), state.index, axis=cache.ndim - 2)
  at = lambda x, new: jax.lax.dynamic_update_slice(x, new, (0, state.index))
  cache_rows = state.cache_rows
  if cache_rows is not None:  # each row's new slots are in its own cache row
    cache_rows = at(cache_rows, _own_rows(n, t))
  return logits, state.replace(
      cache=jax.tree.map(write, state.cache, variables[CACHE_UPDATE]), index=state.index + t,
      key_mask=at(state.key_mask, jnp.ones((n, t), bool)),
      key_positions=at(state.key_positions, positions), next_position=state.next_position + t,
      cache_rows=cache_rows)


def reorder(state: DecodeState, rows: jax.Array) -> DecodeState:
  """Row i of the result is row rows[i] of `state`: beam search expands B prompts to
  B * beams (the caches are gathered, once), then follows beams at every step. Following
  beams moves `cache_rows` only; the caches stay where they are. When the row count stays
  the same, row i must take a row of its own prompt (a beam of the same prompt, as beam
  search does): the visual keys / values of row i are not moved."""
  take = lambda x: None if x is None else jnp.take(x, rows, axis=0)
  n, s = state.key_mask.shape
  if rows.shape[0] == n:
    cache, media_cache = state.cache, state.media_cache
    cache_rows = take(_own_rows(n, s) if state.cache_rows is None else state.cache_rows)
  else:
    if state.cache_rows is not None:
      raise ValueError("reorder: the row count changes after beams were followed")
    cache, media_cache = reorder_cache(state.cache, rows), reorder_cache(state.media_cache, rows)
    # The identity, so that the state's structure stays the same in the decode loop.
    cache_rows = _own_rows(rows.shape[0], s)
  return state.replace(cache=cache, media_cache=media_cache, cache_rows=cache_rows,
                       key_mask=take(state.key_mask), key_positions=take(state.key_positions),
                       next_position=take(state.next_position),
                       media_index=take(state.media_index), media_mask=take(state.media_mask))


def _own_rows(n: int, slots: int) -> jax.Array:
  """int32 [n, slots]: every slot of row i held by cache row i."""
  return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, slots))
