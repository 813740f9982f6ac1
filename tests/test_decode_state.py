"""Decode mode against the plain forward pass: prefill a prompt, extend token by token,
and the logits equal one forward pass over the whole sequence (fp32, max relative error
≤ 1e-5), for every LM family, with a tail group, both xattn placements, `<image>` tokens
inside the prompt, left padding and rows of different lengths."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.decoding import state as decode_state
from tests.decode_models import CASES, batch, make_config, model_and_params
from tests.parity import relative_error

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

  # The comparison can fail: the visual tokens and the cache must both matter.
  _, st_other = prefill(params, images=-images, input_ids=ids, attention_mask=mask,
                        logits_at=jnp.broadcast_to(jnp.arange(t0), (b, t0)))
  other, _ = extend(params, st_other, new[:, :1])
  assert relative_error(np.asarray(other), want[:, t0:t0 + 1]) > 1e-3


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
