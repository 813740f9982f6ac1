"""Dense layers whose parameters carry logical axis names, so a mesh rule can shard them.

A weight stored in fewer bits than the compute dtype (a frozen bf16 weight under float32
compute) enters the matmul as stored: `lax.dot_general` takes the two dtypes and XLA
upcasts inside the dot. Casting it first (flax's promote_dtype) would make autodiff keep
the float32 copy of every scanned layer's weight for the backward (a residual the size
of the frozen model in float32); uncast, the residual is the stored weight itself, which
a scan forwards without a copy.
"""
import functools
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


class Dense(nn.Module):
  """y = x·kernel + bias, the kernel [in, out] named by `axes` (e.g. ('embed', 'mlp'));
  params named as flax's `nn.Dense`'s (`kernel`, `bias`)."""
  features: int
  axes: Sequence[str]
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = DEFAULT_KERNEL_INIT

  @nn.compact
  def weights(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.axes)),
                        (in_features, self.features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axes[1],)),
                        (self.features,), self.param_dtype)
    return kernel, bias

  def __call__(self, x: jax.Array) -> jax.Array:
    return dense_together(x, [self])[0]


def dense_together(x: jax.Array, layers: Sequence[Dense]) -> list[jax.Array]:
  """Each of `layers` (of one shape) applied to `x`, as one matmul over their kernels
  stacked [in, n, out]. One wide matmul is one instruction in the compiled program where
  n matmuls are n: on TPU a matmul's code is about the same size whatever its width, so
  fusing the projections that read one input (q / k / v, gate / up) cuts the code the
  compiler emits, forward and backward, and with it the compile time (README, Scale).
  The stack is one layer's weights, made inside the layer and remade for the backward
  (`_stacked_matmul`), never saved for it: saved, it would be a copy of every scanned
  layer's weights. Meant for frozen weights: a trained kernel's gradient would be one
  stacked array, which ZeRO-1 all-reduces rather than reduce-scatters
  (tests/test_train_compile.py), so the model fuses only the LMs' and vision towers'
  projections, not the xattn block's."""
  x = jnp.asarray(x, layers[0].dtype)
  weights = [layer.weights(x.shape[-1]) for layer in layers]
  kernels = [as_operand(k, x.dtype) for k, _ in weights]
  # As rows [Π leading dims, in]: from a 3-D input, XLA:CPU computes the kernel's gradient
  # through a transposed copy of the output gradient (the resampler's feed-forward: 1.5×
  # the time); from rows, as one plain matmul. A reshape of the leading dims is free.
  lead, rows = x.shape[:-1], x.reshape(-1, x.shape[-1])
  dims = (((1,), (0,)), ((), ()))
  if len(kernels) == 1:
    ys = [mixed_dot_general(rows, kernels[0], dims)]
  else:
    ys = _stacked_matmul(rows, kernels, dims)
  return [(y if b is None else y + b.astype(y.dtype)).reshape(lead + (y.shape[-1],))
          for y, (_, b) in zip(ys, weights)]


# Rematerialised: what the backward needs is then the kernels as given (a scan's slices of
# its stacked weights, as for separate matmuls), not their stack; the matmul's output is
# still saved where a remat policy saves matmul outputs (layers/remat.py "dots"). CSE left
# on: inside a rematerialised layer XLA merges this stack with the layer's recomputed one
# (with it prevented, flamingo_3b fsdp 4 all-gathered its fsdp weights twice: 3.59 GiB a
# step, not 3.32).
@functools.partial(jax.checkpoint, static_argnums=(2,), policy=jax.checkpoint_policies.nothing_saveable,
                   prevent_cse=False)
def _stacked_matmul(x, kernels, dims) -> list[jax.Array]:
  y = mixed_dot_general(x, jnp.stack(kernels, axis=1), dims)
  return [y[..., i, :] for i in range(len(kernels))]
