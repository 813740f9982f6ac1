"""Dense layers whose parameters carry logical axis names, so a mesh rule can shard them.

A weight stored in fewer bits than the compute dtype (a frozen bf16 weight under float32
compute) enters the matmul as stored: `lax.dot_general` takes the two dtypes and XLA
upcasts inside the dot. Casting it first (flax's promote_dtype) would make autodiff keep
the float32 copy of every scanned layer's weight for the backward (a residual the size
of the frozen model in float32); uncast, the residual is the stored weight itself, which
a scan forwards without a copy.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DEFAULT_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def as_operand(w: jax.Array, dtype) -> jax.Array:
  """A weight as a `dtype` matmul operand: as stored when it is a narrower float (XLA
  upcasts it inside the dot, losing nothing), else cast to `dtype`."""
  narrower = (jnp.issubdtype(w.dtype, jnp.floating) and jnp.issubdtype(dtype, jnp.floating)
              and jnp.finfo(w.dtype).bits < jnp.finfo(dtype).bits)
  return w if narrower else jnp.asarray(w, dtype)


def mixed_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """lax.dot_general in the activations' (lhs) dtype, whatever the weight's."""
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type or lhs.dtype)


def _promote_but_keep_weight(inputs, kernel, bias=None, *, dtype=None, inexact=True) -> list:
  """flax's promote_dtype for Dense's (inputs, kernel, bias), the kernel through
  `as_operand`."""
  inputs, bias = nn.dtypes.promote_dtype(inputs, bias, dtype=dtype, inexact=inexact)
  return [inputs, as_operand(kernel, inputs.dtype), bias]


class Embed(nn.Embed):
  """nn.Embed reading a narrower table as stored: the looked-up rows are cast, not the
  table, and `attend` (a tied LM head) upcasts inside the dot. The lookup keeps the batch
  sharded."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"{self.name}: token ids must be integers, got {inputs.dtype}")
    # The table whole along `embed` (gathered over fsdp, as any fsdp weight is where it is
    # used), so the looked-up rows take the ids' batch sharding; with `embed` split, SPMD
    # re-shards the rows by gathering the whole batch's activations to every device.
    table = nn.with_logical_constraint(as_operand(self.embedding, self.dtype), ("vocab", None))
    return jnp.take(table, inputs, axis=0).astype(self.dtype)

  def attend(self, query: jax.Array) -> jax.Array:
    query = query.astype(self.dtype)
    return mixed_dot_general(query, as_operand(self.embedding, self.dtype),
                             (((query.ndim - 1,), (1,)), ((), ())))


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
      promote_dtype=_promote_but_keep_weight,
      dot_general=mixed_dot_general,
      name=name,
  )
