"""`generate`: text from a Flamingo model, with HF generate's arguments and meanings.

One jitted program per (model config, prompt shape, settings): the images are encoded
and the prompt prefilled once, then a `lax.while_loop` extends every row by one token per
step through the KV cache until all rows stop (search.py). Prompts are left-padded.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.decoding import search, state as decode_state
from flamingo_jax.inputs import FlamingoInputError, check_inputs
from flamingo_jax.model import Flamingo


def generate(model, params, *, images, input_ids, attention_mask, media_mask=None,
             max_new_tokens: int, num_beams: int = 1, length_penalty: float = 1.0,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, repetition_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0, min_new_tokens: int = 0, eos_token_id=None,
             pad_token_id: int | None = None, rng: jax.Array | None = None,
             count_padding: bool = False) -> jax.Array:
  """The new tokens, int32 [B, max_new_tokens]; `pad_token_id` after a row has stopped.

  images [B, M, F, H, W, C] as `Flamingo` takes them (None: text only); input_ids and
  attention_mask [B, T], left-padded; media_mask [B, M]. eos_token_id: an id or a list
  (default: the config's `<|endofchunk|>`); pad_token_id defaults to the first eos id
  (as HF does). Sampling (`do_sample`) needs `rng`. Beam search returns each prompt's
  best finished hypothesis, by HF's rules. `count_padding=True` gives left pads position
  ids as open_flamingo's generate does (state.prompt_positions); it matters for rotary
  LMs only.
  """
  config = model.config
  prompt = checked_prompts(config, images, input_ids, attention_mask, media_mask)
  eos = _eos_ids(config.eoc_token_id if eos_token_id is None else eos_token_id, config)
  settings = dict(
      max_new_tokens=_positive_int(max_new_tokens, "max_new_tokens"),
      num_beams=_positive_int(num_beams, "num_beams"), length_penalty=float(length_penalty),
      do_sample=bool(do_sample), temperature=float(temperature), top_k=int(top_k),
      top_p=float(top_p), repetition_penalty=float(repetition_penalty),
      no_repeat_ngram_size=int(no_repeat_ngram_size), min_new_tokens=int(min_new_tokens),
      eos_token_id=eos, pad_token_id=eos[0] if pad_token_id is None else int(pad_token_id))
  if do_sample and rng is None:
    raise ValueError("rng: do_sample=True needs a PRNG key, e.g. rng=jax.random.key(0)")
  if do_sample and temperature <= 0:
    raise ValueError(f"temperature={temperature} must be > 0 when sampling")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p} must be in (0, 1]")
  fn = _compiled(config, tuple(sorted(settings.items())), bool(count_padding), current_rules())
  return fn(params, *prompt, rng if do_sample else None)


@functools.lru_cache(maxsize=64)
def _compiled(config, settings: tuple, count_padding: bool, rules):
  """The jitted program for one config and settings (jit then caches per shape). `rules`
  (the logical axis rules in effect) is part of the key: they change what is traced."""
  del rules
  settings = dict(settings)
  model = Flamingo(config)

  def run(params, images, input_ids, attention_mask, media_mask, rng):
    cache_size = input_ids.shape[1] + settings["max_new_tokens"] - 1
    first_logits, st = decode_state.prefill(
        model, params, images=images, input_ids=input_ids, attention_mask=attention_mask,
        media_mask=media_mask, cache_size=cache_size, count_padding=count_padding)

    def step(st, tokens):
      logits, st = decode_state.extend(model, params, st, tokens[:, None])
      return logits[:, 0], st

    return search.search(step, decode_state.reorder, st, first_logits, input_ids, rng=rng,
                         **settings)

  return jax.jit(run)


def current_rules():
  rules = nn.get_logical_axis_rules()
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def _positive_int(value, name: str) -> int:
  if int(value) != value or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive integer")
  return int(value)


def _eos_ids(eos, config) -> tuple[int, ...]:
  ids = search.eos_ids(eos)
  if not ids or any(not 0 <= i < config.lm.vocab_size for i in ids):
    raise ValueError(f"eos_token_id={eos!r}: ids must lie in [0, lm.vocab_size="
                     f"{config.lm.vocab_size}); the config's <|endofchunk|> id is "
                     f"{config.eoc_token_id} (-1: none, pass eos_token_id)")
  return ids


def checked_prompts(config, images, input_ids, attention_mask, media_mask):
  """(images, input_ids, attention_mask, media_mask) as device arrays, after the model's
  input checks and a check that the prompts are left-padded."""
  input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
  images = None if images is None else jnp.asarray(images)
  media_mask = None if media_mask is None else np.asarray(media_mask)
  check_inputs(config, images, input_ids, attention_mask, media_mask)
  _check_left_padded(attention_mask)
  return (images, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
          None if media_mask is None else jnp.asarray(media_mask, bool))


def _check_left_padded(attention_mask: np.ndarray) -> None:
  """Every row's real tokens must end the row, and no row may be empty."""
  mask = attention_mask.astype(bool)
  # Left padding: once a row's mask turns on, it stays on.
  bad = np.flatnonzero((np.diff(mask.astype(np.int8), axis=1) < 0).any(axis=1) | ~mask.any(axis=1))
  if bad.size:
    raise FlamingoInputError(
        f"attention_mask: row {bad[0]} is not left-padded (or is empty); generation appends "
        "to the end of each row, so pad on the left (tokenizer.padding_side = 'left')")
