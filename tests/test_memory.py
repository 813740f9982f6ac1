"""Memory that matches the arithmetic, on 8 CPU devices (data 2 × fsdp 2 × tensor 2): the
compiled step's arguments are exactly the state, frozen-weight and batch shards a device
should hold, its temporaries are within 10% of the activations and gradients a device
holds, no activation is gathered over the batch, and the backward keeps no float32 copy
of the frozen (bf16) weights."""
import re

import jax
import jax.numpy as jnp
import pytest
from jax._src.ad_checkpoint import saved_residuals

from config_files import load_config
from flamingo_jax.train import partition, program as program_lib, step as step_lib


def config(**model):
  """configs/tiny.py with an LM whose frozen weights outweigh the rest (8 scanned groups)
  under float32 compute and bf16 frozen weights, remat off: where a cast copy would show."""
  c = load_config("tiny")
  c.model.lm.update(d_model=256, num_layers=8, mlp_dim=1024, vocab_size=2048, **model)
  c.model.xattn.every = 1
  c.mesh = dict(slice=1, data=2, fsdp=2, tensor=2)
  c.data.synthetic.batch_size = 8
  return c


@pytest.fixture(scope="module")
def compiled():
  program = program_lib.from_config(config())
  (group,) = program.groups
  return program, group, program.lower(group).compile()


def test_compiled_arguments_are_the_arithmetic(compiled):
  program, group, step = compiled
  m = step.memory_analysis()
  arithmetic = program.argument_bytes(group)
  assert m.argument_size_in_bytes == sum(arithmetic.values()), (m, arithmetic)
  assert m.alias_size_in_bytes == arithmetic["state"]  # the donated state is updated in place
  # The frozen weights arrive as bf16 shards: a quarter (fsdp × tensor) of the LM's, about.
  frozen = sum(x.size * 2 for x in jax.tree.leaves(program.abstract_frozen()))
  assert arithmetic["frozen"] < 0.4 * frozen


def test_compiled_step_gathers_no_batch(compiled):
  """Every activation stays split over the batch axes: no all-gather outputs the global
  batch's [B, T, ...] (the token embedding lookup did, while the table was split along
  `embed` over fsdp)."""
  program, _, step = compiled
  b, t = program.batch_shapes["synthetic"]["input_ids"].shape
  gathered = re.findall(r"= [a-z0-9]+\[([0-9,]*)\][^ ]* all-gather\(", step.as_text())
  assert gathered  # fsdp gathers the weights: the search sees all-gathers
  assert not [g for g in gathered if g.startswith(f"{b},{t},")], gathered


def loss_residuals(program, shards: int = 1) -> list:
  """jax's saved residuals of the loss (as a function of the trainable weights) over the
  first 1 / `shards` of the batch: [(aval, why)]."""
  frozen = program.abstract_frozen()
  trainable = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32),
                           program.abstract_state["params"])
  batch = {k: jax.ShapeDtypeStruct((v.shape[0] // shards,) + v.shape[1:], v.dtype)
           for k, v in program.batch_shapes["synthetic"].items() if k in step_lib.BATCH_KEYS}
  zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)
  return saved_residuals(
      lambda t: step_lib.summed_loss(program.model, partition.merge(t, zeros(frozen)), zeros(batch)),
      zeros(trainable))


def weight_shapes(tree) -> set:
  """The shapes of a tree's leaves, and of one scanned layer's slice of each."""
  shapes = {tuple(x.shape) for x in jax.tree.leaves(tree)}
  return shapes | {s[1:] for s in shapes}


@pytest.mark.parametrize("tied", [False, True])
def test_backward_keeps_no_float32_copy_of_frozen_weights(tied):
  """What autodiff saves for the backward (jax's saved residuals of the loss, as a function
  of the trainable weights): activations, and the frozen weights as stored, but no float32
  array of a frozen weight's shape (it had one per scanned LM weight: a float32 copy of
  the frozen LM)."""
  program = program_lib.from_config(config(tie_embeddings=tied))
  frozen_shapes = weight_shapes([x for x in jax.tree.leaves(program.abstract_frozen()["lm"]) if x.ndim >= 2])
  residuals = loss_residuals(program)
  copies = [(aval, why) for aval, why in residuals
            if aval.dtype == jnp.float32 and tuple(aval.shape) in frozen_shapes
            and not why.startswith("from the argument")]  # the trainable weights themselves
  assert not copies, copies
  # The check sees the frozen weights: they are saved, as stored (bf16).
  assert any(aval.dtype == jnp.bfloat16 and tuple(aval.shape) in frozen_shapes for aval, _ in residuals)


def test_compiled_temporaries_are_within_the_arithmetic():
  """The step's temporaries per device ≤ 1.1 × (a device's activations + its shard of the
  trainable weights three times over: the accumulated gradient, a micro-batch's, the
  optimizer's update). Activations: what autodiff saves for the backward over one batch
  shard's examples (jax's saved residuals, less the weights). Frozen weights in float32
  here: XLA:CPU upcasts bf16 weights before its dots (≈ 2 × their shards of temporaries,
  not in the program; TPU and GPU dots take them as stored), which would blur the bound."""
  c = config()
  c.frozen_dtype = "float32"
  program = program_lib.from_config(c)
  (group,) = program.groups
  temporaries = program.lower(group).compile().memory_analysis().temp_size_in_bytes
  residuals = loss_residuals(program, shards=4)  # data 2 × fsdp 2
  weights = weight_shapes(program.abstract_frozen())
  activations = sum(a.size * a.dtype.itemsize for a, why in residuals
                    if not why.startswith("from the argument") and tuple(a.shape) not in weights)
  arguments = program.argument_bytes(group)
  # The state is the trainable shard three times over (params + Adam's two moments).
  arithmetic = activations + arguments["state"]
  assert temporaries <= 1.1 * arithmetic, (temporaries, activations, arguments)
  # The margin is less than a gathered copy of the frozen LM weights a device holds.
  assert 0.1 * arithmetic < arguments["frozen"]
