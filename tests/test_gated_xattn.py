"""GATED XATTN-DENSE semantics: tanh gates at 0 are the identity; image-causal masking."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.config import XAttnConfig
from flamingo_jax.gated_xattn import GatedCrossAttentionBlock, media_attention_mask

B, T, D, M, N, DV = 2, 7, 16, 3, 4, 12
MEDIA_INDEX = jnp.array([[-1, -1, 0, 0, 1, 2, 2], [-1, 0, 1, 1, 1, 1, 2]])


def _block(ff_without_media=False, gates=0.5):
  cfg = XAttnConfig(num_heads=2, head_dim=4, ff_mult=2, ff_without_media=ff_without_media)
  block = GatedCrossAttentionBlock(cfg)
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  media = jax.random.normal(jax.random.key(1), (B, M * N, DV))
  mask = media_attention_mask(MEDIA_INDEX, M, N)
  params = nn.unbox(block.init(jax.random.key(2), x, media, mask=mask, has_media=MEDIA_INDEX >= 0))
  params["params"]["attn_gate"] = jnp.asarray(gates)
  params["params"]["ff_gate"] = jnp.asarray(-gates)

  def run(x, media, media_index=MEDIA_INDEX, media_mask=None):
    mask = media_attention_mask(media_index, M, N, media_mask)
    return block.apply(params, x, media, mask=mask, has_media=mask.any(-1))
  return run, x, media


def test_zero_gates_are_identity():
  run, x, media = _block(gates=0.0)
  np.testing.assert_array_equal(run(x, media), x)


def test_tokens_without_media_get_exactly_zero():
  run, x, media = _block()
  out = run(x, media)
  none = np.asarray(MEDIA_INDEX < 0)
  np.testing.assert_array_equal(np.asarray(out)[none], np.asarray(x)[none])
  assert not np.allclose(np.asarray(out)[~none], np.asarray(x)[~none])


def test_openflamingo_mode_runs_ffw_on_every_token_but_no_attention():
  run, x, media = _block(ff_without_media=True)
  out = run(x, media)
  out_other_media = run(x, -media)
  none = np.asarray(MEDIA_INDEX < 0)
  assert not np.allclose(np.asarray(out)[none], np.asarray(x)[none])  # the FFW acted
  np.testing.assert_array_equal(np.asarray(out)[none], np.asarray(out_other_media)[none])


@pytest.mark.parametrize("k", range(M))
def test_changing_image_k_changes_only_its_tokens(k):
  run, x, media = _block()
  out = run(x, media)
  changed = media.reshape(B, M, N, DV).at[:, k].set(
      jax.random.normal(jax.random.key(9), (B, N, DV))).reshape(B, M * N, DV)
  diff = np.abs(np.asarray(run(x, changed) - out)).max(-1)
  mapped = np.asarray(MEDIA_INDEX == k)
  assert (diff[mapped] > 0).all()
  np.testing.assert_array_equal(diff[~mapped], 0)


def test_empty_media_slot_is_never_attended():
  run, x, media = _block()
  slot_mask = jnp.array([[True, True, False], [True, True, False]])
  out = run(x, media, media_mask=slot_mask)
  out_other = run(x, media.reshape(B, M, N, DV).at[:, 2].multiply(-3.0).reshape(B, M * N, DV),
                  media_mask=slot_mask)
  np.testing.assert_array_equal(out, out_other)
  on_empty = np.asarray(MEDIA_INDEX == 2)
  np.testing.assert_array_equal(np.asarray(out)[on_empty], np.asarray(x)[on_empty])
