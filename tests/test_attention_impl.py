"""`lm.attention_impl`: jax.nn.dot_product_attention (cuDNN's fused kernel on GPU) in place
of the einsum attention, checked on CPU through the same call's XLA lowering."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from flamingo_jax.config import FlamingoConfig
from flamingo_jax.load_model import random_init
from flamingo_jax.model import Flamingo


def _model(impl: str) -> Flamingo:
  d = tiny.get_config().model.to_dict()
  d["lm"] = dict(d["lm"], attention_impl=impl)
  return Flamingo(FlamingoConfig.from_dict(d))


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 250, (3, 16)).astype(np.int32)
  ids[:, 2] = ids[:, 9] = tiny.synthetic.MEDIA_TOKEN_ID
  mask = np.ones_like(ids)
  mask[1, 12:] = 0  # right padding
  mask[2, :2] = 0  # left padding (fully masked query rows)
  images = rng.normal(size=(3, 2, 1, 32, 32, 3)).astype(np.float32)
  return jnp.asarray(images), jnp.asarray(ids), jnp.asarray(mask)


def test_xla_dot_product_attention_matches_einsum_forward_and_gradients():
  images, ids, mask = _batch()
  reference, fused = _model("einsum"), _model("xla")
  params = random_init(reference, 0)

  def loss(model):
    def fn(p):
      logits = model.apply({"params": p}, images, ids, mask)
      return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2) * 1e-3, logits
    return jax.value_and_grad(fn, has_aux=True)
  (l_ref, logits_ref), g_ref = jax.jit(loss(reference))(params)
  (l_new, logits_new), g_new = jax.jit(loss(fused))(params)

  valid = np.asarray(mask) > 0
  np.testing.assert_allclose(np.asarray(logits_new)[valid], np.asarray(logits_ref)[valid],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(l_new), float(l_ref), rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_new), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  # The switch is not a no-op: the LM's attention is another computation.
  jaxpr = lambda m: str(jax.make_jaxpr(lambda p: m.apply({"params": p}, images, ids, mask))(params))
  assert jaxpr(fused) != jaxpr(reference)
