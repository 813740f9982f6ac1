"""Dense layers whose parameters carry logical axis names, so a mesh rule can shard them."""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

DEFAULT_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def Dense(
    features: int,
    axes: Sequence[str],
    *,
    use_bias: bool = False,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    kernel_init=DEFAULT_KERNEL_INIT,
    name: str | None = None,
) -> nn.Dense:
  """`nn.Dense` with a [in, out] kernel named by `axes` (e.g. ('embed', 'mlp'))."""
  in_axis, out_axis = axes
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, (in_axis, out_axis)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (out_axis,)),
      name=name,
  )
