"""Greedy, sampling and beam search as one `jax.lax.while_loop`, token for token as HF.

Model-agnostic: the model is `step_fn(state, tokens [N]) -> (logits [N, V], state)` and
`reorder_fn(state, rows [N']) -> state` over an arbitrary decode-state pytree. The first
token is chosen from the prefill's logits before the loop, so each iteration is one
forward then one choice, and no forward runs after the last token. Shapes are static
(history buffers of prompt + max_new_tokens); settings are Python values, so one compile
serves every prompt of a shape.

Semantics follow transformers 4.57 `GenerationMixin._sample` and `_beam_search` with the
default `early_stopping=False`. Tie-breaking: `jax.lax.top_k` / `argmax` prefer the lower
index among equal values while `torch.topk` leaves their order unspecified, so outputs can
differ from HF only on exact ties of real scores, which float logits practically never
produce (ties among -1e9 placeholders do occur, but a placeholder is never returned).
"""
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.decoding import logits_processors as lp

StepFn = Callable[[Any, jax.Array], tuple[jax.Array, Any]]
ReorderFn = Callable[[Any, jax.Array], Any]

_PLACEHOLDER = -1.0e9  # HF's score for empty / excluded beams


def search(step_fn: StepFn, reorder_fn: ReorderFn, state: Any, first_logits: jax.Array,
           prompt_ids: jax.Array, *, max_new_tokens: int, num_beams: int = 1,
           length_penalty: float = 1.0, do_sample: bool = False, temperature=1.0, top_k=0,
           top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
           eos_token_id: int | Sequence[int] | None, pad_token_id: int,
           rng: jax.Array | None = None) -> jax.Array:
  """The new tokens [B, max_new_tokens] int32, `pad_token_id` after a row's eos.

  prompt_ids [B, T0] are the rows as HF sees them (left padding included): the history of
  repetition penalty and n-grams. first_logits [B, V]: the logits after the prompt. Beam
  search returns each row's best finished hypothesis (HF `sequences[:, 0]`, new part);
  after its eos HF holds `pad_token_id or eos[0]` (a truthiness test: eos[0] when the pad
  id is 0), here always `pad_token_id`.
  """
  eos = eos_ids(eos_token_id)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if do_sample and rng is None:
    raise ValueError("sampling needs an rng key")
  settings = lp.Settings(
      repetition_penalty=float(repetition_penalty), no_repeat_ngram_size=int(no_repeat_ngram_size),
      min_new_tokens=int(min_new_tokens), eos_token_ids=eos, do_sample=bool(do_sample),
      temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
      min_tokens_to_keep=max(2, 1 + len(eos)) if num_beams > 1 else 1)
  prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
  first_logits = jnp.asarray(first_logits, jnp.float32)
  loop = _greedy_or_sample if num_beams == 1 else functools.partial(
      _beam_search, num_beams=num_beams, length_penalty=float(length_penalty))
  return loop(step_fn, reorder_fn, state, first_logits, prompt_ids, settings=settings,
              max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, rng=rng)


def eos_ids(eos_token_id) -> tuple[int, ...]:
  """An id, a list of ids or None → a tuple of ids."""
  if eos_token_id is None:
    return ()
  if isinstance(eos_token_id, (int, np.integer)):
    return (int(eos_token_id),)
  return tuple(int(i) for i in eos_token_id)


def _history(prompt_ids: jax.Array, rows: jax.Array, max_new_tokens: int, pad: int) -> jax.Array:
  """[N, T0 + max_new_tokens]: the prompt of each row, then `pad` for the tokens to come."""
  new = jnp.full((rows.shape[0], max_new_tokens), pad, jnp.int32)
  return jnp.concatenate([prompt_ids[rows], new], axis=1)


def _processed(logits, hist, seen, t, settings, prompt_len):
  """The processors HF would run at new-token index t (history length prompt_len + t)."""
  return lp.process(logits, settings, num_new=t, seen=seen, history=hist, length=prompt_len + t)


def _is_eos(tokens: jax.Array, eos: tuple[int, ...]) -> jax.Array:
  hit = jnp.zeros(tokens.shape, bool)
  for e in eos:
    hit |= tokens == e
  return hit


# ----------------------------------------------------------------------------------------
# Greedy and sampling (HF `_sample`)


def _greedy_or_sample(step_fn, reorder_fn, state, first_logits, prompt_ids, *, settings,
                      max_new_tokens, pad_token_id, rng):
  del reorder_fn  # rows never move
  b, prompt_len = prompt_ids.shape
  vocab = first_logits.shape[-1]

  def choose(carry, logits):
    t = carry["t"]
    scores = _processed(logits, carry["hist"], carry["seen"], t, settings, prompt_len)
    if settings.do_sample:
      tokens = jax.random.categorical(jax.random.fold_in(rng, t), scores, axis=-1)
    else:
      tokens = jnp.argmax(scores, axis=-1)
    tokens = jnp.where(carry["done"], pad_token_id, tokens.astype(jnp.int32))
    hist = jax.lax.dynamic_update_slice_in_dim(carry["hist"], tokens[:, None], prompt_len + t, 1)
    seen = lp.mark_seen(carry["seen"], tokens) if settings.uses_seen else None
    done = carry["done"] | _is_eos(tokens, settings.eos_token_ids)
    return dict(carry, t=t + 1, tokens=tokens, hist=hist, seen=seen, done=done)

  carry = dict(
      t=jnp.int32(0), tokens=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
      hist=_history(prompt_ids, jnp.arange(b), max_new_tokens, pad_token_id),
      seen=lp.seen_map(prompt_ids, vocab) if settings.uses_seen else None, state=state)
  carry = choose(carry, first_logits)

  def cond(carry):
    return (carry["t"] < max_new_tokens) & ~jnp.all(carry["done"])

  def body(carry):
    logits, state = step_fn(carry["state"], carry["tokens"])
    return choose(dict(carry, state=state), logits.astype(jnp.float32))

  carry = jax.lax.while_loop(cond, body, carry)
  return carry["hist"][:, prompt_len:]


# ----------------------------------------------------------------------------------------
# Beam search and beam sampling (HF `_beam_search`)


def _beam_search(step_fn, reorder_fn, state, first_logits, prompt_ids, *, settings,
                 max_new_tokens, pad_token_id, rng, num_beams, length_penalty):
  """Running beams [B, K] and the best finished hypotheses [B, K], merged every step.

  Each step keeps the top W = max(2, 1 + #eos) * K continuations over all beams (or W
  samples without replacement), so at least K of them do not end in eos. Scores are HF's
  float32 sums, -1e9 placeholders included, so the same hypotheses win.
  """
  b, prompt_len = prompt_ids.shape
  k = num_beams
  vocab = first_logits.shape[-1]
  width = max(2, 1 + len(settings.eos_token_ids)) * k
  # HF divides by (generated_len ** length_penalty), a Python float: a float32 table.
  denominators = jnp.asarray(
      np.array([float((i + 1) ** length_penalty) for i in range(max_new_tokens)], np.float32))
  rows = jnp.repeat(jnp.arange(b), k)

  def choose(carry, logits):
    t = carry["t"]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    log_probs = _processed(log_probs, carry["hist"], carry["seen"], t, settings, prompt_len)
    accumulated = (log_probs.reshape(b, k, vocab) + carry["scores"][:, :, None]).reshape(b, -1)
    key = jax.random.fold_in(rng, t) if settings.do_sample else None
    cand_scores, cand_beam, cand_tok = _top_continuations(accumulated, width, vocab, key)
    hits = _is_eos(cand_tok, settings.eos_token_ids) | (t + 1 >= max_new_tokens)
    running = _next_running(carry, cand_scores, cand_beam, cand_tok, hits, k, prompt_len + t,
                            settings.uses_seen)
    finished = _merge_finished(carry, cand_scores, cand_beam, cand_tok, hits, k, prompt_len, t,
                               denominators[t])
    improvable = _early_stop_heuristic(carry["improvable"], running["scores"],
                                       finished["fin_scores"], finished["fin_done"],
                                       denominators[t])
    return dict(carry, **running, **finished, t=t + 1, improvable=improvable,
                go_on=jnp.any(improvable) & ~jnp.all(hits))

  init_scores = jnp.full((b, k), _PLACEHOLDER, jnp.float32).at[:, 0].set(0.0)
  carry = dict(
      t=jnp.int32(0), tokens=jnp.zeros((b * k,), jnp.int32), src=rows,
      hist=_history(prompt_ids, rows, max_new_tokens, pad_token_id),
      seen=lp.seen_map(prompt_ids, vocab)[rows] if settings.uses_seen else None,
      scores=init_scores, fin_tokens=jnp.full((b, k, max_new_tokens), pad_token_id, jnp.int32),
      fin_scores=jnp.full((b, k), _PLACEHOLDER, jnp.float32), fin_done=jnp.zeros((b, k), bool),
      improvable=jnp.ones((b,), bool), go_on=jnp.bool_(True), state=reorder_fn(state, rows))
  carry = choose(carry, first_logits[rows])

  def cond(carry):
    return carry["go_on"] & (carry["t"] < max_new_tokens)

  def body(carry):
    logits, state = step_fn(reorder_fn(carry["state"], carry["src"]), carry["tokens"])
    return choose(dict(carry, state=state), logits.astype(jnp.float32))

  carry = jax.lax.while_loop(cond, body, carry)
  return carry["fin_tokens"][:, 0]


def _top_continuations(accumulated, width, vocab, key):
  """HF `_get_top_k_continuations`: W (score, source beam, token) per row of [B, K * V].

  With a key, W draws without replacement from softmax(accumulated) by the Gumbel top-k
  trick, in draw order, scored unperturbed (HF's multinomial then gather).
  """
  if key is None:
    scores, flat = jax.lax.top_k(accumulated, width)
  else:
    flat = jax.lax.top_k(accumulated + jax.random.gumbel(key, accumulated.shape), width)[1]
    scores = jnp.take_along_axis(accumulated, flat, axis=1)
  return scores, flat // vocab, (flat % vocab).astype(jnp.int32)


def _next_running(carry, cand_scores, cand_beam, cand_tok, hits, k, position, uses_seen):
  """HF `_get_running_beams_for_next_iteration`: the best K candidates that did not stop
  (stopped ones sink by -1e9), with their history, seen map and state rows."""
  b = cand_scores.shape[0]
  scores, pick = jax.lax.top_k(cand_scores + hits.astype(jnp.float32) * _PLACEHOLDER, k)
  src = (jnp.take_along_axis(cand_beam, pick, axis=1) + (jnp.arange(b) * k)[:, None])
  src = src.reshape(-1)  # flat rows of the state
  tokens = jnp.take_along_axis(cand_tok, pick, axis=1).reshape(-1)
  hist = jax.lax.dynamic_update_slice_in_dim(carry["hist"][src], tokens[:, None], position, 1)
  seen = lp.mark_seen(carry["seen"][src], tokens) if uses_seen else None
  return dict(scores=scores, src=src, tokens=tokens, hist=hist, seen=seen)


def _merge_finished(carry, cand_scores, cand_beam, cand_tok, hits, k, prompt_len, t, denominator):
  """HF `_update_finished_beams`: those of the first K candidates that stopped, length-
  penalized, compete with the K best finished so far (others sink by -1e9, as do all of a
  row that can no longer improve)."""
  b, width = cand_scores.shape
  new_part = carry["hist"].reshape(b, k, -1)[:, :, prompt_len:]
  cand_new = jax.lax.dynamic_update_slice_in_dim(
      new_part[jnp.arange(b)[:, None], cand_beam], cand_tok[:, :, None], t, 2)
  just_done = hits & (jnp.arange(width) < k)[None, :]
  scores = lp.divide(cand_scores, denominator)
  scores = scores + (~carry["improvable"]).astype(jnp.float32)[:, None] * _PLACEHOLDER
  scores = scores + (~just_done).astype(jnp.float32) * _PLACEHOLDER
  fin_scores, keep = jax.lax.top_k(jnp.concatenate([carry["fin_scores"], scores], axis=1), k)
  fin_tokens = jnp.take_along_axis(
      jnp.concatenate([carry["fin_tokens"], cand_new], axis=1), keep[:, :, None], axis=1)
  fin_done = jnp.take_along_axis(
      jnp.concatenate([carry["fin_done"], just_done], axis=1), keep, axis=1)
  return dict(fin_scores=fin_scores, fin_tokens=fin_tokens, fin_done=fin_done)


def _early_stop_heuristic(improvable, running_scores, fin_scores, fin_done, denominator):
  """HF `_check_early_stop_heuristic` (early_stopping=False): a row can still improve while
  its best running beam, scored at the current length, beats its worst finished one."""
  best_running = lp.divide(running_scores[:, :1], denominator)
  worst_finished = jnp.where(fin_done, jnp.min(fin_scores, axis=1, keepdims=True), _PLACEHOLDER)
  return improvable & jnp.any(best_running > worst_finished, axis=1)
