"""Parallelism as the paper ran it, on 8 CPU devices: ZeRO-1 (optimizer state split over
the batch axes, the weights in their own layout; zero-padded where the axes divide no
dimension), the frozen vision tower data parallel over the whole mesh, and micro-batches
checked against the mesh."""
import dataclasses
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from config_files import load_config
from flamingo_jax import sharding
from flamingo_jax.config import ConfigError
from flamingo_jax.data import sources
from flamingo_jax.model import Flamingo
from flamingo_jax.train import checkpoint, hlo, program as program_lib, update_layout
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


# Run name → (optimizer sharding, data axis). Under data 3 no dimension divides (all are
# powers of two): every leaf's optimizer state is padded.
RUNS = {"params": ("params", DATA), "zero1": ("zero1", DATA), "zero1_padded": ("zero1", 3)}


@pytest.fixture(scope="module")
def runs():
  """Three updates (two micro-batches of 12 each) on the same batches per run: the
  losses, the final state, the program and the compiled step's HLO."""
  out, params = {}, None
  for name, (layout, data) in RUNS.items():
    config = small_config(data=data, optimizer_sharding=layout, microbatches=2)
    config.data.synthetic.batch_size = 24
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
    out[name] = dict(losses=losses, state=state, program=program, hlo=compiled.as_text())
  return out


def adam(state):
  """The train state's Adam moments (optax's ScaleByAdamState)."""
  return next(s for s in jax.tree.leaves(state["opt"], is_leaf=lambda s: hasattr(s, "mu"))
              if hasattr(s, "mu"))


def device_bytes(tree) -> int:
  """Bytes one device (the first) holds of a tree of arrays."""
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ["zero1", "zero1_padded"])
def test_zero1_trains_as_the_plain_layout_does(runs, name):
  plain, zero1 = runs["params"], runs[name]
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


def test_zero1_pads_what_the_data_axis_does_not_divide(runs):
  plain, padded = adam(runs["params"]["state"]), adam(runs["zero1_padded"]["state"])
  for moment in ("mu", "nu"):
    before, after = device_bytes(getattr(plain, moment)), device_bytes(getattr(padded, moment))
    # The plain layout is replicated over data (4 or 3 alike); a third each, plus the
    # padding (e.g. 64 → 66 rows) and the replicated gates.
    assert before / 3 <= after <= 1.05 * before / 3, (moment, before, after)
  shapes = lambda tree: [x.shape for x in jax.tree.leaves(tree)]
  assert shapes(padded.mu) != shapes(plain.mu)  # padded ...
  params = runs["zero1_padded"]["state"]["params"]
  assert shapes(params) == shapes(runs["params"]["state"]["params"])  # ... the weights not
  assert all(x.size == 1 or not x.sharding.is_fully_replicated for x in jax.tree.leaves(padded.mu))


def test_update_layout_pads_to_the_layout_and_back():
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = sharding.make_mesh(dict(data=4, tensor=2), jax.devices())
  specs = {"w": P(), "v": P("tensor", None), "b": P(), "gate": P()}
  shardings = {k: NamedSharding(mesh, spec) for k, spec in specs.items()}
  rng = np.random.default_rng(0)
  tree = {"w": rng.normal(size=(6, 6)), "v": rng.normal(size=(2, 6)), "b": rng.normal(size=(3,)),
          "gate": np.float32(0.5)}
  tree = jax.device_put(jax.tree.map(np.float32, tree), shardings)
  layout = update_layout.zero1(shardings, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree))
  up = jax.jit(layout.to_update)(tree)
  # `v`'s rows are split over tensor: its columns are padded, so each tensor shard's rows
  # stay where they were.
  assert {k: x.shape for k, x in up.items()} == {"w": (8, 6), "v": (2, 8), "b": (4,), "gate": ()}
  assert {k: x.sharding.spec for k, x in up.items()} == {
      "w": P("data"), "v": P("tensor", "data"), "b": P("data"), "gate": P()}
  for k, x in up.items():
    np.testing.assert_array_equal(x[tuple(slice(n) for n in tree[k].shape)], tree[k])
    assert float(np.abs(np.asarray(x)).sum()) == pytest.approx(float(np.abs(np.asarray(tree[k])).sum()))
  back = jax.jit(layout.to_weights)(up, tree)
  jax.tree.map(np.testing.assert_array_equal, back, tree)


def test_zero1_checkpoint_restores_under_another_padding(runs, tmp_path):
  """The data-3 run's padded optimizer state restores into data 4's layouts (ZeRO-1
  unpadded, and the plain one): the same values, the padding dropped."""
  saved = runs["zero1_padded"]["state"]
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(3, saved, {}, dict(frozen_fingerprint="f"), force=True)
  ckpt.wait()
  for name in ("zero1", "params"):
    target = runs[name]["program"].abstract_state
    restored, _, _ = ckpt.restore(3, target, "f")
    def check(got, want, abstract):
      assert got.shape == abstract.shape and got.sharding.is_equivalent_to(abstract.sharding, got.ndim)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want)[tuple(slice(n) for n in got.shape)])
    jax.tree.map(check, restored, saved, target)
  # A weight of another shape is refused, naming the leaf.
  other = small_config(data=3, optimizer_sharding="zero1", microbatches=2)
  other.data.synthetic.batch_size = 24
  other.model.xattn.ff_mult = 4  # a trainable weight (frozen ones are not checkpointed)
  other = build(other)
  with pytest.raises(ValueError, match=r"state\.params.*was saved as"):
    ckpt.restore(3, other.abstract_state, "f")
  ckpt.close()


def assert_same_sharding(a, b):
  assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)


def test_zero1_layout_takes_the_fewest_elements_per_device():
  mesh = sharding.make_mesh(dict(data=4, tensor=2), jax.devices())
  spec = lambda *s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s))
  zero1 = lambda s, shape: (sharding.zero1(s, shape)[0].spec, sharding.zero1(s, shape)[1])
  P = jax.sharding.PartitionSpec
  # Per device [6, 8 / 2, 16] with dim 1 over tensor: 96 elements over data on the last
  # dim or dim 1 alike: the last (shards of 16 → 4, not 4 → 1); [6, 64 / 2, 8]: dim 1
  # (32 → 8 rather than 8 → 2 with padding 6 → 8 worse).
  assert zero1(spec(None, "tensor"), (6, 8, 16)) == (P(None, "tensor", "data"), (6, 8, 16))
  assert zero1(spec(None, "tensor"), (6, 64, 8)) == (P(None, ("tensor", "data"), None), (6, 64, 8))
  # Nothing divides by 4: padded, 6 → 8 rows (6 elements of padding, as 3 → 4 columns
  # would be; the larger dimension).
  assert zero1(spec(), (6, 3)) == (P("data", None), (8, 3))
  # A dimension the weight splits is never padded (its shards would move): [3, 14] with
  # the columns over tensor pads its rows (7 a device), not its columns to 16 (6 a device).
  assert zero1(spec(None, "tensor"), (3, 14)) == (P("data", "tensor"), (4, 14))
  assert zero1(spec(), ()) == (P(), ())  # nothing to split
  assert zero1(spec(), (1,)) == (P(), (1,))  # padding 1 → 4 holds 1 a device all the same


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


@pytest.mark.parametrize("tensor,chunk", [(4, 0), (4, 3), (1, 2)])
def test_vision_features_split_over_tensor_equal_one_device(tensor, chunk):
  """6 examples of 5 images over data 2 × `tensor`: a batch shard's 15 images are padded to
  16, 4 a device (tensor 4), and with `vision_chunk` encoded `chunk` at a time under a
  loop (2 steps of 3, 8 of 2); the features are those of one device, all at once. The
  loop's convolution holds a chunk of each device's images."""
  config = small_config(data=2, tensor=tensor)
  config.model.vision_chunk = chunk
  program = build(config)
  rng = np.random.default_rng(0)
  vision = {"vision": jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(np.float32),
                                   nn.unbox(program.abstract_params)["vision"])}
  images = rng.normal(size=(6,) + program.batch_shapes["synthetic"]["images"].shape[1:])
  images = images.astype(np.float32)
  apply = lambda model, p, x: model.apply({"params": p}, x, method=Flamingo.vision_features)
  unchunked = Flamingo(dataclasses.replace(program.model.config, vision_chunk=0))
  want = jax.jit(functools.partial(apply, unchunked))(vision, images)
  # One device, chunked: the loop without a mesh.
  np.testing.assert_allclose(jax.jit(functools.partial(apply, program.model))(vision, images),
                             want, rtol=1e-5, atol=1e-6)

  def sharded(p, x):
    with nn.logical_axis_rules(program.rules):
      return apply(program.model, p, x)
  replicated = jax.sharding.NamedSharding(program.mesh, jax.sharding.PartitionSpec())
  with jax.set_mesh(program.mesh):
    lowered = jax.jit(sharded, in_shardings=(replicated, sharding.batch_sharding(program.mesh))
                      ).lower(vision, images)
    got = lowered.compile()(vision, images)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The patch convolution's input, per device: [images a device encodes at once, H, W, C].
  hlo = lowered.compile().as_text()
  per_device = lambda n: f"f32[{n},{images.shape[-3]},{images.shape[-2]},3]"
  assert per_device(chunk or -(-15 // tensor)) in hlo
  if chunk:
    assert per_device(-(-15 // tensor)) not in hlo


def test_micro_batches_must_split_over_the_batch_shards():
  mesh = sharding.make_mesh(dict(data=8), jax.devices())
  check_against_mesh(small_config(microbatches=1), mesh)  # 8 examples over 8 shards
  with pytest.raises(ConfigError) as e:  # 8 / 2 = 4 examples a micro-batch, over 8 shards
    check_against_mesh(small_config(microbatches=2), mesh)
  message = str(e.value)
  assert message.startswith("data.synthetic.batch_size: ") and "microbatches=2" in message
  assert "8 batch shards" in message and "a multiple of 16" in message, message


def test_zero1_splits_over_all_the_free_batch_axes_padded_or_a_subset():
  """Data 4 × fsdp 2: all the free batch axes where a dimension divides their product, or
  padded where that holds fewer elements a device than a subset that divides."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = sharding.make_mesh(dict(slice=1, data=4, fsdp=2, tensor=1))
  zero1 = lambda s, shape: (sharding.zero1(s, shape)[0].spec, sharding.zero1(s, shape)[1])
  s = NamedSharding(mesh, P())
  assert zero1(s, (16, 6)) == (P(("data", "fsdp"), None), (16, 6))
  # 12 rows: padded to 16 over 8 (12 a device) beats 12 over data 4 (18 a device).
  assert zero1(s, (12, 6)) == (P(("data", "fsdp"), None), (16, 6))
  # 4: over data 4 as padded to 8 over 8 holds 1 a device, without the padding.
  assert zero1(s, (4,)) == (P("data"), (4,))
  assert zero1(s, (3, 5)) == (P(None, ("data", "fsdp")), (3, 8))  # 3 a device, not 5
  # The axes the parameter already uses are not free.
  assert zero1(NamedSharding(mesh, P("fsdp")), (12, 8)) == (P("fsdp", "data"), (12, 8))


def test_the_vision_tower_runs_once_over_every_datasets_images():
  """Two datasets (5 images an example, and one 2-frame clip) in one update over data 2 × tensor 2: the
  features equal each dataset's alone, and the step's program holds one vision tower (one
  patch convolution, as with one dataset), not one per dataset."""
  from flamingo_jax.train import step as step_lib
  two = small_config(data=2)
  two.data.other = dict(source="random", batch_size=4, weight=0.5, seq_len=16, max_images=1,
                        num_frames=2)
  program = build(two)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(np.float32),
                        nn.unbox(program.abstract_params))
  shapes = program.batch_shapes
  images = {n: rng.normal(size=s["images"].shape).astype(np.float32) for n, s in shapes.items()}
  assert len({x.shape[1] for x in images.values()}) == 2, {n: x.shape for n, x in images.items()}

  def together(p, images):
    with nn.logical_axis_rules(program.rules):
      return step_lib.vision_features(program.model, p, {n: {"images": x} for n, x in images.items()})
  with jax.set_mesh(program.mesh):
    got = jax.jit(together, in_shardings=(None, sharding.batch_sharding(program.mesh)))(params, images)
  for n, x in images.items():
    want = jax.jit(lambda p, x: program.model.apply({"params": p}, x, method=Flamingo.vision_features))(params, x)
    np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=1e-6)

  def convolutions(program):
    (group,) = program.groups
    return program.lower(group).as_text().count("stablehlo.convolution")
  assert convolutions(program) == convolutions(build(small_config(data=2))) == 1


def test_datasets_of_other_lengths_pack_into_one_lm():
  """Three datasets (16 tokens and an image; 16 tokens and a 2-frame clip; 8 tokens and an
  image) in one update over data 2 × tensor 2: their losses and gradients equal each
  dataset's alone, and the step's program holds one LM and one resampler, as with one
  dataset."""
  from flamingo_jax.train import partition, step as step_lib
  config = small_config(data=2)
  del config.data["synthetic"]
  clip = dict(source="random", batch_size=4, weight=0.5, seq_len=16, max_images=1)
  config.data.image = dict(clip, batch_size=8, weight=1.0)
  config.data.clip = dict(clip, num_frames=2)
  config.data.short = dict(clip, seq_len=8, weight=0.3)
  program = build(config)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(np.float32),
                        nn.unbox(program.abstract_params))
  batches = {n: sources.build(n, config.data[n], seed=0, model_config=program.model.config).batch_at(0)
             for n in program.batch_shapes}
  batches = {n: {k: np.asarray(v) for k, v in b.items() if k in step_lib.BATCH_KEYS}
             for n, b in batches.items()}

  # Gradients of one random mixture of the losses (distinct weights: a dataset's wrong
  # gradient shows in it), not each loss's own: one backward each way, not six.
  weights = dict(zip(sorted(batches), (0.37, 1.13, 0.71)))

  def losses(trainable, frozen, batches):
    """Each dataset's loss, computed together, then alone."""
    with nn.logical_axis_rules(program.rules):
      run = lambda b: step_lib.summed_losses(program.model, partition.merge(trainable, frozen), b)
      return run(batches), {n: run({n: batches[n]})[n] for n in batches}

  def losses_and_grads(trainable, frozen, batches):
    out, pull = jax.vjp(lambda t: losses(t, frozen, batches), trainable)
    mix, zero = ({n: np.float32(w * k) for n, w in weights.items()} for k in (1, 0))
    return out, pull((mix, zero))[0], pull((zero, mix))[0]
  trainable, frozen = partition.split(params, tuple(config.trainable))
  with jax.set_mesh(program.mesh):
    (together, alone), grads_together, grads_alone = jax.jit(losses_and_grads)(trainable, frozen, batches)
  for n in batches:
    np.testing.assert_allclose(together[n], alone[n], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               grads_together, grads_alone)
  assert len({float(v) for v in together.values()}) == 3

  def loops(config):
    program = build(config)
    (group,) = program.groups
    return program.lower(group).as_text().count("stablehlo.while")
  one = small_config(data=2)
  del one.data["synthetic"]
  one.data.image = config.data.image
  # The loops of one dataset's step: one LM and one resampler, though clip's media hold 2
  # frames (longer keys): the resampler takes stills and clips in one call.
  assert loops(config) == loops(one)
