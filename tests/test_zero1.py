"""Parallelism as the paper ran it, on 8 CPU devices: ZeRO-1 (optimizer state split over
the batch axes, the weights in their own layout), the frozen vision tower data parallel
over the whole mesh, and micro-batches checked against the mesh."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from config_files import load_config
from flamingo_jax import sharding
from flamingo_jax.config import ConfigError
from flamingo_jax.data import sources
from flamingo_jax.model import Flamingo
from flamingo_jax.train import hlo, program as program_lib
from flamingo_jax.train.config import check_against_mesh

DATA, TENSOR = 4, 2


def small_config(data=DATA, tensor=TENSOR, **fields):
  """configs/tiny.py, shallower (compiles in seconds), on a data × tensor mesh."""
  config = load_config("tiny")
  config.model.lm.num_layers = 2
  config.model.vision.depth = config.model.resampler.depth = 1
  config.mesh = dict(slice=1, data=data, fsdp=1, tensor=tensor)
  config.update(fields)
  return config


def build(config):
  n = int(np.prod(list(config.mesh.values())))
  return program_lib.from_config(config, jax.devices()[:n])


@pytest.fixture(scope="module")
def runs():
  """Three updates (two micro-batches each) on the same batches, per optimizer sharding:
  the losses, the final state and the compiled step's HLO."""
  out, params = {}, None
  for layout in ("params", "zero1"):
    config = small_config(optimizer_sharding=layout, microbatches=2)
    program = build(config)
    (group,) = program.groups
    compiled = program.lower(group).compile()
    # Random weights from numpy: no init program to compile (the gates ≠ 0, so the xattn
    # layers take part).
    rng = np.random.default_rng(0)
    params = params or jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(np.float32),
                                    nn.unbox(program.abstract_params))
    trainable, frozen = program.place_params(params)
    state = program.init_state(trainable)
    data = sources.build("synthetic", config.data.synthetic, seed=0)
    losses = []
    for i in range(3):
      batches = {"synthetic": jax.device_put(dict(data.batch_at(i)),
                                             sharding.batch_sharding(program.mesh))}
      state, metrics = compiled(state, frozen, batches)
      losses.append(float(metrics["loss"]))
    out[layout] = dict(losses=losses, state=state, hlo=compiled.as_text())
  return out


def adam(state):
  """The train state's Adam moments (optax's ScaleByAdamState)."""
  return next(s for s in jax.tree.leaves(state["opt"], is_leaf=lambda s: hasattr(s, "mu"))
              if hasattr(s, "mu"))


def device_bytes(tree) -> int:
  """Bytes one device (the first) holds of a tree of arrays."""
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def test_zero1_trains_as_the_plain_layout_does(runs):
  plain, zero1 = runs["params"], runs["zero1"]
  np.testing.assert_allclose(zero1["losses"], plain["losses"], rtol=1e-6)
  assert len(set(plain["losses"])) == 3  # the weights moved
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               zero1["state"]["params"], plain["state"]["params"])


def test_zero1_splits_the_optimizer_state_over_the_data_axis(runs):
  plain, zero1 = adam(runs["params"]["state"]), adam(runs["zero1"]["state"])
  for moment in ("mu", "nu"):
    before, after = device_bytes(getattr(plain, moment)), device_bytes(getattr(zero1, moment))
    # Every leaf with a dimension that divides shrinks 4-fold; the few that do not (the
    # xattn gates, one scalar per layer) stay replicated.
    assert before / DATA <= after <= 1.02 * before / DATA, (moment, before, after)
  # The weights keep their own layout: the forward sees what it saw without ZeRO-1.
  params = lambda r: r["state"]["params"]
  assert device_bytes(params(runs["zero1"])) == device_bytes(params(runs["params"]))
  jax.tree.map(lambda a, b: assert_same_sharding(a, b), params(runs["zero1"]), params(runs["params"]))
  # What ZeRO-1 costs: the updated weights are all-gathered from their shards (on a CPU
  # the gradients' reduce-scatter compiles as an all-reduce then a slice).
  gathered = hlo.collective_bytes(runs["zero1"]["hlo"])["all-gather"]
  gathered -= hlo.collective_bytes(runs["params"]["hlo"])["all-gather"]
  assert gathered == pytest.approx(device_bytes(zero1.mu), rel=0.01)


def assert_same_sharding(a, b):
  assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)


def test_zero1_layout_takes_the_largest_dimension_that_divides():
  mesh = sharding.make_mesh(dict(data=4, tensor=2), jax.devices())
  spec = lambda *s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s))
  P = jax.sharding.PartitionSpec
  # Per device [6, 8 / 2, 16] with dim 1 over tensor: the last dim (16 → 4) rather than
  # dim 1 (4 → 1), each over data; [6, 64 / 2, 8]: dim 1 (32 → 8) rather than the last (8 → 2).
  assert sharding.zero1(spec(None, "tensor"), (6, 8, 16)).spec == P(None, "tensor", "data")
  assert sharding.zero1(spec(None, "tensor"), (6, 64, 8)).spec == P(None, ("tensor", "data"), None)
  assert sharding.zero1(spec(), (6, 3)).spec == P()  # nothing divides by 4: replicated
  assert sharding.zero1(spec(), ()).spec == P()


def vision_flops(tensor: int) -> float:
  """Compiled per-device FLOPs of the frozen vision tower in the training program over
  a data 2 × `tensor` mesh (the same global batch)."""
  program = build(small_config(data=2, tensor=tensor))
  images = program.batch_shapes["synthetic"]["images"]

  def features(frozen, images):
    with nn.logical_axis_rules(program.rules):
      return program.model.apply({"params": frozen}, images, method=Flamingo.vision_features)
  with jax.set_mesh(program.mesh):
    compiled = jax.jit(features).lower(program.abstract_frozen(), images).compile()
  return compiled.cost_analysis()["flops"]


def test_vision_tower_flops_per_device_fall_with_the_tensor_axis():
  flops = {t: vision_flops(t) for t in (1, 2, 4)}
  # A tensor group's devices encode different images, not the same ones.
  assert flops[2] == pytest.approx(flops[1] / 2, rel=0.1), flops
  assert flops[4] == pytest.approx(flops[1] / 4, rel=0.1), flops


def test_vision_features_split_over_tensor_equal_one_device():
  """6 examples of 5 images over data 2 × tensor 4: a batch shard's 15 images are padded to
  16, 4 a device; the features are those of one device."""
  program = build(small_config(data=2, tensor=4))
  rng = np.random.default_rng(0)
  vision = {"vision": jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(np.float32),
                                   nn.unbox(program.abstract_params)["vision"])}
  images = rng.normal(size=(6,) + program.batch_shapes["synthetic"]["images"].shape[1:])
  images = images.astype(np.float32)
  apply = lambda p, x: program.model.apply({"params": p}, x, method=Flamingo.vision_features)
  want = jax.jit(apply)(vision, images)

  def sharded(p, x):
    with nn.logical_axis_rules(program.rules):
      return apply(p, x)
  replicated = jax.sharding.NamedSharding(program.mesh, jax.sharding.PartitionSpec())
  with jax.set_mesh(program.mesh):
    got = jax.jit(sharded, in_shardings=(replicated, sharding.batch_sharding(program.mesh)))(
        vision, images)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_micro_batches_must_split_over_the_batch_shards():
  mesh = sharding.make_mesh(dict(data=8), jax.devices())
  check_against_mesh(small_config(microbatches=1), mesh)  # 8 examples over 8 shards
  with pytest.raises(ConfigError) as e:  # 8 / 2 = 4 examples a micro-batch, over 8 shards
    check_against_mesh(small_config(microbatches=2), mesh)
  message = str(e.value)
  assert message.startswith("data.synthetic.batch_size: ") and "microbatches=2" in message
  assert "8 batch shards" in message and "a multiple of 16" in message, message


def test_zero1_splits_over_the_batch_axes_a_dimension_divides():
  """All the free batch axes where a dimension divides their product; else the largest
  subset some dimension divides (data 4 of data 4 × fsdp 2 for a dimension of 12); else
  the parameter's own layout (replicated over them)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = sharding.make_mesh(dict(slice=1, data=4, fsdp=2, tensor=1))
  s = NamedSharding(mesh, P())
  assert sharding.zero1(s, (16, 6)).spec == P(("data", "fsdp"), None)
  assert sharding.zero1(s, (12, 6)).spec == P("data", None)  # 12 % 8 ≠ 0, 12 % 4 = 0
  assert sharding.zero1(s, (6, 10)).spec == P(None, "fsdp")  # only 2 divides: the larger dim
  assert sharding.zero1(s, (3, 5)).spec == P()
  # The axes the parameter already uses are not free.
  assert sharding.zero1(NamedSharding(mesh, P("fsdp")), (12, 8)).spec == P("fsdp", "data")
