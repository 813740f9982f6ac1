"""Hugging Face's logits processors and warpers (transformers 4.57) as pure jnp functions.

Each works on scores [N, V] float32 and keeps HF's exact semantics, so a search built on
them picks the same tokens as `generate`. The token history they need is kept
incrementally by the caller (a `seen` map, a static history buffer with its length)
instead of being rescanned at every step. `process` applies the enabled ones in the order
of HF's `_get_logits_processor`.
"""
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static (hashable) processor settings; the neutral value of each turns it off as in HF."""
  repetition_penalty: float = 1.0
  no_repeat_ngram_size: int = 0
  min_new_tokens: int = 0
  eos_token_ids: tuple[int, ...] = ()
  do_sample: bool = False  # the warpers below run only when sampling
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_tokens_to_keep: int = 1  # HF: 1, or max(2, 1 + #eos) for beam sampling

  @property
  def uses_seen(self) -> bool:
    return self.repetition_penalty != 1.0

  @property
  def uses_history(self) -> bool:
    return self.no_repeat_ngram_size > 0

  @property
  def uses_min_new(self) -> bool:
    return self.min_new_tokens > 0 and bool(self.eos_token_ids)


def seen_map(ids: jax.Array, vocab_size: int) -> jax.Array:
  """[N, V] bool: which ids occur in each row of `ids` [N, T] (padding included, as HF)."""
  return mark_seen(jnp.zeros((ids.shape[0], vocab_size), bool), ids)


def mark_seen(seen: jax.Array, tokens: jax.Array) -> jax.Array:
  """Adds `tokens` [N] or [N, T] to the `seen` map [N, V]."""
  tokens = tokens.reshape(tokens.shape[0], -1)
  rows = jnp.arange(seen.shape[0])[:, None]
  return seen.at[rows, tokens].set(True)


def divide(x: jax.Array, divisor) -> jax.Array:
  """x / divisor, correctly rounded as in torch.

  XLA rewrites a division by a broadcast scalar as a product with its reciprocal, an ulp
  off; a materialized divisor behind an optimization barrier keeps the true division.
  """
  divisor = jnp.broadcast_to(jnp.asarray(divisor, x.dtype), x.shape)
  return x / jax.lax.optimization_barrier(divisor)


def repetition_penalty(scores: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
  """Scores of seen tokens: negative ones times `penalty`, others divided by it."""
  penalized = jnp.where(scores < 0, scores * penalty, divide(scores, penalty))
  return jnp.where(seen, penalized, scores)


def no_repeat_ngram(scores: jax.Array, history: jax.Array, length: jax.Array,
                    ngram_size: int) -> jax.Array:
  """Bans every token that would repeat an n-gram of the first `length` tokens of `history`.

  history [N, L_max] holds each row's tokens (prompt included) with positions >= `length`
  ignored. A window starting at j counts when it lies wholly before `length`; its last
  token is banned when its first n - 1 tokens equal the row's last n - 1.
  """
  n = ngram_size
  num_rows, max_len = history.shape
  if max_len < n:
    return scores
  starts = jnp.arange(max_len - n + 1)
  match = starts[None, :] <= length - n
  if n > 1:
    tail = jax.lax.dynamic_slice_in_dim(history, jnp.maximum(length - (n - 1), 0), n - 1, 1)
  for k in range(n - 1):
    match &= history[:, k:k + max_len - n + 1] == tail[:, k:k + 1]
  vocab = scores.shape[-1]
  banned = jnp.where(match, history[:, n - 1:], vocab)  # vocab: out of range, dropped
  rows = jnp.arange(num_rows)[:, None]
  ban = jnp.zeros(scores.shape, bool).at[rows, banned].set(True, mode="drop")
  return jnp.where(ban, _NEG_INF, scores)


def eos_mask(eos_token_ids: Sequence[int], vocab_size: int) -> np.ndarray:
  """[V] bool, True at the eos ids (a constant, so no per-step work)."""
  mask = np.zeros(vocab_size, bool)
  mask[list(eos_token_ids)] = True
  return mask


def min_new_tokens(scores: jax.Array, num_new: jax.Array, min_new: int,
                   eos_token_ids: Sequence[int]) -> jax.Array:
  """Eos ids get -inf while fewer than `min_new` new tokens exist."""
  ban = jnp.asarray(eos_mask(eos_token_ids, scores.shape[-1])) & (num_new < min_new)
  return jnp.where(ban, _NEG_INF, scores)


def temperature(scores: jax.Array, value: float) -> jax.Array:
  return divide(scores, value)


def top_k(scores: jax.Array, k: int, min_tokens_to_keep: int = 1) -> jax.Array:
  """Keeps the scores >= the k-th largest (ties at the boundary all stay, as HF)."""
  k = min(max(k, min_tokens_to_keep), scores.shape[-1])
  kth = jax.lax.top_k(scores, k)[0][..., -1:]
  return jnp.where(scores < kth, _NEG_INF, scores)


def top_p(scores: jax.Array, p: float, min_tokens_to_keep: int = 1) -> jax.Array:
  """Drops the least likely tokens whose cumulative probability (ascending) is <= 1 - p.

  Ascending sort and cumsum as HF, so the boundary token is decided by the same sums; the
  `min_tokens_to_keep` most likely always stay.
  """
  order = jnp.argsort(scores, axis=-1)
  ascending = jnp.take_along_axis(scores, order, axis=-1)
  cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
  remove = cumulative <= 1 - p
  remove = remove.at[..., -min_tokens_to_keep:].set(False)
  rows = jnp.arange(scores.shape[0])[:, None]
  remove = jnp.zeros_like(remove).at[rows, order].set(remove)
  return jnp.where(remove, _NEG_INF, scores)


def process(scores: jax.Array, settings: Settings, *, num_new: jax.Array,
            seen: jax.Array | None = None, history: jax.Array | None = None,
            length: jax.Array | None = None) -> jax.Array:
  """The enabled processors in HF's order: repetition penalty, no-repeat n-gram,
  min_new_tokens, then (sampling only) temperature, top-k, top-p.

  num_new: tokens generated so far; seen [N, V] (repetition penalty); history [N, L_max]
  and its `length` (n-grams).
  """
  s = settings
  if s.uses_seen:
    scores = repetition_penalty(scores, seen, s.repetition_penalty)
  if s.uses_history:
    scores = no_repeat_ngram(scores, history, length, s.no_repeat_ngram_size)
  if s.uses_min_new:
    scores = min_new_tokens(scores, num_new, s.min_new_tokens, s.eos_token_ids)
  if s.do_sample:
    if s.temperature != 1.0:
      scores = temperature(scores, s.temperature)
    if s.top_k != 0:
      scores = top_k(scores, s.top_k, s.min_tokens_to_keep)
    if s.top_p < 1.0:
      scores = top_p(scores, s.top_p, s.min_tokens_to_keep)
  return scores
