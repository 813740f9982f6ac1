"""LayerNorm and RMSNorm, computed in float32 whatever the activation dtype."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def LayerNorm(*, eps: float, use_bias: bool = True, dtype: Any = jnp.float32,
              param_dtype: Any = jnp.float32, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm over the last axis; `use_bias=False` is MPT's bias-free variant."""
  return nn.LayerNorm(
      epsilon=eps,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
      name=name,
  )


class RMSNorm(nn.Module):
  """LLaMA's RMSNorm: x / rms(x) * scale, the reduction in float32."""
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    # HF casts back to the input dtype before the scale; same here so bf16 runs match.
    return (y.astype(self.dtype) * scale.astype(self.dtype))
