"""`flamingo_jax.score`: candidate log-likelihoods equal those of full forward passes over
prompt + candidate, the prompt computed once for all candidates."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flamingo_jax
from flamingo_jax.decoding import state as decode_state
from tests.decode_models import batch, make_config, model_and_params

CANDIDATES = np.array([[40, 41, 42], [50, 0, 0], [60, 61, 0], [70, 71, 72], [80, 81, 0]])
LENGTHS = np.array([3, 1, 2, 3, 2])


def forward_log_probs(model, params, images, ids, mask, cand, n):
  """log p(cand[:n] | prompt) by one forward pass over the concatenation."""
  full_ids = jnp.concatenate([ids, jnp.broadcast_to(cand[:n], (ids.shape[0], n))], axis=1)
  full_mask = jnp.concatenate([mask, jnp.ones((ids.shape[0], n), mask.dtype)], axis=1)
  logits = jax.jit(model.apply)({"params": params}, images, full_ids, full_mask,
                                positions=decode_state.prompt_positions(full_mask))
  lp = jax.nn.log_softmax(logits, axis=-1)
  t = ids.shape[1]
  return sum(lp[:, t - 1 + j, cand[j]] for j in range(n))


@pytest.mark.parametrize("family", ["mpt", "llama"])
def test_score_equals_forward_pass(family):
  config = make_config(family, "last")
  model, params = model_and_params(config)
  ids, mask, images = batch(config)
  out = flamingo_jax.score(model, params, images=images, input_ids=ids, attention_mask=mask,
                           candidates=CANDIDATES, candidate_mask=np.arange(3) < LENGTHS[:, None],
                           chunk_size=2)  # 3 chunks, the last one padded
  want = np.stack([forward_log_probs(model, params, images, ids, mask, c, n)
                   for c, n in zip(CANDIDATES, LENGTHS)], axis=1)
  np.testing.assert_allclose(out["sum"], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["mean"], want / LENGTHS, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["length"], np.broadcast_to(LENGTHS, want.shape))
  # One chunk or several: the same numbers.
  whole = flamingo_jax.score(model, params, images=images, input_ids=ids, attention_mask=mask,
                             candidates=CANDIDATES, candidate_mask=np.arange(3) < LENGTHS[:, None])
  np.testing.assert_allclose(whole["sum"], out["sum"], rtol=1e-5, atol=1e-5)


def test_score_rejects_bad_candidates():
  config = make_config("llama", "first")
  model, params = model_and_params(config)
  ids, mask, images = batch(config)
  kw = dict(images=images, input_ids=ids, attention_mask=mask)
  with pytest.raises(ValueError, match="candidates: ids must lie"):
    flamingo_jax.score(model, params, candidates=np.array([[10**6]]), **kw)
  with pytest.raises(ValueError, match="at least one token"):
    flamingo_jax.score(model, params, candidates=np.array([[5, 6]]),
                       candidate_mask=np.array([[0, 1]]), **kw)
  with pytest.raises(ValueError, match="left-padded"):
    flamingo_jax.score(model, params, candidates=np.array([[5]]), images=images,
                       input_ids=ids, attention_mask=mask[:, ::-1])
