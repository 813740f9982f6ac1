"""Logical axis rules: how parameter and activation axis names map onto a device mesh.

Every parameter is created with logical axis names (`embed`, `heads`, `mlp`, `layers`,
…) and activations carry `act_*` constraints; one rule table maps names to the mesh axes
`slice`, `data`, `fsdp` and `tensor` (maxtext style). A name mapped to None is replicated.
"""
import itertools
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("slice", "data", "fsdp", "tensor")
BATCH_AXES = ("slice", "data", "fsdp")  # the batch is split over all but `tensor`

# Defaults: FSDP over the model width, Megatron-style tensor parallelism over heads and
# the FFW hidden size, the batch over data and fsdp.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("act_batch", BATCH_AXES),
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
    ("group_layers", None),
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


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
  """A mesh with axes `MESH_AXES` of the given sizes (one may be -1: the rest) over
  `devices` (default: all). With slice > 1, slices are the outer (DCN) axis."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {name: int(sizes.get(name, 1)) for name in MESH_AXES}
  known = int(np.prod([v for v in sizes.values() if v != -1]))
  for name, v in sizes.items():
    if v == -1:
      sizes[name] = len(devices) // known if known and len(devices) % known == 0 else 0
  shape = tuple(sizes[name] for name in MESH_AXES)
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh {sizes} needs {int(np.prod(shape))} devices, there are "
                     f"{len(devices)}; change config.mesh so the product of its sizes is the "
                     "device count (or set one axis to -1)")
  grid = device_grid(shape, devices, slices=sizes["slice"])
  # Auto axes: logical constraints are sharding hints, not assertions (jax >= 0.7 defaults
  # make_mesh to Explicit axes).
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def device_grid(shape: tuple[int, ...], devices, slices: int = 1) -> np.ndarray:
  """`devices` arranged as `shape`. Devices with a physical topology (TPU chips, abstract
  ones too) go through mesh_utils, which keeps each mesh axis on neighbouring chips (the
  last, `tensor`, on the fastest links; split physical axes only when no exact fit
  exists); with slices > 1 the first axis runs over the slices (DCN). Others (CPU) in
  device order."""
  from jax.experimental import mesh_utils
  if slices > 1:
    return mesh_utils.create_hybrid_device_mesh((1,) + shape[1:], (slices,) + (1,) * (len(shape) - 1),
                                                devices=devices)
  if getattr(devices[0], "coords", None) is None or devices[0].platform != "tpu":
    return np.asarray(devices).reshape(shape)
  try:
    return mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, AssertionError, NotImplementedError):
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over slice × data × fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shards(mesh) -> int:
  """How many ways the batch splits: the product of the batch axes (1 without a mesh)."""
  return 1 if mesh.empty else int(np.prod([mesh.shape.get(a, 1) for a in BATCH_AXES]))


def side_by_side(xs, shards: int) -> jax.Array:
  """Arrays [B_i, ...] of one trailing shape → [ΣB_i, ...] holding each batch shard's rows
  of every array side by side: a concatenation local to each device (where every B_i
  splits over `shards`; pass 1 otherwise)."""
  rows = [x.reshape((shards, -1) + x.shape[1:]) for x in xs]
  return jnp.concatenate(rows, axis=1).reshape((-1,) + xs[0].shape[1:])


def unstack_side_by_side(y: jax.Array, sizes, shards: int) -> list:
  """`side_by_side`'s inverse: [ΣB_i, ...] → the arrays [B_i, ...] (`sizes` = the B_i)."""
  y = y.reshape((shards, -1) + y.shape[1:])
  ends = list(itertools.accumulate(b // shards for b in sizes))
  return [y[:, end - b // shards:end].reshape((b,) + y.shape[2:]) for b, end in zip(sizes, ends)]


def rules(overrides=()) -> tuple:
  """DEFAULT_RULES with `overrides` ((name, axes) pairs) taking precedence."""
  overrides = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in overrides)
  names = {name for name, _ in overrides}
  return overrides + tuple(r for r in DEFAULT_RULES if r[0] not in names)


def vision_rules(rules: tuple) -> tuple:
  """`rules` for the frozen vision tower (`data_parallel`): the batch over every mesh axis,
  so no activation over `tensor`; the weights keep their layout (XLA gathers what it
  needs)."""
  def drop(axes):
    if isinstance(axes, tuple):
      return tuple(a for a in axes if a != "tensor") or None
    return None if axes == "tensor" else axes
  return (("act_batch", BATCH_AXES + ("tensor",)),) + tuple(
      (name, drop(axes)) for name, axes in rules if name != "act_batch")


def data_parallel(module: nn.Module, x: jax.Array, chunk: int = 0) -> jax.Array:
  """`module(x)` for an example-by-example module ([N, ...] → [N, ...]: the frozen vision
  tower) run data parallel over the whole mesh: each batch shard's examples also split over
  `tensor` (padded to a multiple of it), under `vision_rules`, so the devices of a tensor
  group encode different images, not the same ones. `chunk` > 0: each device encodes its
  examples `chunk` at a time under a loop (padded to a multiple of it): a TPU convolution
  compiles longer the more images it holds (FlamingoConfig.vision_chunk).
  Without rules or a mesh, or when N does not split over the batch shards, the examples
  are one device's."""
  rules, mesh = nn.get_logical_axis_rules(), jax.sharding.get_abstract_mesh()
  n = x.shape[0]
  split = bool(rules) and not mesh.empty and n % batch_shards(mesh) == 0
  shards, tensor = (batch_shards(mesh), mesh.shape.get("tensor", 1)) if split else (1, 1)
  per = n // shards
  mine = -(-per // tensor)  # examples a device encodes
  size = min(chunk, mine) if chunk > 0 else mine
  steps = -(-mine // size)
  if steps == 1 and tensor == 1:
    return module(x)
  if split:
    rules = vision_rules(rules)
  # [shards, per] splits each batch shard's rows in place; padding them to tensor · steps ·
  # size rows makes device d's rows [d, step, size], so the loop's step j takes [:, j] of
  # every device: local slices, no data moves.
  pad = tensor * steps * size - per
  x = x.reshape((shards, per) + x.shape[1:])
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  x = jnp.swapaxes(x.reshape((shards * tensor, steps, size) + x.shape[2:]), 0, 1)
  x = x.reshape((steps, -1) + x.shape[3:])
  batch = lambda y, lead=(): lead + ("act_batch",) + (None,) * (y.ndim - 1 - len(lead))
  constrain = lambda y, lead=(): nn.with_logical_constraint(y, batch(y, lead)) if split else y
  with nn.logical_axis_rules(rules):
    if steps == 1:
      y = constrain(module(constrain(x[0])))[None]
    else:
      encode = nn.scan(lambda m, carry, xj: (carry, constrain(m(constrain(xj)))),
                       variable_broadcast="params", split_rngs={"params": False}, length=steps)
      y = constrain(encode(module, None, constrain(x, (None,)))[1], (None,))
  y = jnp.swapaxes(y.reshape((steps, shards * tensor, size) + y.shape[2:]), 0, 1)
  y = y.reshape((shards, tensor * steps * size) + y.shape[3:])[:, :per]
  return y.reshape((n,) + y.shape[2:])


def zero1(s: NamedSharding, shape: tuple[int, ...]) -> tuple[NamedSharding, tuple[int, ...]]:
  """Where ZeRO-1 keeps the optimizer state of a parameter of `shape` laid out as `s`:
  (sharding, shape). Also split over batch axes `s` does not use, on one dimension,
  zero-padded at its end to a multiple of its shard count where it does not divide (every
  power-of-two dimension under a data axis of 96; only a dimension `s` does not split, so
  that the weights' shards keep their boundaries and the two layouts convert locally): of
  all the free axes or any subset of them, and any dimension, the layout with the fewest
  elements per device; ties go to less padding, then to the dimension whose shards are
  largest. A leaf where nothing gains (a scalar) keeps `s`, unpadded."""
  mesh = s.mesh
  spec = list(s.spec) + [None] * (len(shape) - len(s.spec))
  axes = lambda e: () if e is None else (e,) if isinstance(e, str) else tuple(e)
  size = lambda names: int(np.prod([mesh.shape[a] for a in names], dtype=np.int64))
  used = {a for e in spec for a in axes(e)}
  free = tuple(a for a in BATCH_AXES if a not in used and mesh.shape[a] > 1)
  count = lambda dims: int(np.prod(dims, dtype=np.int64))
  per_device = count(s.shard_shape(shape)) if shape else 1
  best, best_key = (s, tuple(shape)), (per_device, 0, 0)
  for subset in (c for n in range(1, len(free) + 1) for c in itertools.combinations(free, n)):
    for d in range(len(shape)):
      split = axes(spec[d]) + subset
      padded = list(shape)
      padded[d] = -(-shape[d] // size(split)) * size(split)
      if padded[d] != shape[d] and size(axes(spec[d])) > 1:
        continue  # padding a split dimension at its end would move every shard's boundary
      key = (count(padded) // size(used | set(subset)), count(padded) - count(shape),
             -(shape[d] // size(axes(spec[d]))))
      if key < best_key:
        new_spec = list(spec)
        new_spec[d] = split
        best, best_key = (NamedSharding(mesh, PartitionSpec(*new_spec)), tuple(padded)), key
  return best


def param_shardings(abstract_variables, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree whose leaves carry logical axis names (e.g. params from
  `jax.eval_shape(model.init, ...)`, or an optimizer state built on them); unnamed leaves
  are replicated."""
  specs = nn.get_partition_spec(abstract_variables)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)
