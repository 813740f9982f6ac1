"""Decode mode against the plain forward pass: prefill a prompt, extend token by token,
and the logits equal one forward pass over the whole sequence (fp32, max relative error
≤ 1e-5), for every LM family, with a tail group, both xattn placements, `<image>` tokens
inside the prompt, left padding and rows of different lengths."""
import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.decoding import state as decode_state
from flamingo_jax.model import unscanned
from tests.decode_models import CASES, batch, make_config, model_and_params
from tests.parity import relative_error

# The module (flamingo_jax.decoding.generate the name is the function).
generate_module = importlib.import_module("flamingo_jax.decoding.generate")

@pytest.mark.parametrize("family,placement", CASES)
def test_prefill_and_extends_equal_the_forward_pass(family, placement):
  config = make_config(family, placement)
  model, params = model_and_params(config)
  ids, mask, images = batch(config)
  b, t0 = ids.shape
  new = jnp.asarray(np.random.default_rng(1).integers(10, 200, (b, 4)), jnp.int32)
  full_ids = jnp.concatenate([ids, new], axis=1)
  full_mask = jnp.concatenate([mask, jnp.ones_like(new)], axis=1)
  positions = decode_state.prompt_positions(full_mask)
  want = np.asarray(jax.jit(model.apply)({"params": params}, images, full_ids, full_mask,
                                         positions=positions))

  cache_size = t0 + new.shape[1] + 3  # spare slots stay masked
  if placement == "first":  # these cases decode in the unscanned layout (scan_layers=False)
    model, params = unscanned(model, params)
    assert "group_1" in params["lm"] and "groups" not in params["lm"]
  prefill = jax.jit(functools.partial(decode_state.prefill, model, cache_size=cache_size))
  logits, st = prefill(params, images=images, input_ids=ids, attention_mask=mask,
                       logits_at=jnp.broadcast_to(jnp.arange(t0), (b, t0)))
  got = [np.asarray(logits)]
  extend = jax.jit(functools.partial(decode_state.extend, model))
  for k in range(new.shape[1]):
    logits, st = extend(params, st, new[:, k:k + 1])
    got.append(np.asarray(logits))
  got = np.concatenate(got, axis=1)
  real = np.asarray(full_mask, bool)
  err = relative_error(got, want, real)
  assert err <= 1e-5, f"{family}/{placement}: max relative error {err:.2e}"

  # The comparison can fail: the visual tokens and the cache must both matter (other
  # images move the logits ten times the tolerance at least).
  _, st_other = prefill(params, images=-images, input_ids=ids, attention_mask=mask,
                        logits_at=jnp.broadcast_to(jnp.arange(t0), (b, t0)))
  other, _ = extend(params, st_other, new[:, :1])
  assert relative_error(np.asarray(other), want[:, t0:t0 + 1]) > 1e-4


def test_alibi_bias_is_built_once_per_lm_call(monkeypatch):
  """MPT's ALiBi row comes from the key positions once per call (forward, prefill, each
  extend), shared by every layer, not once per layer (unscanned: a per-layer build would
  trace 5 times)."""
  from flamingo_jax.lm import mpt
  model, params = unscanned(*model_and_params(make_config("mpt", "first")))
  ids, mask, images = batch(model.config)
  calls = []
  def counted(*args):
    calls.append(1)
    return alibi_bias(*args)
  alibi_bias = mpt.alibi_bias
  monkeypatch.setattr(mpt, "alibi_bias", counted)
  jax.eval_shape(functools.partial(model.apply, {"params": params}), images, ids, mask)
  assert len(calls) == 1
  _, st = jax.eval_shape(functools.partial(decode_state.prefill, model, cache_size=16),
                         params, images=images, input_ids=ids, attention_mask=mask)
  jax.eval_shape(functools.partial(decode_state.extend, model), params, st, ids[:, :1])
  assert len(calls) == 3


def test_logits_only_where_asked():
  config = make_config("llama", "first")
  model, params = model_and_params(config)
  ids, mask, images = batch(config)
  apply = jax.jit(model.apply)
  full = apply({"params": params}, images, ids, mask)
  at = jnp.array([[3, 10], [0, 5]])
  some = apply({"params": params}, images, ids, mask, logits_at=at)
  assert some.shape == (2, 2, config.lm.vocab_size)
  np.testing.assert_allclose(some, jnp.take_along_axis(full, at[..., None], axis=1),
                             rtol=1e-6, atol=1e-6)


def test_reorder_follows_rows():
  config = make_config("mpt", "last")
  model, params = model_and_params(config)
  ids, mask, images = batch(config)
  _, st = jax.jit(functools.partial(decode_state.prefill, model, cache_size=ids.shape[1] + 2))(
      params, images=images, input_ids=ids, attention_mask=mask)
  extend = jax.jit(functools.partial(decode_state.extend, model))
  want, _ = extend(params, st, jnp.array([[20], [30]], jnp.int32))
  swapped = jax.jit(decode_state.reorder)(st, jnp.array([1, 0, 0]))
  got, _ = extend(params, swapped, jnp.array([[30], [20], [20]], jnp.int32))
  np.testing.assert_allclose(got, want[jnp.array([1, 0, 0])], rtol=1e-5, atol=1e-6)


def test_following_beams_equals_decoding_each_history():
  """Beams followed by `reorder` (indices into the cache, never a copy of it) give the
  logits of decoding each row's own history without any reorder."""
  config = make_config("llama", "first")
  model, params = model_and_params(config)
  ids, mask, images = batch(config)
  # Two prompts, two beams each; beams move within their prompt's rows, as in beam search.
  steps = [([0, 0, 1, 1], [5, 6, 7, 8]), ([1, 1, 3, 2], [9, 10, 11, 12]),
           ([1, 0, 3, 3], [13, 14, 15, 16]), ([0, 0, 2, 3], [17, 18, 19, 20])]
  prefill = jax.jit(functools.partial(decode_state.prefill, model, cache_size=ids.shape[1] + 4))
  extend = jax.jit(functools.partial(decode_state.extend, model))
  reorder = jax.jit(decode_state.reorder)
  _, st = prefill(params, images=images, input_ids=ids, attention_mask=mask)
  prompt, history = np.arange(2), np.zeros((2, 0), int)
  for rows, tokens in steps:
    rows = np.array(rows)
    st = reorder(st, jnp.asarray(rows))
    prompt, history = prompt[rows], history[rows]
    got, st = extend(params, st, jnp.asarray(tokens, jnp.int32)[:, None])
    history = np.concatenate([history, np.array(tokens)[:, None]], axis=1)
  assert st.cache_rows is not None and st.cache_rows.shape == (4, ids.shape[1] + 4)
  # The same rows decoded one by one, each from its own prompt, tokens fed in order.
  _, ref = prefill(params, images=images[prompt], input_ids=ids[prompt],
                   attention_mask=mask[prompt])
  for j in range(history.shape[1]):
    want, ref = extend(params, ref, jnp.asarray(history[:, j:j + 1], jnp.int32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


_VIEWS = ("parameter", "get-tuple-element", "tuple", "bitcast")  # no data written


def _while_bodies(hlo: str) -> tuple[dict, set]:
  """Optimised HLO text → ({computation: its lines}, the names of while-loop bodies)."""
  comps, name = {}, None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
    if m:
      name = m.group(1)
      comps[name] = []
    elif name:
      comps[name].append(line.strip())
  return comps, set(re.findall(r"body=%([\w.\-]+)", hlo))


def test_decode_loop_writes_the_cache_in_place():
  """Beam search's compiled loop touches the stacked KV cache [groups, layers, N, K, S, D]
  only by writing one slot in place: no copy of it per layer, no gather of it to follow
  beams."""
  config = make_config("llama", "first")
  model, params = model_and_params(config)
  ids, mask, images = batch(config)
  new, beams = 4, 3
  settings = dict(max_new_tokens=new, num_beams=beams, length_penalty=0.0, do_sample=False,
                  temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                  no_repeat_ngram_size=0, min_new_tokens=0, eos_token_id=(1,), pad_token_id=1)
  program = generate_module._compiled(config, tuple(sorted(settings.items())), False, ())
  hlo = program.lower(params, images, ids, mask, None, None).compile().as_text()
  comps, bodies = _while_bodies(hlo)
  c = config.lm
  groups, rows, slots = c.num_layers // config.xattn.every, 2 * beams, ids.shape[1] + new - 1
  every, heads = config.xattn.every, c.kv_heads or c.num_heads
  stacked = f"[{groups},{every},{rows},{heads},{slots},{c.dim_per_head}]"
  one_slot = f"[{groups},{every},{rows},{heads},1,{c.dim_per_head}]"
  writes = 0
  for body in bodies:
    for line in comps[body]:
      m = re.match(r"(?:ROOT )?%\S+ = \w+" + re.escape(stacked) + r"\S* ([\w\-]+)\(", line)
      if not m or m.group(1) in _VIEWS:
        continue
      called = re.search(r"calls=%([\w.\-]+)", line)
      fused = comps[called.group(1)] if called else []
      root = next((l for l in fused if l.startswith("ROOT")), "")
      update = re.search(r"dynamic-update-slice\(%\S+, %([\w.\-]+)", root)
      shapes = {re.match(r"%(\S+) = \w+(\[[\d,]*\])", l).groups() for l in fused
                if re.match(r"%\S+ = \w+\[", l)}
      assert update and (update.group(1), one_slot) in shapes, f"a full-cache op: {line[:200]}"
      writes += 1
  assert writes == 2  # one per stacked leaf: the key and the value of the group's layers


def _greedy_program_hlo(model, params, ids, mask, images) -> str:
  settings = dict(max_new_tokens=4, num_beams=1, length_penalty=1.0, do_sample=False,
                  temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                  no_repeat_ngram_size=0, min_new_tokens=0, eos_token_id=(1,), pad_token_id=1)
  program = generate_module._compiled(model.config, tuple(sorted(settings.items())), False, ())
  return program.lower(params, images, ids, mask, None, None).compile().as_text()


def test_unscanned_decode_loop_copies_no_weights():
  """In the unscanned layout the decode loop reads every LM weight where it lies: no
  instruction in a loop body outputs a buffer of an LM matrix's shape (a scanned stack
  sliced inside the loop is copied so on XLA:CPU)."""
  config = make_config("llama", "first")
  model, params = unscanned(*model_and_params(config))
  ids, mask, images = batch(config)
  comps, bodies = _while_bodies(_greedy_program_hlo(model, params, ids, mask, images))
  shapes = {"[" + ",".join(map(str, x.shape)) + "]" for x in jax.tree.leaves(params["lm"])
            if x.ndim == 2 and min(x.shape) > 8}
  assert shapes
  for body in bodies:
    for line in comps[body]:
      m = re.match(r"(?:ROOT )?%\S+ = \w+(\[[\d,]*\])\S* ([\w\-]+)\(", line)
      lm = "lm_logits" in line and "encode_media" not in line  # the vision tower scans
      assert not (m and lm and m.group(1) in shapes and m.group(2) not in _VIEWS), (
          f"a weight-sized buffer: {line[:200]}")
