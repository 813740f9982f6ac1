"""Feed-forward blocks: plain (up → act → down) or gated (SwiGLU)."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.layers import activations
from flamingo_jax.layers.linear import Dense, dense_together


class MLP(nn.Module):
  """`down(act(up(x)))`, or `down(act(gate(x)) * up(x))` when `gated`.

  Parameter names: `up`, `gate` (gated only), `down`; kernels are [embed, mlp] and
  [mlp, embed] so tensor parallelism shards the hidden dimension.
  """
  hidden_dim: int
  activation: str = "gelu"
  gated: bool = False
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    act = activations.get(self.activation)
    if self.gated:  # gate and up in one matmul (linear.dense_together)
      h, gate = dense_together(x, [Dense(self.hidden_dim, ("embed", "mlp"), name=n, **kw)
                                   for n in ("up", "gate")])
      h = act(gate) * h
    else:
      h = act(Dense(self.hidden_dim, ("embed", "mlp"), name="up", **kw)(x))
    h = nn.with_logical_constraint(h, ("act_batch", "act_len", "act_mlp"))
    return Dense(x.shape[-1], ("mlp", "embed"), name="down", **kw)(h)
