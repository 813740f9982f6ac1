"""`score`: log-likelihoods of candidate continuations, the prompt computed once.

Classification by ranked likelihood (ImageNet's 1000 class names, HatefulMemes' yes/no)
asks for log p(candidate | prompt) for many candidates of one prompt. The prompt (images
included) is prefilled once; then chunks of candidates are fed side by side after it,
each candidate seeing the prompt's cache and its own earlier tokens only (the cache is
read, never written), so a chunk of k candidates costs one call over k × L tokens, never
k prompt passes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.decoding import state as decode_state
from flamingo_jax.decoding.generate import current_rules, checked_prompts
from flamingo_jax.model import Flamingo

# Candidates per chunk so that a chunk's logits ([B, k * L, V] float32) stay near this size.
_LOGITS_BUDGET = 2 ** 27


def score(model, params, *, images, input_ids, attention_mask, candidates,
          candidate_mask=None, media_mask=None, chunk_size: int | None = None,
          count_padding: bool = False) -> dict:
  """{'sum': [B, C], 'mean': [B, C], 'length': [B, C]}: each candidate's summed token
  log-probability given its prompt, the same divided by its length, and the length.

  input_ids, attention_mask [B, T]: left-padded prompts; candidates [C, L] (the same for
  every prompt) or [B, C, L] token ids, right-padded, with candidate_mask (1 = token)
  of the same shape (default: all L tokens count). count_padding: as in `generate`.
  """
  config = model.config
  prompt = checked_prompts(config, images, input_ids, attention_mask, media_mask)
  b = prompt[1].shape[0]
  candidates = np.asarray(candidates)
  if candidates.ndim == 2:
    candidates = np.broadcast_to(candidates, (b,) + candidates.shape)
  if candidates.ndim != 3 or candidates.shape[0] != b:
    raise ValueError(f"candidates: expected [C, L] or [batch={b}, C, L] token ids, got shape "
                     f"{np.shape(candidates)}")
  mask = np.ones(candidates.shape, bool) if candidate_mask is None else np.broadcast_to(
      np.asarray(candidate_mask, bool), candidates.shape)
  if not mask[..., 0].all():
    raise ValueError("candidate_mask: every candidate needs at least one token, right-padded")
  if (candidates < 0).any() or (candidates >= config.lm.vocab_size).any():
    raise ValueError(f"candidates: ids must lie in [0, lm.vocab_size={config.lm.vocab_size})")
  _, c, length = candidates.shape
  k = chunk_size or max(1, min(c, _LOGITS_BUDGET // max(1, b * length * config.lm.vocab_size)))
  padded = -(-c // k) * k  # whole chunks; the extra candidates are masked and dropped
  pad = ((0, 0), (0, padded - c), (0, 0))
  candidates = np.pad(candidates, pad)
  mask = np.pad(mask, pad)
  fn = _compiled(config, k, bool(count_padding), current_rules())
  sums, lengths = fn(params, *prompt, jnp.asarray(candidates, jnp.int32), jnp.asarray(mask))
  sums, lengths = sums[:, :c], lengths[:, :c]
  return {"sum": sums, "mean": sums / lengths, "length": lengths}


@functools.lru_cache(maxsize=16)
def _compiled(config, chunk: int, count_padding: bool, rules):
  del rules  # part of the cache key only (see generate._compiled)
  model = Flamingo(config)

  def run(params, images, input_ids, attention_mask, media_mask, candidates, mask):
    b, t = input_ids.shape
    _, c, length = candidates.shape
    first, st = decode_state.prefill(model, params, images=images, input_ids=input_ids,
                                     attention_mask=attention_mask, media_mask=media_mask,
                                     cache_size=t, count_padding=count_padding)
    first = jax.nn.log_softmax(first, axis=-1)  # [B, V]: the first candidate token

    def one_chunk(args):
      tokens, valid = args  # [B, k, L]
      lp = [jnp.take_along_axis(first, tokens[:, :, 0], axis=1)]  # [B, k]
      if length > 1:
        lp.append(_continuation_log_probs(model, params, st, tokens, t))
      per_token = jnp.concatenate([lp[0][..., None]] + lp[1:], axis=-1)
      return jnp.where(valid, per_token, 0.0).sum(-1), valid.sum(-1).astype(jnp.float32)

    split = lambda x: jnp.moveaxis(x.reshape(b, c // chunk, chunk, length), 1, 0)
    sums, lengths = jax.lax.map(one_chunk, (split(candidates), split(mask)))
    merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, c)
    return merge(sums), merge(lengths)

  return jax.jit(run)


def _continuation_log_probs(model, params, st, tokens, prompt_len):
  """log p(token j | prompt, tokens < j) for j >= 1 of each candidate: [B, k, L - 1].

  The k candidates' k × L tokens go in side by side; token j of a candidate sees the
  prompt's real tokens and its own candidate's tokens up to j, at positions continuing
  its prompt.
  """
  b, k, length = tokens.shape
  j = jnp.tile(jnp.arange(length), k)  # [k * L]: position within the candidate
  cand = jnp.repeat(jnp.arange(k), length)  # [k * L]: which candidate
  own = (cand[None, :] == cand[:, None]) & (j[None, :] <= j[:, None])  # [k*L, k*L]
  prompt = jnp.broadcast_to(st.key_mask[:, None, :], (b, k * length, prompt_len))
  mask = jnp.concatenate([prompt, jnp.broadcast_to(own, (b,) + own.shape)], axis=-1)
  positions = st.next_position[:, None] + j[None, :]
  # Only positions 0 .. L-2 of each candidate predict a candidate token.
  at = (jnp.arange(k)[:, None] * length + jnp.arange(length - 1)[None, :]).reshape(-1)
  logits, _ = decode_state.extend(model, params, st, tokens.reshape(b, k * length),
                                  positions=positions, mask=mask,
                                  logits_at=jnp.broadcast_to(at, (b, at.size)), advance=False)
  logits = logits.reshape(b, k, length - 1, -1)
  target = tokens[:, :, 1:]
  picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)
