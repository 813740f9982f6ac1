"""Logical axis rules: how parameter and activation axis names map onto a device mesh.

Every parameter is created with logical axis names (`embed`, `heads`, `mlp`, `layers`,
…) and activations carry `act_*` constraints; one rule table maps names to the mesh axes
`data`, `fsdp` and `tensor` (maxtext style). A name mapped to None is replicated.
"""
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")

# Defaults: FSDP over the model width, Megatron-style tensor parallelism over heads and
# the FFW hidden size, the batch over data and fsdp.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("latents", None),
    ("frames", None),
    ("vis_len", None),
    # The vision tower is small next to the LM and frozen: replicated (as in the paper).
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", None),
    ("se_hidden", None),
    ("new_tokens", None),
)


def make_mesh(shape: Sequence[int], devices=None, axis_names: Sequence[str] = MESH_AXES) -> Mesh:
  """A mesh of `shape` (one size per axis name) over `devices` (default: all)."""
  devices = jax.devices() if devices is None else devices
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} ({dict(zip(axis_names, shape))}) needs "
                     f"{int(np.prod(shape))} devices, there are {len(devices)}; change the "
                     "mesh sizes so their product is the device count")
  # Auto axes: logical constraints are sharding hints, not assertions (jax >= 0.7 defaults
  # make_mesh to Explicit axes).
  return Mesh(np.asarray(devices).reshape(tuple(shape)), tuple(axis_names),
              axis_types=(AxisType.Auto,) * len(shape))


def param_shardings(abstract_variables, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a (boxed, e.g. from `jax.eval_shape(model.init, ...)`) tree."""
  specs = nn.get_partition_spec(abstract_variables)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)
