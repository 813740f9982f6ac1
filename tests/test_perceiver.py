"""Perceiver Resampler: fixed output shape, temporal embeddings, latents in the keys, parity
with open_flamingo's (output and gradients)."""
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _zero_temporal_table(params):
  zeroed = jax.tree.map(lambda x: x, params)
  zeroed["params"]["temporal_embedding"] = jax.tree.map(jnp.zeros_like, params["params"]["temporal_embedding"])
  return zeroed


def test_temporal_embeddings_distinguish_frames():
  """Frames are flattened into one set of keys with no position encoding, so only the
  temporal embedding tells them apart: swapping two different frames changes the output,
  and without the embedding (table zeroed) the swap changes nothing."""
  model, params = _init(jnp.ones((1, 2, 3, 3, 16)))
  x = jax.random.normal(jax.random.key(1), (1, 2, 3, 3, 16))
  swapped = x.at[:, 1, 0].set(x[:, 1, 2]).at[:, 1, 2].set(x[:, 1, 0])  # item 1: frames 0 <-> 2
  out, out_swapped = model.apply(params, x), model.apply(params, swapped)
  np.testing.assert_array_equal(out[:, 0], out_swapped[:, 0])  # item 0 untouched
  # (random init attends almost uniformly: the effect is small but far above rounding)
  assert np.abs(out[:, 1] - out_swapped[:, 1]).max() > 1e-4
  zeroed = _zero_temporal_table(params)
  assert np.abs(model.apply(zeroed, x) - model.apply(zeroed, swapped)).max() < 1e-5


def _torch_linear_resize(table: np.ndarray, rows: int) -> np.ndarray:
  """The reference: PyTorch's 1-D linear interpolation (half-pixel centres, edges clamped)."""
  import torch
  t = torch.from_numpy(np.array(table, np.float32)).T[None]  # [1, D, max_frames]
  return torch.nn.functional.interpolate(t, size=rows, mode="linear", align_corners=False)[0].T.numpy()


def test_temporal_interpolation():
  table = jax.random.normal(jax.random.key(3), (8, 3))
  np.testing.assert_array_equal(temporal_embeddings(table, 5), table[:5])  # open_flamingo's [:F]
  np.testing.assert_array_equal(temporal_embeddings(table, 8), table)
  for rows in (9, 16, 30):
    np.testing.assert_allclose(temporal_embeddings(table, rows), _torch_linear_resize(table, rows),
                               rtol=1e-6, atol=1e-6)
  # By hand: two rows [0, 1] to four rows sit at source positions -0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
  np.testing.assert_allclose(temporal_embeddings(jnp.array([[0.0], [1.0]]), 4)[:, 0],
                             [0.0, 0.25, 0.75, 1.0], atol=1e-7)


def test_interpolated_embeddings_are_the_ones_added():
  """A video longer than max_frames gets, per frame, the interpolated table's row."""
  model, params = _init(jnp.ones((1, 1, 1, 3, 16)))
  frames = CFG.max_frames * 2 + 1
  x = jax.random.normal(jax.random.key(1), (1, 1, frames, 3, 16))
  table = params["params"]["temporal_embedding"]
  table = table.unbox() if hasattr(table, "unbox") else table
  rows = jnp.asarray(_torch_linear_resize(table, frames))
  # The same output from the embeddings added by hand and the table zeroed.
  by_hand = model.apply(_zero_temporal_table(params), x + rows[None, None, :, None, :])
  np.testing.assert_allclose(model.apply(params, x), by_hand, rtol=1e-5, atol=1e-5)


def test_latents_take_part_in_keys():
  """Every step is per latent (LayerNorm, the residual, the FFW, each query's attention)
  except that the latents are keys and values too: so changing latent 1 changes latent
  0's output only through the keys. Without the latents among the keys it stays exact."""
  model, params = _init(jnp.ones((1, 1, 1, 1, 16)))
  x = jax.random.normal(jax.random.key(1), (1, 1, 1, 1, 16))
  p2 = jax.tree.map(lambda a: a, params)
  lat = params["params"]["latents"]
  value = lat.unbox() if hasattr(lat, "unbox") else lat
  value = value.at[1].set(jax.random.normal(jax.random.key(2), value.shape[1:]) * 3)
  p2["params"]["latents"] = lat.replace_boxed(value) if hasattr(lat, "unbox") else value
  out, out2 = model.apply(params, x), model.apply(p2, x)
  moved = np.abs(out - out2).max(axis=-1)[0, 0]  # per latent
  others = np.delete(moved, 1)
  assert others.min() > 1e-4, moved  # exactly 0 if the latents were not keys


def test_groups_resampled_in_one_call_equal_each_group_alone():
  """Stills and clips in one call (train/step.py): projections over every group's rows
  side by side per batch shard, the softmax per group; each group's items come back in
  order, as the group alone gives them, for any shard count."""
  model, params = _init(jnp.ones((1, 1, 1, 7, 16)))
  stills = jax.random.normal(jax.random.key(1), (4, 1, 7, 16))
  clips = jax.random.normal(jax.random.key(2), (2, 3, 7, 16))
  alone = [model.apply(params, g[:, None])[:, 0] for g in (stills, clips)]
  for shards in (1, 2):
    together = model.apply(params, [stills, clips], shards)
    for a, t in zip(alone, together):
      np.testing.assert_allclose(t, a, rtol=1e-5, atol=1e-5)
  assert not np.allclose(alone[0][:2], alone[1])  # (the groups' outputs differ)


def test_remat_policy_decides_whether_the_backward_recomputes_the_layers():
  """remat_policy 'none' (FlamingoConfig's default, open_flamingo's training) saves the
  layers' residuals; 'full' recomputes each layer's forward in the backward. Same gradient."""
  x = jax.random.normal(jax.random.key(1), (2, 1, 3, 7, 16))
  params = _init(x)[1]
  def grad(policy):  # (gradient, its jaxpr as text)
    g = jax.grad(lambda p: (PerceiverResampler(CFG, policy).apply(p, x) ** 2).sum())
    return g(params), str(jax.make_jaxpr(g)(params))
  (g_none, jaxpr_none), (g_full, jaxpr_full) = grad("none"), grad("full")
  assert "remat" not in jaxpr_none and "remat" in jaxpr_full  # (jax.checkpoint's primitive: remat2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_none, g_full)


@pytest.mark.parametrize("frames", [1, 3])
def test_output_and_gradients_match_open_flamingo(frames):
  """The resampler and the gradient of every weight against open_flamingo's
  PerceiverResampler on the same weights (its LayerNorms away from scale 1 / bias 0);
  with 3 frames its learned frame embeddings (ours: the temporal table) train too."""
  torch = pytest.importorskip("torch")
  helpers = pytest.importorskip("open_flamingo.src.helpers")
  from flamingo_jax.convert.openflamingo import convert_resampler
  from flamingo_jax.convert.state_dict import StateDict

  cfg = ResamplerConfig(depth=2, num_heads=2, head_dim=8, num_latents=5, ff_mult=2,
                        max_frames=frames if frames > 1 else 0)
  d = 16
  torch.manual_seed(0)
  ref = helpers.PerceiverResampler(dim=d, depth=cfg.depth, dim_head=cfg.head_dim,
                                   heads=cfg.num_heads, num_latents=cfg.num_latents,
                                   max_num_frames=cfg.max_frames or None, ff_mult=cfg.ff_mult)
  with torch.no_grad():
    for name, p in ref.named_parameters():  # 1-D: the LayerNorms' scales (about 1) and biases
      scale = float(p.ndim == 1 and name.endswith("weight"))
      p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.3) + scale)
  x = torch.randn(2, 2, frames, 7, d)
  g = torch.randn(2, 2, cfg.num_latents, d)
  (ref(x) * g).sum().backward()

  def ours(tensors):  # an open_flamingo state dict → our resampler tree
    tensors = dict(tensors)
    table = tensors.pop("frame_embs", None)
    config = types.SimpleNamespace(resampler=cfg, vision=types.SimpleNamespace(out_dim=d))
    tree = convert_resampler(StateDict(tensors), config, prefix="")
    if table is not None:
      tree["temporal_embedding"] = table
    return jax.tree.map(jnp.asarray, tree)

  params = ours({k: p.detach().numpy() for k, p in ref.named_parameters()})
  want_grads = ours({k: p.grad.numpy() for k, p in ref.named_parameters()})
  model = PerceiverResampler(cfg, remat_policy="none")
  features, cotangent = jnp.asarray(x.numpy()), jnp.asarray(g.numpy())
  out = model.apply({"params": params}, features)
  np.testing.assert_allclose(out, ref(x).detach().numpy(), rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, features) * cotangent))(params)
  assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
  for path, got in jax.tree_util.tree_leaves_with_path(grads):
    want = functools.reduce(lambda t, k: t[k.key], path, want_grads)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(),  # float32 sums
                               err_msg=jax.tree_util.keystr(path))
