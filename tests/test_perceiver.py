"""Perceiver Resampler: fixed output shape, temporal embeddings, latents in the keys."""
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.config import ResamplerConfig
from flamingo_jax.perceiver import PerceiverResampler, temporal_embeddings

CFG = ResamplerConfig(depth=2, num_heads=2, head_dim=8, num_latents=5, ff_mult=2,
                      activation="squared_relu", max_frames=4)


def _init(features):
  model = PerceiverResampler(CFG)
  return model, model.init(jax.random.key(0), features)


def test_output_shape_independent_of_resolution_and_frames():
  model, params = _init(jnp.ones((1, 1, 1, 7, 16)))
  for frames, tokens in [(1, 7), (3, 49), (4, 1), (9, 20)]:  # 9 > max_frames: interpolated
    out = model.apply(params, jax.random.normal(jax.random.key(1), (2, 3, frames, tokens, 16)))
    assert out.shape == (2, 3, CFG.num_latents, 16)
    assert np.isfinite(out).all()


def test_each_media_item_is_resampled_on_its_own():
  model, params = _init(jnp.ones((1, 2, 1, 7, 16)))
  x = jax.random.normal(jax.random.key(1), (1, 2, 1, 7, 16))
  out = model.apply(params, x)
  # (a constant shift would vanish in the LayerNorm: use new random features)
  out_changed = model.apply(params, x.at[:, 1].set(jax.random.normal(jax.random.key(2), (1, 1, 7, 16))))
  np.testing.assert_array_equal(out[:, 0], out_changed[:, 0])
  assert not np.allclose(out[:, 1], out_changed[:, 1])


def test_temporal_embeddings_distinguish_frames():
  model, params = _init(jnp.ones((1, 1, 2, 3, 16)))
  frame = jax.random.normal(jax.random.key(1), (1, 1, 1, 3, 16))
  same_twice = jnp.concatenate([frame, frame], axis=2)
  # Swapping two identical frames changes nothing; the output still depends on the
  # embeddings added per frame (zeroing the table changes it).
  base = model.apply(params, same_twice)
  zeroed = jax.tree.map(lambda x: x, params)
  zeroed["params"]["temporal_embedding"] = jax.tree.map(jnp.zeros_like, params["params"]["temporal_embedding"])
  assert not np.allclose(base, model.apply(zeroed, same_twice))


def test_temporal_interpolation():
  table = jnp.arange(8.0)[:, None] * jnp.ones((1, 3))
  np.testing.assert_array_equal(temporal_embeddings(table, 5), table[:5])
  longer = temporal_embeddings(table, 30)
  assert longer.shape == (30, 3)
  # Linear interpolation of a linear ramp stays a monotone ramp within the table's range.
  assert np.all(np.diff(longer[:, 0]) >= 0)
  assert longer[0, 0] >= 0 and longer[-1, 0] <= 7


def test_latents_take_part_in_keys():
  """With a single media token, the output still varies with the latents (they are keys
  and values too), unlike a plain cross-attention whose softmax over one key is 1."""
  model, params = _init(jnp.ones((1, 1, 1, 1, 16)))
  x = jax.random.normal(jax.random.key(1), (1, 1, 1, 1, 16))
  p2 = jax.tree.map(lambda a: a, params)
  lat = params["params"]["latents"]
  p2["params"]["latents"] = lat.replace_boxed(lat.unbox() * 2) if hasattr(lat, "unbox") else lat * 2
  assert not np.allclose(model.apply(params, x), model.apply(p2, x))
