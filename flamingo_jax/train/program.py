"""The training program: what train.py runs, built from the config, a mesh and the
batches' shapes, without allocating a weight.

train.py builds it over its devices and then fills it (`init_params` / `restore_params`,
`init_state`); train_compile.py builds the very same program over the abstract devices
of a TPU topology and only lowers and compiles `steps` on `abstract_inputs`. One
function, so what compiles there is what runs here.

  model, model_config      Flamingo and its checked config
  mesh, rules              the device mesh and the logical axis rules
  abstract_params          every parameter's shape, with logical axis names (boxed)
  trainable_shardings      NamedShardings of the trainable subtree (float32)
  frozen_shardings         ... of the frozen rest (config.frozen_dtype)
  optimizer, schedule      optax, and its learning-rate schedule
  state_shardings          of the train state (step.py); optimizer moments inherit their
                           parameter's logical names, so they are sharded alike, or with
                           config.optimizer_sharding='zero1' also split over the batch
                           axes (update_layout.py)
  batch_shapes             dataset → key → ShapeDtypeStruct (global, batch-sharded)
  groups, steps            the datasets of each update (all of them, or one each for
                           round robin) → its jitted step(state, frozen, batches)
"""
import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax import sharding
from flamingo_jax.config import FlamingoConfig
from flamingo_jax.data import loader
from flamingo_jax.layers.scan import unrolled
from flamingo_jax.model import Flamingo
from flamingo_jax.train import (config as config_lib, flops, optimizer as optim, partition,
                                step as step_lib, update_layout)


@dataclasses.dataclass(frozen=True)
class Program:
  config: Any
  model_config: FlamingoConfig
  model: Flamingo
  mesh: jax.sharding.Mesh
  rules: tuple
  abstract_params: Any
  trainable_shardings: Any
  frozen_shardings: Any
  optimizer: Any
  schedule: Callable
  new_state: Callable
  state_shardings: Any
  abstract_state: Any
  batch_shapes: Mapping[str, Mapping[str, jax.ShapeDtypeStruct]]
  groups: tuple
  steps: Mapping[tuple, Any]

  @property
  def frozen_dtype(self):
    return jnp.dtype(self.config.frozen_dtype)

  def abstract_frozen(self):
    """The frozen subtree's ShapeDtypeStructs, in frozen_dtype, with their shardings."""
    _, frozen = partition.split(nn.unbox(self.abstract_params), tuple(self.config.trainable))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, _cast(x.dtype, self.frozen_dtype),
                                                          sharding=s),
                        frozen, self.frozen_shardings)

  def abstract_inputs(self, group) -> tuple:
    """(state, frozen, batches) of `steps[group]`, as ShapeDtypeStructs with shardings."""
    return (self.abstract_state, self.abstract_frozen(),
            {n: dict(self.batch_shapes[n]) for n in group})

  def argument_bytes(self, group) -> dict:
    """Bytes one device holds of `steps[group]`'s arguments (the largest shard of each
    leaf): the arithmetic its compiled memory_analysis() should show."""
    def shard_bytes(tree):
      return sum(int(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree))
    state, frozen, batches = self.abstract_inputs(group)
    return dict(state=shard_bytes(state), frozen=shard_bytes(frozen), batch=shard_bytes(batches))

  def lower(self, group):
    """`steps[group]` lowered on `abstract_inputs(group)` (nothing materialised)."""
    with jax.set_mesh(self.mesh):
      return self.steps[group].lower(*self.abstract_inputs(group))

  def init_params(self, seed: int) -> tuple[dict, dict]:
    """(trainable float32, frozen in frozen_dtype), random from `seed`, created in their
    shardings inside one jit (no full float32 tree on any device)."""
    init = init_fn(self.model)
    patterns, dtype = tuple(self.config.trainable), self.frozen_dtype

    def make(rng):
      trainable, frozen = partition.split(nn.unbox(init(rng)), patterns)
      return partition.cast(trainable, jnp.float32), partition.cast(frozen, dtype)
    return jax.jit(make, out_shardings=(self.trainable_shardings, self.frozen_shardings))(
        jax.random.PRNGKey(seed))

  def place_params(self, params: dict) -> tuple[dict, dict]:
    """A full parameter tree (e.g. converted weights on the host) → (trainable, frozen),
    cast and put into their shardings."""
    trainable, frozen = partition.split(params, tuple(self.config.trainable))
    trainable = jax.device_put(partition.cast(trainable, jnp.float32), self.trainable_shardings)
    frozen = jax.device_put(partition.cast(frozen, self.frozen_dtype), self.frozen_shardings)
    return trainable, frozen

  def restore_params(self, path: str) -> tuple[dict, dict]:
    """A converted directory (`convert.openflamingo.save_converted`) → (trainable float32,
    frozen in frozen_dtype), restored straight into their shardings and dtypes: orbax reads
    each process's shards only, so no host or device ever holds the whole model. Refuses
    a converted model other than the config's (`check_against_init`)."""
    from flamingo_jax import load_model
    from flamingo_jax.lm import token_rows

    saved_config = load_model.converted_config(path)
    config_lib.check_against_init(self.model_config, saved_config, path)
    shardings = tu.flatten_dict(partition.merge(self.trainable_shardings, self.frozen_shardings), sep="/")
    trains = set(tu.flatten_dict(self.trainable_shardings, sep="/"))
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def target(key, x):
      dtype = _cast(x.dtype, jnp.float32 if key in trains else self.frozen_dtype)
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=shardings.get(key, replicated))
    saved = tu.flatten_dict(load_model.abstract_params(saved_config), sep="/")
    _, params = load_model.restore_converted(
        path, tu.unflatten_dict({k: target(k, x) for k, x in saved.items()}, sep="/"))
    # New-token rows the checkpoint lacks come from the (sharded) frozen table as the model
    # applies it (frozen_dtype): k rows are gathered, not the table. Saved rows this config
    # does not train are dropped.
    params = token_rows.with_rows(params, self.model_config)
    params = tu.unflatten_dict({k: v for k, v in tu.flatten_dict(params, sep="/").items()
                                if k in shardings}, sep="/")
    trainable, frozen = partition.split(params, tuple(self.config.trainable))
    return jax.device_put(partition.cast(trainable, jnp.float32), self.trainable_shardings), frozen

  def init_state(self, trainable: dict) -> dict:
    return jax.jit(self.new_state, out_shardings=self.state_shardings)(trainable)

  def step_flops(self, group) -> float:
    """Analytic FLOPs of one update of `group` (frozen-aware; flops.py), counted on this
    host's backend (the shapes without the mesh's shardings)."""
    bare = {n: {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in self.batch_shapes[n].items()}
            for n in group}
    return flops.train_step_flops(self.model, bare, tuple(self.config.trainable))


def _cast(dtype, to):
  return to if jnp.issubdtype(dtype, jnp.floating) else dtype


def init_fn(model: Flamingo):
  """rng → boxed params. The parameters' shapes do not depend on the batch: init runs on
  one tiny dummy example (and with an explicit media index, so no `<image>` id is needed)."""
  size = model.config.vision.image_size
  images = jnp.zeros((1, 1, 1, size, size, 3), jnp.float32)
  ids = jnp.zeros((1, 8), jnp.int32)
  return lambda rng: model.init(rng, images, ids, media_index=jnp.zeros_like(ids))["params"]


def batch_shapes_of(batch: Mapping[str, Any]) -> dict:
  """Key → (shape, dtype) of a (numpy) batch."""
  return {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in batch.items()}


def from_config(config, devices=None) -> Program:
  """`build` over `devices` (default: all) with the batch shapes the config's data settings
  give (sources.config_batch_shapes), once the config and its batches' split over the mesh
  are checked: what train_compile.py, the benchmarks and the tests build (train.py takes
  the shapes of its first batches)."""
  from flamingo_jax.data import sources
  model_config = config_lib.check(config)
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  config_lib.check_against_mesh(config, mesh)
  return build(config, model_config, mesh, sources.config_batch_shapes(config, model_config))


def build(config, model_config: FlamingoConfig, mesh, batch_shapes: Mapping[str, Mapping]) -> Program:
  """`batch_shapes`: dataset → key → (global shape, dtype)."""
  rules = sharding.rules(config.sharding_rules)
  model = Flamingo(model_config)
  abstract_params = jax.eval_shape(init_fn(model), jax.random.PRNGKey(0))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    param_shardings = nn.unbox(sharding.param_shardings(abstract_params, mesh, rules))
  trainable_shardings, frozen_shardings = partition.split(param_shardings, tuple(config.trainable))

  # ---- train state (the optimizer sees the trainable subtree only)
  o = config.optimizer
  opt = optim.build(**dict(o), total_steps=config.total_steps)
  schedule = optim.learning_rate(o.lr, o.warmup_steps, o.decay, config.total_steps)
  skip_counters = {n: len(loader.SKIP_REASONS) for n, b in batch_shapes.items() if "skipped" in b}
  abstract_trainable, _ = partition.split(abstract_params, tuple(config.trainable))
  fp32 = lambda x: jax.ShapeDtypeStruct(x.shape, _cast(x.dtype, jnp.float32))
  abstract_trainable = jax.tree.map(  # trainable leaves are float32 whatever param_dtype
      lambda x: x.replace_boxed(fp32(x.value)) if isinstance(x, nn.Partitioned) else fp32(x),
      abstract_trainable, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  # ZeRO-1: each trainable leaf's optimizer state also splits over the batch axes
  # (update_layout.py); the weights keep their own layout (state_shardings["params"]).
  layout = (update_layout.zero1(trainable_shardings, nn.unbox(abstract_trainable))
            if config.optimizer_sharding == "zero1" else update_layout.UpdateLayout())
  seed = config.seed
  new_state = lambda t, layout=layout: step_lib.init_state(
      t, opt, jax.random.PRNGKey(seed + 1), skip_counters, layout)
  # Shardings from the logical names the optimizer's moments inherit from their parameters
  # (the weights' layout), then (ZeRO-1) the moments' own; shapes as the layout pads them.
  boxed_state = jax.eval_shape(lambda t: new_state(t, update_layout.UpdateLayout()),
                               abstract_trainable)
  state_shardings = nn.unbox(sharding.param_shardings(boxed_state, mesh, rules))
  state_shardings["opt"] = layout.opt_shardings(opt, state_shardings["opt"])
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                jax.eval_shape(new_state, nn.unbox(abstract_trainable)),
                                state_shardings)

  # ---- the update steps: jit with explicit shardings, the state donated
  batch_sharding = sharding.batch_sharding(mesh)
  shapes = {n: {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding) for k, (s, d) in b.items()}
            for n, b in batch_shapes.items()}
  weights = {name: float(d.get("weight", 1.0)) for name, d in config.data.items()}
  names = sorted(batch_shapes)
  groups = (names,) if config.accumulation == "all" else tuple([n] for n in names)
  groups = tuple(tuple(g) for g in groups)

  def jitted(group):
    fn = step_lib.make_train_step(model, opt, {n: weights[n] for n in group},
                                  config.microbatches, learning_rate=schedule, layout=layout)

    def with_rules(state, frozen, batches):
      with nn.logical_axis_rules(rules), unrolled(config.unroll_layers):
        return fn(state, frozen, batches)
    in_shardings = (state_shardings, frozen_shardings,
                    {n: {k: batch_sharding for k in shapes[n]} for n in group})
    return jax.jit(with_rules, donate_argnums=(0,), in_shardings=in_shardings,
                   out_shardings=(state_shardings, None))

  return Program(config=config, model_config=model_config, model=model, mesh=mesh, rules=rules,
                 abstract_params=abstract_params, trainable_shardings=trainable_shardings,
                 frozen_shardings=frozen_shardings, optimizer=opt, schedule=schedule,
                 new_state=new_state, state_shardings=state_shardings,
                 abstract_state=abstract_state, batch_shapes=shapes, groups=groups,
                 steps={g: jitted(g) for g in groups})
