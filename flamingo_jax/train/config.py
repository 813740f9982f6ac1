"""Training configuration: the paper's recipe as defaults, checked before anything compiles.

A config file (`configs/NAME.py`) starts from `defaults()`, sets `model`, `data` and
whatever else differs, and can be overridden on the command line:

  python train.py --config configs/tiny.py --workdir /tmp/run --config.total_steps=10
"""
import importlib.util
import os

import ml_collections

from flamingo_jax import sharding, trainable
from flamingo_jax.config import ConfigError, FlamingoConfig


def from_file(path: str, arg=None) -> ml_collections.ConfigDict:
  """A config file's `get_config(arg)`, loaded as train.py's `--config FILE.py:arg` does."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict()
  c.trainable = trainable.DEFAULT_TRAINABLE
  c.init = ""  # '' = random init from `seed`; else a directory written by flamingo_jax.convert
  c.frozen_dtype = "bfloat16"  # paper: frozen weights stored and applied in bf16
  c.seed = 0
  c.total_steps = 500_000
  c.log_every = 100
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.optimizer = dict(
      lr=1e-4, warmup_steps=5000, decay="constant",  # linear warm-up, then constant
      weight_decay=0.1, no_weight_decay=("resampler/.*",),  # paper: none on the resampler
      grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8)
  # Datasets of one update: name -> dict(source=..., batch_size=..., weight=λ, **source args).
  c.data = ml_collections.ConfigDict()
  c.accumulation = "all"  # paper: gradients of all datasets in every update; or 'round_robin'
  c.microbatches = 1  # split each dataset's batch to save memory; same gradient
  # Mesh axis sizes; -1 takes the remaining devices. `slice` spans multi-slice (DCN) pods.
  c.mesh = dict(slice=1, data=-1, fsdp=1, tensor=1)
  # 'params': optimizer state laid out like its parameter; 'zero1': also split over the
  # batch axes (ZeRO stage 1, as the paper's 80B), the weights keeping their own layout.
  c.optimizer_sharding = "params"
  c.sharding_rules = ()  # (logical name, mesh axes) pairs that override sharding.DEFAULT_RULES
  # Multi-host: jax.distributed.initialize(). Empty fields are auto-detected (TPU pods,
  # SLURM, ...); set them for a hand-made cluster (e.g. several CPU processes).
  c.distributed = dict(enabled=False, coordinator_address="", num_processes=0, process_id=-1)
  c.max_nonfinite_in_row = 20
  # Steps of input (read, collated, on the mesh) made ahead of the loop in a background
  # thread, each holding its batches on the devices (train_compile.py's `batch` bytes a
  # step, one more while the thread makes the next); 0: made in the loop, before the step.
  c.prefetch_steps = 2
  c.peak_flops_per_device = 0.0  # 0 = from the device kind (measured on CPU)
  # True: every layer stack (vision, resampler, LM) unrolled in the compiled step, the
  # weights still stacked: a larger program and a longer compile, and no scan residual
  # buffers to fill and copy (on XLA:CPU the small benchmark's step ~6% faster, README).
  c.unroll_layers = False
  c.eval = ml_collections.ConfigDict(dict(kind=""))  # '' = none; 'synthetic_fewshot'
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """big_vision's config argument, `--config configs/NAME.py:key=value,key=value`: the
  `defaults` with the given keys replaced, each read as its default's type (a bare `key`
  is key=True). An unknown key or a bad value is a ConfigError naming it."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = (s.strip() for s in item.partition("="))
    if key not in defaults:
      raise ConfigError(f"config argument {key!r}: unknown; known: {', '.join(defaults)} "
                        "(--config FILE.py:key=value,key=value)")
    kind = type(defaults[key])
    try:
      if kind is bool:
        out[key] = {"true": True, "1": True, "false": False, "0": False}[(value or "true").lower()]
      elif not sep:
        raise ValueError
      else:
        out[key] = kind(value)
    except (KeyError, ValueError):
      raise ConfigError(f"config argument {key}={value!r}: not a {kind.__name__}") from None
  return ml_collections.ConfigDict(out)


def check(config) -> FlamingoConfig:
  """Validates the whole config; returns the model config. Every error names its field."""
  def require(cond, field, message):
    if not cond:
      raise ConfigError(f"{field}: {message}")

  model = FlamingoConfig.from_dict(config.model)
  trainable.compile_patterns(tuple(config.trainable))
  for name in ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "microbatches",
               "max_nonfinite_in_row"):
    require(int(config[name]) > 0, name, f"must be a positive integer, got {config[name]!r}")
  require(int(config.prefetch_steps) >= 0, "prefetch_steps",
          f"must be an integer >= 0, got {config.prefetch_steps!r}")
  opt = config.optimizer
  require(opt.lr > 0, "optimizer.lr", f"must be > 0, got {opt.lr}")
  require(opt.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
  require(opt.decay in ("constant", "cosine"), "optimizer.decay", "choose 'constant' or 'cosine'")
  require(opt.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
  require(config.accumulation in ("all", "round_robin"), "accumulation",
          f"{config.accumulation!r}: choose 'all' or 'round_robin'")
  require(config.optimizer_sharding in ("params", "zero1"), "optimizer_sharding",
          f"{config.optimizer_sharding!r}: choose 'params' or 'zero1'")
  require(config.frozen_dtype in ("float32", "bfloat16", "float16"), "frozen_dtype",
          f"{config.frozen_dtype!r}: choose float32, bfloat16 or float16")
  require(len(config.data) > 0, "data", "no dataset; add e.g. config.data.NAME = dict(source=..., "
          "batch_size=..., weight=...)")
  for name, d in config.data.items():
    require("source" in d, f"data.{name}.source", "missing (e.g. 'synthetic')")
    require(int(d.get("batch_size", 0)) > 0, f"data.{name}.batch_size", "must be a positive integer")
    require(float(d.get("weight", 1.0)) > 0, f"data.{name}.weight", "must be > 0")
    require(int(d.batch_size) % config.microbatches == 0, f"data.{name}.batch_size",
            f"{d.batch_size} is not divisible by microbatches={config.microbatches}")
  mesh = dict(config.mesh)
  require(set(mesh) == {"slice", "data", "fsdp", "tensor"}, "mesh",
          f"needs exactly the axes slice, data, fsdp, tensor; got {sorted(mesh)}")
  require(sum(v == -1 for v in mesh.values()) <= 1, "mesh", "at most one axis may be -1")
  require(all(v == -1 or v > 0 for v in mesh.values()), "mesh", "sizes must be positive or -1")
  return model


def check_against_mesh(config, mesh) -> None:
  """Checks that need the device count: every batch, and each of its micro-batches, splits
  evenly over the batch axes (else XLA reshards each micro-batch, images included)."""
  shards = sharding.batch_shards(mesh)
  n = int(config.microbatches)
  for name, d in config.data.items():
    if int(d.batch_size) % shards:
      raise ConfigError(
          f"data.{name}.batch_size: {d.batch_size} does not split over the {shards} batch "
          f"shards of the mesh (slice × data × fsdp = {dict(mesh.shape)}); use a multiple of "
          f"{shards} or change config.mesh")
    if int(d.batch_size) % (shards * n):
      raise ConfigError(
          f"data.{name}.batch_size: micro-batches of {d.batch_size} / microbatches={n} = "
          f"{int(d.batch_size) / n:g} examples do not split over the {shards} batch shards of the "
          f"mesh ({dict(mesh.shape)}); use a batch_size that is a multiple of {shards * n}, or "
          f"microbatches dividing {int(d.batch_size) // shards}")


# Run-time choices a training config may set differently from the weights it starts from.
_RUN_TIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "trainable_token_ids",
                    "lm.max_seq_len", "lm.attention_impl", "vision_chunk")


def check_against_init(model_config: FlamingoConfig, init_config: FlamingoConfig, init: str):
  """`config.init`'s converted model must be the model the config describes: a different
  placement, activation or token id would load silently whenever the shapes agree."""
  import flax.traverse_util as tu
  ours = tu.flatten_dict(model_config.to_dict(), sep=".")
  theirs = tu.flatten_dict(init_config.to_dict(), sep=".")
  diff = [f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in sorted({**ours, **theirs})
          if k not in _RUN_TIME_FIELDS and ours.get(k) != theirs.get(k)]
  if diff:
    raise ConfigError(f"init: {init} holds another model ({'; '.join(diff)}); set config.model "
                      f"to the model of its config.json")
